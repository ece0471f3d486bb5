"""Training metrics: the per-step log of each rank, merged into one :class:`History`."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable

NaN = float("nan")


@dataclasses.dataclass
class History:
    """What ``Trainer.fit`` returns.

    Attributes:
        steps: one dict per training step: ``step``, ``epoch``, ``loss`` (last stage),
            ``synth_loss`` (list, one per boundary; NaN where that boundary trained no
            synthesizer at that step), ``time`` (seconds since the fit began, on rank 0).
        epochs: one dict per finished epoch: ``epoch``, ``steps``, ``samples``, ``time``,
            ``samples_per_s`` and, with an eval loader, ``eval_loss``, ``eval_accuracy``.
    """

    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    epochs: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record (empty if no epoch finished)."""
        return self.epochs[-1] if self.epochs else {}

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs}

    def to_json(self, path: str) -> None:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, list):
                return [clean(v) for v in x]
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return x
        with open(path, "w") as f:
            json.dump(clean(self.as_dict()), f, indent=1)


class StepLog:
    """One rank's per-step values: ``log.put(step, key, value)``; merged across ranks later."""

    def __init__(self) -> None:
        self.values: dict[int, dict[str, Any]] = {}

    def put(self, step: int, key: str, value: Any) -> None:
        self.values.setdefault(step, {})[key] = value

    def clear(self) -> None:
        self.values.clear()


def merge_logs(logs: Iterable[dict[int, dict[str, Any]]], n_boundaries: int) -> list[dict[str, Any]]:
    """Rows by step from the ranks' logs. Keys ``synth_loss/<b>`` become the ``synth_loss`` list."""
    merged: dict[int, dict[str, Any]] = {}
    for log in logs:
        for step, values in log.items():
            merged.setdefault(step, {}).update(values)
    rows = []
    for step in sorted(merged):
        v = merged[step]
        rows.append({
            "step": step,
            "epoch": v.get("epoch"),
            "loss": v.get("loss", NaN),
            "synth_loss": [v.get(f"synth_loss/{b}", NaN) for b in range(n_boundaries)],
            "time": v.get("time", NaN),
        })
    return rows
