"""Message encoding of engine/transport.py (the channels themselves run in test_worker.py)."""
from __future__ import annotations

import pytest
import torch

from synthpipe.engine.transport import (FLAG_SKIPPED, HEADER_LEN, N_STATS, TRAIN, TransportError, decode_header,
                                        encode_header, pack, unpack)


def test_header_round_trip_with_shapes_dtypes_none_and_stats():
    tensors = [torch.zeros(3, 5, 7), None, torch.zeros(3, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.bfloat16)]
    header = encode_header(TRAIN, 41, tensors, flags=FLAG_SKIPPED, stats=[1.5, float("nan"), -2e-9])
    assert len(header) == HEADER_LEN
    kind, step, flags, stats, specs, nbytes = decode_header(header)
    assert (kind, step, flags) == (TRAIN, 41, FLAG_SKIPPED)
    assert stats[0] == 1.5 and stats[1] != stats[1] and stats[2] == -2e-9
    assert specs == [(torch.float32, (3, 5, 7)), None, (torch.int64, (3,)), (torch.bfloat16, (2, 0))]
    assert nbytes == 432 + 32  # 420 and 24 bytes, each padded to a multiple of 16


def test_pack_unpack_preserves_values_dtypes_and_order():
    tensors = (torch.randn(4, 3), None, torch.arange(5), torch.tensor([True, False]), torch.randn(2, 2).double().t())
    specs = [None if t is None else (t.dtype, tuple(t.shape)) for t in tensors]
    out = unpack(pack(tensors, torch.device("cpu")), specs)
    assert out[1] is None
    for a, b in zip(tensors, out):
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_messages_that_do_not_fit_are_rejected_with_a_reason():
    with pytest.raises(TransportError, match="too many tensors"):
        encode_header(TRAIN, 0, [torch.zeros(1, 1, 1, 1)] * 20)
    with pytest.raises(TransportError, match="at most 8 dims"):
        encode_header(TRAIN, 0, [torch.zeros([1] * 9)])
    with pytest.raises(TransportError, match=f"at most {N_STATS} statistics"):
        encode_header(TRAIN, 0, [], stats=[0.0] * (N_STATS + 1))
    with pytest.raises(TransportError, match="cannot send dtype"):
        encode_header(TRAIN, 0, [torch.zeros(2, dtype=torch.complex64)])
