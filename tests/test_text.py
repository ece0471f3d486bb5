"""Tests for synthpipe.text: the standard library as a character corpus."""
from __future__ import annotations

import pytest
import torch

from synthpipe.text import VOCAB_SIZE, char_lm, stdlib_corpus


def test_corpus_is_deterministic_bytes_of_python_source():
    a, b = stdlib_corpus(50_000), stdlib_corpus(50_000)
    assert a.dtype == torch.uint8 and a.shape == (50_000,)
    assert torch.equal(a, b)
    text = bytes(a.tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text


def test_char_lm_windows_are_shifted_by_one_and_splits_do_not_overlap():
    train, test = char_lm(seq_len=32, max_bytes=40_000, test_fraction=0.25)
    x, y = train.tensors
    assert x.shape[1] == 32 and y.shape == x.shape and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert int(x.max()) < VOCAB_SIZE and int(x.min()) >= 0
    corpus = stdlib_corpus(40_000).long()
    n = len(train) + len(test)
    assert len(test) == int(n * 0.25)
    # the test windows are the corpus's last stretch, after every training window
    assert torch.equal(test.tensors[0][0], corpus[len(train) * 32:len(train) * 32 + 32])


@pytest.mark.parametrize("kwargs", [dict(seq_len=0), dict(seq_len=2.5), dict(test_fraction=1.0),
                                    dict(seq_len=10_000, max_bytes=500)])
def test_char_lm_refuses_bad_arguments_by_name(kwargs):
    with pytest.raises(ValueError, match="seq_len|test_fraction|max_bytes"):
        char_lm(**kwargs)
