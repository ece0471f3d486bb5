"""A rank that dies or raises takes the job down within the failure timeout, by name (engine/watchdog.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from multiprocess import free_port, rank_env

pytestmark = pytest.mark.timeout(120)

FAILURE_TIMEOUT = 4.0

# One rank of a 3-stage job that trains "forever" on synthetic batches. Stage 1 holds a
# `Probe` that writes a marker file once it has seen 10 steps, and, in mode "raise",
# raises at step 12; in mode "badshape", stage 0 emits a width stage 1 cannot take.
RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.nn as nn, synthpipe as sp
    torch.set_num_threads(1)
    mode, marker, world = sys.argv[1], sys.argv[2], int(os.environ["WORLD_SIZE"])

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.steps = 0
        def forward(self, h):
            self.steps += 1
            if self.steps == 10:
                open(marker, "w").close()
            if mode == "raise" and self.steps == 12:
                raise RuntimeError("boom in the probe")
            return h

    width = 17 if mode == "badshape" else 16
    layers = [nn.Linear(8, width), nn.ReLU(), nn.Linear(16, 16), Probe(), nn.Linear(16, 4)]
    balance = [2, 2, 1] if world == 3 else [2, 3]
    stages = sp.split(nn.Sequential(*layers), balance=balance)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)

    trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), progress=False, failure_timeout=float(sys.argv[3]))
    trainer.fit(batches(), max_steps=10**9)
""")


def start_job(tmp_path, world: int, mode: str) -> tuple[list[subprocess.Popen], str]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    marker = str(tmp_path / "marker")
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, **rank_env(rank, world, port), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), mode, marker, str(FAILURE_TIMEOUT)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs, marker


def wait_for(path: str, procs: list[subprocess.Popen], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            outs = [p.communicate()[1][-2000:] for p in procs]
            pytest.fail(f"the job did not start training: {outs}")
        time.sleep(0.1)


def finish(procs: list[subprocess.Popen], seconds: float) -> list[tuple[int | None, str, float]]:
    """(exit code, stderr, seconds to exit) per process; kills what is still running after ``seconds``."""
    start = time.monotonic()
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(0.1, start + seconds - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            results.append((None, err, float("inf")))
            continue
        results.append((p.returncode, err, time.monotonic() - start))
    return results


# The documented bound (failure_timeout + 5 heartbeats) plus room for a busy shared machine
# to schedule the processes: a correctness bound, not a timing benchmark.
SCHEDULING_SLACK = 4.0


def first_words(err: str, victim: int) -> str:
    """What a surviving rank printed before its message naming ``victim`` (warnings aside)."""
    lines = err.splitlines()
    named = next((i for i, line in enumerate(lines) if line.startswith("synthpipe (rank ") and f"rank {victim}" in
                  line.split(":", 1)[1]), None)
    assert named is not None, f"no synthpipe message naming rank {victim}: {err[-1500:]}"
    return "\n".join(line for line in lines[:named] if "Warning" not in line and line.strip())


@pytest.mark.parametrize("world,victim", [(3, 1), (2, 0), (2, 1)])
def test_killing_one_rank_makes_the_others_exit_naming_it_first_within_the_bound(tmp_path, world, victim):
    from synthpipe.engine.watchdog import exit_bound

    procs, marker = start_job(tmp_path, world, "train")
    wait_for(marker, procs)
    procs[victim].send_signal(signal.SIGKILL)
    bound = exit_bound(FAILURE_TIMEOUT) + SCHEDULING_SLACK
    results = finish(procs, bound + 10)
    for rank, (code, err, took) in enumerate(results):
        if rank == victim:
            continue
        assert code is not None, f"rank {rank} still running {bound + 10} s after rank {victim} was killed"
        assert code == 1, f"rank {rank} exited {code} after rank {victim} died: {err[-1500:]}"
        assert first_words(err, victim) == "", f"rank {rank} printed before naming rank {victim}: {err[-3000:]}"
        assert took <= bound, f"rank {rank} exited {took:.1f} s after rank {victim} was killed (bound {bound:.1f} s)"


def test_a_rank_that_raises_stops_the_others_with_its_error(tmp_path):
    procs, marker = start_job(tmp_path, 3, "raise")
    results = finish(procs, 60)
    codes = [code for code, _, _ in results]
    assert all(code not in (None, 0) for code in codes), codes
    assert "boom in the probe" in results[1][1]
    for rank in (0, 2):
        assert "rank 1: " in results[rank][1] and "boom in the probe" in results[rank][1], results[rank][1][-1500:]
        assert first_words(results[rank][1], 1) == "", results[rank][1][-3000:]


def test_a_shape_a_stage_cannot_take_names_the_stage_and_shapes(tmp_path):
    procs, _ = start_job(tmp_path, 3, "badshape")
    results = finish(procs, 60)
    assert all(code not in (None, 0) for code, _, _ in results)
    message = "stage 1 failed on its input ((8, 17):float32)"
    assert message in results[1][1], results[1][1][-1500:]
    assert message in results[0][1] and message in results[2][1]


# -- a rank alive but stuck ---------------------------------------------------------------------

def a_loader_that_blocks(batches: list, at: int, seconds: float):
    for i, b in enumerate(batches):
        if i == at:
            time.sleep(seconds)  # a dead file server, a queue nobody fills...
        yield b


def stalled_fit(rank: int) -> dict:
    import io

    import torch
    import torch.nn as nn

    import synthpipe as sp

    sys.stderr = captured = io.StringIO()  # (the watchdog thread prints here)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(6)]
    trainer = sp.Trainer(sp.split(model, balance=[2, 1]), nn.CrossEntropyLoss(), progress=False,
                         stall_warning=1.0)
    loader = a_loader_that_blocks(batches, at=3, seconds=3.0) if rank == 0 else None
    trainer.fit(loader, max_steps=6)
    trainer.close()
    return {"step": trainer.step, "stderr": captured.getvalue()}


def test_a_stuck_loader_is_reported_by_every_rank_with_where_it_waits():
    from multiprocess import run_ranks

    results = run_ranks(stalled_fit, 2, timeout=60)
    assert [r["step"] for r in results] == [6, 6]  # a stall is only a warning: the fit went on and ended
    rank0, rank1 = results[0]["stderr"], results[1]["stderr"]
    assert "synthpipe (rank 0): warning: no progress for 1.0 s in fit()" in rank0, rank0
    assert "in a_loader_that_blocks" in rank0 and "time.sleep(seconds)" in rank0, rank0
    assert "synthpipe (rank 1): warning: no progress for 1.0 s in fit()" in rank1, rank1
    assert "recv" in rank1, rank1  # rank 1 waits for rank 0's next activation


# -- under torchrun's agent ---------------------------------------------------------------------

def start_torchrun(tmp_path, world: int, mode: str) -> tuple[subprocess.Popen, str]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    marker = str(tmp_path / "marker")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-port", str(free_port()), str(script), mode, marker, str(FAILURE_TIMEOUT)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), marker


def worker_pid(agent: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank} under torchrun")


def root_cause(report: str) -> str:
    """The rank torchrun's report names as the root cause of the failure."""
    assert "Root Cause (first observed failure):" in report, report[-3000:]
    section = report.split("Root Cause (first observed failure):", 1)[1]
    return section.split("rank      :", 1)[1].split("(", 1)[0].strip()


@pytest.mark.parametrize("mode", ["train", "raise"])
def test_under_torchrun_the_agent_ends_the_job_and_its_report_names_the_failed_rank(tmp_path, mode):
    from synthpipe.engine.watchdog import exit_bound

    agent, marker = start_torchrun(tmp_path, 3, mode)
    wait_for(marker, [agent])
    if mode == "train":
        os.kill(worker_pid(agent, 1), signal.SIGKILL)
    bound = exit_bound(FAILURE_TIMEOUT) + SCHEDULING_SLACK  # (in mode "raise", stage 1 raises 2 steps after the marker)
    try:
        report, _ = agent.communicate(timeout=bound + 10)
    except subprocess.TimeoutExpired:
        agent.kill()
        report, _ = agent.communicate()
        pytest.fail(f"torchrun still running {bound + 10} s after the failure: {report[-3000:]}")
    assert agent.returncode != 0
    assert root_cause(report) == "1", report[-3000:]  # not a survivor that exited on its own first
    for line in report.splitlines():  # what synthpipe printed (the agent may end a rank before it does)
        if line.startswith("synthpipe (rank "):
            assert "rank 1" in line.split(":", 1)[1], line
