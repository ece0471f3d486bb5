"""The per-stage cache of activations waiting for their gradient target (docs/guide.md, "The target cache")."""
from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch

__all__ = ["Entry", "TargetCache", "train_due_synthesizer"]


@dataclasses.dataclass
class Entry:
    """Step ``step``'s detached boundary ``h``, labels ``y`` and, once known, its target."""

    step: int
    h: tuple
    y: Any
    target: tuple | None = None
    skipped: bool = False

    @property
    def ready(self) -> bool:
        return self.target is not None or self.skipped


class TargetCache:
    """Entries by step id, oldest first. Bounded by the caller (``max_inflight`` or delay)."""

    def __init__(self) -> None:
        self._entries: "OrderedDict[int, Entry]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def add(self, step: int, h: tuple, y: Any) -> None:
        self._entries[step] = Entry(step, tuple(t.detach() if torch.is_tensor(t) else t for t in h), y)

    def put_target(self, step: int, target: tuple, skipped: bool = False) -> None:
        entry = self._entries.get(step)
        if entry is None:
            raise KeyError(f"a gradient target arrived for step {step}, which is not waiting for one "
                           f"(waiting: {list(self._entries)})")
        entry.target, entry.skipped = (None if skipped else tuple(target)), skipped

    def get(self, step: int) -> Entry | None:
        return self._entries.get(step)

    def oldest(self) -> Entry | None:
        return next(iter(self._entries.values()), None)

    def pop(self, step: int) -> Entry:
        return self._entries.pop(step)

    def pop_ready(self) -> list[Entry]:
        """Remove and return every entry whose target has arrived, in step order."""
        ready = [e for e in self._entries.values() if e.ready]
        for e in ready:
            del self._entries[e.step]
        return ready

    def state_dict(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(e) for e in self._entries.values()]

    def load_state_dict(self, state: list[dict[str, Any]], device: torch.device) -> None:
        def to(x: Any) -> Any:
            if torch.is_tensor(x):
                return x.to(device)
            if isinstance(x, (tuple, list)):
                return tuple(to(v) for v in x)
            return x
        self._entries.clear()
        for e in state:
            self._entries[e["step"]] = Entry(e["step"], to(e["h"]), to(e["y"]),
                                             to(e["target"]) if e["target"] is not None else None, e["skipped"])


def train_due_synthesizer(stage: Any, cache: TargetCache, step: int, delay: int | None,
                          max_inflight: int, wait_for: Callable[[int], None],
                          agree: Callable[[int], int] | None = None) -> float | None:
    """Train the synthesizer of one stage on its due targets, after its update at step ``step``.

    What is due is described in docs/guide.md, "The target cache".

    With a fixed ``delay``, train on exactly the entry of step ``step - delay`` (waiting
    for its target through ``wait_for``). Without, train on every entry whose target has
    arrived and, while the cache holds ``max_inflight`` entries, wait for the oldest.
    Returns the mean regression loss, or ``None`` if nothing was trained.

    ``agree`` (data parallelism, without a fixed delay): the replicas of the stage must
    train on the same entries, since every regression step averages its gradients over
    them. Each replica first waits until popping its ready entries (a prefix: targets
    arrive in step order) would leave fewer than ``max_inflight``; ``agree(n)`` then gives
    the replicas' smallest count of ready entries, and the first that many are trained.
    """
    entries: list[Entry] = []
    if delay is not None:
        due = cache.get(step - delay)
        if due is not None:
            if not due.ready:
                wait_for(due.step)
            entries.append(cache.pop(due.step))
    elif agree is not None:
        def ready() -> list[Entry]:
            return list(itertools.takewhile(lambda e: e.ready, cache))
        while len(cache) - len(ready()) >= max_inflight:
            wait_for(next(e.step for e in cache if not e.ready))
        entries.extend(cache.pop(e.step) for e in ready()[:agree(len(ready()))])
    else:
        entries.extend(cache.pop_ready())
        while len(cache) >= max_inflight:
            oldest = cache.oldest()
            assert oldest is not None
            wait_for(oldest.step)
            entries.extend(cache.pop_ready())
    losses = [stage.train_synthesizer(e.h, e.y, e.target) for e in entries if not e.skipped]
    return sum(losses) / len(losses) if losses else None
