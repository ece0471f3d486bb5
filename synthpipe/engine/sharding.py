"""Each pipeline replica's share of the data: every sample once per epoch across replicas.

:func:`shard` gives replica ``index`` of ``replicas`` its part of a loader:

* a ``DataLoader`` over a map-style dataset with a ``batch_size`` is rebuilt with the same
  settings around a :class:`ShardSampler`, as ``DistributedSampler`` would: replica ``i``
  loads only the samples ``i, i + dp, i + 2 dp, ...`` of the epoch's order. A shuffling
  ``RandomSampler`` becomes a permutation seeded by ``seed + epoch`` (the generator's
  initial seed, else 0), the same on every replica; any other sampler is iterated on every
  replica, so it must yield the same order everywhere (seed its generator);
* anything else (a list of batches, a generator, a ``DataLoader`` with its own batch
  sampler or an iterable dataset) is read in groups of ``dp`` consecutive batches, of
  which replica ``i`` takes the ``i``-th: with a list of per-replica batches the global
  batch of step ``t`` is batches ``t * dp ... t * dp + dp - 1``.

For training (``even=True``) every replica gets the same number of steps, so no
all-reduce waits for a replica that ran out: the last ``len % dp`` samples (or batches) of
an epoch are dropped. For evaluation (``even=False``) nothing is dropped or repeated.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler

__all__ = ["shard", "ShardSampler", "ShardedBatches"]


class ShardSampler(Sampler[int]):
    """Replica ``index`` of ``replicas``'s share of ``base``'s order (every ``replicas``-th index).

    Args:
        base: the loader's sampler (a ``RandomSampler`` without replacement is replaced by
            a seeded permutation of ``range(len(base))``).
        replicas, index: the number of replicas and this one's index.
        even: drop the last ``len % replicas`` indices, so every replica gets as many.
    """

    def __init__(self, base: Sampler, replicas: int, index: int, even: bool = True):
        self.base, self.replicas, self.index, self.even = base, replicas, index, even
        self.epoch = 0
        self.shuffle = (isinstance(base, RandomSampler) and not base.replacement
                        and base.num_samples == len(base.data_source))
        generator = getattr(base, "generator", None)
        self.seed = int(generator.initial_seed()) if self.shuffle and generator is not None else 0

    def set_epoch(self, epoch: int) -> None:
        """A new epoch's order (called by the trainer before every epoch)."""
        self.epoch = epoch
        set_epoch = getattr(self.base, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(len(self.base), generator=g).tolist()  # type: ignore[arg-type]
        return list(iter(self.base))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.even:
            order = order[:len(order) - len(order) % self.replicas]
        return iter(order[self.index::self.replicas])

    def __len__(self) -> int:
        n = len(self.base)  # type: ignore[arg-type]
        if self.even:
            return n // self.replicas
        return max(0, (n - self.index + self.replicas - 1) // self.replicas)


class ShardedBatches:
    """Batch ``index`` of every group of ``replicas`` consecutive batches of ``batches``.

    ``even``: a last, incomplete group is dropped (every replica gets as many batches);
    otherwise replica ``index`` also takes its batch of it, if there is one.
    """

    def __init__(self, batches: Iterable[Any], replicas: int, index: int, even: bool = True):
        self.batches, self.replicas, self.index, self.even = batches, replicas, index, even
        self.sampler = getattr(batches, "sampler", None)  # (set_epoch still reaches a loader's sampler)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.batches)
        while True:
            group = list(itertools.islice(it, self.replicas))
            if self.index < len(group) and (len(group) == self.replicas or not self.even):
                yield group[self.index]
            if len(group) < self.replicas:
                return

    def __len__(self) -> int:
        n = len(self.batches)  # type: ignore[arg-type]  # (TypeError without a length, as the trainer expects)
        if self.even:
            return n // self.replicas
        return max(0, (n - self.index + self.replicas - 1) // self.replicas)


_LOADER_SETTINGS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                    "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


def shard(loader: Iterable[Any], replicas: int, index: int, even: bool = True) -> Iterable[Any]:
    """Replica ``index`` of ``replicas``'s share of ``loader`` (see the module docstring).

    Returns ``loader`` itself when ``replicas == 1``.
    """
    if replicas == 1:
        return loader
    if (isinstance(loader, DataLoader) and loader.batch_size is not None
            and not isinstance(loader.dataset, IterableDataset)):
        settings = {k: getattr(loader, k) for k in _LOADER_SETTINGS if hasattr(loader, k)}
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last,
                          sampler=ShardSampler(loader.sampler, replicas, index, even),  # type: ignore[arg-type]
                          **settings)
    return ShardedBatches(loader, replicas, index, even)
