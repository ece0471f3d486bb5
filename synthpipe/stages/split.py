"""Cutting a model into pipeline stages.

:func:`split` returns one ``nn.Module`` per stage. Stage ``i`` is called as
``stage(*boundary)`` where ``boundary`` is what stage ``i - 1`` returned, as a tuple (a
single tensor is a 1-tuple; see :func:`as_tuple`), and stage 0 takes the model's own
positional inputs (or, traced from a dict of keyword inputs, that dict). :func:`compose`
runs the stages in that convention, so for a model without randomness
``compose(split(model, ...), x)`` equals ``model(x)``.

Stages never copy anything: they hold the model's own submodules, so parameters *and*
buffers are the original tensors (``stage_param is model_param``), an optimizer over a
stage's parameters trains the model, BatchNorm running statistics update in the model,
and every ``stage.state_dict()`` key is the key the model uses for the same tensor.

Two ways to split:

* ``nn.Sequential`` (torchgpipe style): a *balance* ``[n_0, n_1, ...]`` gives each stage
  that many consecutive children. Either pass ``balance`` or ``n_stages`` and let
  :mod:`synthpipe.stages.balance` choose it (``by="params"`` or ``by="time"``). Each
  stage is a :class:`StageSequential` keyed by the original child names.
* Any other module: name the submodules where stages begin (``points``) and give an
  ``example_input``; the model is traced with ``torch.export`` through
  ``torch.distributed.pipelining.pipeline`` (tracing only: no process group is used).
  Each stage is a ``torch.fx.GraphModule``. See :func:`split` for what tracing freezes.
"""
from __future__ import annotations

import itertools
import operator
from collections import OrderedDict
from typing import Any, Sequence

import torch.nn as nn

from .balance import balance_by_params, balance_by_time, sequential_children
from .boundary import as_tuple
from .trace import original_name as original_name  # re-exported: engine.checkpoint imports it from here
from .trace import split_traced

__all__ = ["split", "compose", "as_tuple", "StageSequential"]

_BY = ("params", "time")


def compose(stages: Sequence[nn.Module], *inputs: Any) -> Any:
    """Run ``stages`` in order with the boundary convention ``out = stage(*as_tuple(out))``.

    ``inputs`` are the model's positional inputs. Returns the last stage's output, with a
    1-tuple unwrapped to its single element.
    """
    out: Any = inputs
    for stage in stages:
        out = stage(*as_tuple(out))
    if isinstance(out, tuple) and len(out) == 1:
        return out[0]
    return out


class StageSequential(nn.Sequential):
    """Consecutive children of an ``nn.Sequential``, under their original names.

    Built from an ``OrderedDict`` of the original child names and child objects, so
    ``state_dict()`` keys equal the original model's (stage 1 of a 6-child model split
    ``[3, 3]`` has keys ``"3.weight"``, ...) and the parameters are the original ones.

    ``forward(*inputs)``: the engine calls every stage as ``stage(*boundary)``. One input
    is passed on as is; several are passed to the first child as *one* tuple, exactly as
    the original ``nn.Sequential`` handed the previous child's tuple output to it.
    """

    def forward(self, *inputs: Any) -> Any:
        if not inputs:
            raise TypeError("StageSequential needs at least one input")
        x = inputs[0] if len(inputs) == 1 else tuple(inputs)
        for child in self:
            x = child(x)
        return x


def split(model: nn.Module, n_stages: int | None = None, balance: Sequence[int] | None = None,
          by: str = "params", points: Sequence[str] | None = None,
          example_input: Any = None) -> list[nn.Module]:
    """Split ``model`` into pipeline stages that share its submodules.

    Args:
        model: an ``nn.Sequential`` (split by children) or any module (split by tracing).
        n_stages: number of stages; for a Sequential, the balance is then chosen ``by``
            parameter count or measured time, between whole layers (a layer with the
            norm, activation and dropout right after it) where there are enough.
        balance: children per stage for a Sequential, e.g. ``[2, 3, 1]``; positive and
            summing to ``len(model)``. Give exactly one of ``n_stages`` and ``balance``
            (or ``points``).
        by: ``"params"`` or ``"time"`` (needs ``example_input``); used with ``n_stages``.
        points: qualified names of the submodules where stages 1, 2, ... begin, e.g.
            ``["layer2", "fc"]`` gives 3 stages. Required for a non-Sequential model; for
            a Sequential they must be child names and are turned into a balance.
        example_input: the model's input (a tensor, or a tuple of positional inputs for a
            traced model, or a dict of keyword inputs such as a Hugging Face model's
            ``input_ids`` and ``attention_mask``); needed for tracing and for ``by="time"``.
            With a dict, the first traced stage takes one dict with the same keys and
            shapes (batches ``(dict_of_inputs, target)``), and refuses others by name.

    Returns:
        The stages, in order; ``compose(stages, *inputs)`` computes ``model(*inputs)``.
        A boundary carries a tensor or a tuple of tensors: a traced stage that hands on
        several values (e.g. a skip connection over a split point) returns a tuple, and
        values needed two or more stages later are passed through the stages between, so
        stage ``i + 1`` always takes exactly what stage ``i`` returns.

    Tracing (non-Sequential models): ``torch.export`` turns every submodule into a graph
    recorded in the train/eval mode the model had when traced, so a traced BatchNorm
    keeps using batch statistics after ``.eval()``. To undo that, every childless
    original module (Linear, Conv, BatchNorm, Dropout, activations, ...) that the graph
    calls with a single tensor, and whose ``forward`` takes a single argument, is put
    back into the stage as the original object; its train/eval behaviour and in-place
    buffer updates are then the model's. What cannot be put back stays frozen to the
    tracing mode (with a warning where that matters): a leaf called with several or
    constant arguments, a module called more than once with buffers, and functional
    code such as ``F.dropout(x, self.training)`` in a ``forward`` that has children.
    Tracing also needs ``example_input`` shapes representative of training (export
    specialises on them) and a model that ``torch.export`` can capture. A Hugging Face
    model is traced with its ``config.use_cache`` off (a key-value cache cannot cross a
    boundary) and the setting is restored; a cache returned anyway is refused, naming
    ``use_cache=False``.

    Raises:
        ValueError: inconsistent or missing arguments; the message names the numbers.
    """
    if by not in _BY:
        raise ValueError(f"unknown by={by!r}; expected one of {list(_BY)}")
    if isinstance(points, str):
        raise ValueError(f"points must be a list of submodule names, got the string {points!r}; "
                         f"write points=[{points!r}]")
    if isinstance(model, nn.Sequential) and _is_plain_sequential(model):
        return _split_sequential(model, n_stages, balance, by, points, example_input)
    if balance is not None:
        raise ValueError(f"balance={list(balance)} only applies to nn.Sequential; "
                         f"{type(model).__name__} is split at named points (points=[...])")
    if points is None:
        raise ValueError(f"points are required to split a {type(model).__name__} (not an "
                         f"nn.Sequential): name the submodules where stages 1.. begin, e.g. "
                         f"points={[name for name, _ in model.named_children()][1:3]}")
    points = list(points)
    if n_stages is not None and n_stages != len(points) + 1:
        raise ValueError(f"n_stages={n_stages} does not match {len(points)} points "
                         f"({len(points) + 1} stages)")
    return split_traced(model, points, example_input)


# -- nn.Sequential -------------------------------------------------------------------


def _is_plain_sequential(model: nn.Module) -> bool:
    # A Sequential subclass with its own forward may not chain its children; trace it.
    return isinstance(model, nn.Sequential) and (
        type(model).forward is nn.Sequential.forward or isinstance(model, StageSequential))


def _split_sequential(model: nn.Sequential, n_stages: int | None, balance: Sequence[int] | None,
                      by: str, points: Sequence[str] | None, example_input: Any) -> list[nn.Module]:
    children = sequential_children(model)
    names = [name for name, _ in children]
    n = len(names)
    if n == 0:
        raise ValueError("cannot split an empty nn.Sequential (0 children)")

    if points is not None:
        if balance is not None:
            raise ValueError("give either balance or points, not both")
        balance = _points_to_balance(names, list(points))
        if n_stages is not None and n_stages != len(balance):
            raise ValueError(f"n_stages={n_stages} does not match {len(points)} points "
                             f"({len(balance)} stages)")
    elif (n_stages is None) == (balance is None):
        raise ValueError(f"give exactly one of n_stages and balance for an nn.Sequential "
                         f"(got n_stages={n_stages}, balance={balance})")
    elif n_stages is not None:
        if n_stages < 1:
            raise ValueError(f"n_stages must be at least 1, got {n_stages}")
        if n_stages > n:
            raise ValueError(f"cannot split a model with {n} children into {n_stages} stages "
                             f"(more stages than children)")
        if by == "time":
            if example_input is None:
                raise ValueError('by="time" needs example_input to profile the children')
            balance = balance_by_time(model, n_stages, example_input)
        else:
            balance = balance_by_params(model, n_stages)

    balance = [_stage_size(balance, i, size) for i, size in enumerate(balance)]  # type: ignore[arg-type]
    if sum(balance) != n:
        raise ValueError(f"balance {balance} sums to {sum(balance)} but the model has "
                         f"{n} children")

    blocks = []
    start = 0
    for size in balance:
        blocks.append(children[start:start + size])
        start += size
    _check_no_state_shared_across(blocks)
    stages: list[nn.Module] = []
    for block in blocks:
        # Original names and objects: state_dict keys and parameters stay the model's.
        stage = StageSequential(OrderedDict(block))
        # Only the container's flag: train(mode) would recurse into the model's children.
        stage.training = model.training
        stages.append(stage)
    return stages


def _stage_size(balance: Sequence[Any], i: int, size: Any) -> int:
    """``balance[i]`` as a positive int (numpy integers are fine, floats and bools are not)."""
    try:
        value = operator.index(size) if not isinstance(size, bool) else None
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"balance {list(balance)} has entry {i} = {size!r}; every stage needs "
                         f"a positive whole number of children")
    return value


def _check_no_state_shared_across(blocks: list[list[tuple[str, nn.Module]]]) -> None:
    """A parameter or buffer in two stages would become two tensors, one per process."""
    owner: dict[int, tuple[int, str]] = {}
    for stage, block in enumerate(blocks):
        for child_name, child in block:
            for name, t in [*child.named_parameters(), *child.named_buffers()]:
                first = owner.setdefault(id(t), (stage, f"{child_name}.{name}"))
                if first[0] != stage:
                    raise ValueError(
                        f"'{first[1]}' (stage {first[0]}) and '{child_name}.{name}' (stage {stage}) are the "
                        f"same tensor: each stage trains its own copy in its own process, so the weight "
                        f"would stop being shared; put the children that share it in one stage "
                        f"(choose balance=[...]) or untie them")


def _points_to_balance(names: list[str], points: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    starts = []
    for p in points:
        if p not in index:
            raise ValueError(f"split point {p!r} is not a child of the nn.Sequential; "
                             f"children are {names[:12]}{' ...' if len(names) > 12 else ''}")
        starts.append(index[p])
    if starts != sorted(set(starts)) or (starts and starts[0] == 0):
        raise ValueError(f"split points {points} must be distinct children in order, not "
                         f"the first child {names[0]!r} (stage 0 would be empty)")
    bounds = [0] + starts + [len(names)]
    return [b - a for a, b in itertools.pairwise(bounds)]
