"""Data sets for training and benchmarks, all made locally (nothing is downloaded).

* :func:`mnist1d` — MNIST-1D (Greydanus 2020), generated in code by the ``mnist1d``
  package's ``make_dataset``: 10 classes, 1-D signals of length 40.
* :func:`synthetic_classification` — random inputs labelled by a fixed random linear
  teacher: learnable, any size, instant; for speed tests.
* :func:`loader` — a ``DataLoader`` whose shuffling is seeded.
"""
from __future__ import annotations

import functools
import random
from typing import Any, Iterator, Sized, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

__all__ = ["mnist1d", "synthetic_classification", "loader"]


@functools.lru_cache(maxsize=8)
def _mnist1d_tensors(num_samples: int, seed: int, train_split: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate and standardise MNIST-1D once per (num_samples, seed, train_split)."""
    from mnist1d.data import get_dataset_args, make_dataset  # imported lazily: optional at import time

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = train_split
    # make_dataset seeds Python's and NumPy's global RNGs; leave the caller's untouched.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)  # generated in code; get_dataset() would download
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    x_train = torch.as_tensor(np.asarray(data["x"]), dtype=torch.float64)
    x_test = torch.as_tensor(np.asarray(data["x_test"]), dtype=torch.float64)
    y_train = torch.as_tensor(np.asarray(data["y"]), dtype=torch.int64)
    y_test = torch.as_tensor(np.asarray(data["y_test"]), dtype=torch.int64)
    if len(y_train) == 0:
        raise ValueError(f"MNIST-1D with num_samples={num_samples}, train_split={train_split} "
                         "has an empty training set")
    mean, std = x_train.mean(), x_train.std()
    x_train = ((x_train - mean) / std).float()
    x_test = ((x_test - mean) / std).float()
    return x_train, y_train, x_test, y_test


def mnist1d(num_samples: int = 5000, seed: int = 42, train_split: float = 0.8
            ) -> tuple[TensorDataset, TensorDataset]:
    """MNIST-1D as ``(train, test)`` ``TensorDataset`` s of ``(x, y)``.

    ``x`` is float32 of shape (N, 40), ``y`` int64 of shape (N,) with classes 0..9.
    ``num_samples`` is the total over both splits, rounded down to a multiple of 10
    (the generator makes the same number per class); the first
    ``int(train_split * num_samples)`` go to the training set.

    Standardisation: ``x`` (both splits) is shifted and scaled by one scalar mean and
    one scalar standard deviation computed over all values of the *training* inputs,
    so the training inputs have mean 0 and std 1 and the shape of each signal is kept
    (what a convolution expects); the test set is not used for the statistics.

    The data are generated in code by ``mnist1d.data.make_dataset`` (never downloaded)
    and deterministic for a given seed. Generation takes ~1 ms per sample (plus ~1 s to import mnist1d), so the
    result is cached in-process per argument triple; every call returns fresh tensors.
    """
    x_train, y_train, x_test, y_test = _mnist1d_tensors(int(num_samples), int(seed), float(train_split))
    return (TensorDataset(x_train.clone(), y_train.clone()),
            TensorDataset(x_test.clone(), y_test.clone()))


def synthetic_classification(num_samples: int, in_features: int, num_classes: int = 10,
                             seed: int = 0) -> TensorDataset:
    """Random inputs with labels from a fixed random linear teacher (a learnable rule).

    ``x`` ~ N(0, 1), float32 of shape (num_samples, in_features); ``y`` =
    argmax(x @ W + b), int64 of shape (num_samples,), with teacher weights W
    (in_features, num_classes) ~ N(0, 1/in_features) and b ~ N(0, 0.1^2) drawn from the
    same seeded generator. Deterministic for a given seed.
    """
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(in_features, num_classes, generator=gen) / in_features ** 0.5
    bias = 0.1 * torch.randn(num_classes, generator=gen)
    x = torch.randn(num_samples, in_features, generator=gen)
    y = (x @ weight + bias).argmax(dim=1)
    return TensorDataset(x, y)


class EpochShuffle(Sampler[int]):
    """Shuffles with ``seed + epoch``: each epoch's order is a function of its number.

    The trainer calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint
    in the middle of epoch k sees exactly the order the uninterrupted run saw.
    """

    def __init__(self, length: int, seed: int = 0):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=gen).tolist())

    def __len__(self) -> int:
        return self.length


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
           drop_last: bool = False, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` whose order is fixed by ``seed`` and the epoch (see :class:`EpochShuffle`).

    Extra keyword arguments (``num_workers``, ``pin_memory``, ...) go to ``DataLoader``.
    """
    sampler = EpochShuffle(len(cast(Sized, dataset)), seed) if shuffle else None  # (a map-style dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
