"""Training metrics: the per-step log of each rank, merged into one :class:`History`."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Iterable

__all__ = ["History", "StepLog", "merge_logs"]

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

    def plot(self, path: str, title: str = "", reference_accuracy: float | None = None,
             reference_label: str = "backprop") -> None:
        """Write the training curves as a PNG: the loss per step (and its moving average), each
        boundary's synthesizer loss per step (how closely the synthetic gradients track their
        targets; log scale) and, when epochs were evaluated, the test accuracy per epoch, with
        ``reference_accuracy`` (e.g. backprop's, same steps) as a dashed line."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        steps = [s["step"] for s in self.steps]
        evaluated = [e for e in self.epochs if e.get("eval_accuracy") is not None]
        panels = 2 + bool(evaluated)
        fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8))
        ax = axes[0]
        losses = [s["loss"] for s in self.steps]
        ax.plot(steps, losses, lw=0.6, alpha=0.4, color="C0", label="per step")
        window = max(1, len(losses) // 50)
        if window > 1:
            ax.plot(steps[window - 1:], _moving_average(losses, window), color="C0", label=f"mean of {window}")
            ax.legend(fontsize=8)
        ax.set(xlabel="step", ylabel="loss (last stage)", title="training loss")
        ax = axes[1]
        boundaries = max((len(s["synth_loss"]) for s in self.steps), default=0)
        drawn = False
        for b in range(boundaries):
            points = [(s["step"], s["synth_loss"][b]) for s in self.steps
                      if b < len(s["synth_loss"]) and math.isfinite(s["synth_loss"][b]) and s["synth_loss"][b] > 0]
            if points:
                ax.plot(*zip(*points, strict=True), lw=0.8, label=f"boundary {b}")
                drawn = True
        if drawn:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no synthesizer trained\n(backprop mode)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set(xlabel="step", ylabel="synthesizer loss", title="synthetic vs target gradients")
        if evaluated:
            ax = axes[2]
            ax.plot([e["epoch"] + 1 for e in evaluated], [100 * e["eval_accuracy"] for e in evaluated],
                    marker="o", label="this run")
            if reference_accuracy is not None:
                ax.axhline(100 * reference_accuracy, ls="--", color="gray", label=f"{reference_label} (same steps)")
            ax.legend(fontsize=8)
            ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="evaluation")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _moving_average(values: list[float], window: int) -> list[float]:
    finite = [v if math.isfinite(v) else 0.0 for v in values]
    out, total = [], sum(finite[:window - 1])
    for i in range(window - 1, len(finite)):
        total += finite[i]
        out.append(total / window)
        total -= finite[i - window + 1]
    return out


class StepLog:
    """One rank's per-step values: ``log.put(step, key, value)``; merged across ranks later.

    ``sink``, when set, is called with every value as it is put (a TensorBoard writer).
    """

    def __init__(self) -> None:
        self.values: dict[int, dict[str, Any]] = {}
        self.sink: Callable[[int, str, Any], None] | None = None

    def put(self, step: int, key: str, value: Any) -> None:
        self.values.setdefault(step, {})[key] = value
        if self.sink is not None:
            self.sink(step, key, value)

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
