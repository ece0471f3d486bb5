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

__all__ = ["SCHEDULES", "StageCost", "Prediction", "Transfer", "simulate", "profile_transfer", "stage_cost",
           "model_chunk", "scaled_stages", "predict", "best_microbatches", "predict_table", "predict_run",
           "validate"]

SCHEDULES = ("single", "backprop", "gpipe", "1f1b", "zb", "dni")


@dataclasses.dataclass
class StageCost:
    """One stage's time per step (seconds, full batch).

    Attributes:
        forward, backward, update: compute (backward includes input and weight gradients).
        synth: synthesizer prediction + training (DNI only; 0 on the last stage).
        comm: CPU time spent sending/receiving messages (not the transfer latency).
        other: per-step overhead outside those (Python glue), charged once per step.
        weight_fraction: share of ``backward`` that is the weight gradient (zero bubble).
    """

    forward: float = 0.0
    backward: float = 0.0
    update: float = 0.0
    synth: float = 0.0
    comm: float = 0.0
    other: float = 0.0
    weight_fraction: float = 0.5

    @property
    def total(self) -> float:
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
    ends = [0.0] * steps
    busy = [[0.0] * n_ranks for _ in range(steps)]
    for op in engine.ops.values():
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
def simulate(schedule: str, stages: Sequence[StageCost], microbatches: int = 1,
             transfer: float | Callable[[int], float] = 0.0, max_inflight: int = 4,
             steps: int | None = None) -> Prediction:
    """Steady-state step time of ``schedule`` with one stage per device.

    Args:
        schedule: one of :data:`SCHEDULES`.
        stages: per-stage costs (their number is the number of devices, except for
            ``single``, which runs them all on one device).
        microbatches: m for ``gpipe``, ``1f1b`` and ``zb``.
        transfer: one-way time of a boundary message, or a function of m giving it
            (messages of a micro-batch are 1/m of the batch).
        max_inflight: synthpipe's bound on outstanding targets (``dni``).
        steps: steps simulated (default: 6, or 24 for ``dni``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    stages = list(stages)
    if not stages:
        raise ValueError("need at least one stage")
    m = max(1, int(microbatches)) if schedule in ("gpipe", "1f1b", "zb") else 1
    t = transfer(m) if callable(transfer) else float(transfer)
    p = len(stages)
    if schedule == "single":
        total = sum(s.forward + s.backward + s.update + s.other for s in stages)
        return Prediction("single", 1, 1, total, 0.0, [total])
    steps = steps or (24 if schedule == "dni" else 3)
    if schedule == "dni":
        engine = _dni(stages, t, max_inflight, steps)
    elif schedule == "backprop":
        engine = _microbatched(stages, 1, t, steps, order="gpipe")  # m=1; the update follows the send
    elif schedule == "zb":
        engine = _zero_bubble(stages, m, t, steps)
    else:
        engine = _microbatched(stages, m, t, steps, order=schedule)
    engine.run()
    return _steady(engine, steps, p, schedule, p, m)


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
    the per-boundary synthesizer time (``dni``); each message costs the profile's
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
        if schedule == "dni":
            synth_s = profile.get("synth_s", {}).get(synth or "cdni", 0.0) if r < n - 1 else 0.0
            comm = neighbours * profile.get("message_s", 0.0)
            out.append(StageCost(f, b, u, synth_s, comm, other, wf))
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
                    max_inflight=inflight)


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
