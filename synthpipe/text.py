"""Character-level text that ships with Python: the standard library's own sources.

Nothing is downloaded: the corpus is the ``.py`` files of this interpreter's standard
library, read in sorted path order, so it is the same on every machine with the same
Python version. Characters are mapped to byte values (UTF-8, vocabulary of 256), which
needs no vocabulary file and round-trips any text.

* :func:`stdlib_corpus` — the corpus as one ``uint8`` tensor of bytes, capped in size.
* :func:`char_lm` — ``(train, test)`` ``TensorDataset`` s of ``(x, y)`` windows for
  next-character prediction: ``y`` is ``x`` shifted by one.
"""
from __future__ import annotations

import functools
import os
import sysconfig

import torch
from torch.utils.data import TensorDataset

__all__ = ["VOCAB_SIZE", "stdlib_corpus", "char_lm"]

VOCAB_SIZE = 256  # byte values


@functools.lru_cache(maxsize=4)
def _read_stdlib(max_bytes: int) -> bytes:
    root = sysconfig.get_paths()["stdlib"]
    chunks: list[bytes] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(chunks)[:max_bytes]
    if not chunks:
        raise FileNotFoundError(f"no Python sources found under the standard library at {root}")
    return b"".join(chunks)[:max_bytes]


def stdlib_corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """The first ``max_bytes`` bytes of the standard library's sources, as ``uint8`` (N,).

    Raises:
        ValueError: ``max_bytes`` is not a positive whole number.
        FileNotFoundError: this interpreter has no standard-library sources on disk.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive whole number, got {max_bytes!r}")
    data = _read_stdlib(max_bytes)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def char_lm(seq_len: int = 64, max_bytes: int = 1_000_000, test_fraction: float = 0.1
            ) -> tuple[TensorDataset, TensorDataset]:
    """Next-character windows from :func:`stdlib_corpus`, as ``(train, test)``.

    The corpus is cut into non-overlapping windows of ``seq_len + 1`` bytes; each gives
    ``x`` = the first ``seq_len`` (int64, shape (seq_len,)) and ``y`` = the last
    ``seq_len`` (the next character at every position). The last ``test_fraction`` of
    the corpus (a contiguous stretch, so no window overlaps training text) is the test set.

    Raises:
        ValueError: ``seq_len`` < 1, ``test_fraction`` outside (0, 1), or a corpus too
            small for one window in each split.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive whole number, got {seq_len!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    data = stdlib_corpus(max_bytes).long()
    n_windows = (len(data) - 1) // seq_len
    n_test = max(1, int(n_windows * test_fraction))
    n_train = n_windows - n_test
    if n_train < 1:
        raise ValueError(f"a corpus of {len(data)} bytes holds {n_windows} window(s) of {seq_len + 1}; "
                         f"raise max_bytes or lower seq_len")
    idx = torch.arange(n_windows)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    windows = data[idx]
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])
