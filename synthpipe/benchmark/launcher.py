"""A pool of spawned rank processes that run benchmark jobs one after another.

Each process of a :class:`RankPool` is started once (spawn; the torchrun environment is
set per job) with the same thread count, then takes jobs from its inbox: a job is a
picklable function ``fn(ctx, spec)`` run by ranks ``0..n-1`` of the pool, where ``ctx``
(:class:`RankContext`) gives the rank, the job's world size and a fresh rendezvous port.
Starting the processes once saves the import and start-up time of every job; each
multi-rank job creates (and destroys) its own process group on its own port.

A job that raises, kills a rank or runs past its deadline raises :class:`JobError` in the
harness; the pool is then torn down and restarted for the next job, so one broken job
never hangs a benchmark.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["THREAD_VARS", "JobError", "free_port", "RankContext", "RankPool"]

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class JobError(RuntimeError):
    """A benchmark job failed (a rank raised, died, or the job ran past its deadline)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class RankContext:
    """What a job function learns about where it runs."""

    rank: int
    world_size: int
    threads: int
    port: int
    job_id: int

    def set_env(self) -> None:
        """The torchrun environment for this job (a one-process job gets WORLD_SIZE=1)."""
        os.environ.update({"RANK": str(self.rank), "LOCAL_RANK": str(self.rank),
                           "WORLD_SIZE": str(self.world_size), "LOCAL_WORLD_SIZE": str(self.world_size),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port),
                           "TORCHELASTIC_RUN_ID": f"bench{self.job_id}", "TORCHELASTIC_RESTART_COUNT": "0"})


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serve(rank: int, threads: int, cores: list[int] | None, inbox: Any, results: Any) -> None:
    """The loop of one pool process."""
    if cores:
        try:
            os.sched_setaffinity(0, cores)
        except (AttributeError, OSError):
            pass
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    while True:
        item = inbox.get()
        if item is None:
            return
        job_id, fn, spec, world, port = item
        ctx = RankContext(rank, world, threads, port, job_id)
        try:
            value = fn(ctx, spec)
            results.put((job_id, rank, True, value))
        except BaseException:
            results.put((job_id, rank, False, traceback.format_exc()))
            if world > 1:
                return  # the process group may be unusable: let the harness restart the pool


class RankPool:
    """``size`` spawned processes, each with ``threads`` intra-op threads.

    Args:
        size: processes (the largest job's rank count).
        threads: ``torch.set_num_threads`` (and ``OMP_NUM_THREADS``) in every process.
        pin: give rank r its own cores ``[r*threads, (r+1)*threads)`` (``sched_setaffinity``).
    """

    def __init__(self, size: int, threads: int = 1, pin: bool = False):
        self.size, self.threads, self.pin = size, threads, pin
        self._job = 0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(self.size)]
        ncores = os.cpu_count() or 1
        env = {k: str(self.threads) for k in THREAD_VARS}
        self.procs = []
        with _environ(env):
            for r in range(self.size):
                cores = ([c % ncores for c in range(r * self.threads, (r + 1) * self.threads)]
                         if self.pin else None)
                p = ctx.Process(target=_serve, args=(r, self.threads, cores, self.inboxes[r], self.results),
                                daemon=True, name=f"synthpipe-bench-rank{r}")
                p.start()
                self.procs.append(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def run(self, fn: Callable[[RankContext, Any], Any], spec: Any, world: int, timeout: float) -> list[Any]:
        """Run ``fn(ctx, spec)`` on ranks ``0..world-1``; their return values by rank."""
        if world > self.size:
            raise ValueError(f"a job on {world} ranks needs a pool of at least {world} processes")
        self._job += 1
        job_id, port = self._job, free_port()
        for r in range(world):
            self.inboxes[r].put((job_id, fn, spec, world, port))
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        failure: str | None = None
        while len(got) < world:
            if time.monotonic() > deadline:
                failure = f"ranks {sorted(set(range(world)) - set(got))} still running after {timeout:.3g} s"
                break
            try:
                jid, rank, ok, value = self.results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r in range(world) if r not in got and not self.procs[r].is_alive()]
                if dead:
                    failure = f"rank(s) {dead} died (exit codes {[self.procs[r].exitcode for r in dead]})"
                    break
                continue
            if jid != job_id:
                continue  # a late answer from a job that already failed
            if not ok:
                failure = f"rank {rank} raised:\n{value}"
                break
            got[rank] = value
        if failure is not None:
            self.restart()
            raise JobError(failure)
        return [got[r] for r in range(world)]

    def restart(self) -> None:
        self.close(graceful=False)
        self._start()

    def close(self, graceful: bool = True) -> None:
        if graceful:
            for inbox, p in zip(self.inboxes, self.procs, strict=True):
                if p.is_alive():
                    inbox.put(None)
            for p in self.procs:
                p.join(timeout=5)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(graceful=exc[0] is None)
