"""Choosing a balance: how many consecutive children of an ``nn.Sequential`` each stage gets.

A *balance* is a list of positive block sizes summing to the number of children, e.g.
``[2, 3, 1]`` puts children 0-1 on stage 0, 2-4 on stage 1 and 5 on stage 2 (the same
convention as torchgpipe). Balancing is a contiguous partition of a per-child cost list
that minimises the most expensive stage, since the slowest stage sets the pipeline's pace.

Costs come either from parameter counts (:func:`balance_by_params`, free and
deterministic) or from profiling forward+backward time on an example input
(:func:`balance_by_time`, closer to what the pipeline actually waits for).

Both keep a layer together with the normalisation, activation and dropout layers right
after it (:func:`whole_layers`): a stage boundary then carries a block's output (after
its ReLU), never a Linear's output before its BatchNorm or activation. A gradient source
that models the boundary's gradient (a synthesizer, an auxiliary head) learns far
better there: the gradient of a pre-BatchNorm activation passes through the batch's
normalisation, which a linear synthesizer cannot follow. Where there are fewer whole
layers than stages, the children are balanced one by one.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Any, Sequence, cast

import torch
import torch.nn as nn

from .materialize import on_meta

__all__ = ["partition", "balance_by_params", "balance_by_time", "block_sums", "whole_layers", "param_costs"]


def _check_costs(costs: Sequence[float], n_parts: int) -> list[float]:
    costs = [float(c) for c in costs]
    if n_parts < 1:
        raise ValueError(f"n_parts must be at least 1, got {n_parts}")
    if n_parts > len(costs):
        raise ValueError(f"cannot partition {len(costs)} costs into {n_parts} non-empty parts "
                         f"(n_parts={n_parts} > {len(costs)})")
    for i, c in enumerate(costs):
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"cost {i} is {c}; costs must be finite and non-negative")
    return costs


def block_sums(costs: Sequence[float], balance: Sequence[int]) -> list[float]:
    """Sum of ``costs`` over each block of ``balance`` (``len(balance)`` numbers)."""
    sums, start = [], 0
    for size in balance:
        sums.append(float(sum(costs[start:start + size])))
        start += size
    return sums


def partition(costs: Sequence[float], n_parts: int) -> list[int]:
    """Contiguous partition of ``costs`` into ``n_parts`` non-empty blocks.

    Minimises the largest block sum exactly (dynamic programming, ``O(n^2 * n_parts)``;
    cost lists are one entry per layer, so short). Among the optimal partitions it picks
    the one with the smallest sum of squared block sums, i.e. the most even one, so that
    e.g. ``[1, 1, 1, 1]`` into 2 gives ``[2, 2]`` rather than ``[1, 3]``.

    Args:
        costs: ``n`` non-negative finite numbers, one per item.
        n_parts: number of blocks, ``1 <= n_parts <= n``.

    Returns:
        Block sizes (the balance): ``n_parts`` positive ints summing to ``n``.

    Raises:
        ValueError: ``n_parts`` out of range, or a negative / non-finite cost.
    """
    costs = _check_costs(costs, n_parts)
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def block(i: int, j: int) -> float:  # sum of costs[i:j]; one formula for both passes
        return prefix[j] - prefix[i]

    inf = math.inf
    # Pass 1: best[k][j] = smallest possible max block sum of costs[:j] in k blocks.
    best = [[inf] * (n + 1) for _ in range(n_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, n_parts + 1):
        for j in range(k, n - (n_parts - k) + 1):
            best[k][j] = min(max(best[k - 1][i], block(i, j)) for i in range(k - 1, j))
    limit = best[n_parts][n]

    # Pass 2: among partitions whose blocks all stay <= limit, minimise the sum of squares.
    # (A lexicographic (max, sumsq) key in one pass would not be exact: a prefix with a
    # worse sum of squares can still win once the last block dominates the max.)
    sq = [[inf] * (n + 1) for _ in range(n_parts + 1)]
    arg = [[-1] * (n + 1) for _ in range(n_parts + 1)]
    sq[0][0] = 0.0
    for k in range(1, n_parts + 1):
        for j in range(k, n - (n_parts - k) + 1):
            for i in range(k - 1, j):
                b = block(i, j)
                if b <= limit and sq[k - 1][i] + b * b < sq[k][j]:
                    sq[k][j] = sq[k - 1][i] + b * b
                    arg[k][j] = i

    sizes, j = [], n
    for k in range(n_parts, 0, -1):
        i = arg[k][j]
        sizes.append(j - i)
        j = i
    sizes.reverse()
    return sizes


def sequential_children(model: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """Every ``(name, child)`` of ``model`` in call order.

    Unlike ``named_children()``, a module object used twice (``act = nn.ReLU()`` placed at
    several positions, a block applied twice) is listed at each of its positions, as
    ``nn.Sequential.forward`` calls it and ``len(model)`` counts it.
    """
    return [(name, child) for name, child in model._modules.items() if child is not None]


def _follows_a_layer(child: nn.Module) -> bool:
    """Is ``child`` a normalisation, activation or dropout layer (which belongs to the layer before it)?"""
    if isinstance(child, nn.MultiheadAttention):  # (defined among the activations, but a layer)
        return False
    return (isinstance(child, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                               nn.modules.dropout._DropoutNd))
            or type(child).__module__ == "torch.nn.modules.activation"
            or getattr(nn, "RMSNorm", None) is not None and isinstance(child, nn.RMSNorm))


def whole_layers(children: Sequence[nn.Module]) -> list[int]:
    """``children`` grouped into whole layers: each group is a layer and the normalisation,
    activation and dropout layers right after it. Returns the group sizes (summing to
    ``len(children)``); e.g. Linear, BatchNorm1d, ReLU, Linear -> ``[3, 1]``."""
    sizes: list[int] = []
    for i, child in enumerate(children):
        if i == 0 or not _follows_a_layer(child):
            sizes.append(1)
        else:
            sizes[-1] += 1
    return sizes


def _partition_whole_layers(costs: Sequence[float], n_parts: int, children: Sequence[nn.Module]) -> list[int]:
    """:func:`partition` of ``costs`` that cuts between whole layers only, where there are enough."""
    groups = whole_layers(children)
    if len(groups) < n_parts:
        return partition(costs, n_parts)
    bounds = list(itertools.accumulate(groups, initial=0))
    group_costs = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
    counts = partition(group_costs, n_parts)
    ends = list(itertools.accumulate(counts))
    return [bounds[e] - bounds[e - c] for e, c in zip(ends, counts, strict=True)]


def param_costs(model: nn.Sequential) -> list[float]:
    """Each child's cost for :func:`balance_by_params`: ``1 +`` its parameter elements."""
    return [1 + sum(p.numel() for p in child.parameters()) for _, child in sequential_children(model)]


def balance_by_params(model: nn.Sequential, n_stages: int) -> list[int]:
    """Balance ``model``'s children by parameter count.

    The cost of a child is ``1 + (number of parameter elements in it, recursively)``; the
    ``+1`` keeps parameter-free children (ReLU, pooling, Flatten) from costing exactly
    nothing, so they are spread rather than all piled onto one stage. Buffers are not
    counted. Shared parameters are counted in every child that holds them. Stages are cut
    between whole layers (:func:`whole_layers`) where there are at least ``n_stages``.

    Returns:
        A balance: ``n_stages`` positive ints summing to ``len(model)``.
    """
    children = [child for _, child in sequential_children(model)]
    return _partition_whole_layers(param_costs(model), n_stages, children)


def _tensors(x: Any) -> list[torch.Tensor]:
    """All tensors in a (possibly nested tuple/list/dict) value."""
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _detach(x: Any, requires_grad: bool) -> Any:
    """``x`` with every tensor detached; floating ones made leaves that require grad."""
    if torch.is_tensor(x):
        x = x.detach()
        if requires_grad and (x.is_floating_point() or x.is_complex()):
            x.requires_grad_(True)
        return x
    if isinstance(x, tuple):
        return tuple(_detach(v, requires_grad) for v in x)
    if isinstance(x, list):
        return [_detach(v, requires_grad) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v, requires_grad) for k, v in x.items()}
    return x


def _synchronize(tensors: Sequence[torch.Tensor]) -> None:
    # Kernels are asynchronous on accelerators; wait so the clock measures the work.
    for device in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.synchronize(device)


def _time_child(child: nn.Module, x: Any) -> float:
    """Seconds for one forward+backward of ``child`` on a fresh leaf copy of ``x``."""
    x = _detach(x, requires_grad=True)
    inputs = [t for t in _tensors(x) if t.requires_grad]
    params = [p for p in child.parameters() if p.requires_grad]
    _synchronize(_tensors(x))
    start = time.perf_counter()
    y = child(x)
    outs = [t for t in _tensors(y) if t.requires_grad]
    if outs:
        loss = cast(torch.Tensor, sum(t.sum() for t in outs))  # (outs is not empty)
        # autograd.grad rather than backward(): nothing accumulates into .grad.
        torch.autograd.grad(loss, [*inputs, *params], allow_unused=True)
    _synchronize(_tensors(y))
    return time.perf_counter() - start


def balance_by_time(model: nn.Sequential, n_stages: int, example_input: Any,
                    repeats: int = 3) -> list[int]:
    """Balance ``model``'s children by measured forward+backward time.

    ``example_input`` is what ``model(example_input)`` takes (a tensor, or a tuple that
    the first child takes as one argument, as in ``nn.Sequential``). The output of child
    ``i`` is fed to child ``i + 1``. Each child is then timed on its own: forward and
    backward (``sum()`` of the output as the loss) on a detached input that requires
    grad, one warm-up run and then the median of ``repeats`` runs. Profiling runs in
    training mode, since that is what the pipeline will run.

    The model is left as it was: no optimizer step (parameters unchanged), gradients
    are taken with ``torch.autograd.grad`` so every ``.grad`` stays as it was (``None``
    on a fresh model), buffers such as BatchNorm running statistics are restored, each
    submodule's train/eval flag is restored, and the RNG state is restored. Stages are cut
    between whole layers (:func:`whole_layers`) where there are at least ``n_stages``.

    Returns:
        A balance: ``n_stages`` positive ints summing to ``len(model)``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    children = [child for _, child in sequential_children(model)]
    _check_costs([0.0] * len(children), n_stages)  # fail before spending time profiling
    if on_meta(model):
        raise ValueError("by='time' runs the model, but it was built on the meta device (no values to "
                         "compute with); balance it by='params' or give an explicit balance")

    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({torch.cuda.current_device() if t.device.index is None else t.device.index
                   for t in _tensors(example_input) + _state_tensors(model) if t.device.type == "cuda"})
    costs: list[float] = []
    try:
        with torch.random.fork_rng(devices=cuda):
            model.train()
            # Inputs to every child, from one plain forward pass.
            inputs, x = [], example_input
            with torch.no_grad():
                for child in children:
                    inputs.append(x)
                    x = child(x)
            for child, x in zip(children, inputs, strict=True):
                _time_child(child, x)  # warm-up: allocator, lazy init, caches
                costs.append(statistics.median(_time_child(child, x) for _ in range(repeats)))
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes:
            m.training = training
    return _partition_whole_layers(costs, n_stages, children)


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model`` (to find the devices it lives on)."""
    return list(model.parameters()) + list(model.buffers())
