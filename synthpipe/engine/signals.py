"""SIGTERM and Ctrl-C during a fit: a clean stop after the current step, then a save.

:class:`StopSignals` turns SIGTERM (what torchrun and cluster schedulers send before
killing a job) and a first SIGINT into a request that the trainer's data loop checks
after every step; the pipeline then drains and every rank saves its checkpoint. A second
SIGINT raises ``KeyboardInterrupt`` at once, as Ctrl-C normally does (saves are atomic,
so the last complete checkpoint survives it). A rank other than 0 passes its request on
through the watchdog, since only rank 0 runs the data loop.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

from .watchdog import Watchdog

__all__ = ["StopSignals"]


class StopSignals:
    """The stop requests of one fit on rank ``rank``.

    Args:
        rank: this process's rank (named in :attr:`reason`).
        watchdog: passes requests between ranks (``None`` in one process).
    """

    def __init__(self, rank: int, watchdog: Watchdog | None):
        self.rank = rank
        self.watchdog = watchdog
        self.here: str | None = None  # "SIGTERM on rank 1": set by this process's handler
        self.signum: int = signal.SIGTERM  # (which of the two it was)
        self._stops_before = watchdog.stops if watchdog is not None else 0
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        """Take over SIGTERM and SIGINT while they have their default handlers.

        An application's own handler is left alone, and nothing is installed outside the
        main thread (where Python cannot set handlers).
        """
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            if signal.getsignal(signum) is default:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.here is not None:
            # Ctrl-C again: the user wants out now, not after the save.
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
            raise KeyboardInterrupt
        if self.here is None:
            self.here, self.signum = f"{name} on rank {self.rank}", signum
            if signum == signal.SIGINT and self.rank == 0:
                # (os.write: print() is not safe here, the main thread may be inside one)
                os.write(2, b"\nsynthpipe: stopping after this step and saving the checkpoint; "
                            b"press Ctrl-C again to stop at once\n")
        if self.watchdog is not None:
            self.watchdog.request_stop(name)  # for rank 0, if this is not it

    @property
    def reason(self) -> str | None:
        """Rank 0: why to stop now, if this process or another rank was asked to."""
        if self.here is not None:
            return self.here
        if self.watchdog is not None and self.watchdog.stops > self._stops_before:
            return self.watchdog.stop_reason
        return None

    def act_late(self, stopped: str | None) -> None:
        """A signal that came after the data loop ended (during the last save, say): the
        run is complete and saved, so act on it now as the signal's default would have."""
        if self.here is not None and stopped is None:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), self.signum)
