"""The synthetic input model of a stage: predict its input ``h_{r-1}`` from the data ``x``.

The DNI paper's *complete unlock*: besides a synthetic gradient for its output, stage
r > 0 owns a model ``I_r(x) ~ h_{r-1}`` so that it can run its forward and update on a
predicted input without waiting for stages 0..r-1 (forward unlocking). ``I_r`` is
trained by regression (MSE) on the real input ``h_{r-1}`` when that arrives. Pure model
math: the runner decides when it predicts and when it learns.

Shapes: ``x`` is (B, ...) and is flattened to (B, D); every floating tensor of the
boundary, (B, ...), gets its own two-layer MLP head ``D -> hidden -> prod(...)``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from .boundary import describe
from .stage import OptimizerFactory, StageInputError

__all__ = ["InputSynthesizer"]


class InputSynthesizer:
    """``I_r``: stage ``index``'s predicted input from the data, and its regression.

    Args:
        index: the stage it predicts the input of (``> 0``: stage 0 reads the data itself).
        optimizer: factory ``params -> Optimizer`` for its parameters.
        hidden: the width of each MLP head.
        device: where it lives.
        seed: the seed of its initialisation (``None``: the global random state), so that
            processes that each build one build the same weights.

    Raises:
        ValueError: ``index`` is 0.
    """

    def __init__(self, index: int, optimizer: OptimizerFactory, hidden: int = 256,
                 device: torch.device | str = "cpu", seed: int | None = None):
        if index <= 0:
            raise ValueError(f"stage {index}: a synthetic input needs a stage before it; stage 0 reads "
                             f"the data itself, so it has no input to predict")
        self.index = index
        self.optimizer_factory = optimizer
        self.hidden = hidden
        self.device = torch.device(device)
        self.seed = seed
        self.model: nn.ModuleList | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.shapes: list[tuple[int, ...]] = []
        self.in_features = 0

    @property
    def name(self) -> str:
        return f"stage {self.index}'s input synthesizer"

    def _flat(self, x: Sequence[Any]) -> torch.Tensor:
        parts = [t.to(self.device).flatten(1).float() for t in x if torch.is_tensor(t) and t.dim() > 0]
        if not parts:
            raise StageInputError(f"{self.name}: the data ({describe(list(x))}) has no tensor with a batch dimension")
        flat = torch.cat(parts, dim=1)
        if self.model is not None and flat.shape[1] != self.in_features:
            raise StageInputError(f"{self.name}: the data has {flat.shape[1]} features per example "
                                  f"({describe(list(x))}), but it was built for {self.in_features}")
        return flat

    def build(self, x: Sequence[Any], h: Sequence[Any]) -> None:
        """Build the model for data like ``x`` and inputs like ``h`` (their shapes only; no training).

        Raises:
            StageInputError: a part of ``h`` is not a floating batch tensor, or ``x`` has none.
        """
        self._check_real(h)
        self._make([tuple(t.shape[1:]) for t in h], self._flat(x).shape[1])

    def _check_real(self, h: Sequence[Any]) -> None:
        for i, t in enumerate(h):
            if not torch.is_tensor(t) or not t.dtype.is_floating_point or t.dim() == 0:
                raise StageInputError(f"{self.name}: input tensor {i} of stage {self.index} ({describe(list(h))}) is "
                                      f"not a floating batch tensor, which a synthetic input cannot predict")

    def _make(self, shapes: list[tuple[int, ...]], in_features: int) -> None:
        self.shapes, self.in_features = shapes, in_features
        with torch.random.fork_rng(devices=[]):  # (built on the CPU, then moved)
            if self.seed is not None:
                torch.manual_seed(self.seed)
            model = nn.ModuleList(
                nn.Sequential(nn.Linear(self.in_features, self.hidden), nn.ReLU(),
                              nn.Linear(self.hidden, math.prod(s))) for s in self.shapes)
        self.model = model.to(self.device)
        self.optimizer = self.optimizer_factory(self.model.parameters())

    def ready(self) -> bool:
        """Has it been built (from a first real input)?"""
        return self.model is not None

    @torch.no_grad()
    def predict(self, x: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """``I_r(x)``: one detached tensor per boundary tensor, shaped (B, ...) like the real input.

        Raises:
            RuntimeError: before its first :meth:`train` (its shapes come from a real input).
        """
        if self.model is None:
            raise RuntimeError(f"{self.name} has not seen a real input yet")
        flat = self._flat(x)
        return tuple(head(flat).view(flat.shape[0], *s) for head, s in zip(self.model, self.shapes, strict=True))

    def train(self, x: Sequence[Any], real: Sequence[torch.Tensor]) -> float:
        """One regression step of ``I_r(x)`` towards the real input ``real``; returns the MSE (summed over tensors).

        Raises:
            StageInputError: ``real`` no longer has the shapes it was built for.
        """
        if self.model is None:
            self.build(x, real)
        flat = self._flat(x)
        assert self.model is not None and self.optimizer is not None
        if [tuple(t.shape[1:]) for t in real] != self.shapes:
            raise StageInputError(f"{self.name}: the real input is {describe(list(real))}, but it was built "
                                  f"for (B, ...) shapes {self.shapes}")
        losses = [nn.functional.mse_loss(head(flat).view_as(t), t.detach().to(self.device).float())
                  for head, t in zip(self.model, real, strict=True)]
        total = torch.stack(losses).sum()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return float(total.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"model": None if self.model is None else self.model.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "shapes": self.shapes, "in_features": self.in_features}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (building the model from the saved shapes)."""
        if state["model"] is None:
            self.model = self.optimizer = None
            return
        self._make([tuple(s) for s in state["shapes"]], int(state["in_features"]))
        assert self.model is not None and self.optimizer is not None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
