"""Forward unlocking (``synthetic_inputs=True``): the real-input pass both runners share.

With synthetic inputs, stage r > 0 updates on its input synthesizer's prediction
``I_r(x)`` (:class:`~synthpipe.stages.input_synth.InputSynthesizer`), so its update waits
for neither the forward nor the backward of the rest of the pipeline. The real chain
still runs: when stage r - 1's real output ``h_{r-1}`` arrives, stage r trains ``I_r``
on it and runs it through without updating (:func:`real_forward`). That real output is
stage r + 1's real input and ``M_r``'s regression input, and the gradient at the real
input is ``M_{r-1}``'s target. So every regression target, and the norm layers' running
statistics, come from the network that evaluation runs; only the updates use predicted
inputs.

How the data reaches stage r: the first rank of a pipeline, which reads the loader, sends
each batch ``(x, y)`` straight to every other rank of its pipeline, on a channel of its
own, before its forward. The data is the input of one stage (usually far smaller than
an activation), it needs no equal loaders on every rank, and it reaches every stage
one hop after it is read, without waiting for a forward. In one process it is at hand.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..stages.stage import Stage
from .config import TrainConfig
from .sources import GradientSource
from .sporadic import update_drawn

__all__ = ["real_forward", "input_seed", "meta_input"]


def input_seed(index: int) -> int:
    """The seed of stage ``index``'s input synthesizer initialisation.

    Derived from the seed the process was given (``torch.manual_seed``) and the stage, so
    a pipeline of processes, each building its own, starts from the very weights the
    single-process trainer builds.
    """
    return (torch.initial_seed() + 7919 * index) % (2 ** 63)


def meta_input(upstream: Sequence[nn.Module], x: tuple) -> tuple | None:
    """Stage r's input for the data ``x``, shapes and dtypes only: ``upstream`` (the modules
    of stages 0..r-1) run on the meta device, which computes nothing.

    A rank sizes its input synthesizer from it at its first step, instead of waiting for
    the first real input to arrive (N - 1 forwards later on the last rank). Returns
    ``None`` where a module cannot run on meta tensors (an operation without a meta
    kernel, a data-dependent shape): the first step then waits for the real input.
    """
    h: tuple = tuple(t.to("meta") if torch.is_tensor(t) else t for t in x)
    try:
        for module in upstream:
            state = {n: torch.empty_like(t, device="meta")
                     for n, t in itertools.chain(module.named_parameters(), module.named_buffers())}
            out = torch.func.functional_call(module, state, h)
            h = out if isinstance(out, tuple) else (out,)
    except Exception:  # (any failure only means: wait for the real input, as without this)
        return None
    return h


def real_forward(stage: Stage, source: GradientSource, config: TrainConfig, step: int, real: tuple,
                 y: torch.Tensor) -> tuple[tuple, tuple | None]:
    """Stage r on its real input ``real`` of ``step``, without updating.

    Returns ``(output, target)``: the detached real output (stage r + 1's real input) and
    the gradient at the real input, through ``M_r`` (or the loss, on the last stage): the
    target of ``M_{r-1}``, in place of the one taken at the predicted input. ``target`` is
    ``None`` where stage r's ``p_update`` draw skips the step (a skipped stage does no
    backward). The source's cached activation of ``step`` (``M_r``'s regression input) is
    replaced by the real output.
    """
    inputs, outputs = stage.forward(real)
    target: tuple | None = None
    if update_drawn(config.p_update, config.p_update_seed, stage.index, step):
        if stage.is_last:
            pairs = [(stage.loss(outputs, y), None)]
        else:
            pairs = [(o, g) for o, g in zip(outputs, stage.synthetic_gradient(outputs, y), strict=True)
                     if g is not None and torch.is_tensor(o) and o.requires_grad]
        leaves = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
        found: list[Any] = [None] * len(leaves)
        if pairs and leaves:
            found = list(torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                             allow_unused=True))
        got = iter(found)
        target = tuple(next(got) if torch.is_tensor(t) and t.requires_grad else None for t in inputs)
    out = tuple(o.detach() if torch.is_tensor(o) else o for o in outputs)
    cache = getattr(source, "cache", None)
    if not stage.is_last and cache is not None and cache.get(step) is not None:
        cache.add(step, out, y)  # (M_r regresses at the real output; its target is still to come)
    return out, target
