"""``gradients="local"``: Decoupled Greedy Learning, each stage trains on a local loss.

Stage r < N-1 owns a small auxiliary head ``a_r`` (a :class:`~synthpipe.stages.aux.AuxHead`
recipe, built from the first activation) and steps at once on the gradient of
``loss_fn(a_r(h_r), y)``, the trainer's own loss with the labels, which travel with the
activations anyway. The head steps on the same loss, with the stage's optimizer factory.
Nothing travels backward (``sends_back = False``): no gradient message, no gradient
channel, no activation kept for a later step. ``delay`` has no meaning and is refused.

Costs: one head per stage (its parameters, optimizer state and forward/backward); no
weight versions, no cache. Assumes labels the loss takes at every stage (classification,
or per-token labels with ``AuxHead("token")``).
"""
from __future__ import annotations

from typing import Any

import torch

from ...stages.aux import AuxHead, floating
from ...stages.stage import (
    HEAD_SEED_SALT,
    Stage,
    StageInputError,
    _check_optimizer_state,
    _class_name,
    all_finite,
    describe,
    stage_seeded,
)
from .base import GradientSource, register

__all__ = ["AuxLoss", "AuxHeadState", "Local"]


class AuxLoss:
    """The auxiliary head of one stage, its optimizer and its local loss.

    Args:
        stage: the stage; its ``aux_head`` recipe builds the head, its
            ``optimizer_factory`` the head's optimizer, its ``loss_fn`` the loss.
        source: the gradient source's name, for error messages.
    """

    def __init__(self, stage: Stage, source: str):
        self.stage = stage
        self.source = source
        self.recipe: AuxHead = stage.aux_head
        self.head: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.shapes: list[tuple[int, ...]] | None = None
        self.dtype: torch.dtype | None = None

    def _build(self, h: tuple) -> None:
        with stage_seeded(self.stage, HEAD_SEED_SALT):  # (the same head in one process and on its rank)
            self.head = self.recipe.build(self.stage.index, h)
        params = list(self.head.parameters())
        self.optimizer = self.stage.optimizer_factory(params) if params else None
        if self.stage.replicate is not None:  # data parallel: replica 0's head, gradients averaged
            self.stage.replicate(self.head, self.optimizer, True)
        self.shapes = [tuple(t.shape[1:]) for t in h]
        self.dtype = h[0].dtype

    def loss_and_gradient(self, step: int, outputs: tuple, y: Any) -> tuple[torch.Tensor, tuple]:
        """``(loss, dloss/d outputs)`` of ``loss_fn(head(h_r), y)``; the head's gradients are left
        in its parameters (see :meth:`step_head`). Gradients are ``None`` for non-floating outputs.

        Raises:
            ValueError: the step has no labels.
            StageInputError: the head or ``loss_fn`` cannot take the activation or the labels.
        """
        stage = self.stage
        if not torch.is_tensor(y):
            raise ValueError(f"{stage.name}: gradients={self.source!r} trains the stage on a local loss with the "
                             f"labels, but step {step} has none (got {type(y).__name__}); fit on (input, target) "
                             f"batches")
        leaves = tuple(o.detach().requires_grad_(True) if torch.is_tensor(o) and o.dtype.is_floating_point
                       else None for o in outputs)
        h = floating(leaves)
        if self.head is None:
            self._build(h)
        assert self.head is not None
        try:
            logits = self.head(h)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise StageInputError(f"{stage.name}: its auxiliary head {self.recipe!r} could not take output "
                                  f"{describe(outputs)}: {e}") from e
        assert stage.loss_fn is not None
        try:
            loss = stage.loss_fn(logits, y.to(stage.device, non_blocking=True))
        except (RuntimeError, ValueError, IndexError) as e:
            raise StageInputError(f"{stage.name}: loss_fn could not take its auxiliary head's output "
                                  f"{describe([logits])} and target {describe([y])} (is num_classes right?): "
                                  f"{e}") from e
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), tuple(None if t is None else t.grad for t in leaves)

    def step_head(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"head": None if self.head is None else self.head.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "optimizer_class": _class_name(self.optimizer), "shapes": self.shapes, "dtype": self.dtype}

    def prepare(self, state: dict[str, Any]) -> tuple | None:
        """A head and optimizer built from ``state``; changes nothing. Raises ``ValueError`` naming the stage."""
        if state.get("head") is None:
            return None
        example = [torch.zeros((2, *s), device=self.stage.device, dtype=state["dtype"]) for s in state["shapes"]]
        head = self.recipe.build(self.stage.index, example)
        try:
            head.load_state_dict(state["head"])
        except RuntimeError as e:
            raise ValueError(f"{self.stage.name}: the checkpoint's auxiliary head does not fit this trainer's "
                             f"{self.recipe!r}: {e}") from e
        params = list(head.parameters())
        optimizer = self.stage.optimizer_factory(params) if params else None
        _check_optimizer_state(f"{self.stage.name}'s auxiliary head optimizer", optimizer, state["optimizer"],
                               state.get("optimizer_class"))
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        return head, optimizer, [tuple(s) for s in state["shapes"]], state["dtype"]

    def commit(self, prepared: tuple | None) -> None:
        if prepared is None:  # saved before the first step: a fresh head is built from the next activation
            self.head = self.optimizer = self.shapes = self.dtype = None
        else:
            self.head, self.optimizer, self.shapes, self.dtype = prepared
            if self.stage.replicate is not None:  # (loaded alike on every replica: no broadcast)
                self.stage.replicate(self.head, self.optimizer, False)


def check_aux_head(name: str, config: Any, aux_head: Any) -> None:
    """The checks the sources with local losses share (raises ``ValueError`` naming the option)."""
    if aux_head is None:
        raise ValueError(f"gradients={name!r} trains each stage but the last on a local loss and needs an "
                         f"auxiliary head recipe: pass aux_head=sp.AuxHead('linear', num_classes=C)")
    if not isinstance(aux_head, AuxHead):
        raise ValueError(f"aux_head must be an sp.AuxHead recipe, got {type(aux_head).__name__}")
    if config.delay is not None:
        raise ValueError(f"delay={config.delay} has no meaning for gradients={name!r} (no stage waits for a "
                         f"delayed gradient): leave delay=None")
    if config.warmup_steps:
        raise ValueError(f"warmup_steps={config.warmup_steps} has no meaning for gradients={name!r} "
                         f"(it warms up synthesizers): leave it 0")


def check_loaded(stage: Stage, name: str, state: Any) -> None:
    if not (isinstance(state, dict) and state.get("source") == name):
        saved = repr(state.get("source")) if isinstance(state, dict) else "'synthetic' or 'backprop'"
        raise ValueError(f"{stage.name}: the checkpoint was saved with gradients={saved}, this trainer uses "
                         f"gradients={name!r}")


class AuxHeadState:
    """The checkpoint state of a source whose own state is its stage's auxiliary head
    (``self.aux``, an :class:`AuxLoss`): saved with the source's name, checked on load."""

    name: str
    stage: Stage
    aux: AuxLoss

    def state_dict(self) -> Any:
        return {"source": self.name, "aux": self.aux.state_dict()}

    def check_state(self, state: Any) -> None:
        check_loaded(self.stage, self.name, state)
        self.aux.prepare(state["aux"])

    def load_state_dict(self, state: Any, device: torch.device) -> None:
        check_loaded(self.stage, self.name, state)
        self.aux.commit(self.aux.prepare(state["aux"]))


@register("local")
class Local(AuxHeadState, GradientSource):
    """The gradient of the stage's own auxiliary loss, at once; nothing is sent back."""

    sends_back = False
    uses_delay = False

    def __init__(self, stage: Stage, config: Any):
        super().__init__(stage, config)
        self.aux = AuxLoss(stage, self.name)

    @classmethod
    def check(cls, config: Any, n_stages: int, aux_head: Any = None) -> None:
        check_aux_head(cls.name, config, aux_head)

    def gradient(self, step: int, outputs: tuple, y: Any) -> tuple:
        loss, grads = self.aux.loss_and_gradient(step, outputs, y)
        if all_finite([loss]):  # (a non-finite one stops or skips the step: the head must not step on it)
            self.aux.step_head()
        return grads

