"""Failure detection (engine/watchdog.py) with an in-process store; the multi-process cases are in test_failure.py."""
from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from synthpipe.engine.watchdog import Watchdog

pytestmark = pytest.mark.timeout(30)


def make(store, rank, failures, timeout=0.6):
    return Watchdog(store, rank, 2, timeout=timeout, interval=0.1, prefix="t", on_failure=failures.append)


def test_a_silent_rank_is_declared_dead_by_name():
    store, failures = dist.HashStore(), []
    store.set("t/hb/1", "0")  # rank 1 started once, then went silent
    dog = make(store, 0, failures).start()
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.05)
    dog.close()
    assert failures and "rank 1 stopped responding" in failures[0]
    assert "rank 1 stopped responding" in store.get("t/error").decode()


def test_a_reported_error_stops_the_other_ranks_and_first_report_wins():
    store, failures = dist.HashStore(), []
    a, b = make(store, 0, failures, timeout=5), make(store, 1, [], timeout=5)
    a.start()
    b.start()
    b.report("ValueError: bad batch")
    a.report("a later error")
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.05)
    a.close()
    b.close()
    assert failures == ["synthpipe (rank 0): stopping because rank 1: ValueError: bad batch"]


def test_a_rank_that_finished_is_not_dead():
    store, failures = dist.HashStore(), []
    a, b = make(store, 0, failures), make(store, 1, [])
    a.start()
    b.start()
    b.close()
    time.sleep(1.2)
    a.close()
    assert failures == []


def test_timeout_must_exceed_interval():
    with pytest.raises(ValueError, match="must exceed the heartbeat interval"):
        Watchdog(dist.HashStore(), 0, 2, timeout=0.1, interval=0.5)


def test_a_stop_request_reaches_every_rank_by_name():
    store, failures = dist.HashStore(), []
    a, b = make(store, 0, failures, timeout=5), make(store, 1, failures, timeout=5)
    a.start()
    b.start()
    assert a.stops == 0 and a.stop_reason is None
    b.request_stop("SIGTERM")
    deadline = time.monotonic() + 5
    while (a.stops == 0 or b.stops == 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    a.close()
    b.close()
    assert (a.stops, a.stop_reason) == (b.stops, b.stop_reason) == (1, "SIGTERM on rank 1")
    assert failures == []  # a stop is not a failure
