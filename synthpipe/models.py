"""Reference models, built as *flat* ``nn.Sequential`` containers.

Every layer (including BatchNorm, ReLU, pooling and reshapes) is its own direct child,
so a model can be split into pipeline stages at any child boundary.

* :func:`paper_mlp` — the MLP of the DNI paper (Jaderberg et al. 2017, MNIST experiments):
  hidden layers of Linear -> BatchNorm -> ReLU and a linear classifier.
* :func:`paper_cnn` — the paper's small CNN (conv -> BN -> ReLU -> max-pool blocks and
  a linear classifier), adapted to 1-D signals such as MNIST-1D (B, 40).
* :func:`deep_mlp` — a deep, wide Linear+ReLU stack for throughput benchmarks.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["paper_mlp", "paper_cnn", "deep_mlp"]


def paper_mlp(in_features: int = 40, num_classes: int = 10, hidden: int = 256,
              depth: int = 3) -> nn.Sequential:
    """The DNI paper's MLP: ``depth`` x (Linear -> BatchNorm1d -> ReLU), then Linear.

    Shapes: input (B, in_features) -> every hidden activation (B, hidden) -> logits
    (B, num_classes). Children: ``3 * depth + 1`` modules (each Linear, BatchNorm1d
    and ReLU separately, then the output Linear).
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _pooled_length(length: int, kernel: int = 3, stride: int = 2, padding: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def paper_cnn(in_channels: int = 1, num_classes: int = 10, length: int = 40,
              channels: int = 64, kernel_size: int = 5, blocks: int = 2) -> nn.Sequential:
    """The DNI paper's small CNN, in 1-D for MNIST-1D-like signals.

    Layout (a flat Sequential)::

        Unflatten            (B, in_channels * length) -> (B, in_channels, length)
        blocks x [Conv1d(k=kernel_size, 'same' padding) -> BatchNorm1d -> ReLU
                  -> MaxPool1d(3, stride 2, padding 1)]
                             (B, C, L) -> (B, channels, ceil(L / 2))
        Flatten              -> (B, channels * L_out)
        Linear               -> (B, num_classes)

    With the defaults (in_channels=1, length=40, channels=64, blocks=2) the activations
    are (B, 1, 40) -> (B, 64, 20) -> (B, 64, 10) -> (B, 640) -> (B, 10). The input is
    the flat (B, in_channels * length) tensor, i.e. (B, 40) for MNIST-1D.
    """
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (shape-preserving padding), got {kernel_size}")
    layers: list[nn.Module] = [nn.Unflatten(1, (in_channels, length))]
    width, size = in_channels, length
    for _ in range(blocks):
        layers += [nn.Conv1d(width, channels, kernel_size, padding=kernel_size // 2),
                   nn.BatchNorm1d(channels), nn.ReLU(),
                   nn.MaxPool1d(3, stride=2, padding=1)]
        width, size = channels, _pooled_length(size)
    layers += [nn.Flatten(), nn.Linear(width * size, num_classes)]
    return nn.Sequential(*layers)


def deep_mlp(in_features: int = 1024, hidden: int = 1024, depth: int = 8,
             num_classes: int = 10) -> nn.Sequential:
    """A deep Linear+ReLU stack for speed benchmarks (no normalisation layers).

    Shapes: (B, in_features) -> ``depth`` x (Linear -> ReLU) giving (B, hidden) ->
    Linear -> (B, num_classes). Children: ``2 * depth + 1`` modules, so the compute is
    easy to balance across stages (every hidden block costs the same).
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
