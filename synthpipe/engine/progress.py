"""What a fit shows while it runs: the progress bar's live values and the epoch lines."""
from __future__ import annotations

import sys
from typing import Any

from .step import LiveStats

__all__ = ["open_bar", "live_postfix", "epoch_line"]


def open_bar(total: int | None, initial: int, enabled: bool, description: str) -> Any:
    """A tqdm bar on stderr for a whole fit (disabled: a bar that shows nothing)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc=description,
                dynamic_ncols=True, file=sys.stderr)


def live_postfix(stats: LiveStats, rate: float) -> dict[str, str]:
    """The bar's postfix: samples/s, the newest loss and each boundary's synthesizer loss."""
    shown: dict[str, str] = {"samples/s": f"{rate:.0f}"}
    if stats.loss == stats.loss:
        shown["loss"] = f"{stats.loss:.4f}"
    for b, v in enumerate(stats.synth_losses):
        if v == v:
            shown[f"sg{b}"] = f"{v:.3g}"
    return shown


def epoch_line(row: dict[str, Any]) -> str:
    """One line per finished epoch: steps, speed, time and, when evaluated, the test metrics."""
    line = (f"epoch {row['epoch']}: {row['steps']} steps, {row['samples_per_s']:.0f} samples/s, "
            f"{row['time']:.1f} s")
    if "eval_accuracy" in row:
        line += f", eval loss {row['eval_loss']:.4f}, eval accuracy {100 * row['eval_accuracy']:.2f}%"
    return line
