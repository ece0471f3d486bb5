"""Failure detection: a rank that dies takes the whole job down, quickly and by name.

A pipeline cannot survive the loss of a stage, and a rank blocked in a receive from a
dead neighbour would otherwise wait for the collective timeout (30 minutes by default).
Each rank runs a :class:`Watchdog` thread that, through the rendezvous key-value store:

* writes a heartbeat counter every ``interval`` seconds;
* watches the other ranks' counters: one that has not moved for ``timeout`` seconds
  belongs to a dead (killed, crashed, out-of-memory) rank;
* watches an error key that a rank sets when it raises (first error wins);
* carries *stop requests*: a rank asked to stop (SIGTERM) counts one in the store, and
  every watchdog sees it within an interval, so rank 0, which drives the data, can end
  the run cleanly (drain, save a checkpoint) whichever rank got the signal;
* checks that the ranks make the same collective call (:meth:`Watchdog.agree`): a
  trainer method called on one rank only, or with a different checkpoint plan, is an
  error on every rank rather than a wait that never ends;
* warns when this rank's main thread makes no progress (:meth:`Watchdog.watching`): a
  rank stuck in a data loader or in user code keeps its heartbeat going (this thread
  beats, not the main one), so the job would otherwise wait without a word. The warning
  shows where the main thread is; it does not stop the job (a slow loader is not a
  failure).

On a failure, it prints a message naming the failed rank, first (before the main thread,
which may have hit the dead peer's closed connection, can print gloo's traceback), and
ends this process with exit code 1 (``os._exit``, because the main thread may be blocked
inside a receive). Losing the store itself (its host died) counts as a failure of the
rank that hosts it. Each surviving rank exits within ``timeout + 5 * interval`` seconds
of the failure (:func:`exit_bound`; ``failure_timeout`` + 2.5 s in a Trainer): a dead
rank's last heartbeat is seen at most an interval after it was written and its silence
is checked every interval, so it is declared dead within ``timeout + 2 * interval``; the
store's host then keeps the store up for ``3 * interval`` so that the others read the
verdict. An error a rank raises reaches the others within an interval or two.

That is how the job ends without torchrun's agent (plain processes, a launcher that
starts each rank itself). Under torchrun, the agent stops every rank (SIGTERM) as soon as
it sees one exit, and its report names the failed rank as the root cause; the watchdog
then only prints its message (when it sees the failure first) and leaves the ending to
the agent, exiting itself only if the agent has not acted within the bound.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch.distributed as dist

from .prefetch import THREAD_NAME as PREFETCH_THREAD_NAME

__all__ = ["Watchdog", "EXIT_CODE", "exit_bound", "open_store", "stall_message", "COLLECTIVE_RULE"]

EXIT_CODE = 1
_EXIT_INTERVALS = 5  # detection (2 intervals) + the store host's wait for the others to read (3)


def exit_bound(timeout: float, interval: float = 0.5) -> float:
    """Seconds after a rank fails within which every other rank has exited (see the module docstring)."""
    return timeout + _EXIT_INTERVALS * interval


COLLECTIVE_RULE = ("a Trainer's fit, evaluate, save, load, export, state_dict and close are collective: call them on "
                   "every rank, in the same order, with the same checkpoint, checkpoint_every and resume "
                   "(every rank saves and loads its own stage)")


def stall_message(rank: int, call: str, idle: float, next_after: float, frames: int = 8) -> str:
    """What a rank whose main thread made no progress for ``idle`` seconds says, with the
    innermost ``frames`` frames of that thread's stack."""
    current = sys._current_frames()

    def stack(thread: threading.Thread) -> str:
        frame = current.get(thread.ident or -1)
        return "".join(traceback.format_stack(frame)[-frames:]) if frame is not None else "  (unknown)\n"
    where = f"This rank's main thread is at:\n{stack(threading.main_thread())}"
    for thread in threading.enumerate():  # rank 0's loader runs here; the main thread only waits for it
        if thread.name == PREFETCH_THREAD_NAME:
            where += f"Its data loader (read by the prefetch thread) is at:\n{stack(thread)}"

    def secs(x: float) -> str:
        return f"{x:.0f}" if x >= 10 else f"{x:.1f}"
    return (f"synthpipe (rank {rank}): warning: no progress for {secs(idle)} s in {call}: no step, batch or gradient "
            f"completed on this rank. The job has not failed; it is waiting. A data loader that blocks on rank 0, "
            f"or a rank stuck in user code, stalls every rank. {where}"
            f"(next warning after {secs(next_after)} s without progress; TrainConfig.stall_warning sets when "
            f"the first comes)")


def _default_exit(message: str) -> None:
    os._exit(EXIT_CODE)  # (the watchdog printed the message already)


def open_store(timeout: float) -> Any:
    """A store client of our own (the store is shared with the process group's)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if host and port:
        try:
            return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout),
                                 wait_for_workers=False)
        except Exception:  # fall back to the process group's store below
            pass
    return dist.distributed_c10d._get_default_store()


class Watchdog:
    """Heartbeats and failure detection for ``rank`` of ``world_size``.

    Args:
        store: a c10d Store shared by all ranks.
        rank, world_size: this process's place in the job.
        timeout: seconds without a heartbeat after which a rank counts as dead.
        interval: seconds between heartbeats and checks.
        prefix: key namespace (unique per run and restart).
        on_failure: called with the message (already printed to stderr) instead of
            exiting (tests).
        describe: ``describe(rank)`` names a rank in messages (default ``"rank r"``; with
            data parallelism also its mesh coordinates, ``"rank 3 (dp 1, pp 1)"``).
    """

    def __init__(self, store: Any, rank: int, world_size: int, timeout: float = 30.0,
                 interval: float = 0.5, prefix: str = "synthpipe",
                 on_failure: Callable[[str], None] | None = None,
                 describe: Callable[[int], str] | None = None):
        if timeout <= interval:
            raise ValueError(f"failure timeout ({timeout} s) must exceed the heartbeat interval ({interval} s)")
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.interval = interval
        self.prefix = prefix
        self.on_failure = on_failure or _default_exit
        self.describe = describe or (lambda r: f"rank {r}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synthpipe-watchdog", daemon=True)
        self.failure: str | None = None
        self._failed = threading.Event()  # set once on_failure has returned (it normally exits)
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        self._store_address = (host, int(port)) if host and port and port.isdigit() else None
        self.stops = 0  # stop requests seen in the job so far (any rank's)
        self.stop_reason: str | None = None  # the latest request's reason
        self._asked: list[str] = []  # this rank's requests, published by the thread
        self._calls = 0  # collective calls agreed so far
        self._watched: tuple[str, Callable[[], int], float] | None = None  # (call, progress, warn after)

    def _key(self, *parts: Any) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    # -- public ---------------------------------------------------------------------
    def start(self) -> "Watchdog":
        self.store.set(self._key("hb", self.rank), "0")
        self._thread.start()
        atexit.register(self.close)
        return self

    def report(self, message: str) -> None:
        """Tell every rank that this rank failed (first report in the job wins).

        The store's host then waits a few heartbeats, so the others read the error
        before the store goes away with this process.
        """
        try:
            self.store.compare_set(self._key("error"), "", f"{self.describe(self.rank)}: {message}")
            if self.hosts_store:
                time.sleep(3 * self.interval)
        except Exception:
            pass

    def request_stop(self, reason: str) -> None:
        """Ask the job to stop cleanly; safe to call from a signal handler (the thread publishes it)."""
        self._asked.append(f"{reason} on rank {self.rank}")

    @contextlib.contextmanager
    def watching(self, call: str, progress: Callable[[], int], warn_after: float | None) -> Iterator[None]:
        """While in the block, warn if ``progress()`` (a counter the main thread raises as it
        works) stays the same for ``warn_after`` seconds, then again after twice as long, and
        so on. ``None`` turns the warning off."""
        if warn_after is None:
            yield
            return
        self._watched = (call, progress, warn_after)
        try:
            yield
        finally:
            self._watched = None

    def _check_progress(self, state: list[Any], now: float) -> None:
        """The thread's side of :meth:`watching`; ``state`` is ``[watched, last count, since, next warning]``."""
        watched = self._watched
        if watched is None:
            state[0] = None
            return
        call, progress, warn_after = watched
        count = progress()
        if watched is not state[0] or count != state[1]:
            state[:] = [watched, count, now, warn_after]
            return
        idle = now - state[2]
        if idle < state[3]:
            return
        state[3] *= 2
        print(stall_message(self.rank, call, idle, state[3]), file=sys.stderr, flush=True)

    def wait_for_verdict(self, seconds: float | None = None) -> str | None:
        """After a communication error: give the watchdog time to find the dead rank.

        Returns the failure message if one is known (the watchdog normally exits the
        process first), else ``None`` after ``seconds`` (default: the timeout).
        """
        # (the dead rank may have beaten just before it died: detection takes up to timeout + 2 intervals)
        deadline = time.monotonic() + (self.timeout + 4 * self.interval if seconds is None else seconds)
        while time.monotonic() < deadline and self.failure is None:
            time.sleep(self.interval / 2)
        return self.failure

    def wait_for_exit(self) -> None:
        """After :meth:`wait_for_verdict` found a failure: let the watchdog end this process.

        The store's host keeps the process (and the store) up for a few heartbeats so the
        other ranks read the verdict; a main thread that raised meanwhile would end the
        interpreter, and the store with it, first. Returns only where ``on_failure`` does
        not exit (tests), or if the watchdog has not ended the process well after it should.
        """
        self._failed.wait(timeout=self.timeout + 3 * self.interval + 5.0)  # (the longest wait in _fail, and some)

    def agree(self, call: str) -> None:
        """Check that every rank's next collective call is ``call``; wait for them to make it.

        ``call`` describes the call and the arguments that decide what it communicates (for
        example ``"save()"`` or ``"fit(checkpoint=..., checkpoint_every=4)"``). Each rank
        publishes it as its n-th call and reads the others' n-th. Raises ``ValueError`` on
        every rank, before anything is sent, if they differ, and ``RuntimeError`` if a rank
        closed (or exited) without making it: a method called on one rank only would
        otherwise wait in a receive or a barrier forever. A rank that is merely late is
        waited for, with a warning naming it after ``timeout`` seconds.
        """
        self._calls += 1
        n = self._calls
        self.store.set(self._key("call", n, self.rank), call)
        calls = {self.rank: call}
        missing = [r for r in range(self.world_size) if r != self.rank]
        started, pause, warned = time.monotonic(), 0.0005, False
        while missing:
            for r in list(missing):
                if self.store.check([self._key("call", n, r)]):
                    calls[r] = self.store.get(self._key("call", n, r)).decode()
                    missing.remove(r)
                elif self.store.check([self._key("done", r)]):
                    raise RuntimeError(
                        f"rank {self.rank} called {call} but rank {r} has closed its trainer (or exited) "
                        f"without making that call; {COLLECTIVE_RULE}")
            if missing:
                if not warned and time.monotonic() - started > self.timeout:
                    warnings.warn(f"synthpipe: rank {self.rank} has waited {self.timeout:g} s in {call} for "
                                  f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} to call "
                                  f"it too; {COLLECTIVE_RULE}", RuntimeWarning, stacklevel=3)
                    warned = True
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
        if len(set(calls.values())) > 1:
            self._confirm_seen(n)
            made = "; ".join(f"rank {r} called {c}" for r, c in sorted(calls.items()))
            raise ValueError(f"the ranks made different calls: {made}; {COLLECTIVE_RULE}")

    def _confirm_seen(self, n: int) -> None:
        """After a disagreement: the store's host waits (briefly) until every rank has read it."""
        self.store.set(self._key("call", n, "seen", self.rank), "1")
        if not self.hosts_store:
            return
        deadline = time.monotonic() + 6 * self.interval
        keys = [self._key("call", n, "seen", r) for r in range(self.world_size)]
        while not self.store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        """Mark this rank as finished (not dead), stop the thread and let go of the store."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.set(self._key("done", self.rank), "1")
        except Exception:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)
        # Our store client is freed now, not at interpreter exit: once a rank exits non-zero
        # (a clean stop on a signal, 130/143), torchrun's agent shuts its store down, and a
        # client destroyed after that aborted the process ("terminate called without an
        # active exception").
        self.store = None

    # -- thread ---------------------------------------------------------------------
    def _fail(self, message: str, verdict: str | None = None, reported: bool = False) -> None:
        """Publish ``verdict`` (so ranks that see it first agree on who failed), print the
        message, then exit (the store's host after the others have had time to read it).
        ``reported``: the failed rank raised and published its error (it is still exiting)."""
        self._stop.set()
        text = f"synthpipe ({self.describe(self.rank)}): {message}"
        try:
            if verdict is not None:
                self.store.compare_set(self._key("error"), "", verdict)
        except Exception:
            pass
        try:  # before self.failure is set: the main thread raises (with gloo's traceback) once it is
            print(text, file=sys.stderr, flush=True)
        except Exception:
            pass
        self.failure = message
        if self.hosts_store:  # keep the store up until the others have read the error
            time.sleep(3 * self.interval)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # Leave the ending to torchrun's agent, which stops every rank once it sees the
            # failed one exit: that exit, not this one, must be the first it sees (the "root
            # cause" of its report). A rank that raised can take seconds to exit; a dead rank
            # has exited already. (Within exit_bound either way.)
            time.sleep(self.timeout if reported else 3 * self.interval)
        self.on_failure(text)
        self._failed.set()

    @property
    def hosts_store(self) -> bool:
        """Rank 0 hosts the store unless torchrun's agent does."""
        return self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"

    def _store_gone(self) -> bool:
        """True if the store's host refuses connections: it died (or finished).

        Checked with a plain socket before each round of store calls, because a store call
        on a connection its host closed makes torch's C++ client log a warning with a stack
        trace, which would then come before this rank's message naming the failed rank.
        """
        if self.hosts_store or self._store_address is None:
            return False
        try:
            with socket.create_connection(self._store_address, timeout=self.interval):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:  # (slow or unreachable: the store calls below decide)
            return False

    def _lost_store(self, error: str) -> None:
        host = "torchrun's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
        self._fail(f"lost the rendezvous store hosted by {host} ({error}); "
                   f"{'rank 0' if host == 'rank 0' else 'the job'} failed; stopping")

    def _run(self) -> None:
        beats = 0
        seen: dict[int, tuple[bytes, float]] = {}
        started = time.monotonic()
        others = [r for r in range(self.world_size) if r != self.rank]
        done: set[int] = set()
        progress: list[Any] = [None, None, 0.0, 0.0]
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self._check_progress(progress, now)
            except Exception:  # (a warning that cannot be printed must not end failure detection)
                pass
            if self._store_gone():
                if self._stop.is_set() or 0 in done:
                    return
                return self._lost_store("its port refuses connections")
            try:
                beats += 1
                self.store.set(self._key("hb", self.rank), str(beats))
                while self._asked:
                    self.store.set(self._key("stop-reason"), self._asked.pop(0))
                    self.store.add(self._key("stops"), 1)
                stops = self.store.add(self._key("stops"), 0)
                if stops != self.stops:
                    self.stop_reason = self.store.get(self._key("stop-reason")).decode()
                    self.stops = stops
                if self.store.check([self._key("error")]):
                    error = self.store.get(self._key("error")).decode()
                    if error:
                        return self._fail(f"stopping because {error}", None, reported=True)
                for r in others:
                    if r in done or self.store.check([self._key("done", r)]):
                        done.add(r)
                        continue
                    value = self.store.get(self._key("hb", r)) if self.store.check([self._key("hb", r)]) else b""
                    last_value, since = seen.get(r, (None, started))
                    if value != last_value:
                        seen[r] = (value, now)
                    elif now - since > self.timeout:
                        verdict = (f"{self.describe(r)} stopped responding (no heartbeat for {now - since:.0f} s; "
                                   f"it was killed or crashed)")
                        return self._fail(f"{verdict}; stopping", verdict)
            except Exception as e:  # the store is gone: its host died or finished
                if self._stop.is_set() or 0 in done:
                    return
                return self._lost_store(str(e))
