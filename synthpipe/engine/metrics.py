"""Per-rank section timers: where a rank's time goes (compute, communication, waiting).

A :class:`Timers` object accumulates time by *kind* (``forward``, ``backward``,
``update``, ``synth``, ``send``, ``recv``, ``wait``) and keeps a bounded timeline of
``(start, end, kind, step)`` segments for plots. Sections may nest; time is counted
*exclusively*: entering a section pauses the enclosing one, so the kinds never overlap
and their sum never exceeds the wall-clock time.

The engine's worker holds :data:`NULL_TIMERS` (a no-op, a few hundred nanoseconds per
section) unless someone, e.g. the benchmark harness, installs a real one::

    trainer.timers = Timers()
    trainer.fit(...)
    trainer.timers.totals()   # {"forward": s, "backward": s, ...}

On CPU the clock is ``time.perf_counter``. On a CUDA device, ``Timers(device=cuda)``
records a CUDA event at every section switch instead and resolves them lazily, so the
segments measure the *GPU stream's* timeline: the time between two events is attributed
to the section whose host code enqueued it (a host-side wait shows up as the stream idle
in that section). Events are resolved when the ring buffer wraps and on every read.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import torch

__all__ = ["KINDS", "BUSY_KINDS", "COMM_KINDS", "WAIT_KINDS", "NullTimers", "NULL_TIMERS", "Timers"]

KINDS = ("forward", "backward", "update", "synth", "send", "recv", "wait")
BUSY_KINDS = ("forward", "backward", "update", "synth")
COMM_KINDS = ("send", "recv")
WAIT_KINDS = ("wait",)


class _NullSection:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL_SECTION = _NullSection()


class NullTimers:
    """Timers that record nothing (the engine's default)."""

    enabled = False

    def section(self, kind: str, step: int = -1) -> _NullSection:
        return _NULL_SECTION


NULL_TIMERS = NullTimers()


class _Section:
    __slots__ = ("timers", "kind", "step")

    def __init__(self, timers: "Timers", kind: str, step: int):
        self.timers, self.kind, self.step = timers, kind, step

    def __enter__(self) -> None:
        self.timers._push(self.kind, self.step)

    def __exit__(self, *exc: Any) -> None:
        self.timers._pop()


class Timers:
    """Exclusive section timers with a bounded timeline.

    Args:
        device: a CUDA device to time with CUDA events; ``None`` or CPU: host clock.
        capacity: the most timeline segments kept (oldest dropped); totals keep counting.
        clock: host clock in seconds (default ``time.perf_counter``).
    """

    enabled = True

    def __init__(self, device: torch.device | str | None = None, capacity: int = 20000,
                 clock: Callable[[], float] = time.perf_counter):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = dev.type == "cuda" and torch.cuda.is_available()
        self.device = dev
        self.clock = clock
        self.capacity = capacity
        self.reset()

    # -- recording --------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything; time 0 of the timeline is now."""
        self._totals: dict[str, float] = {k: 0.0 for k in KINDS}
        self._counts: dict[str, int] = {k: 0 for k in KINDS}
        self._stack: list[tuple[str, int]] = []
        self._segments: deque = deque(maxlen=self.capacity)  # (start, end, kind, step), seconds from origin
        self._pending: deque = deque()  # CUDA: (start_event, end_event, kind, step) not yet resolved
        self._origin_wall = time.time()
        if self.cuda:
            self._origin: Any = torch.cuda.Event(enable_timing=True)  # (a float on CPU)
            self._origin.record()
            self._mark: Any = self._origin
        else:
            self._origin = self.clock()
            self._mark = self._origin

    def section(self, kind: str, step: int = -1) -> _Section:
        """Context manager timing ``kind`` (one of :data:`KINDS` or any other name)."""
        return _Section(self, kind, step)

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return self.clock()

    def _close_segment(self, now: Any) -> None:
        """Attribute [mark, now) to the innermost open section."""
        kind, step = self._stack[-1]
        if self.cuda:
            self._pending.append((self._mark, now, kind, step))
            if len(self._pending) > self.capacity:
                self._resolve(1)
        else:
            self._add(self._mark - self._origin, now - self._origin, kind, step)
        self._mark = now

    def _add(self, start: float, end: float, kind: str, step: int) -> None:
        self._totals[kind] = self._totals.get(kind, 0.0) + (end - start)
        self._segments.append((start, end, kind, step))

    def _push(self, kind: str, step: int) -> None:
        now = self._now()
        if self._stack:
            self._close_segment(now)
        else:
            self._mark = now
        self._stack.append((kind, step))
        self._counts[kind] = self._counts.get(kind, 0) + 1

    def _pop(self) -> None:
        now = self._now()
        self._close_segment(now)
        self._stack.pop()

    def _resolve(self, n: int | None = None) -> None:
        """CUDA: turn the oldest ``n`` (default all) pending event pairs into segments."""
        count = len(self._pending) if n is None else min(n, len(self._pending))
        for _ in range(count):
            start_ev, end_ev, kind, step = self._pending.popleft()
            end_ev.synchronize()
            start = self._origin.elapsed_time(start_ev) / 1e3
            end = self._origin.elapsed_time(end_ev) / 1e3
            self._add(start, end, kind, step)

    # -- reading ----------------------------------------------------------------------
    def totals(self) -> dict[str, float]:
        """Seconds per kind since the last :meth:`reset` (closed segments only)."""
        if self.cuda:
            self._resolve()
        return dict(self._totals)

    def counts(self) -> dict[str, int]:
        """How many times each kind's section was entered."""
        return dict(self._counts)

    def timeline(self) -> list[tuple[float, float, str, int]]:
        """The kept segments ``(start, end, kind, step)``, seconds from the last reset."""
        if self.cuda:
            self._resolve()
        return list(self._segments)

    @property
    def origin_wall(self) -> float:
        """``time.time()`` at the last reset (to line up several ranks' timelines)."""
        return self._origin_wall

    def summary(self, wall: float) -> dict[str, Any]:
        """Totals plus busy / communication / waiting fractions of ``wall`` seconds."""
        totals = self.totals()
        busy = sum(totals.get(k, 0.0) for k in BUSY_KINDS)
        comm = sum(totals.get(k, 0.0) for k in COMM_KINDS)
        wait = sum(totals.get(k, 0.0) for k in WAIT_KINDS)
        wall = max(wall, 1e-12)
        return {"seconds": totals, "counts": self.counts(), "wall": wall,
                "busy_fraction": busy / wall, "comm_fraction": comm / wall, "wait_fraction": wait / wall,
                "other_fraction": max(0.0, 1.0 - (busy + comm + wait) / wall)}
