"""``gradients="backprop"``: wait for the true gradient of every step (exact, locked).

Naive model parallelism: stage r steps only once stage r + 1 has sent back the true
gradient of the same step, so the parameters after k steps equal single-process
backprop's. The transparency check of the transport and the split, and a baseline.
"""
from __future__ import annotations

from .base import GradientSource, register

__all__ = ["Backprop"]


@register("backprop")
class Backprop(GradientSource):
    """Every step waits for the true gradient; nothing else is kept."""

    sporadic_updates = True

    def waits(self, step: int) -> bool:
        return True
