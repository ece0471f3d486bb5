"""The model, data and optimizer every method of a benchmark shares.

A :class:`Workload` is plain data (it travels to the rank processes); :func:`build_model`,
:func:`train_batches` and :func:`test_batches` turn it into the same seeded model and the
same list of batches in every process, so every method trains exactly the same thing.
Batches are made up front and held in memory: no method pays for data loading inside
its timed region.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

__all__ = ["MODELS", "OPTIMIZERS", "DATASETS", "Workload", "build_model", "optimizer_factory", "make_optimizer",
           "train_batches", "test_batches"]

MODELS = ("deep_mlp", "paper_mlp", "wide_mlp")
OPTIMIZERS = ("adam-fused", "adam", "sgd")
DATASETS = ("synthetic", "mnist1d")


@dataclasses.dataclass
class Workload:
    """What is trained.

    Attributes:
        model: ``"deep_mlp"`` (Linear+ReLU stack, for speed), ``"paper_mlp"`` (the DNI
            paper's MLP with BatchNorm) or ``"wide_mlp"`` (the same made wide and deep: the
            convergence workload, heavy enough that a pipeline pays off).
        in_features, hidden, depth, num_classes: the model's shape.
        batch: global batch size (the same for every method; pipelines split it).
        data: ``"synthetic"`` (random inputs, teacher labels) or ``"mnist1d"``.
        num_samples: MNIST-1D samples (train + test), or synthetic batches' pool size.
        lr: learning rate of every stage (and of the baseline).
        synth_lr: learning rate of the synthesizers (synthpipe).
        optimizer: ``"adam-fused"`` (Adam with ``fused=True``: one pass over the
            parameters; the default, as on GPUs), ``"adam"`` (torch's default multi-tensor
            Adam, several passes: on one CPU thread it costs about half as much as the
            backward pass of a deep MLP) or ``"sgd"`` (momentum 0.9). Every method and the
            synthesizers use the same one.
        seed: model initialisation and data seed.
    """

    model: str = "deep_mlp"
    in_features: int = 1024
    hidden: int = 1024
    depth: int = 8
    num_classes: int = 10
    batch: int = 256
    data: str = "synthetic"
    num_samples: int = 4096
    lr: float = 1e-3
    synth_lr: float = 1e-3
    optimizer: str = "adam-fused"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {self.data!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    def describe(self) -> str:
        return (f"{self.model}(in={self.in_features}, hidden={self.hidden}, depth={self.depth}, "
                f"classes={self.num_classes}), batch {self.batch}, {self.data}, {self.optimizer} lr {self.lr}")


def build_model(w: Workload) -> nn.Sequential:
    """The seeded model (identical in every process)."""
    from ..models import deep_mlp, paper_mlp, wide_mlp

    torch.manual_seed(w.seed)
    if w.model == "deep_mlp":
        return deep_mlp(in_features=w.in_features, hidden=w.hidden, depth=w.depth, num_classes=w.num_classes)
    if w.model == "wide_mlp":
        return wide_mlp(in_features=w.in_features, num_classes=w.num_classes, hidden=w.hidden, depth=w.depth)
    return paper_mlp(in_features=w.in_features, num_classes=w.num_classes, hidden=w.hidden, depth=w.depth)


def optimizer_factory(kind: str, lr: float) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """``params -> Optimizer`` for ``kind`` (see :class:`Workload`)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")

    def factory(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        params = list(params)
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        if kind == "adam-fused":
            try:
                return torch.optim.Adam(params, lr=lr, fused=True)
            except (RuntimeError, TypeError, ValueError):  # a device or dtype without a fused kernel
                pass
        return torch.optim.Adam(params, lr=lr)
    return factory


def make_optimizer(w: Workload) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    return optimizer_factory(w.optimizer, w.lr)


def _stack(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.contiguous(), y.contiguous()) for x, y in pairs]


def _mnist1d(w: Workload) -> tuple[Any, Any]:
    from ..data import mnist1d
    return mnist1d(num_samples=w.num_samples, seed=w.seed)


def _synthetic(w: Workload, test: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool of ``num_samples`` training and ``test`` held-out samples from one teacher."""
    from ..data import synthetic_classification
    n = max(w.num_samples, w.batch)
    x, y = synthetic_classification(n + test, w.in_features, w.num_classes, seed=w.seed + 1).tensors
    return x[:n], y[:n], x[n:], y[n:]


def train_batches(w: Workload, count: int | None = None, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Full training batches (a last partial batch is dropped).

    Synthetic data: ``count`` batches cycling over the pool of ``num_samples`` (default:
    one pass). MNIST-1D: one epoch of the training split (or its first ``count``
    batches), shuffled by ``seed`` and ``epoch``.
    """
    if w.data == "synthetic":
        x, y, _, _ = _synthetic(w)
        pool = max(1, len(y) // w.batch)
        n = pool if count is None else count
        return _stack([(x[(i % pool) * w.batch:(i % pool + 1) * w.batch],
                        y[(i % pool) * w.batch:(i % pool + 1) * w.batch]) for i in range(n)])
    train, _ = _mnist1d(w)
    x, y = train.tensors
    g = torch.Generator().manual_seed(w.seed * 1000 + epoch)
    order = torch.randperm(len(y), generator=g)
    n = len(y) // w.batch if count is None else min(count, len(y) // w.batch)
    return _stack([(x[order[i * w.batch:(i + 1) * w.batch]], y[order[i * w.batch:(i + 1) * w.batch]])
                   for i in range(n)])


def test_batches(w: Workload, batch: int = 1000) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation set in batches of ``batch`` (MNIST-1D test split; synthetic: held-out samples)."""
    if w.data == "synthetic":
        _, _, x, y = _synthetic(w)
    else:
        _, ds = _mnist1d(w)
        x, y = ds.tensors
    return _stack([(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)])
