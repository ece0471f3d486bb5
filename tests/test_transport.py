"""engine/transport.py: message encoding, and a channel between two gloo ranks (the worker's use of
channels runs in test_worker.py)."""
from __future__ import annotations

import pytest
import torch

from synthpipe.engine.transport import (
    FLAG_SKIPPED,
    HEADER_LEN,
    N_STATS,
    TRAIN,
    TransportError,
    as_bytes,
    decode_header,
    encode_header,
)


def test_header_round_trip_with_shapes_dtypes_none_and_stats():
    tensors = [torch.zeros(3, 5, 7), None, torch.zeros(3, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.bfloat16)]
    header = encode_header(TRAIN, 41, tensors, flags=FLAG_SKIPPED, stats=[1.5, float("nan"), -2e-9])
    assert len(header) == HEADER_LEN
    kind, step, flags, stats, specs, nbytes = decode_header(header)
    assert (kind, step, flags) == (TRAIN, 41, FLAG_SKIPPED)
    assert stats[0] == 1.5 and stats[1] != stats[1] and stats[2] == -2e-9
    assert specs == [(torch.float32, (3, 5, 7)), None, (torch.int64, (3,)), (torch.bfloat16, (2, 0))]
    assert nbytes == 420 + 24


def test_as_bytes_is_a_view_of_a_contiguous_tensor_and_a_copy_otherwise():
    t = torch.randn(4, 3)
    raw = as_bytes(t, torch.device("cpu"))
    assert raw.dtype == torch.uint8 and raw.numel() == 48 and raw.data_ptr() == t.data_ptr()
    strided = torch.randn(3, 4).t()
    assert torch.equal(as_bytes(strided, torch.device("cpu")).view(torch.float32).view(4, 3), strided)
    assert as_bytes(torch.tensor(7), torch.device("cpu")).numel() == 8  # a 0-d tensor


def test_messages_that_do_not_fit_are_rejected_with_a_reason():
    with pytest.raises(TransportError, match="too many tensors"):
        encode_header(TRAIN, 0, [torch.zeros(1, 1, 1, 1)] * 20)
    with pytest.raises(TransportError, match="at most 8 dims"):
        encode_header(TRAIN, 0, [torch.zeros([1] * 9)])
    with pytest.raises(TransportError, match=f"at most {N_STATS} statistics"):
        encode_header(TRAIN, 0, [], stats=[0.0] * (N_STATS + 1))
    with pytest.raises(TransportError, match="cannot send dtype"):
        encode_header(TRAIN, 0, [torch.zeros(2, dtype=torch.complex64)])


# -- channels between two gloo ranks ---------------------------------------------------------
def _exchange(rank: int, sizes: list[int]) -> list:
    import time

    import torch.distributed as dist

    from synthpipe.engine.transport import Channel

    dist.init_process_group("gloo")
    try:
        ch = Channel(dist.new_group([0, 1]), 1 - rank, torch.device("cpu"), "test 0->1")
        got = []
        if rank == 0:
            for i, n in enumerate(sizes):
                tensors = (torch.full((n,), float(i)), None, torch.arange(3),
                           torch.tensor([True, False]).reshape(1, 2)) if n else ()
                ch.send(TRAIN, i, tensors, stats=[i / 2])
            ch.flush()
        else:
            for i in range(len(sizes)):
                deadline = time.monotonic() + 30
                if i == 0:
                    ch.expect(len(sizes))
                while not ch.ready():  # turns true without recv: the receiver thread pulls whole messages
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"message {i} never arrived whole without recv")
                    time.sleep(0.001)
                msg = ch.recv()
                got.append((msg.kind, msg.step, msg.stats, list(msg.tensors)))
        ch.close()
        dist.barrier()
        return got
    finally:
        dist.destroy_process_group()


def test_channel_messages_arrive_whole_before_recv_in_order():
    from multiprocess import run_ranks

    sizes = [1 << 18, 0, 17, 1 << 16]
    _, got = run_ranks(_exchange, 2, sizes, timeout=90)
    assert [g[1] for g in got] == list(range(len(sizes)))
    for i, (kind, _step, stats, tensors) in enumerate(got):
        assert kind == TRAIN and stats == [i / 2]
        if sizes[i] == 0:
            assert tensors == []
        else:
            assert torch.equal(tensors[0], torch.full((sizes[i],), float(i)))
            assert tensors[1] is None and torch.equal(tensors[2], torch.arange(3))
            assert torch.equal(tensors[3], torch.tensor([[True, False]]))


def _corrupt(rank: int) -> str:
    import torch.distributed as dist

    from synthpipe.engine.transport import Channel

    dist.init_process_group("gloo")
    try:
        group = dist.new_group([0, 1])
        if rank == 0:
            dist.send(torch.full((HEADER_LEN,), 99, dtype=torch.int64), 1, group=group)
            return ""
        ch = Channel(group, 0, torch.device("cpu"), "activations 0->1")
        with pytest.raises(TransportError) as err:
            ch.recv()
        return str(err.value)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_a_corrupt_message_fails_recv_naming_the_channel():
    from multiprocess import run_ranks

    _, message = run_ranks(_corrupt, 2, timeout=60)
    assert "activations 0->1" in message and "corrupt header (kind 99" in message


def _bounded(rank: int, n: int, max_sends: int, late: float) -> dict:
    import time

    import torch.distributed as dist

    from synthpipe.engine.transport import Channel

    dist.init_process_group("gloo")
    try:
        ch = Channel(dist.new_group([0, 1]), 1 - rank, torch.device("cpu"), "test 0->1", max_sends=max_sends)
        out: dict = {}
        if rank == 0:
            held = []
            for i in range(n):
                ch.send(TRAIN, i, (torch.full((1000,), float(i)),))
                held.append(ch.sends_in_flight)
            ch.flush()
            out = {"held": held, "after": ch.sends_in_flight}
        else:
            time.sleep(late)  # a receiver that falls behind: the sender must not pile up buffers
            got = []
            for _ in range(n):
                msg = ch.recv()
                got.append((msg.step, bool(torch.equal(msg.tensors[0], torch.full((1000,), float(msg.step))))))
            out = {"got": got}
        ch.close()
        dist.barrier()
        return out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("late", [0.0, 1.0])
def test_a_channel_holds_at_most_max_sends_messages_and_delivers_all_intact(late):
    from multiprocess import run_ranks

    n, max_sends = 60, 3
    sender, receiver = run_ranks(_bounded, 2, n, max_sends, late, timeout=90)
    assert len(sender["held"]) == n and max(sender["held"]) <= max_sends, sender["held"]
    assert sender["after"] == 0
    assert receiver["got"] == [(i, True) for i in range(n)]


def test_max_sends_must_be_a_positive_count():
    from synthpipe.engine.transport import Channel

    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_sends must be a whole number >= 1"):
            Channel(None, 1, torch.device("cpu"), "activations 0->1", max_sends=bad)
