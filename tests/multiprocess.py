"""Run a function on N local ranks (gloo, CPU), as torchrun would, with a hard deadline.

``run_ranks(fn, n, *args, timeout=...)`` starts N spawned processes with the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), runs
``fn(rank, *args)`` in each and returns the results by rank. A rank that raises, exits
non-zero or is still running at the deadline fails the test (every process is killed):
a distributed test can fail, but never hang.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(rank_env(rank, world_size, port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    try:
        value = fn(rank, *args)
        buffer = io.BytesIO()  # plain bytes: tensor handles would die with this process
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1) from None


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 90.0) -> list[Any]:
    """``[fn(0, *args), ..., fn(world_size - 1, *args)]``, each in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.2)
                got[rank] = (ok, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    failures = [f"rank {r} raised:\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
    failures += [f"rank {r} exited with code {p.exitcode} and no result"
                 for r, p in enumerate(procs) if r not in got and r not in hung]
    if hung:
        failures.append(f"ranks {hung} still running after {timeout} s (killed)")
    if failures:
        raise AssertionError("\n".join(failures))
    import torch
    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(world_size)]
