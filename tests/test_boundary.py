"""synthpipe.stages.boundary: the tuple convention and how a boundary is shown in errors."""
from __future__ import annotations

import numpy as np
import torch

from synthpipe.stages.boundary import as_tuple, describe


def test_a_boundary_is_always_a_tuple():
    t = torch.zeros(2)
    assert as_tuple(t) == (t,)
    assert as_tuple([t, t]) == (t, t) and isinstance(as_tuple([t, t]), tuple)
    pair = (t, None)
    assert as_tuple(pair) is pair


def test_errors_describe_values_without_printing_them():
    text = describe([[0.5] * 1000] * 300)
    assert text.startswith("list of 1000, list of 1000") and text.endswith("... (300 values)")
    assert len(text) < 200
    assert describe([np.zeros((256, 6)), torch.zeros(2, 3, dtype=torch.int64)]) == \
        "ndarray of shape (256, 6), (2, 3):int64"


def test_a_long_repr_is_cut():
    assert describe(["x" * 100]) == "str " + repr("x" * 100)[:40] + "..."
    assert describe([3]) == "3"


def test_keyword_inputs_are_described_by_key_and_shape():
    inputs = {"input_ids": torch.zeros(4, 16, dtype=torch.int64), "use_cache": True}
    assert describe([inputs]) == "{input_ids: (4, 16):int64, use_cache: bool}"
    many = {f"k{i}": torch.zeros(1) for i in range(10)}
    assert describe([many]).endswith("k7: (1,):float32, ...}")
