"""Data parallelism across pipeline replicas: ``world = dp x pp`` on a 2-D device mesh.

Rank layout: the pipeline dimension is the inner one, so global rank ``r`` holds stage
``r % pp`` of replica ``r // pp`` and every pipeline is a block of consecutive ranks (under
``torchrun --nnodes`` a pipeline, whose point-to-point traffic is the heavy part, stays
inside a node as long as a node holds a multiple of ``pp`` processes). The mesh comes from
:func:`torch.distributed.device_mesh.init_device_mesh` with dimensions ``("dp", "pp")``;
its ``"dp"`` group of a rank holds the same stage in every replica.

Gradients are averaged by :class:`Replicas`, a bucketed all-reduce over that group (not
``DistributedDataParallel``): the average must carry each replica's verdict on the step
(a replica that skips a non-finite step tells the others in the same collective, so no
all-reduce ever waits for a replica that skipped), the synthesizers and the stage share
one mechanism, and the stage module stays unwrapped (its ``state_dict`` keeps the
original names).

A checkpoint is dp-neutral: :func:`merge_cache_states` turns the replicas' target caches
(activations waiting for their synthesizer target) into one cache of the global batch,
and :func:`split_cache_state` gives each replica of another ``dp`` its share. The
synthesizers' replay buffers (the last targets they revisit) are merged and split the
same way (:func:`merge_replay_states`, :func:`split_replay_state`).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parameter import UninitializedParameter

__all__ = ["Layout", "layout", "Replicas", "merge_cache_states", "split_cache_state", "merge_replay_states",
           "split_replay_state", "mean_over_replicas"]

BUCKET_BYTES = 25 * 2**20  # per all-reduce, as DistributedDataParallel's default bucket_cap_mb


class Layout:
    """Where global rank ``rank`` sits in a job of ``dp`` pipelines of ``pp`` stages.

    Attributes:
        dp, pp: the data- and pipeline-parallel degrees (``world = dp * pp``).
        rank: the global rank; ``dp_rank = rank // pp`` (its replica), ``pp_rank = rank % pp`` (its stage).
    """

    def __init__(self, dp: int, pp: int, rank: int):
        self.dp, self.pp, self.rank = dp, pp, rank
        self.dp_rank, self.pp_rank = divmod(rank, pp)

    def describe(self, rank: int) -> str:
        """``"rank 3 (dp 1, pp 1)"``: a global rank and its mesh coordinates, for messages."""
        if self.dp == 1:
            return f"rank {rank}"
        return f"rank {rank} (dp {rank // self.pp}, pp {rank % self.pp})"

    def ranks_of_replica(self, dp_rank: int) -> list[int]:
        """The global ranks of pipeline ``dp_rank``, stage by stage."""
        return list(range(dp_rank * self.pp, (dp_rank + 1) * self.pp))


def layout(world: int, n_stages: int, dp: int | None, rank: int) -> Layout:
    """The :class:`Layout` of ``rank`` in a job of ``world`` processes and ``n_stages`` stages.

    Raises:
        ValueError: ``world`` is not a multiple of ``n_stages``, or not ``dp * n_stages``
            when ``dp`` is given (the message gives the numbers).
    """
    if dp is not None and (isinstance(dp, bool) or not isinstance(dp, int) or dp < 1):
        raise ValueError(f"dp must be a whole number >= 1, got {dp!r}")
    if world % n_stages != 0:
        raise ValueError(f"the job has {world} processes but the model has {n_stages} stages; the processes must "
                         f"be a multiple of the stages (dp x pp): launch {n_stages}, {2 * n_stages}, ... processes "
                         f"(--nproc {n_stages}) or split into a divisor of {world} stages")
    if dp is not None and dp * n_stages != world:
        raise ValueError(f"dp={dp} pipelines of {n_stages} stages need {dp * n_stages} processes, but the job has "
                         f"{world}; pass dp={world // n_stages} or leave dp out")
    return Layout(world // n_stages, n_stages, rank)


def _buckets(tensors: Sequence[torch.Tensor], cap: int = BUCKET_BYTES) -> list[list[int]]:
    """Indices of ``tensors`` grouped by dtype and device, each group cut at ``cap`` bytes."""
    groups: dict[tuple[torch.dtype, torch.device], list[list[int]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if key not in groups or sizes[key] + nbytes > cap:
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(i)
        sizes[key] += nbytes
    return [b for bs in groups.values() for b in bs if b]


class Replicas:
    """One stage's data-parallel group: the same stage in every pipeline.

    Args:
        group: the process group (the device mesh's ``"dp"`` group of this rank).
        size: ``dp``; index: this replica's place in the group (its ``dp`` coordinate).
        src: the global rank of replica 0 of this stage (it broadcasts the initial weights).
        device: where the small control tensors live (a CUDA device for NCCL, else CPU).
    """

    def __init__(self, group: Any, size: int, index: int, src: int, device: torch.device):
        self.group, self.size, self.index, self.src, self.device = group, size, index, src, device

    # -- weights -------------------------------------------------------------------------
    @torch.no_grad()
    def broadcast(self, module: nn.Module) -> None:
        """Give ``module`` replica 0's parameters and buffers (in place: optimizers keep theirs)."""
        tensors = [t for t in (*module.parameters(), *module.buffers()) if not isinstance(t, UninitializedParameter)
                   and not isinstance(t, torch.nn.parameter.UninitializedBuffer)]
        for bucket in _buckets(tensors):
            part = [tensors[i].data for i in bucket]
            flat = _flatten_dense_tensors(part)
            dist.broadcast(flat, src=self.src, group=self.group)
            for t, new in zip(part, _unflatten_dense_tensors(flat, part), strict=False):
                t.copy_(new)

    def replicate(self, module: nn.Module, optimizer: torch.optim.Optimizer | None, fresh: bool) -> None:
        """Keep ``module`` (a synthesizer, an auxiliary head) the same on every replica.

        A ``fresh`` module (built now, from this replica's random state) takes replica 0's
        weights; one about to be loaded from a checkpoint does not need to. Either way its
        optimizer averages the gradients over the replicas before every step (a step
        pre-hook), as the stage's own update does.
        """
        if fresh:
            self.broadcast(module)
        if optimizer is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            def average(*_: Any) -> None:
                self.average_gradients(params)
            optimizer.register_step_pre_hook(average)

    # -- gradients -----------------------------------------------------------------------
    @torch.no_grad()
    def average_gradients(self, params: Iterable[nn.Parameter], ok: bool = True) -> bool:
        """Average ``params``' gradients over the replicas, with each replica's verdict.

        Every replica calls this at the same step. ``ok=False`` means this replica skips
        the step (a non-finite loss or gradient): it still takes part, with zeros, and the
        call returns ``False`` on every replica, which then all skip it. A parameter
        without a gradient on every replica keeps ``grad=None`` (an optimizer then leaves
        it alone, as it would in one process).

        Returns:
            True if every replica's step is fine (the gradients are the average now).
        """
        params = [p for p in params if p.requires_grad]
        flags = torch.tensor([float(ok)] + [float(ok and p.grad is not None) for p in params],
                             dtype=torch.float32, device=self.device)
        grads = [p.grad if ok and p.grad is not None else torch.zeros_like(p) for p in params]
        tensors = [flags, *grads]
        for bucket in _buckets(tensors):
            part = [tensors[i] for i in bucket]
            flat = _flatten_dense_tensors(part)
            dist.all_reduce(flat, group=self.group)
            for i, new in zip(bucket, _unflatten_dense_tensors(flat, part), strict=False):
                tensors[i] = new
        counts = tensors[0].tolist()
        if counts[0] < self.size:
            return False
        for p, g, n in zip(params, tensors[1:], counts[1:], strict=False):
            p.grad = g.div_(self.size) if n > 0 else None
        return True

    # -- agreement -----------------------------------------------------------------------
    def minimum(self, value: int) -> int:
        """The smallest ``value`` over the replicas (how many ready targets all of them have)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def agree(self, every: bool, some: bool) -> tuple[bool, bool]:
        """``(every replica's every, some replica's some)``: one small all-reduce."""
        t = torch.tensor([float(not every), float(some)], dtype=torch.float32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t[0].item() == 0.0, t[1].item() > 0.0

    def gather_object(self, value: Any) -> list[Any] | None:
        """Every replica's ``value`` on replica 0 (in replica order); ``None`` on the others."""
        out: list[Any] | None = [None] * self.size if self.index == 0 else None
        dist.gather_object(value, out, dst=self.src, group=self.group)
        return out


# -- dp-neutral checkpoints ---------------------------------------------------------------

def _is_entry_list(state: Any) -> bool:
    return isinstance(state, list) and all(isinstance(e, dict) and {"step", "h", "y", "target"} <= e.keys()
                                           for e in state)


def _cat(parts: Sequence[Any]) -> Any:
    if all(torch.is_tensor(p) and p.dim() > 0 for p in parts):
        return torch.cat([p.to(parts[0].device) for p in parts])
    return parts[0]


def merge_cache_states(states: Sequence[Any]) -> Any:
    """One gradient source state for the global batch, from the replicas' (replica order).

    A target cache (a list of entries: ``step``, boundary ``h``, labels ``y``, ``target``,
    ``skipped``; every tensor batch-first) is merged entry by entry: ``h`` and ``y`` are
    concatenated, and each target (the gradient of the replica's batch-mean loss) is
    rescaled to the global batch mean. Any other state is taken from replica 0 (a source
    whose state is not a target cache must keep it the same on every replica).

    Raises:
        ValueError: the replicas' caches hold different steps.
    """
    if len(states) == 1 or not all(_is_entry_list(s) for s in states):
        return states[0]
    steps = [[e["step"] for e in s] for s in states]
    if any(s != steps[0] for s in steps):
        raise ValueError(f"the replicas' target caches hold different steps ({steps}); they cannot be merged")
    merged = []
    for entries in zip(*states, strict=False):
        first = entries[0]
        batches = [next((t.shape[0] for t in e["h"] if torch.is_tensor(t) and t.dim() > 0), 1) for e in entries]
        total = sum(batches)
        target = None
        if first["target"] is not None and not first["skipped"]:
            target = tuple(None if parts[0] is None else
                           torch.cat([t * (b / total) for t, b in zip(parts, batches, strict=False)])
                           for parts in zip(*(e["target"] for e in entries), strict=False))
        h = tuple(_cat(parts) for parts in zip(*(e["h"] for e in entries), strict=False))
        merged.append({"step": first["step"], "h": h, "y": _cat([e["y"] for e in entries]), "target": target,
                       "skipped": first["skipped"]})
    return merged


def split_cache_state(state: Any, size: int, index: int) -> Any:
    """Replica ``index`` of ``size``'s share of a global-batch source state (inverse of
    :func:`merge_cache_states`: equal contiguous chunks of each entry's batch).

    Raises:
        ValueError: an entry's batch does not divide into ``size`` equal chunks.
    """
    if size == 1 or not _is_entry_list(state):
        return state
    out = []
    for e in state:
        batch = next((t.shape[0] for t in e["h"] if torch.is_tensor(t) and t.dim() > 0), None)
        if batch is None or batch % size:
            raise ValueError(f"the checkpoint's target cache holds step {e['step']} with a batch of {batch}, "
                             f"which does not split into {size} equal shares (one per pipeline); resume with a dp "
                             f"that divides {batch}")
        n = batch // size
        lo, hi = index * n, (index + 1) * n

        def part(t: Any, lo: int = lo, hi: int = hi, batch: int = batch) -> Any:
            return t[lo:hi] if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == batch else t
        target = None
        if e["target"] is not None:
            target = tuple(None if t is None else part(t) * size for t in e["target"])
        out.append({"step": e["step"], "h": tuple(part(t) for t in e["h"]), "y": part(e["y"]),
                    "target": target, "skipped": e["skipped"]})
    return out


def _replay_entries(replay: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"step": i, "h": r["h"], "y": r["y"], "target": r["target"], "skipped": False}
            for i, r in enumerate(replay)]


def _replay_of(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"h": e["h"], "y": e["y"], "target": e["target"]} for e in entries]


def merge_replay_states(states: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One synthesizer replay buffer for the global batch from the replicas' (replica order):
    each kept ``{"h", "y", "target"}`` merged as :func:`merge_cache_states` merges an entry.

    Raises:
        ValueError: the replicas keep different numbers of targets.
    """
    if len({len(s) for s in states}) > 1:
        raise ValueError(f"the replicas' synthesizers keep {[len(s) for s in states]} replayed targets; "
                         f"they cannot be merged")
    return _replay_of(merge_cache_states([_replay_entries(s) for s in states]))


def split_replay_state(state: list[dict[str, Any]], size: int, index: int) -> list[dict[str, Any]]:
    """Replica ``index`` of ``size``'s share of a global-batch replay buffer (inverse of
    :func:`merge_replay_states`).

    Raises:
        ValueError: a kept batch does not divide into ``size`` equal chunks.
    """
    return _replay_of(split_cache_state(_replay_entries(state), size, index))


def mean_over_replicas(logs: Sequence[dict[int, dict[str, Any]]], pp: int) -> list[dict[int, dict[str, Any]]]:
    """One step log per stage from every rank's (rank order): losses averaged over the
    replicas (the global batch's mean loss when the replicas' batches are equal), other
    values (time, epoch) from replica 0."""
    out = []
    for stage in range(pp):
        replicas = list(logs[stage::pp])
        merged: dict[int, dict[str, Any]] = {}
        for step, values in replicas[0].items():
            row = dict(values)
            for key, _value in values.items():
                if key == "loss" or key.startswith("synth_loss/"):
                    seen = [r[step][key] for r in replicas if step in r and key in r[step]]
                    row[key] = sum(seen) / len(seen)
            merged[step] = row
        out.append(merged)
    return out
