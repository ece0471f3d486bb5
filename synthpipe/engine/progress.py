"""What a fit shows while it runs: the progress bar's live values and the epoch lines.

On a terminal (or in a notebook) that is a tqdm bar. Elsewhere (stderr redirected to a
log file, a batch job's output) a bar would write every redraw into the file, so the
fit writes a plain line instead every ``LOG_INTERVAL`` seconds, and one at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from .step import LiveStats

__all__ = ["open_bar", "live_postfix", "epoch_line", "LogLines", "LOG_INTERVAL"]

LOG_INTERVAL = 30.0  # seconds between two progress lines off a terminal


def open_bar(total: int | None, initial: int, enabled: bool, description: str, stream: TextIO | None = None,
             interval: float = LOG_INTERVAL) -> Any:
    """A progress display on ``stream`` (default stderr) for a whole fit.

    A tqdm bar where ``stream`` is a terminal or the code runs in a notebook; otherwise a
    :class:`LogLines` (a line every ``interval`` seconds). Disabled: a bar that shows nothing.
    """
    from tqdm.auto import tqdm

    stream = stream if stream is not None else sys.stderr
    if enabled and not _interactive(stream):
        return LogLines(total, initial, description, stream, interval)
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc=description,
                dynamic_ncols=True, file=stream)


def _interactive(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty()) or "ipykernel" in sys.modules


class LogLines:
    """Progress as plain log lines, the interface of the tqdm bar the fit uses.

    A line (``<description>: step 120/600 (20%), 35 s, samples/s=850, loss=0.4321``) is
    written when at least ``interval`` seconds passed since the last one, and at
    :meth:`close` if steps were made since. ``write`` passes a line through at once.
    """

    def __init__(self, total: int | None, initial: int, description: str, stream: TextIO,
                 interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.description, self.stream = total, initial, description, stream
        self.interval, self.clock = interval, clock
        self.postfix: dict[str, str] = {}
        self._start = self._last = clock()
        self._shown = initial  # the step count of the last line

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.interval:
            self._line(now)

    def set_postfix(self, values: dict[str, str], refresh: bool = False) -> None:
        self.postfix = dict(values)

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.n != self._shown:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        done = f"step {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")
        parts = [done, f"{now - self._start:.0f} s"] + [f"{k}={v}" for k, v in self.postfix.items()]
        self.write(f"{self.description}: {', '.join(parts)}")
        self._last, self._shown = now, self.n


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
