"""Gradient sources, one module each; ``TrainConfig(gradients=name)`` picks one.

See :mod:`synthpipe.engine.sources.base` for the protocol. Importing this package
registers every source below.
"""
from . import backprop, corrected, delayed, interlocking, local, synthetic  # noqa: F401  (registers them)
from .base import SOURCES, GradientSource, make_source, register

__all__ = ["SOURCES", "GradientSource", "make_source", "register"]
