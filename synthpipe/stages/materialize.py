"""Stages built on the meta device: each rank allocates only the stage it runs.

A model too big for one device is also too big to build N times, once per process.
Build it on the meta device instead (shapes only, no memory), split it on every rank,
and each :class:`~synthpipe.stages.stage.Stage` allocates and initialises just its own
layers on its own device::

    with torch.device("meta"):
        model = build_model()
    stages = sp.split(model, n_stages=4)              # by="params" works on meta
    trainer = sp.Trainer(stages, loss_fn)              # rank r materialises stage r only

Initialisation: :func:`materialize` calls ``reset_parameters()`` (or PyTorch's private
``_reset_parameters()``, e.g. ``nn.MultiheadAttention``) of every submodule that has
one, which draws the same distributions as the module's constructor. Parameters and
buffers of a module with neither (a custom ``nn.Parameter``, a positional table made in
``__init__``) cannot be recreated that way: pass ``init(module)``, which is called after
the resets and may set anything. Without it, such tensors are an error that names them.
The values differ from a model built directly on the device (the random draws happen
in a different order), so a pipeline run from a meta-built model is not bit-identical
to a single-process run of a normally built one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

__all__ = ["InitFn", "on_meta", "materialize"]

InitFn = Callable[[nn.Module], None]


def on_meta(module: nn.Module) -> bool:
    """True if any parameter or buffer of ``module`` is on the meta device."""
    return any(t.is_meta for _, t in _named_tensors(module))


def materialize(module: nn.Module, device: torch.device, init: InitFn | None = None,
                name: str = "the module") -> nn.Module:
    """Allocate ``module``'s meta tensors on ``device`` and initialise them (in place).

    Args:
        module: a module whose parameters and buffers are (some or all) on meta.
        device: where to allocate them.
        init: called as ``init(module)`` after every submodule's ``reset_parameters``;
            required when some meta tensor belongs to a module without one.
        name: how errors refer to the module (e.g. ``"stage 1"``).

    Returns:
        ``module``, with no tensor left on meta.

    Raises:
        ValueError: a meta tensor that nothing would initialise (named), a module that
            mixes meta and allocated tensors, or ``init`` that left some tensor on meta.
    """
    real = [k for k, t in _named_tensors(module) if not t.is_meta]
    if real:  # to_empty would replace their values with garbage
        raise ValueError(f"{name} mixes meta and allocated tensors ({', '.join(real[:4])} are allocated): "
                         f"build all of it on the meta device, or none")
    if init is None:
        orphans = [f"{prefix + '.' if prefix else ''}{k} ({type(m).__name__})"
                   for prefix, m in module.named_modules() if _reset_fn(m) is None
                   for k, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
                   if t.is_meta]
        if orphans:
            raise ValueError(
                f"{name} was built on the meta device, but nothing would initialise "
                f"{', '.join(orphans[:4])}{' ...' if len(orphans) > 4 else ''}: its module has no "
                f"reset_parameters(); pass init=fn, where fn(module) sets them")
    module.to_empty(device=device)
    with torch.no_grad():
        for m in module.modules():
            reset = _reset_fn(m)
            if reset is not None:
                reset()
        if init is not None:
            init(module)
    left = [k for k, t in _named_tensors(module) if t.is_meta]
    if left:
        raise ValueError(f"{name}: {', '.join(left[:4])} still on the meta device after init")
    return module


def _reset_fn(m: nn.Module) -> Callable[[], None] | None:
    for attr in ("reset_parameters", "_reset_parameters"):
        fn = getattr(m, attr, None)
        if callable(fn):
            return fn
    return None


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())
