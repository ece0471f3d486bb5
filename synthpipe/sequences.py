"""Sequence tasks generated in code, for recurrent cores: *copy*, *repeat copy* and a character LM.

Copy (Graves et al., 2014; used by the DNI paper): the core reads ``N`` random binary
patterns of ``bits`` bits, one per step, then a delimiter, and must then write the ``N``
patterns back, one per step. Repeat copy also reads a repeat count ``R`` with the
delimiter and must write the patterns ``R`` times, then raise an end marker.

Batches are ``(x, y)``, both batch-first and float:

* ``x``: (B, L, C) inputs. Copy: C = bits + 1 (the last channel is the delimiter).
  Repeat copy: C = bits + 2 (delimiter, then the repeat count as ``R / max_repeats``).
* ``y``: (B, L, D) targets in {0, 1}, and :data:`IGNORE` (-1) at the steps where nothing
  is asked (while reading). Copy: D = bits. Repeat copy: D = bits + 1 (the end marker).

Losses are sums over time and channels and means over the batch (nats per sequence):
a sequence cut into chunks then has the sum of the chunks' losses as its loss, whatever
the chunk length, which is what truncated backpropagation through time adds up.

* :func:`copy_batch`, :func:`repeat_copy_batch` — one batch.
* :class:`CopyTask` — an endless (or ``n_batches`` long) seeded stream of batches.
* :func:`masked_bce` — the copy loss; :func:`bits_per_step` — its error metric, the
  cross-entropy in bits per asked-for step (the paper counts a length as solved below 0.15).
* :func:`char_lm_loss`, :func:`bits_per_char` — the same for next-character prediction on
  :func:`synthpipe.text.char_lm` windows.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

__all__ = ["IGNORE", "CopyTask", "bits_per_char", "bits_per_step", "char_lm_loss", "copy_batch", "masked_bce",
           "repeat_copy_batch"]

IGNORE = -1.0  # target value of a step (or channel) that is not scored


def _whole(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
    return value


def _patterns(batch_size: int, n: int, bits: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, 2, (batch_size, n, bits), generator=generator).float()


def copy_batch(batch_size: int, n_patterns: int, bits: int = 8,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the copy task, length ``L = 2 * n_patterns + 1``.

    Steps ``0..N-1`` show the patterns, step ``N`` the delimiter (channel ``bits``), steps
    ``N+1..2N`` ask for the patterns in order (inputs zero there).

    Returns:
        ``x`` (B, L, bits + 1) and ``y`` (B, L, bits), with ``y`` = :data:`IGNORE` on steps ``0..N``.

    Raises:
        ValueError: a size is not a whole number >= 1.
    """
    b, n, bits = _whole("batch_size", batch_size, 1), _whole("n_patterns", n_patterns, 1), _whole("bits", bits, 1)
    pats = _patterns(b, n, bits, generator)
    length = 2 * n + 1
    x = torch.zeros(b, length, bits + 1)
    x[:, :n, :bits] = pats
    x[:, n, bits] = 1.0
    y = torch.full((b, length, bits), IGNORE)
    y[:, n + 1:] = pats
    return x, y


def repeat_copy_batch(batch_size: int, n_patterns: int, repeats: int, bits: int = 8, max_repeats: int = 20,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the repeat-copy task, length ``L = N + 1 + N * R + 1``.

    Steps ``0..N-1`` show the patterns; step ``N`` the delimiter (channel ``bits``) with the
    repeat count ``R / max_repeats`` on channel ``bits + 1``; the next ``N * R`` steps ask for
    the patterns ``R`` times; the last step asks for the end marker (channel ``bits`` of
    ``y``) with all data bits zero.

    Returns:
        ``x`` (B, L, bits + 2) and ``y`` (B, L, bits + 1), ``y`` = :data:`IGNORE` on steps ``0..N``.

    Raises:
        ValueError: a size is not a whole number >= 1, or ``repeats > max_repeats``.
    """
    b, n, bits = _whole("batch_size", batch_size, 1), _whole("n_patterns", n_patterns, 1), _whole("bits", bits, 1)
    r, r_max = _whole("repeats", repeats, 1), _whole("max_repeats", max_repeats, 1)
    if r > r_max:
        raise ValueError(f"repeats ({r}) must not exceed max_repeats ({r_max}), which normalises the count input")
    pats = _patterns(b, n, bits, generator)
    length = n + 1 + n * r + 1
    x = torch.zeros(b, length, bits + 2)
    x[:, :n, :bits] = pats
    x[:, n, bits] = 1.0
    x[:, n, bits + 1] = r / r_max
    y = torch.full((b, length, bits + 1), IGNORE)
    y[:, n + 1:] = 0.0
    y[:, n + 1:n + 1 + n * r, :bits] = pats.repeat(1, r, 1)
    y[:, -1, bits] = 1.0
    return x, y


class CopyTask(IterableDataset):
    """A seeded stream of copy (``repeats=None``) or repeat-copy batches ``(x, y)``.

    Iterate it directly, or wrap it as ``DataLoader(task, batch_size=None)`` (it yields whole
    batches). Each iteration restarts the same stream (same seed), so runs are repeatable.

    Args:
        n_patterns: N, patterns per sequence.
        batch_size: B.
        bits: bits per pattern (the paper: 8).
        repeats: R for repeat copy; ``None`` for plain copy.
        max_repeats: normalisation of the repeat-count input.
        n_batches: batches per iteration; ``None`` for an endless stream.
        seed: seed of the stream.

    Raises:
        ValueError: a size is not a whole number >= 1 (``n_batches`` may be ``None``).
    """

    def __init__(self, n_patterns: int, batch_size: int, bits: int = 8, repeats: int | None = None,
                 max_repeats: int = 20, n_batches: int | None = None, seed: int = 0):
        super().__init__()
        self.n_patterns = _whole("n_patterns", n_patterns, 1)
        self.batch_size = _whole("batch_size", batch_size, 1)
        self.bits = _whole("bits", bits, 1)
        self.repeats = None if repeats is None else _whole("repeats", repeats, 1)
        self.max_repeats = _whole("max_repeats", max_repeats, 1)
        if self.repeats is not None and self.repeats > self.max_repeats:
            raise ValueError(f"repeats ({self.repeats}) must not exceed max_repeats ({self.max_repeats})")
        self.n_batches = None if n_batches is None else _whole("n_batches", n_batches, 1)
        self.seed = seed

    @property
    def length(self) -> int:
        """L, steps per sequence."""
        n = self.n_patterns
        return 2 * n + 1 if self.repeats is None else n + 2 + n * self.repeats

    def batch(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch drawn from ``generator`` (the global RNG if ``None``)."""
        if self.repeats is None:
            return copy_batch(self.batch_size, self.n_patterns, self.bits, generator)
        return repeat_copy_batch(self.batch_size, self.n_patterns, self.repeats, self.bits, self.max_repeats,
                                 generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        i = 0
        while self.n_batches is None or i < self.n_batches:
            yield self.batch(gen)
            i += 1


def _check_pair(name: str, logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"{name}: predictions of shape {tuple(logits.shape)} do not match targets of shape "
                         f"{tuple(target.shape)}")
    if logits.dim() < 2:
        raise ValueError(f"{name}: needs batched (B, L, ...) tensors, got shape {tuple(logits.shape)}")


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ``logits`` against ``target``, skipping :data:`IGNORE` entries.

    Args:
        logits: (B, L, D) pre-sigmoid predictions (any (B, ...) shape).
        target: the same shape, entries in {0, 1} or :data:`IGNORE`.

    Returns:
        A scalar: the sum over steps and channels, mean over the batch (nats per sequence).

    Raises:
        ValueError: shapes differ, or the tensors are not batched.
    """
    _check_pair("masked_bce", logits, target)
    scored = target >= 0
    per_entry = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
    return (per_entry * scored).sum() / logits.shape[0]


def bits_per_step(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The copy tasks' error: cross-entropy in bits per scored step (summed over its channels).

    A step is scored when any of its channels is not :data:`IGNORE`. Predicting every bit as
    a coin flip costs ``D`` bits per step; a solved task costs near 0.

    Raises:
        ValueError: shapes differ, the tensors are not batched, or no step is scored.
    """
    _check_pair("bits_per_step", logits, target)
    scored = target >= 0
    steps = int(scored.reshape(*scored.shape[:2], -1).any(-1).sum())
    if steps == 0:
        raise ValueError("bits_per_step: no step of the target is scored (all entries are IGNORE)")
    per_entry = F.binary_cross_entropy_with_logits(logits.float(), target.float().clamp(min=0), reduction="none")
    return float((per_entry * scored).sum()) / math.log(2) / steps


def char_lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-character cross-entropy: sum over steps, mean over the batch (nats per sequence).

    Args:
        logits: (B, L, V) unnormalised scores.
        target: (B, L) integer characters.

    Raises:
        ValueError: ``logits`` is not (B, L, V) with ``target`` (B, L).
    """
    if logits.dim() != 3 or target.shape != logits.shape[:2]:
        raise ValueError(f"char_lm_loss: needs logits (B, L, V) and targets (B, L), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum") / logits.shape[0]


def bits_per_char(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean next-character cross-entropy in bits per character.

    Raises:
        ValueError: ``logits`` is not (B, L, V) with ``target`` (B, L).
    """
    nats = char_lm_loss(logits.float(), target)
    return float(nats) / target.shape[1] / math.log(2)
