"""Failure detection (engine/watchdog.py) with an in-process store; the multi-process cases are in test_failure.py."""
from __future__ import annotations

import re
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


def agree_in_threads(dogs, calls, delays=None):
    """Each watchdog agrees on its call in a thread of its own (as its rank would); what each got."""
    import threading

    outcome: dict[int, str] = {}

    def one(rank):
        time.sleep((delays or {}).get(rank, 0.0))
        try:
            for call in calls[rank]:
                dogs[rank].agree(call)
            outcome[rank] = "agreed"
        except Exception as e:
            outcome[rank] = f"{type(e).__name__}: {e}"
    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(dogs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "agree hung"
    return outcome


def test_ranks_making_the_same_calls_agree_even_when_one_is_late():
    store = dist.HashStore()
    dogs = [make(store, r, [], timeout=5) for r in range(2)]
    calls = ["fit(checkpoint=..., checkpoint_every=4)", "save()", "close()"]
    assert agree_in_threads(dogs, {0: calls, 1: calls}, delays={1: 0.3}) == {0: "agreed", 1: "agreed"}


def test_different_calls_are_an_error_on_every_rank_naming_both():
    store = dist.HashStore()
    dogs = [make(store, r, [], timeout=5) for r in range(2)]
    outcome = agree_in_threads(dogs, {0: ["fit()", "save()"], 1: ["fit()", "close()"]})
    for r in range(2):
        assert outcome[r].startswith("ValueError: the ranks made different calls: rank 0 called save(); "
                                     "rank 1 called close()"), outcome[r]
        assert "call them on every rank, in the same order" in outcome[r]


def test_a_rank_that_closed_without_the_call_is_an_error_not_a_wait():
    store = dist.HashStore()
    dog = make(store, 0, [], timeout=5)
    make(store, 1, [], timeout=5).close()  # rank 1 finished (its trainer closed) without calling save
    with pytest.raises(RuntimeError, match="rank 0 called save.. but rank 1 has closed its trainer"):
        dog.agree("save()")


def test_a_long_wait_for_a_call_warns_naming_the_missing_rank():
    store = dist.HashStore()
    dogs = [make(store, r, [], timeout=0.3) for r in range(2)]
    with pytest.warns(RuntimeWarning, match=r"rank 0 has waited 0.3 s in evaluate\(\) for rank 1 to call it too"):
        outcome = agree_in_threads(dogs, {0: ["evaluate()"], 1: ["evaluate()"]}, delays={1: 0.8})
    assert outcome == {0: "agreed", 1: "agreed"}


# -- stalls: a rank alive but stuck ------------------------------------------------------------

def stuck_in_the_loader(seconds: float) -> None:
    time.sleep(seconds)


def test_a_rank_without_progress_says_where_its_main_thread_is(capsys):
    store, failures = dist.HashStore(), []
    a, b = make(store, 0, failures, timeout=5), make(store, 1, [], timeout=5)
    a.start()
    b.start()
    with a.watching("fit()", lambda: 7, warn_after=0.3):  # a count that never moves
        stuck_in_the_loader(1.0)  # warnings after 0.3 s and 0.6 s without progress, not after 1.2 s
    a.close()
    b.close()
    err = capsys.readouterr().err
    assert not failures  # a stall is not a failure
    warnings = [w for w in err.split("synthpipe (rank 0): warning: ")[1:]]
    assert len(warnings) == 2, err
    idle = [float(re.match(r"no progress for ([\d.]+) s in fit\(\)", w).group(1)) for w in warnings]
    assert 0.3 <= idle[0] < 0.6 <= idle[1] < 1.2, warnings
    assert "in stuck_in_the_loader" in warnings[0] and "time.sleep(seconds)" in warnings[0], warnings[0]
    assert "next warning after 0.6 s" in warnings[0] and "next warning after 1.2 s" in warnings[1]


def test_progress_or_no_watch_means_no_warning(capsys):
    store = dist.HashStore()
    a, b = make(store, 0, [], timeout=5), make(store, 1, [], timeout=5)
    a.start()
    b.start()
    count = [0]
    with a.watching("fit()", lambda: count[0], warn_after=0.3):
        for _ in range(12):  # 1.2 s, but a step every 0.1 s
            time.sleep(0.1)
            count[0] += 1
    with a.watching("evaluate()", lambda: 0, warn_after=None):  # turned off
        time.sleep(0.6)
    stuck_in_the_loader(0.6)  # outside any watched call (user code between fits)
    a.close()
    b.close()
    assert "warning" not in capsys.readouterr().err
