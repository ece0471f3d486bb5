"""Auxiliary heads: the small classifiers that give a stage a local loss.

The ``local`` (Decoupled Greedy Learning) and ``interlocking`` gradient sources train
every stage but the last on ``loss_fn(head_r(h_r), y)``, with the trainer's own loss
function and labels, so a head must turn a stage's output into what the model's last
layer produces: logits of shape (B, C) or, per token, (B, T, C).

:class:`AuxHead` is a recipe, like :class:`~synthpipe.stages.synthesizer.Synthesizer`:
:meth:`AuxHead.build` makes one head per stage from the first activation seen there,
so only ``num_classes`` must be given. Pure model math (no torch.distributed).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

__all__ = ["AuxHead", "HEAD_KINDS"]

HEAD_KINDS = ("linear", "mlp", "pool", "token")


class _Flat(nn.Module):
    """(B, *S_i) per boundary tensor -> (B, C): the flattened tensors, concatenated, through ``net``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, h: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat([t.flatten(1) for t in h], dim=1))


class _Pooled(nn.Module):
    """(B, C_i, *spatial) -> (B, sum C_i): the mean over every dimension after the channels, through ``net``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, h: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat([t.flatten(2).mean(2) if t.dim() > 2 else t for t in h], dim=1))


class _PerToken(nn.Module):
    """(B, T, D_i) -> (B, T, C): a LayerNorm over the concatenated D, then the same map at
    every position (T may change per step)."""

    def __init__(self, width: int, net: nn.Module):
        super().__init__()
        # A transformer's own LM head reads its residual stream through a final norm. Without
        # one the local loss can be lowered by growing the stream the next stage reads.
        self.norm = nn.LayerNorm(width)
        self.net = net

    def forward(self, h: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.net(self.norm(torch.cat(list(h), dim=-1)))


def _mlp(width: int, num_classes: int, hidden: int | None) -> nn.Module:
    if hidden is None:
        return nn.Linear(width, num_classes)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class AuxHead:
    """Recipe for the auxiliary head of every stage but the last.

    Args:
        kind: ``"linear"`` (the flattened activation -> C logits), ``"mlp"`` (the same
            through one hidden layer of ``hidden`` units and a ReLU), ``"pool"`` (the mean
            over every dimension after the channel dimension, for (B, C, L) or
            (B, C, H, W) feature maps, then a linear map, or an MLP with ``hidden``),
            or ``"token"`` (a (B, T, D) sequence -> (B, T, C) logits: a LayerNorm over
            D, as before a transformer's own LM head, then the same linear map at every
            position, or an MLP with ``hidden``).
        num_classes: C, the size of the logits the trainer's ``loss_fn`` takes.
        hidden: hidden units (required for ``"mlp"``; optional for ``"pool"`` and ``"token"``).

    Every floating tensor of the boundary enters the head (integer tensors, masks and
    indices, are left out). The head is built on the activation's device and dtype.

    Raises:
        ValueError: an unknown kind, or sizes that are not whole numbers >= 1.
    """

    def __init__(self, kind: str = "linear", num_classes: int | None = None, hidden: int | None = None):
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown auxiliary head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"an auxiliary head needs num_classes, a whole number >= 1 (the size of the "
                             f"logits loss_fn takes), got {num_classes!r}")
        if kind == "mlp" and hidden is None:
            raise ValueError("the mlp auxiliary head needs hidden=... (its hidden units)")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"the auxiliary head's hidden must be a whole number >= 1, got {hidden!r}")
        if kind == "linear" and hidden is not None:
            raise ValueError("the linear auxiliary head takes no hidden; use kind='mlp'")
        self.kind = kind
        self.num_classes = num_classes
        self.hidden = hidden

    def __repr__(self) -> str:
        return f"AuxHead({self.kind!r}, num_classes={self.num_classes}, hidden={self.hidden})"

    def build(self, stage: int, example: Sequence[Any]) -> nn.Module:
        """The head of ``stage`` for an example of its boundary, shapes (B, ...) per tensor.

        Only per-example sizes are used (batch size, and for ``"token"`` the sequence
        length, may change later). Returns a module taking the tuple of floating tensors.

        Raises:
            ValueError: naming the stage, when the boundary has no floating tensor or its
                shapes do not suit the kind.
        """
        h = floating(example)
        shapes = ", ".join(str(tuple(t.shape)) for t in h)
        if not h:
            raise ValueError(f"stage {stage}: an auxiliary head needs a floating-point activation, the boundary "
                             f"has none")
        if any(t.dim() < 2 for t in h):
            raise ValueError(f"stage {stage}: an auxiliary head needs batched activations (B, ...), got {shapes}")
        if self.kind == "token":
            if any(t.dim() != 3 for t in h) or len({t.shape[:2] for t in h}) != 1:
                raise ValueError(f"stage {stage}: the token auxiliary head needs (B, T, D) activations with "
                                 f"the same B and T, got {shapes}")
            width = sum(t.shape[-1] for t in h)
            head: nn.Module = _PerToken(width, _mlp(width, self.num_classes, self.hidden))
        elif self.kind == "pool":
            head = _Pooled(_mlp(sum(t.shape[1] for t in h), self.num_classes, self.hidden))
        else:
            width = sum(int(t[0].numel()) for t in h)
            head = _Flat(_mlp(width, self.num_classes, self.hidden))
        return head.to(device=h[0].device, dtype=h[0].dtype)


def floating(tensors: Sequence[Any]) -> tuple:
    """The floating-point tensors of a boundary, in order (what a head or a local loss sees)."""
    return tuple(t for t in tensors if torch.is_tensor(t) and t.dtype.is_floating_point)
