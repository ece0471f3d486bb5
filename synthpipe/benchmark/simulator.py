"""A discrete-event model of pipeline schedules, driven by measured per-stage times.

Each rank runs *operations* (a stage's forward or backward of one micro-batch, its
optimizer update, a synthesizer step, ...) one at a time; an operation starts when its
rank is free and every operation it depends on has finished, plus the one-way transfer
time where the dependency crosses ranks. Ranks pick their next operation either in a
fixed order (GPipe, 1F1B, synthpipe) or greedily by priority (zero bubble). Simulating a
few consecutive steps gives the steady-state step time, the bubble (idle share of the
ranks) and, against the single-device step, the speedup.

Schedules (:data:`SCHEDULES`):

* ``single`` — one device runs every stage's forward, backward and update in turn.
* ``backprop`` — naive model parallelism (synthpipe ``backprop`` mode): one batch,
  forward down the ranks, backward up, each rank updates right after its backward
  (after sending its input gradient, so the updates overlap the backwards upstream).
* ``gpipe`` — m micro-batches: all forwards, then all backwards, then the update (flush).
* ``1f1b`` — torch's Schedule1F1B order: ``min(m, p - r)`` warm-up forwards, then one
  backward / one forward alternately, then the remaining backwards; update at the flush.
* ``zb`` — zero bubble (ZB-H1 style): each backward is split into the input-gradient
  part B (on the critical path) and the weight-gradient part W, which fills idle time;
  greedy by priority B > F > W with at most ``p - r`` micro-batches in flight.
* ``dni`` — synthpipe with synthetic gradients: every rank runs forward, synthetic
  gradient + backward + update, and synthesizer training per batch without waiting for
  the backward pass; rank r only waits for the activations of its batch and, when
  ``max_inflight`` targets are outstanding, for the oldest target from rank r + 1.
* ``dni-inputs`` — synthpipe with synthetic gradients and synthetic inputs (forward
  unlocking). Rank 0 sends each batch's data to every rank (one transfer, ``data_transfer``
  seconds) before its own step, which is that of ``dni``. Rank r > 0 has two chains:

  - *predicted* ``P(r, k)``: forward on the predicted input ``I_r(x)``, synthetic gradient
    (the loss on the last rank), backward, update, the input synthesizer's prediction
    (a quarter of ``input_synth``) and ``M_r``'s prediction (half of ``synth``); then
    ``S(r, k)``, ``M_r``'s training (the other half), which, as in ``dni``, waits for the
    target of step ``k - max_inflight + 1`` from rank r + 1. ``P(r, k)`` waits for the data
    of step k (rank 0's send + ``data_transfer``) and for the real step ``R(r, k - lag - 1)``
    of this rank: at most ``lag`` batches (default ``max_inflight``; 0 models a fixed
    ``delay``) run on predicted inputs ahead of their real input.
  - *real* ``R(r, k)``: ``I_r``'s regression step (three quarters of ``input_synth``), the
    forward on the real input, ``M_r`` at the real output (half of ``synth``) and an
    input-only backward (``1 - weight_fraction`` of ``backward``), and every boundary
    message (``comm``). It waits for ``P(r, k)`` and for the real output of step k from
    rank r - 1 (``R(r - 1, k)``, or rank 0's forward) + ``transfer``; its target goes back
    to rank r - 1, its output on to rank r + 1. A rank runs an arrived real input before
    its next predicted step (priority on ties).

  Rank 0's send of step k's data waits, as the engine's bounded channels do, until every
  rank has taken the data of step ``k - max_inflight - 2``. ``first_real`` makes each
  rank's first predicted step wait for its first real input (the engine sizes ``I_r``
  from it).

Stragglers: ``slowdown(rank, step)`` multiplies the duration of every operation of that
rank in that step (:func:`unlock_table` uses it for a persistent or an intermittent slow
rank). Fill time: :func:`trace` returns every operation's start and finish, and
:func:`update_times` the times at which a rank finishes its updates.

Costs (:class:`StageCost`) are per step at the full batch; a micro-batched schedule
divides forward/backward/communication into m equal chunks. :func:`scaled_stages` spreads
a measured single-device profile over N balanced stages (keeping the per-boundary
synthesizer cost, per-message cost and transfer time) to predict 2..16 devices.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from collections import deque
from typing import Any, Callable, Iterable, Sequence

from .profiles import check_devices, check_microbatches

__all__ = ["SCHEDULES", "StageCost", "Prediction", "Transfer", "Event", "simulate", "trace", "update_times",
           "profile_transfer", "stage_cost", "model_chunk", "scaled_stages", "predict", "best_microbatches",
           "predict_table", "predict_run", "validate", "straggler", "rotating_straggler",
           "UNLOCK_METHODS", "unlock_table", "unlock_markdown"]

SCHEDULES = ("single", "backprop", "gpipe", "1f1b", "zb", "dni", "dni-inputs")


@dataclasses.dataclass
class StageCost:
    """One stage's time per step (seconds, full batch).

    Attributes:
        forward, backward, update: compute (backward includes input and weight gradients).
        synth: synthesizer prediction + training (DNI only; 0 on the last stage).
        comm: CPU time spent sending/receiving messages (not the transfer latency).
        other: per-step overhead outside those (Python glue), charged once per step.
        weight_fraction: share of ``backward`` that is the weight gradient (zero bubble;
            ``dni-inputs``: the real input's backward is the other share).
        input_synth: the input synthesizer's prediction + regression step per step
            (``dni-inputs`` only, ranks > 0).
    """

    forward: float = 0.0
    backward: float = 0.0
    update: float = 0.0
    synth: float = 0.0
    comm: float = 0.0
    other: float = 0.0
    weight_fraction: float = 0.5
    input_synth: float = 0.0

    @property
    def total(self) -> float:
        """Seconds per step of the schedules that update once per step (``input_synth`` excluded)."""
        return self.forward + self.backward + self.update + self.synth + self.comm + self.other


@dataclasses.dataclass
class Prediction:
    """What :func:`simulate` returns.

    Attributes:
        schedule, devices, microbatches: what was simulated.
        step_s: steady-state seconds per step (one global batch).
        bubble: idle share of all ranks' time in steady state, ``1 - busy / (devices x step)``.
        busy_s: each rank's busy seconds per step.
    """

    schedule: str
    devices: int
    microbatches: int
    step_s: float
    bubble: float
    busy_s: list[float]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Transfer:
    """One-way message time ``latency + bytes / bandwidth`` (seconds, bytes/s)."""

    latency: float = 0.0
    bandwidth: float = math.inf

    def __call__(self, nbytes: float) -> float:
        return self.latency + (nbytes / self.bandwidth if self.bandwidth not in (0.0, math.inf) else 0.0)

    @classmethod
    def fit(cls, points: Sequence[tuple[float, float]]) -> "Transfer":
        """Least-squares line through ``(bytes, seconds)`` points (non-negative terms)."""
        pts = [(float(b), float(t)) for b, t in points]
        if not pts:
            return cls()
        if len(pts) == 1:
            return cls(latency=pts[0][1])
        n = len(pts)
        mx = sum(b for b, _ in pts) / n
        my = sum(t for _, t in pts) / n
        var = sum((b - mx) ** 2 for b, _ in pts)
        slope = sum((b - mx) * (t - my) for b, t in pts) / var if var > 0 else 0.0
        slope = max(slope, 0.0)
        latency = max(my - slope * mx, 0.0)
        return cls(latency=latency, bandwidth=1.0 / slope if slope > 0 else math.inf)


# -- the event engine -------------------------------------------------------------------------
class _Op:
    __slots__ = ("key", "rank", "dur", "deps", "prio", "step", "start", "finish")

    def __init__(self, key: tuple, rank: int, dur: float, deps: list[tuple[tuple, float]],
                 prio: int = 0, step: int = 0):
        self.key, self.rank, self.dur, self.deps, self.prio, self.step = key, rank, max(dur, 0.0), deps, prio, step
        self.start = self.finish = math.nan


class _Engine:
    """Ranks with one or more *chains* of operations (each chain runs in order).

    A rank considers the head of each of its chains whose dependencies have finished and
    that ``eligible`` allows; it takes the one that can start first (ties: lowest
    ``prio``). Globally the earliest start is committed first, which keeps time causal.
    """

    def __init__(self, n_ranks: int, eligible: Callable[[_Op, dict], bool] | None = None):
        self.n_ranks = n_ranks
        self.chains: list[list[deque]] = [[] for _ in range(n_ranks)]
        self.ops: dict[tuple, _Op] = {}
        self.eligible = eligible
        self.state: dict[str, Any] = {}
        self.all_pairs = False  # set when dependencies may join ranks that are not neighbours

    def chain(self, rank: int, ops: Iterable[_Op]) -> None:
        q: deque[_Op] = deque()
        for op in ops:
            self.ops[op.key] = op
            q.append(op)
        self.chains[rank].append(q)

    def _best(self, r: int, free: float) -> tuple[float, int, int, deque] | None:
        best = None
        for q in self.chains[r]:
            if not q:
                continue
            op = q[0]
            ready = 0.0
            ok = True
            for key, lat in op.deps:
                dep = self.ops.get(key)
                if dep is None:
                    continue
                if math.isnan(dep.finish):
                    ok = False
                    break
                ready = max(ready, dep.finish + lat)
            if not ok or (self.eligible is not None and not self.eligible(op, self.state)):
                continue
            cand = (max(free, ready), op.prio, r, q)
            if best is None or cand[:2] < best[:2]:
                best = cand
        return best

    def run(self) -> None:
        free = [0.0] * self.n_ranks
        remaining = sum(len(q) for qs in self.chains for q in qs)
        # A commit on rank r can only change the choices of r and its neighbours
        # (dependencies cross one boundary), so only those are recomputed. Each rank's
        # current choice sits in a heap keyed (start, prio, rank): the earliest start
        # comes out in O(log n), not by scanning every rank (which made 64+ devices
        # take minutes); ties go to the lowest rank, as before. An entry is stale once
        # its rank has chosen again (its version moved on).
        version = [0] * self.n_ranks
        heap: list[tuple[float, int, int, int]] = []
        cache: list[tuple[float, int, int, deque] | None] = [None] * self.n_ranks

        def refresh(rr: int) -> None:
            cache[rr] = self._best(rr, free[rr])
            version[rr] += 1
            best = cache[rr]
            if best is not None:
                heapq.heappush(heap, (best[0], best[1], rr, version[rr]))

        for r in range(self.n_ranks):
            refresh(r)
        while remaining:
            while heap and heap[0][3] != version[heap[0][2]]:
                heapq.heappop(heap)
            if not heap:
                stuck = [q[0].key for qs in self.chains for q in qs if q]
                raise RuntimeError(f"schedule deadlocks; waiting operations: {stuck[:6]}")
            chosen = cache[heap[0][2]]
            assert chosen is not None  # (a heap entry is pushed only for a rank with a choice)
            start, _, r, q = chosen
            op = q.popleft()
            op.start, op.finish = start, start + op.dur
            free[r] = op.finish
            remaining -= 1
            self._committed(op)
            for rr in self._neighbours(r):
                refresh(rr)

    def _neighbours(self, r: int) -> list[int]:
        if self.n_ranks <= 3 or self.all_pairs:
            return list(range(self.n_ranks))
        return [x for x in (r - 1, r, r + 1) if 0 <= x < self.n_ranks]

    def _committed(self, op: _Op) -> None:
        kind = op.key[0]
        counts = self.state.setdefault("inflight", {})
        stage = op.key[1]
        if kind == "F":
            counts[stage] = counts.get(stage, 0) + 1
        elif kind in ("B", "BW"):
            counts[stage] = counts.get(stage, 0) - 1


def _steady(engine: _Engine, steps: int, n_ranks: int, schedule: str, devices: int, m: int) -> Prediction:
    """Step time and bubble over the second half of steps ``0 .. steps - 1`` (later steps are ignored)."""
    ends = [0.0] * steps
    busy = [[0.0] * n_ranks for _ in range(steps)]
    for op in engine.ops.values():
        if op.step >= steps:
            continue
        ends[op.step] = max(ends[op.step], op.finish)
        busy[op.step][op.rank] += op.dur
    first = steps // 2
    if steps - first >= 1 and first >= 1:
        step_s = (ends[steps - 1] - ends[first - 1]) / (steps - first)
    else:
        step_s = ends[-1] / steps
    per_rank = [sum(busy[s][r] for s in range(first, steps)) / max(steps - first, 1) for r in range(n_ranks)]
    bubble = 1.0 - sum(per_rank) / (n_ranks * step_s) if step_s > 0 else 0.0
    return Prediction(schedule, devices, m, step_s, max(0.0, bubble), per_rank)


# -- schedules ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Event:
    """One simulated operation.

    Attributes:
        kind: ``F`` forward, ``B`` backward (``zb``: its input-gradient part), ``W`` weight
            gradient, ``U`` update (flushed schedules), ``C`` synthetic gradient + backward
            + update (``dni``; rank 0 of ``dni-inputs``), ``S`` synthesizer training, ``X``
            rank 0 sends the data (``dni-inputs``), ``D`` the data taken, ``P`` the step on
            the predicted input (its update included), ``R`` the real input's step.
        rank, micro, step: where it runs, its micro-batch and its step.
        start, finish: seconds from the start of the run.
    """

    kind: str
    rank: int
    micro: int
    step: int
    start: float
    finish: float


def _build(schedule: str, stages: Sequence[StageCost], microbatches: int,
           transfer: float | Callable[[int], float], max_inflight: int, steps: int | None,
           lag: int | None, data_transfer: float | None, slowdown: Callable[[int, int], float] | None,
           first_real: bool) -> tuple[_Engine, int, int]:
    if schedule not in SCHEDULES or schedule == "single":
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
        raise ValueError(f"max_inflight must be a whole number >= 1; got {max_inflight!r}")
    if lag is not None and (isinstance(lag, bool) or not isinstance(lag, int) or lag < 0):
        raise ValueError(f"lag must be a whole number >= 0; got {lag!r}")
    m = max(1, int(microbatches)) if schedule in ("gpipe", "1f1b", "zb") else 1
    t = transfer(m) if callable(transfer) else float(transfer)
    steps = steps or (24 if schedule in ("dni", "dni-inputs") else 3)
    # dni-inputs: the last lag + 2 steps' real inputs run after every update is done (nothing
    # left to run ahead of), faster than in steady state; simulated, not measured
    extra = (max_inflight if lag is None else lag) + 2 if schedule == "dni-inputs" else 0
    if schedule == "dni":
        engine = _dni(stages, t, max_inflight, steps)
    elif schedule == "dni-inputs":
        engine = _dni_inputs(stages, t, t if data_transfer is None else float(data_transfer), max_inflight,
                             max_inflight if lag is None else lag, steps + extra, first_real)
    elif schedule == "backprop":
        engine = _microbatched(stages, 1, t, steps, order="gpipe")  # m=1; the update follows the send
    elif schedule == "zb":
        engine = _zero_bubble(stages, m, t, steps)
    else:
        engine = _microbatched(stages, m, t, steps, order=schedule)
    if slowdown is not None:
        for op in engine.ops.values():
            factor = float(slowdown(op.rank, op.step))
            if not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"slowdown({op.rank}, {op.step}) must be a finite number > 0; got {factor!r}")
            op.dur *= factor
    engine.run()
    return engine, steps, m


def simulate(schedule: str, stages: Sequence[StageCost], microbatches: int = 1,
             transfer: float | Callable[[int], float] = 0.0, max_inflight: int = 4,
             steps: int | None = None, *, lag: int | None = None, data_transfer: float | None = None,
             slowdown: Callable[[int, int], float] | None = None, first_real: bool = False) -> Prediction:
    """Steady-state step time of ``schedule`` with one stage per device.

    Args:
        schedule: one of :data:`SCHEDULES`.
        stages: per-stage costs (their number is the number of devices, except for
            ``single``, which runs them all on one device).
        microbatches: m for ``gpipe``, ``1f1b`` and ``zb``.
        transfer: one-way time of a boundary message, or a function of m giving it
            (messages of a micro-batch are 1/m of the batch).
        max_inflight: synthpipe's bound on outstanding targets (``dni``, ``dni-inputs``).
        steps: steps simulated (default: 6, or 24 for ``dni`` and ``dni-inputs``).
        lag: ``dni-inputs``: the most batches a rank runs on predicted inputs ahead of
            their real input (default ``max_inflight``; 0 for a fixed delay).
        data_transfer: ``dni-inputs``: one-way time of a batch's data from rank 0
            (default: ``transfer``).
        slowdown: ``(rank, step) -> factor`` multiplying that rank's operations in that
            step (a straggler); default 1 everywhere.
        first_real: ``dni-inputs``: each rank's first predicted step waits for its first
            real input.

    Raises:
        ValueError: an unknown schedule, no stages, ``max_inflight < 1``, ``lag < 0``,
            or a slowdown factor that is not a finite number > 0.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    stages = list(stages)
    if not stages:
        raise ValueError("need at least one stage")
    if schedule == "single":
        total = sum(s.forward + s.backward + s.update + s.other for s in stages)
        return Prediction("single", 1, 1, total, 0.0, [total])
    engine, steps, m = _build(schedule, stages, microbatches, transfer, max_inflight, steps, lag, data_transfer,
                              slowdown, first_real)
    return _steady(engine, steps, len(stages), schedule, len(stages), m)


def trace(schedule: str, stages: Sequence[StageCost], microbatches: int = 1,
          transfer: float | Callable[[int], float] = 0.0, max_inflight: int = 4, steps: int | None = None,
          *, lag: int | None = None, data_transfer: float | None = None,
          slowdown: Callable[[int, int], float] | None = None, first_real: bool = False) -> list[Event]:
    """Every operation :func:`simulate` schedules, ordered by start (then rank).

    Takes the arguments of :func:`simulate`; ``single`` has no pipeline to trace.

    Raises:
        ValueError: as :func:`simulate`, and for ``single`` or no stages.
    """
    stages = list(stages)
    if not stages:
        raise ValueError("need at least one stage")
    engine, _, _ = _build(schedule, stages, microbatches, transfer, max_inflight, steps, lag, data_transfer,
                          slowdown, first_real)
    events = [Event(str(op.key[0]), op.rank, int(op.key[2]), op.step, op.start, op.finish)
              for op in engine.ops.values()]
    return sorted(events, key=lambda e: (e.start, e.rank, e.finish))


def _update_kind(schedule: str, rank: int) -> str:
    if schedule == "dni-inputs" and rank > 0:
        return "P"
    return "C" if schedule in ("dni", "dni-inputs") else "U"


def update_times(events: Sequence[Event], schedule: str, rank: int) -> list[float]:
    """When ``rank`` finishes its update of step 0, 1, ... in a :func:`trace` of ``schedule``."""
    kind = _update_kind(schedule, rank)
    done = {e.step: e.finish for e in events if e.rank == rank and e.kind == kind}
    return [done[k] for k in sorted(done)]


def _chunk(s: StageCost, m: int) -> tuple[float, float, float]:
    """Forward and backward time of one micro-batch, and the step-end time (update + glue)."""
    return (s.forward + s.comm / 2) / m, (s.backward + s.comm / 2) / m, s.update + s.other


def _flush_dep(stage: int, step: int) -> list[tuple[tuple, float]]:
    return [(("U", stage, 0, step - 1), 0.0)] if step > 0 else []


def _forward_op(r: int, k: int, f: float, t: float, i: int) -> _Op:
    """Rank ``r``'s forward of micro-batch ``i`` of step ``k`` (``f`` seconds; ``t``: transfer from r - 1)."""
    deps = [(("F", r - 1, i, k), t)] if r > 0 else []
    return _Op(("F", r, i, k), r, f, deps + (_flush_dep(r, k) if i == 0 else []), step=k)


def _backward_op(r: int, k: int, b: float, t: float, p: int, i: int) -> _Op:
    """Rank ``r``'s backward of micro-batch ``i`` of step ``k`` (``b`` seconds; after its forward
    and, but on the last of ``p`` ranks, the backward of rank r + 1)."""
    deps = [(("F", r, i, k), 0.0)]
    if r < p - 1:
        deps.append((("B", r + 1, i, k), t))
    return _Op(("B", r, i, k), r, b, deps, step=k)


def _microbatched(stages: Sequence[StageCost], m: int, t: float, steps: int, order: str) -> _Engine:
    """Fixed-order schedules: forwards and backwards in ``order``, the update after the last
    backward (its gradient already sent back, so the update is off the critical path)."""
    p = len(stages)
    eng = _Engine(p)
    for r, s in enumerate(stages):
        f, b, u = _chunk(s, m)
        ops: list[_Op] = []
        for k in range(steps):
            # (bound now: F and B are called only within this iteration)
            F = functools.partial(_forward_op, r, k, f, t)
            B = functools.partial(_backward_op, r, k, b, t, p)

            if order == "gpipe":
                seq = [F(i) for i in range(m)] + [B(i) for i in range(m)]
            elif order == "1f1b":
                warm = min(m, p - r)
                seq = [F(i) for i in range(warm)]
                nf = warm
                for i in range(m):
                    seq.append(B(i))
                    if nf < m:
                        seq.append(F(nf))
                        nf += 1
            else:
                raise ValueError(order)
            # the update follows this step's backwards in the same chain, so it waits for them
            # without listing all m as dependencies (each listed one is checked on every
            # scheduling decision: O(m) per decision made large m quadratic)
            seq.append(_Op(("U", r, 0, k), r, u, [(seq[-1].key, 0.0)], step=k))
            ops.extend(seq)
        eng.chain(r, ops)
    return eng


def _zero_bubble(stages: Sequence[StageCost], m: int, t: float, steps: int) -> _Engine:
    p = len(stages)
    limits = {r: p - r for r in range(p)}

    def eligible(op: _Op, state: dict) -> bool:
        if op.key[0] != "F":
            return True
        return state.get("inflight", {}).get(op.key[1], 0) < limits[op.key[1]]

    eng = _Engine(p, eligible)
    for r, s in enumerate(stages):
        f, b, u = _chunk(s, m)
        bw = b * s.weight_fraction
        bi = b - bw
        fs, bs, ws, us = [], [], [], []
        for k in range(steps):
            for i in range(m):
                deps = [(("F", r - 1, i, k), t)] if r > 0 else []
                if i == 0:
                    deps += _flush_dep(r, k)
                fs.append(_Op(("F", r, i, k), r, f, deps, prio=1, step=k))
                bdeps = [(("F", r, i, k), 0.0)]
                if r < p - 1:
                    bdeps.append((("B", r + 1, i, k), t))
                bs.append(_Op(("B", r, i, k), r, bi, bdeps, prio=0, step=k))
                ws.append(_Op(("W", r, i, k), r, bw, [(("B", r, i, k), 0.0)], prio=2, step=k))
            # the W chain runs in order on this rank: its last W of the step finishes after the others
            us.append(_Op(("U", r, 0, k), r, u, [(("W", r, m - 1, k), 0.0)], prio=3, step=k))
        for chain in (fs, bs, ws, us):
            eng.chain(r, chain)
    return eng


def _dni(stages: Sequence[StageCost], t: float, max_inflight: int, steps: int) -> _Engine:
    p = len(stages)
    eng = _Engine(p)
    for r, s in enumerate(stages):
        ops: list[_Op] = []
        for k in range(steps):
            deps = [(("F", r - 1, 0, k), t)] if r > 0 else []
            ops.append(_Op(("F", r, 0, k), r, s.forward + s.comm / 2, deps, step=k))
            # synthetic gradient (or loss) + backward + update + sending the gradient back
            ops.append(_Op(("C", r, 0, k), r, s.backward + s.update + s.comm / 2 + s.other + s.synth / 2, [], step=k))
            if r < p - 1:
                oldest = k - max_inflight + 1
                sdeps = [(("C", r + 1, 0, oldest), t)] if oldest >= 0 else []
                ops.append(_Op(("S", r, 0, k), r, s.synth / 2, sdeps, step=k))
        eng.chain(r, ops)
    return eng


def _real_out(r: int, k: int) -> tuple:
    """The operation that produces rank ``r``'s real output of step ``k`` (``dni-inputs``)."""
    return ("F", 0, 0, k) if r == 0 else ("R", r, 0, k)


def _dni_inputs(stages: Sequence[StageCost], t: float, td: float, max_inflight: int, lag: int, steps: int,
                first_real: bool) -> _Engine:
    p = len(stages)
    eng = _Engine(p)
    eng.all_pairs = True  # (rank 0's data reaches every rank)
    s0 = stages[0]
    ops: list[_Op] = []
    for k in range(steps):
        # a channel holds max_inflight + 1 sends: the send of step k waits until that of
        # k - max_inflight - 1 has crossed, which its receiver posts on taking the one before
        back = k - max_inflight - 2
        xdeps = [(("D", r, 0, back), td) for r in range(1, p)] if back >= 0 else []
        ops.append(_Op(("X", 0, 0, k), 0, 0.0, xdeps, prio=1, step=k))
        ops.append(_Op(("F", 0, 0, k), 0, s0.forward + s0.comm / 2, [], prio=1, step=k))
        ops.append(_Op(("C", 0, 0, k), 0, s0.backward + s0.update + s0.comm / 2 + s0.other + s0.synth / 2, [],
                       prio=1, step=k))
        if p > 1:
            oldest = k - max_inflight + 1
            sdeps = [(("R", 1, 0, oldest), t)] if oldest >= 0 else []
            ops.append(_Op(("S", 0, 0, k), 0, s0.synth / 2, sdeps, prio=1, step=k))
    eng.chain(0, ops)
    for r in range(1, p):
        s = stages[r]
        pred: list[_Op] = []
        real: list[_Op] = []
        for k in range(steps):
            pred.append(_Op(("D", r, 0, k), r, 0.0, [(("X", 0, 0, k), td)], prio=1, step=k))
            pdeps = [(("R", r, 0, k - lag - 1), 0.0)] if k - lag - 1 >= 0 else []
            if first_real and k == 0:
                pdeps.append((_real_out(r - 1, 0), t))
            pred.append(_Op(("P", r, 0, k), r, s.forward + s.backward + s.update + s.other + s.synth / 2
                            + s.input_synth / 4, pdeps, prio=1, step=k))
            if r < p - 1:
                oldest = k - max_inflight + 1
                sdeps = [(("R", r + 1, 0, oldest), t)] if oldest >= 0 else []
                pred.append(_Op(("S", r, 0, k), r, s.synth / 2, sdeps, prio=1, step=k))
            rdur = (s.forward + s.backward * (1.0 - s.weight_fraction) + s.comm + s.synth / 2
                    + 3 * s.input_synth / 4)
            real.append(_Op(("R", r, 0, k), r, rdur, [(("P", r, 0, k), 0.0), (_real_out(r - 1, k), t)],
                            prio=0, step=k))
        eng.chain(r, pred)
        eng.chain(r, real)
    return eng


# -- predictions from a profile -----------------------------------------------------------
def profile_transfer(profile: dict[str, Any]) -> Transfer:
    pts = [(p["bytes"], p["one_way_s"]) for p in profile.get("transfer", [])]
    return Transfer.fit(pts)


def stage_cost(d: dict[str, float]) -> StageCost:
    """A :class:`StageCost` from a profile's per-stage dict (``*_s`` keys)."""
    return StageCost(forward=d.get("forward_s", 0.0), backward=d.get("backward_s", 0.0),
                     update=d.get("update_s", 0.0), synth=d.get("synth_s", 0.0),
                     comm=d.get("comm_s", 0.0), other=d.get("other_s", 0.0),
                     weight_fraction=d.get("weight_fraction", 0.5))


def model_chunk(profile: dict[str, Any], m: int) -> tuple[float, float]:
    """Whole-model forward and backward seconds of one micro-batch of ``batch / m`` rows.

    Measured values when the profile has this ``m``; otherwise ``a + c / m`` fitted by
    least squares to the measured ones (the single-device step alone gives ``c / m``).
    """
    single = profile["single"]
    points = {int(p["m"]): (p["forward_s"], p["backward_s"]) for p in profile.get("microbatch", [])}
    points.setdefault(1, (single["forward_s"], single["backward_s"]))
    if m in points:
        return points[m]
    out = []
    for i in (0, 1):
        xs = [1.0 / k for k in points]
        ys = [v[i] for v in points.values()]
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        c = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var > 0 else my / mx
        a = max(0.0, my - c * mx)
        out.append(a + c / m)
    return out[0], out[1]


def scaled_stages(profile: dict[str, Any], devices: int, schedule: str, microbatches: int = 1,
                  synth: str | None = None) -> list[StageCost]:
    """The single-device work of ``profile`` spread over ``devices`` balanced stages.

    Compute (forward, backward, update) is divided evenly; every stage but the last gets
    the per-boundary synthesizer time (``dni``, ``dni-inputs``); each stage r > 0 of
    ``dni-inputs`` gets the profile's ``input_synth_s`` (else the synthesizer's time, a
    network of the same order), its data message costs ``message_s`` on rank 0 (once per
    rank) and on rank r; each message costs the profile's
    per-message CPU time (``message_s``; ``pp_message_s`` per posted micro-batch
    operation for torch schedules). Micro-batched schedules use the measured per-micro-
    batch forward/backward times (:func:`model_chunk`), divided by ``devices``, plus the
    schedule's glue per operation (``op_overhead_s``). Each synthpipe stage keeps the
    per-step overhead ``step_overhead_s``.
    """
    single = profile["single"]
    n = devices
    f, b, u = single["forward_s"] / n, single["backward_s"] / n, single["update_s"] / n
    wf = profile.get("weight_fraction", 0.5)
    other = profile.get("step_overhead_s", 0.0)
    out = []
    for r in range(n):
        neighbours = (r > 0) + (r < n - 1)
        if schedule in ("dni", "dni-inputs"):
            synths = profile.get("synth_s", {})
            synth_s = synths.get(synth or "cdni", 0.0) if r < n - 1 else 0.0
            msg = profile.get("message_s", 0.0)
            comm = neighbours * msg
            if schedule == "dni":
                out.append(StageCost(f, b, u, synth_s, comm, other, wf))
                continue
            # rank 0 sends each batch's data to every rank; rank r > 0 takes it on its predicted path
            if r == 0:
                out.append(StageCost(f, b, u, synth_s, comm + (n - 1) * msg, other, wf))
            else:
                inp = profile.get("input_synth_s", synths.get(synth or "cdni", 0.0))
                out.append(StageCost(f, b, u, synth_s, comm, other + msg, wf, input_synth=inp))
        elif schedule == "backprop":
            comm = neighbours * profile.get("message_s", 0.0)
            out.append(StageCost(f, b, u, 0.0, comm, other, wf))
        else:
            m = max(1, microbatches)
            cf, cb = model_chunk(profile, m)
            ov = profile.get("op_overhead_s", 0.0)
            comm = 2 * neighbours * m * profile.get("pp_message_s", 0.0)
            out.append(StageCost(m * (cf / n + ov), m * (cb / n + ov), u, 0.0, comm, 0.0, wf))
    return out


def _data_bytes(profile: dict[str, Any]) -> float:
    """Bytes of one batch's data (``x`` and int64 labels): the profile's ``data_bytes``, else
    float32 rows of the workload's ``in_features``, else the boundary message's size."""
    if "data_bytes" in profile:
        return float(profile["data_bytes"])
    w = profile.get("workload", {})
    if "in_features" in w:
        batch = int(w.get("batch", 256))
        return float(batch * int(w["in_features"]) * 4 + batch * 8)
    return float(profile.get("boundary_bytes", 0))


def _message_bytes(profile: dict[str, Any], m: int) -> float:
    return profile.get("boundary_bytes", 0) / max(m, 1)


def predict(profile: dict[str, Any], devices: int, schedule: str, microbatches: int = 1,
            synth: str | None = None, max_inflight: int | None = None) -> Prediction:
    """Predict ``schedule`` on ``devices`` devices from a bench profile."""
    tr = profile_transfer(profile)
    if schedule == "single":
        single = profile["single"]
        step = single.get("step_s") or (single["forward_s"] + single["backward_s"] + single["update_s"])
        return Prediction("single", 1, 1, step, 0.0, [step])
    stages = scaled_stages(profile, devices, schedule, microbatches, synth)
    inflight = max_inflight or profile.get("max_inflight", 4)
    return simulate(schedule, stages, microbatches, transfer=lambda m: tr(_message_bytes(profile, m)),
                    max_inflight=inflight,
                    data_transfer=tr(_data_bytes(profile)) if schedule == "dni-inputs" else None)


def best_microbatches(profile: dict[str, Any], devices: int, schedule: str,
                      candidates: Sequence[int] | None = None) -> Prediction:
    """The best prediction over micro-batch counts that divide the batch."""
    batch = int(profile.get("workload", {}).get("batch", 256))
    cands = candidates or [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= batch]
    cands = [m for m in cands if batch % m == 0] or [1]
    preds = [predict(profile, devices, schedule, m) for m in cands]
    return min(preds, key=lambda p: p.step_s)


def predict_table(profile: dict[str, Any], devices: Sequence[int] = (2, 4, 8, 16),
                  microbatches: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Rows ``{devices, method, microbatches, step_s, bubble, speedup, samples_per_s}``.

    Methods: ``single``, ``backprop``, ``gpipe``, ``1f1b``, ``zb`` (each at its best
    micro-batch count from ``microbatches``), and ``dni`` once per synthesizer variant
    in the profile (``synth_s``: e.g. ``cdni``, ``cdni-lowrank``). ``ValueError`` for
    ``devices`` or ``microbatches`` that :func:`check_devices` / :func:`check_microbatches`
    refuse.
    """
    batch = int(profile.get("workload", {}).get("batch", 256))
    devices = check_devices(devices)
    if microbatches is not None:
        microbatches = check_microbatches(microbatches, batch)
    single = predict(profile, 1, "single")
    rows = []
    for n in devices:
        preds: list[tuple[str, Prediction]] = [("backprop", predict(profile, n, "backprop"))]
        for sched in ("gpipe", "1f1b", "zb"):
            preds.append((sched, best_microbatches(profile, n, sched, microbatches)))
        for variant in sorted(profile.get("synth_s", {})):
            preds.append((variant, predict(profile, n, "dni", synth=variant)))
        rows.append({"devices": n, "method": "single", "microbatches": 1, "step_s": single.step_s,
                     "bubble": 0.0, "speedup": 1.0, "samples_per_s": batch / single.step_s})
        for name, p in preds:
            rows.append({"devices": n, "method": name, "microbatches": p.microbatches, "step_s": p.step_s,
                         "bubble": p.bubble, "speedup": single.step_s / p.step_s if p.step_s > 0 else math.nan,
                         "samples_per_s": batch / p.step_s if p.step_s > 0 else math.nan})
    return rows


def straggler(rank: int, factor: float, every: int | None = None) -> Callable[[int, int], float]:
    """A ``slowdown`` for :func:`simulate`: ``rank`` takes ``factor`` times as long, in every
    step (``every=None``: a persistent straggler) or in each ``every``-th step (steps
    ``every - 1``, ``2 every - 1``, ...: an intermittent one).

    Raises:
        ValueError: ``factor`` not a finite number > 0, or ``every`` not a whole number >= 1.
    """
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"straggler factor must be a finite number > 0; got {factor!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"straggler every must be a whole number >= 1; got {every!r}")

    def slowdown(r: int, k: int) -> float:
        return float(factor) if r == rank and (every is None or k % every == every - 1) else 1.0
    return slowdown


def rotating_straggler(factor: float, every: int) -> Callable[[int, int], float]:
    """A ``slowdown`` for :func:`simulate`: every rank is ``factor`` times slower in each
    ``every``-th step, rank r in steps ``k`` with ``k % every == r % every`` (the same work
    per rank as :func:`straggler` with ``every``, but spread over the ranks' steps).

    Raises:
        ValueError: as :func:`straggler`.
    """
    straggler(0, factor, every)  # (the same checks)

    def slowdown(r: int, k: int) -> float:
        return float(factor) if k % every == r % every else 1.0
    return slowdown


UNLOCK_METHODS = ("backprop", "1f1b", "dni", "dni-inputs")


def unlock_table(profile: dict[str, Any], devices: Sequence[int] = (2, 4, 8, 16),
                 factors: Sequence[float] = (1.5, 2.0, 4.0), every: int = 8, straggler_rank: int = 1,
                 kth: int = 8, synth: str | None = None) -> list[dict[str, Any]]:
    """What forward unlocking buys: fill time and straggler slowdown, per device count.

    One row per device count and method (:data:`UNLOCK_METHODS`; ``1f1b`` at its best
    micro-batch count without a straggler, kept for the straggler runs; ``dni`` and
    ``dni-inputs`` with the synthesizer ``synth``, default ``cdni`` if the profile has
    it, else its first). Keys:

    * ``devices``, ``method``, ``microbatches``, ``step_s`` (steady state, no straggler);
    * ``fill_s``: when every rank has made its first update; ``fill_k_s``: its ``kth``;
      ``fill_engine_s`` (``dni-inputs`` only, else ``None``): ``fill_s`` when each
      rank's first predicted step waits for its first real input, as the engine does;
    * ``persistent_<f>x`` / ``intermittent_<f>x`` / ``rotating_<f>x`` for each factor f:
      steady-state step time, divided by ``step_s``, with rank ``straggler_rank`` (the
      last rank if there are fewer) ``f`` times slower in every step / in every
      ``every``-th step (:func:`straggler`), or with every rank so, each in its own
      steps (:func:`rotating_straggler`).

    Raises:
        ValueError: bad ``devices`` (:func:`check_devices`), ``every`` or ``kth`` below 1,
            or a factor that is not a finite number > 0.
    """
    devices = check_devices(devices)
    for name, v in (("every", every), ("kth", kth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a whole number >= 1; got {v!r}")
    synths = sorted(profile.get("synth_s", {}))
    variant = synth or ("cdni" if "cdni" in synths else (synths[0] if synths else None))
    tr = profile_transfer(profile)
    inflight = int(profile.get("max_inflight", 4))
    rows = []
    for n in devices:
        slow_rank = min(straggler_rank, n - 1)
        for method in UNLOCK_METHODS:
            m = best_microbatches(profile, n, method).microbatches if method == "1f1b" else 1
            stages = scaled_stages(profile, n, method, m, variant)
            flushed = method in ("backprop", "1f1b")
            # whole straggler periods in the measured second half of the run
            steps = max(2 * every, 2 * kth) if flushed else max(6 * every, 2 * kth, 24)
            steps += (-steps) % (2 * every)
            kw: dict[str, Any] = dict(microbatches=m, transfer=lambda mm: tr(_message_bytes(profile, mm)),
                                      max_inflight=inflight, steps=steps)
            if method == "dni-inputs":
                kw["data_transfer"] = tr(_data_bytes(profile))
            base = simulate(method, stages, **kw)
            events = trace(method, stages, **kw)
            ups = [update_times(events, method, r) for r in range(n)]
            row: dict[str, Any] = {"devices": n, "method": method if method != "dni" or not variant else variant,
                                   "schedule": method, "microbatches": m, "step_s": base.step_s,
                                   "fill_s": max(u[0] for u in ups), "fill_k_s": max(u[kth - 1] for u in ups),
                                   "fill_engine_s": None}
            if method == "dni-inputs":
                row["method"] = f"{variant} + inputs" if variant else method
                late = trace(method, stages, **kw, first_real=True)
                row["fill_engine_s"] = max(update_times(late, method, r)[0] for r in range(n))
            for f in factors:
                for kind, slow in (("persistent", straggler(slow_rank, f)),
                                   ("intermittent", straggler(slow_rank, f, every)),
                                   ("rotating", rotating_straggler(f, every))):
                    pred = simulate(method, stages, **kw, slowdown=slow)
                    row[f"{kind}_{f:g}x"] = pred.step_s / base.step_s if base.step_s > 0 else math.nan
            rows.append(row)
    return rows


def unlock_markdown(rows: Sequence[dict[str, Any]], kth: int = 8) -> str:
    """:func:`unlock_table` rows as a markdown table (milliseconds; slowdowns as ratios)."""
    if not rows:
        return ""
    factors = [k for k in rows[0] if k.startswith(("persistent_", "intermittent_", "rotating_"))]
    head = ["devices", "method", "m", "step ms", "first update ms (all ranks)", f"update {kth} ms",
            *[k.replace("_", " ") for k in factors]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fill = f"{r['fill_s'] * 1e3:.1f}"
        if r.get("fill_engine_s") is not None:
            fill += f" ({r['fill_engine_s'] * 1e3:.1f} engine)"
        cells = [str(r["devices"]), r["method"], str(r["microbatches"]), f"{r['step_s'] * 1e3:.1f}", fill,
                 f"{r['fill_k_s'] * 1e3:.1f}", *[f"{r[k]:.2f}" for k in factors]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def predict_run(run: dict[str, Any], profile: dict[str, Any]) -> Prediction | None:
    """Predict one measured run from its own per-rank times (for validation).

    ``run`` is an entry of ``profile["runs"]``: ``schedule``, ``ranks``,
    ``microbatches``, ``stages`` (per-rank ``*_s`` dicts from that run's timers). Returns
    ``None`` for schedules the model does not cover (interleaved, ZB-V).
    """
    sched = run["schedule"]
    if sched not in SCHEDULES:
        return None
    stages = [stage_cost(s) for s in run["stages"]]
    if sched == "single":
        s = stages[0]
        total = s.forward + s.backward + s.update + s.other
        return Prediction("single", 1, 1, total, 0.0, [total])
    tr = profile_transfer(profile)
    m = int(run.get("microbatches") or 1)
    return simulate(sched, stages, m, transfer=lambda mm: tr(_message_bytes(profile, mm)),
                    max_inflight=int(run.get("max_inflight") or profile.get("max_inflight", 4)))


def validate(profile: dict[str, Any]) -> list[dict[str, Any]]:
    """Predicted against measured step time for every measured run the model covers.

    Rows: ``name``, ``schedule``, ``microbatches``, ``measured_step_s``,
    ``predicted_step_s``, ``error`` ((predicted - measured) / measured),
    ``within_15pct``, ``predicted_bubble``.
    """
    rows = []
    for run in profile.get("runs", []):
        pred = predict_run(run, profile)
        if pred is None:
            continue
        meas = run["measured_step_s"]
        err = (pred.step_s - meas) / meas if meas else math.nan
        rows.append({"name": run["name"], "schedule": run["schedule"], "microbatches": run.get("microbatches", 1),
                     "measured_step_s": meas, "predicted_step_s": pred.step_s, "error": err,
                     "within_15pct": abs(err) <= 0.15, "predicted_bubble": pred.bubble})
    return rows


# -- data parallel x pipeline parallel ------------------------------------------------------

@dataclasses.dataclass
class RingAllReduce:
    """The cost of averaging ``nbytes`` over ``n`` replicas with a ring all-reduce.

    ``time = 2 (n - 1) / n * nbytes / bandwidth + 2 (n - 1) * latency``: a reduce-scatter
    and an all-gather, each ``n - 1`` steps that move ``nbytes / n`` per link.

    Attributes:
        bandwidth: bytes per second of one link (the slowest in the ring).
        latency: seconds per step (per message).
    """

    bandwidth: float = 10e9
    latency: float = 20e-6

    def __call__(self, nbytes: float, n: int) -> float:
        if n <= 1:
            return 0.0
        return 2 * (n - 1) / n * nbytes / self.bandwidth + 2 * (n - 1) * self.latency

    def describe(self) -> str:
        return f"ring all-reduce, {self.bandwidth / 1e9:g} GB/s per link, {self.latency * 1e6:g} us per step"


def layouts(devices: int) -> list[tuple[int, int]]:
    """Every ``(dp, pp)`` with ``dp * pp == devices``, pure data parallelism first."""
    return [(devices // pp, pp) for pp in range(1, devices + 1) if devices % pp == 0]


def predict_layout(profile: dict[str, Any], dp: int, pp: int, schedule: str, ring: RingAllReduce,
                   param_bytes: float, microbatches: int = 1, synth: str | None = None,
                   max_inflight: int | None = None) -> tuple[Prediction, float]:
    """Predict ``dp`` pipelines of ``pp`` stages at the profile's (global) batch.

    Each replica computes ``batch / dp`` rows (the profile's per-micro-batch times,
    :func:`model_chunk`, at ``m = dp * microbatches``); each stage then averages its share
    of the gradients (``param_bytes / pp``) over its ``dp`` replicas, on its critical path:
    synthpipe does it after the backward and before sending the input gradient back (so
    it is charged to the backward), torch's schedules and DDP at the flush (charged to
    the update). ``pp == 1`` is pure data parallelism (DDP): ``schedule`` is ignored.

    Returns:
        The prediction (``step_s`` per global batch) and one stage's all-reduce seconds.
    """
    reduce_s = ring(param_bytes / pp, dp)
    single = profile["single"]
    if pp == 1:
        f, b = model_chunk(profile, dp)
        step = f + b + single["update_s"] + reduce_s + (single.get("other_s") or 0.0)
        return Prediction("ddp", dp, 1, step, 0.0, [step]), reduce_s
    shard = dict(profile, single=dict(single))
    shard["single"]["forward_s"], shard["single"]["backward_s"] = model_chunk(profile, dp)
    shard["microbatch"] = [{"m": c["m"] // dp, "forward_s": c["forward_s"], "backward_s": c["backward_s"]}
                           for c in profile.get("microbatch", []) if c["m"] % dp == 0 and c["m"] >= dp]
    stages = scaled_stages(shard, pp, schedule, microbatches, synth)
    for s in stages:
        if schedule in ("dni", "backprop"):
            s.backward += reduce_s
        else:
            s.update += reduce_s
    tr = profile_transfer(profile)
    inflight = max_inflight or profile.get("max_inflight", 4)
    pred = simulate(schedule, stages, microbatches, transfer=lambda k: tr(_message_bytes(profile, dp * k)),
                    max_inflight=inflight)
    return pred, reduce_s


def predict_layouts(profile: dict[str, Any], devices: Sequence[int], ring: RingAllReduce, param_bytes: float,
                    schedules: Sequence[str] = ("dni", "backprop", "1f1b")) -> list[dict[str, Any]]:
    """Rows ``{devices, layout, dp, pp, method, step_s, allreduce_s, samples_per_s, speedup}``
    for every ``(dp, pp)`` layout of each device count (same global batch everywhere)."""
    batch = int(profile.get("workload", {}).get("batch", 256))
    single = predict(profile, 1, "single").step_s
    rows = []
    for n in check_devices(devices):
        for dp, pp in layouts(n):
            if batch % dp:
                continue
            for sched in (("ddp",) if pp == 1 else schedules):
                pred, reduce_s = predict_layout(profile, dp, pp, "single" if pp == 1 else sched, ring, param_bytes)
                rows.append({"devices": n, "layout": f"dp{dp}xpp{pp}", "dp": dp, "pp": pp, "method": sched,
                             "step_s": pred.step_s, "allreduce_s": reduce_s,
                             "samples_per_s": batch / pred.step_s if pred.step_s > 0 else math.nan,
                             "speedup": single / pred.step_s if pred.step_s > 0 else math.nan})
    return rows
