"""The prefetch queue (engine/prefetch.py): order, bound, errors, early stop; CUDA streams on a GPU."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from synthpipe.engine.prefetch import PrefetchQueue


def batches(n: int):
    for i in range(n):
        yield torch.full((2, 3), float(i)), torch.tensor([i, i])


def test_yields_every_batch_in_order_on_cpu():
    got = [(x[0, 0].item(), y[0].item()) for x, y in PrefetchQueue(batches(7), "cpu", depth=2)]
    assert got == [(float(i), i) for i in range(7)]


def test_the_producer_stays_at_most_depth_batches_ahead():
    produced = []

    def counting():
        for i in range(50):
            produced.append(i)
            yield torch.zeros(1)

    queue = PrefetchQueue(counting(), depth=3)
    it = iter(queue)
    next(it)
    time.sleep(0.3)
    # consumed 1, queue holds 3, the producer may hold one more it could not put yet
    assert len(produced) <= 1 + 3 + 1
    queue.close()


def test_loader_errors_reach_the_consumer():
    def broken():
        yield torch.zeros(1)
        raise IOError("disk went away")

    queue = PrefetchQueue(broken())
    with pytest.raises(IOError, match="disk went away"):
        for _ in queue:
            pass


def test_stopping_early_ends_the_thread():
    before = threading.active_count()
    with PrefetchQueue(batches(1000), depth=2) as queue:
        for i, _ in enumerate(queue):
            if i == 3:
                break
    time.sleep(0.2)
    assert threading.active_count() <= before


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be at least 1"):
        PrefetchQueue([], depth=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_stream_pinned_memory_and_events():
    device = torch.device("cuda", 0)
    queue = PrefetchQueue(batches(20), device, depth=3)
    assert queue.stream is not None and queue.pin_memory
    seen = []
    for x, y in queue:
        assert x.is_cuda and y.is_cuda
        seen.append(int((x * 2).sum().item() / 12))  # used on the consumer's stream
    assert seen == list(range(20))
