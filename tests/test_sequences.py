"""Tests for synthpipe.sequences: copy, repeat copy and the character-LM loss and metric."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from synthpipe.sequences import (
    IGNORE,
    CopyTask,
    bits_per_char,
    bits_per_step,
    char_lm_loss,
    copy_batch,
    masked_bce,
    repeat_copy_batch,
)


def test_copy_batch_layout():
    x, y = copy_batch(5, 3, bits=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 7, 9) and y.shape == (5, 7, 8)
    pats = x[:, :3, :8]
    assert set(pats.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(x[:, :3, 8] == 0) and torch.all(x[:, 3, 8] == 1) and torch.all(x[:, 4:] == 0)
    assert torch.all(x[:, 3, :8] == 0)
    assert torch.all(y[:, :4] == IGNORE)
    assert torch.equal(y[:, 4:], pats)  # the patterns, in order, after the delimiter


def test_repeat_copy_batch_layout():
    x, y = repeat_copy_batch(4, 2, repeats=3, bits=5, max_repeats=6, generator=torch.Generator().manual_seed(1))
    length = 2 + 1 + 2 * 3 + 1
    assert x.shape == (4, length, 7) and y.shape == (4, length, 6)
    pats = x[:, :2, :5]
    assert torch.all(x[:, 2, 5] == 1) and torch.allclose(x[:, 2, 6], torch.full((4,), 0.5))
    assert torch.all(x[:, 3:] == 0)
    assert torch.all(y[:, :3] == IGNORE)
    assert torch.equal(y[:, 3:9, :5], pats.repeat(1, 3, 1))
    assert torch.all(y[:, 3:9, 5] == 0)  # no end marker while copying
    assert torch.all(y[:, -1, :5] == 0) and torch.all(y[:, -1, 5] == 1)


def test_copy_task_stream_is_seeded_and_batches_through_a_dataloader():
    task = CopyTask(2, batch_size=3, bits=4, n_batches=4, seed=7)
    a, b = list(task), list(DataLoader(task, batch_size=None))
    assert len(a) == len(b) == 4
    for (xa, ya), (xb, yb) in zip(a, b, strict=False):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], a[1][0])
    assert task.length == a[0][0].shape[1] == 5
    rc = CopyTask(2, batch_size=3, bits=4, repeats=2, max_repeats=4, n_batches=1)
    assert rc.length == next(iter(rc))[0].shape[1] == 2 + 1 + 4 + 1
    assert not torch.equal(next(iter(CopyTask(2, 3, bits=4, seed=8)))[0], a[0][0])


def test_masked_bce_scores_only_asked_entries_and_sums_over_time():
    target = torch.tensor([[[IGNORE, IGNORE], [1.0, 0.0], [0.0, 1.0]]] * 2)  # B=2, L=3, D=2
    logits = torch.zeros_like(target)
    # 4 scored entries per sequence at ln 2 each; mean over the batch of the per-sequence sum
    assert masked_bce(logits, target).item() == pytest.approx(4 * math.log(2))
    logits[:, 0] = 100.0  # ignored entries do not count, however wrong
    assert masked_bce(logits, target).item() == pytest.approx(4 * math.log(2))
    assert bits_per_step(logits, target) == pytest.approx(2.0)  # coin flips on 2 channels
    sure = torch.where(target > 0, 50.0, -50.0)
    assert bits_per_step(sure, target) < 1e-6
    # gradient only on scored entries
    logits = torch.zeros_like(target, requires_grad=True)
    masked_bce(logits, target).backward()
    assert torch.all(logits.grad[:, 0] == 0) and torch.all(logits.grad[:, 1:] != 0)


def test_char_lm_loss_and_bits_per_char():
    logits = torch.zeros(3, 4, 256)
    y = torch.randint(0, 256, (3, 4))
    assert char_lm_loss(logits, y).item() == pytest.approx(4 * math.log(256), rel=1e-6)
    assert bits_per_char(logits, y) == pytest.approx(8.0, rel=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: copy_batch(0, 3), "batch_size"),
    (lambda: copy_batch(2, 0), "n_patterns"),
    (lambda: copy_batch(2, 2, bits=2.0), "bits"),
    (lambda: repeat_copy_batch(2, 2, repeats=5, max_repeats=4), "max_repeats"),
    (lambda: CopyTask(2, 2, n_batches=0), "n_batches"),
    (lambda: masked_bce(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)), "do not match"),
    (lambda: bits_per_step(torch.zeros(2, 3, 4), torch.full((2, 3, 4), IGNORE)), "no step"),
    (lambda: char_lm_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)), r"\(B, L, V\)"),
])
def test_bad_arguments_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()
