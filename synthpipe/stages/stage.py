"""One pipeline stage: its layers, their optimizer, and its synthesizer.

This module is pure model math (no torch.distributed). The single-process reference
trainer and the per-rank worker both drive a :class:`Stage` through the same calls, so
they apply exactly the same update rule (docs/guide.md, "How a step runs"):

    inputs, outputs = stage.forward(inputs)                # h_r = f_r(h_{r-1})
    grads = stage.synthetic_gradient(outputs, y)           # r < N-1: M_r(h_r, y) / B
      or  loss = stage.loss(outputs, y)                    # r = N-1
    stage.backward(outputs, grads or loss); stage.step()   # update-unlocked
      or  stage.undo_forward()                             # a skipped (non-finite) step
    target = stage.input_gradient(inputs)                  # sent to rank r-1
    stage.train_synthesizer(h, y, target_from_r_plus_1)    # regress M_r (MSE)

A boundary is always a tuple of tensors (a single tensor is a 1-tuple); gradients are
tuples of the same length with ``None`` where no gradient flows.
"""
from __future__ import annotations

import warnings
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn.parameter import UninitializedBuffer

from .boundary import as_tuple, describe
from .materialize import InitFn, materialize, on_meta
from .precision import autocast, autocast_dtype, make_scaler, to_float32
from .synthesizer import BoundarySynthesizer, Synthesizer, TokenSynth, per_batch
from .trace import traced_input_shapes, traced_output_shapes

__all__ = ["OptimizerFactory", "training_modes", "restore_training_modes", "NonFiniteError", "StageInputError",
           "default_synth_optimizer", "Stage", "running_statistics", "all_finite"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]  # optimizer -> torch.optim.lr_scheduler.LRScheduler


def training_modes(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule's train/eval flag, for :func:`restore_training_modes`."""
    return [(m, m.training) for m in module.modules()]


def restore_training_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put back exactly the flags :func:`training_modes` saw.

    ``module.train(mode)`` would set one flag on every submodule, so a layer the user had
    put in eval mode (a frozen BatchNorm) would come back in train mode.
    """
    for m, training in modes:
        m.training = training


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite."""


class StageInputError(ValueError):
    """A stage could not take the tensors it was given."""


SYNTH_SEED_SALT = 104729  # (distinct salts: a stage's synthesizer and its head draw different numbers)
HEAD_SEED_SALT = 7919


@contextmanager
def stage_seeded(stage: "Stage", salt: int) -> Iterator[None]:
    """Run the block on a generator of its own, seeded by ``torch.initial_seed()``, ``salt`` and the stage.

    For what a stage builds lazily (a synthesizer, an auxiliary head): that happens at a
    point of the run that differs between one process and a rank, so it must draw the same
    numbers in both and leave the random stream the stages use (dropout) as it was.
    """
    devices = [stage.device] if stage.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((torch.initial_seed() + salt * (stage.index + 1)) % 2 ** 63)
        yield


def adam(lr: float = 1e-3) -> OptimizerFactory:
    """The default optimizer factory: ``params -> torch.optim.Adam(params, lr=lr)``."""
    def make(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr)
    return make


default_synth_optimizer = adam()


def _traced_shapes_hint(traced: list | None, inputs: Sequence[Any]) -> str:
    """Why a stage traced with input shapes ``traced`` may fail on ``inputs`` (empty if not that)."""
    if traced is None or traced == [tuple(t.shape) if torch.is_tensor(t) else None for t in inputs]:
        return ""
    shown = ", ".join(str(s) for s in traced)
    return (f". This stage was traced (split at points) with input {shown}, and tracing fixes the sizes the "
            f"model's code computes with (x.view(batch, ...), x.view(x.size(0), -1), reshape to a sequence "
            f"length), so other batch sizes or lengths can fail: give example_input the training shapes and "
            f"drop a smaller last batch (DataLoader(drop_last=True)), or use shape-free code (torch.flatten(x, 1))")


class Stage:
    """Stage ``index`` of ``n_stages``: module, optimizer, and synthesizer (not on the last).

    Args:
        index, n_stages: position in the pipeline.
        module: the stage's layers; called as ``module(*inputs)``.
        optimizer: factory ``params -> Optimizer`` for the stage's parameters.
        loss_fn: ``loss_fn(output, y)`` (batch mean), used on the last stage.
        synthesizer: recipe; ``None`` means this stage can only train with true gradients.
        synth_optimizer: factory for the synthesizer's optimizer (default Adam, lr 1e-3).
        synthetic_scale: factor on the synthetic gradient before it is applied.
        device: where the module and its synthesizer live.
        init: for a module built on the meta device, called as ``init(module)`` after it
            is allocated on ``device`` and every submodule's ``reset_parameters`` ran
            (see :mod:`synthpipe.stages.materialize`).
        aux_head: an :class:`~synthpipe.stages.aux.AuxHead` recipe, for gradient sources
            that train the stage on a local loss (the source builds and owns the head).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the forward and loss run under
            autocast in that type; fp16 adds a gradient scaler (:mod:`synthpipe.stages.precision`).
        synth_precision: ``"fp32"`` (the synthesizer takes its input cast to fp32) or
            ``"bf16"`` (its forward under bf16 autocast).
        clip_grad_norm: clip the stage's gradient to this 2-norm before each step.
        lr_scheduler: ``optimizer -> scheduler`` for the stage's optimizer, stepped once per
            training step (skipped steps included, so the learning rate follows the step id).
        synth_lr_scheduler: ``optimizer -> scheduler`` for the synthesizer's optimizer,
            stepped after each of its regression steps.
    """

    def __init__(self, index: int, n_stages: int, module: nn.Module, optimizer: OptimizerFactory,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 synthesizer: Synthesizer | None = None,
                 synth_optimizer: OptimizerFactory | None = None,
                 synthetic_scale: float = 1.0,
                 device: torch.device | str | None = None,
                 init: InitFn | None = None,
                 aux_head: Any = None,
                 precision: str = "fp32", synth_precision: str = "fp32",
                 clip_grad_norm: float | None = None,
                 lr_scheduler: SchedulerFactory | None = None,
                 synth_lr_scheduler: SchedulerFactory | None = None):
        self.index = index
        self.n_stages = n_stages
        self.device = torch.device(device) if device is not None else _module_device(module)
        if self.device.type == "meta":
            raise ValueError(f"stage {index}: give a device to run on; the module is on the meta device")
        if on_meta(module):
            module = materialize(module, self.device, init, name=f"stage {index}")
        self.module = module.to(self.device)
        self.optimizer_factory = optimizer  # (also builds the optimizers of a source's auxiliary heads)
        params = list(self.module.parameters())
        self.optimizer = optimizer(params) if params else None
        autocast_dtype(precision), autocast_dtype(synth_precision)  # (raise on an unknown name)
        self.precision = precision
        self.synth_precision = synth_precision
        self.scaler = make_scaler(self.device, precision)
        self.clip_grad_norm = clip_grad_norm
        self.log_metrics = False  # set by a trainer that logs each step's gradient norm and learning rate
        self.lr_scheduler = _scheduler(lr_scheduler, self.optimizer, f"stage {index}")
        self.synth_lr_scheduler_factory = synth_lr_scheduler
        self.synth_lr_scheduler: Any = None
        self.loss_fn = loss_fn
        self.recipe = synthesizer
        self.aux_head = aux_head  # (an AuxHead recipe: the local losses of some gradient sources)
        self.synth_optimizer_factory = synth_optimizer or default_synth_optimizer
        self.synthetic_scale = synthetic_scale
        self.synth: BoundarySynthesizer | None = None
        self.synth_optimizer: torch.optim.Optimizer | None = None
        # The last (h, y, target) regressed on, newest first, revisited by the next
        # regression steps (the recipe's replay - 1 of them; copies, owned here).
        self.replay_buffer: deque[tuple[tuple, Any, tuple]] = deque(maxlen=_replay_kept(synthesizer))
        # Data parallelism's hook (set by the engine; this module stays free of it): called as
        # replicate(synthesizer, its optimizer, fresh) for every synthesizer built, ``fresh``
        # when built from an activation (False: about to be loaded from a checkpoint).
        self.replicate: Callable[[nn.Module, torch.optim.Optimizer | None, bool], None] | None = None
        self._running_stats = running_statistics(self.module)
        self._stats_before: list[torch.Tensor] | None = None  # saved by a training forward
        self._traced_shapes = traced_input_shapes(self.module)  # (None unless split by tracing)
        self._traced_out = traced_output_shapes(self.module)
        # A lazy norm layer's first forward: the saved copies of the statistics that
        # existed, and the layers that had none yet (undone by resetting them).
        self._first_saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._first_lazy: list[nn.modules.batchnorm._NormBase] = []
        if self.is_last and loss_fn is None:
            raise ValueError("the last stage needs a loss_fn")

    # -- properties ---------------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    @property
    def name(self) -> str:
        return f"stage {self.index}"

    # -- forward ------------------------------------------------------------------
    def forward(self, inputs: Sequence[Any], requires_grad: bool = True,
                parameters: dict[str, torch.Tensor] | None = None) -> tuple[tuple, tuple]:
        """Run the layers. Returns ``(inputs, outputs)``, both tuples.

        ``parameters``: run with these tensors in place of the module's parameters of the
        same names (``torch.func.functional_call``; a gradient source's stashed weights).

        For stages after the first, floating inputs are detached leaves with
        ``requires_grad`` (when ``requires_grad``) so their gradient can be sent back.
        A training-mode forward first saves the running statistics of the stage's norm
        layers, so that :meth:`undo_forward` can take back what this batch did to them.
        """
        prepared = []
        for t in inputs:
            if torch.is_tensor(t):
                t = t.to(self.device, non_blocking=True)
                if not self.is_first and requires_grad and t.dtype.is_floating_point:
                    t = t.detach().requires_grad_(True)
            prepared.append(t)
        inputs = tuple(prepared)
        saved = bool(self._running_stats) and self.module.training
        if saved:
            self._save_running_stats()
        cause: Exception | None = None
        try:
            with self.autocast():
                out = as_tuple(self.module(*inputs) if parameters is None
                               else torch.func.functional_call(self.module, parameters, inputs))
            problem = self._traced_batch_problem(inputs, out)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            hint = _traced_shapes_hint(self._traced_shapes, inputs)
            # (a traced stage's error goes on with the fx interpreter's notes: the first line says it)
            reason = str(e).strip().splitlines()[0] if hint and str(e).strip() else str(e)
            problem, cause = f"{self.name} failed on its input ({describe(inputs)}): {reason}{hint}", e
        if problem is not None:
            if saved:  # a norm layer may have counted this batch already
                self.undo_forward()
            raise StageInputError(problem) from cause
        return inputs, out

    def _traced_batch_problem(self, inputs: tuple, outputs: tuple) -> str | None:
        """A traced stage given another batch size may run and silently mix examples (a
        ``view`` with the traced batch size baked in). An output whose first dimension was
        the batch when traced must follow the batch now; others (a sequence-first (T, B, D)
        boundary, a (B * T, C) output for the loss) are left alone."""
        if not self._traced_shapes or self._traced_out is None:  # (every step: nothing to do unless traced)
            return None
        traced_batch = next((s[0] for s in self._traced_shapes if s), None)
        batch = next((t.shape[0] for t in inputs if torch.is_tensor(t) and t.dim() > 0), None)
        if traced_batch is None or batch is None or batch == traced_batch:
            return None
        for t, traced in zip(outputs, self._traced_out, strict=False):
            if (torch.is_tensor(t) and t.dim() > 0 and traced and traced[0] == traced_batch
                    and t.shape[0] != batch):
                return (f"{self.name} turned a batch of {batch} ({describe(inputs)}) into outputs "
                        f"({describe(outputs)}) whose first dimension was the batch when traced but is not now, "
                        f"so examples were mixed{_traced_shapes_hint(self._traced_shapes, inputs)}")
        return None

    def loss(self, outputs: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """The training loss on the last stage (``loss_fn(outputs[0], y)``)."""
        assert self.loss_fn is not None
        try:
            with self.autocast():
                return self.loss_fn(outputs[0], y.to(self.device, non_blocking=True))
        except (RuntimeError, ValueError, IndexError) as e:
            raise StageInputError(
                f"{self.name}: loss_fn could not take output {describe(outputs)} "
                f"and target {describe([y])}: {e}") from e

    # -- synthetic gradients ------------------------------------------------------
    def ensure_synthesizer(self, example: Sequence[torch.Tensor]) -> BoundarySynthesizer:
        """Build the synthesizer from the first activation seen (lazily)."""
        if self.synth is None:
            if self.recipe is None:
                raise ValueError(f"{self.name} has no synthesizer; pass synthesizer=sp.Synthesizer(...)")
            self.synth, self.synth_optimizer, self.synth_lr_scheduler = self._new_synthesizer(
                self._synth_input([t.detach() for t in example]))
            if self.replicate is not None:
                self.replicate(self.synth, self.synth_optimizer, True)
        return self.synth

    def _new_synthesizer(self, example: Sequence[torch.Tensor]
                         ) -> tuple[BoundarySynthesizer, torch.optim.Optimizer | None, Any]:
        """A synthesizer built by the recipe from ``example``, its optimizer and that one's scheduler."""
        assert self.recipe is not None
        with stage_seeded(self, SYNTH_SEED_SALT):
            synth = self.recipe.build(self.index, example, module=self.module)
        params = list(synth.parameters())
        optimizer = self.synth_optimizer_factory(params) if params else None
        return synth, optimizer, _scheduler(self.synth_lr_scheduler_factory, optimizer, f"{self.name}'s synthesizer")

    def _synth_input(self, h: Sequence[Any]) -> tuple:
        """The boundary as the synthesizer takes it: cast to fp32 in mixed precision (its weights are fp32)."""
        return to_float32(h) if self.precision != "fp32" else tuple(h)

    def _synth_autocast(self) -> Any:
        return autocast(self.device, self.synth_precision)

    def autocast(self) -> Any:
        """The autocast region of one forward of this stage (a no-op in fp32)."""
        return autocast(self.device, self.precision)

    def _check_boundary(self, h: Sequence[torch.Tensor]) -> None:
        """Name the stage and shapes when an activation no longer fits the synthesizer."""
        assert self.synth is not None and self.recipe is not None
        if callable(self.recipe.kind):
            return  # a custom model checks its own input
        for i, (t, shape, part) in enumerate(zip(h, self.synth.shapes, self.synth.parts, strict=False)):
            # Only the token synthesizer takes any sequence length.
            token = (isinstance(part, TokenSynth) and shape is not None and len(shape) == 2
                     and t.dim() == 3 and t.shape[-1] == shape[-1])
            if shape is not None and tuple(t.shape[1:]) != shape and not token:
                raise StageInputError(
                    f"{self.name}: boundary tensor {i} has shape {tuple(t.shape)}, but its "
                    f"synthesizer was built for (B, {', '.join(map(str, shape))})")

    def synthetic_gradient(self, outputs: Sequence[torch.Tensor], y: torch.Tensor | None) -> tuple:
        """``scale * M_r(h_r, y) / B`` for every floating output; no gradient into M_r.

        With the recipe's ``bound``, ``M_r(h_r, y)`` is first scaled down to at most
        ``bound`` times the running RMS of the per-example targets M_r was trained on.
        """
        h = self._synth_input([t.detach() for t in outputs])
        synth = self.ensure_synthesizer(h)
        self._check_boundary(h)
        with torch.no_grad(), self._synth_autocast():
            try:
                pred = synth(h, _labels_on(y, self.device))
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                raise StageInputError(f"{self.name}: its synthesizer could not take output {describe(h)} "
                                      f"with labels {describe([y])}: {e}") from e
            pred = synth.bound_(pred)
        return tuple(None if p is None else per_batch(p.float() if self.precision != "fp32" else p,
                                                      self.synthetic_scale) for p in pred)

    def train_synthesizer(self, h: Sequence[torch.Tensor], y: torch.Tensor | None,
                          target: Sequence[torch.Tensor | None]) -> float:
        """Regress M_r on a new target: MSE between ``M_r(h, y)`` and ``B * target``.

        ``target`` is the (true or bootstrapped) gradient of the batch-mean loss with
        respect to ``h``. One regression step on it, then one on each of the recipe's
        last ``replay - 1`` targets (:attr:`replay_buffer`, newest first), which then
        keeps this one too; the synthesizer's LR schedule advances once. Returns the MSE
        of the new target before its step (sum over the boundary's tensors).
        """
        loss = self._regress(h, y, target, observe=True)
        if loss is None:
            return 0.0  # (no tensor of the boundary got a gradient: nothing to learn or keep)
        for old_h, old_y, old_target in self.replay_buffer:
            self._regress(old_h, old_y, old_target, observe=False)
        if self.replay_buffer.maxlen:  # (appending drops the oldest)
            # Copies: a kept target must not change with whatever the caller later does to its tensors.
            self.replay_buffer.appendleft((tuple(_copy(t) for t in h), _copy(y), tuple(_copy(t) for t in target)))
        if self.synth_lr_scheduler is not None and self.synth_optimizer is not None:
            _step_scheduler(self.synth_lr_scheduler)
        return loss

    def _regress(self, h: Sequence[torch.Tensor], y: torch.Tensor | None,
                 target: Sequence[torch.Tensor | None], observe: bool) -> float | None:
        """One regression step of M_r on ``(h, y, target)``; ``observe``: fold it into the running
        averages. Returns the MSE before the step (``None``: no tensor had a target)."""
        h = self._synth_input(h)
        synth = self.ensure_synthesizer(h)
        with self._synth_autocast():
            pred = synth(h, _labels_on(y, self.device))
        # The MSE and its gradient in closed form: three passes over the boundary instead
        # of the half-dozen that mse_loss, per_example and autograd through them take.
        # d = pred - per_example(g) = pred - B * g (one fused pass);  loss = mean(d^2);
        # dloss/dpred = 2 d / numel.
        outs, grads, total = [], [], 0.0
        errors: list[float | None] = []
        with torch.no_grad():
            for p, g in zip(pred, target, strict=False):
                if p is None or g is None:
                    errors.append(None)
                    continue
                d = torch.sub(p, g.to(p.device, p.dtype), alpha=g.shape[0])
                n = max(d.numel(), 1)
                flat = d.reshape(-1)
                if flat.dtype not in (torch.float32, torch.float64):
                    flat = flat.float()  # no half-precision overflow in the reported loss
                error = float(torch.dot(flat, flat)) / n
                errors.append(error)
                total += error
                outs.append(p)
                grads.append(d.mul_(2.0 / n))
            if observe:
                synth.observe(target, errors)  # (the bound's and the quality gate's running averages)
        if not outs:
            return None
        if self.synth_optimizer is not None:
            self.synth_optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(outs, grads)
            self.synth_optimizer.step()
        return total

    # -- backward and update ------------------------------------------------------
    def backward(self, outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None] | None = None,
                 loss: torch.Tensor | None = None) -> None:
        """Accumulate parameter (and input) gradients from ``loss`` or from output ``grads``.

        With fp16 the backward starts from the loss or ``grads`` times the scaler's scale;
        :meth:`input_gradient` and :meth:`step` take the scale off again.
        """
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            return
        assert grads is not None
        if len(grads) != len(outputs):
            raise StageInputError(
                f"{self.name}: got {len(grads)} gradient tensors for {len(outputs)} outputs")
        pairs = []
        for i, (o, g) in enumerate(zip(outputs, grads, strict=True)):
            if g is None or not torch.is_tensor(o) or not o.requires_grad:
                continue
            if g.shape != o.shape:
                raise StageInputError(
                    f"{self.name}: gradient {i} has shape {tuple(g.shape)} but output {i} has shape {tuple(o.shape)}")
            g = g.to(o.device, o.dtype)
            pairs.append((o, self.scaler.scale(g) if self.scaler is not None else g))
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    def step(self, skip: bool = False) -> float | None:
        """The optimizer step after :meth:`backward`, then one step of the LR schedule.

        The gradient is unscaled (fp16) and clipped to ``clip_grad_norm`` first. ``skip``:
        no update (an fp16 overflow in the input gradient: the scale is lowered); the
        schedule still advances. Returns the gradient's 2-norm before clipping when it was
        computed (clipping, or ``log_metrics``), else ``None``; with fp16 an overflow
        makes it inf and the scaler skips the update.
        """
        norm: float | None = None
        if skip:
            if self.scaler is not None:
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        elif self.optimizer is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
                norm = self._clip()
                self.scaler.step(self.optimizer)  # (skips the update if a gradient overflowed)
                self.scaler.update()
            else:
                norm = self._clip()
                self.optimizer.step()
        self.advance_schedule()
        return norm

    def _clip(self) -> float | None:
        if self.clip_grad_norm is None and not self.log_metrics:
            return None
        assert self.optimizer is not None
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        if self.clip_grad_norm is None:
            return float(torch.nn.utils.get_total_norm(grads))
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))

    def advance_schedule(self) -> None:
        """One step of the stage's LR schedule (called once per training step, skipped or not)."""
        if self.lr_scheduler is not None:
            _step_scheduler(self.lr_scheduler)

    @property
    def lr(self) -> float | None:
        """The learning rate of the stage's first parameter group (``None`` without parameters)."""
        return None if self.optimizer is None else float(self.optimizer.param_groups[0]["lr"])

    def undo_forward(self) -> None:
        """Restore the norm layers' running statistics saved by the last training forward.

        For a step that is skipped (a NaN or infinite loss or gradient): its forward has
        already folded the batch into BatchNorm's running mean and variance, and a NaN
        there would poison every later evaluation. Parameters and optimizer state are
        untouched by a skipped step, so after this the stage is as it was before it. A
        lazy norm layer whose first forward is undone keeps its (now known) shape, with
        the statistics of a freshly built layer: mean 0, variance 1, no batch counted.
        """
        if self._stats_before is not None:
            torch._foreach_copy_(self._running_stats, self._stats_before)
            return
        for t, saved in self._first_saved:
            t.copy_(saved)
        for m in self._first_lazy:
            m.reset_running_stats()

    def _save_running_stats(self) -> None:
        if self._stats_before is not None:
            torch._foreach_copy_(self._stats_before, self._running_stats)  # one call, not one per buffer
        elif not any(isinstance(t, UninitializedBuffer) for t in self._running_stats):
            self._stats_before = [t.clone() for t in self._running_stats]
            self._first_saved, self._first_lazy = [], []
        else:  # a lazy norm layer's first forward (rare: the per-step path above stays one call)
            self._first_saved = [(t, t.clone()) for t in self._running_stats if not isinstance(t, UninitializedBuffer)]
            self._first_lazy = [m for m in _tracking_norms(self.module)
                                if isinstance(m.running_mean, UninitializedBuffer)]

    def input_gradient(self, inputs: Sequence[Any]) -> tuple:
        """``dL/dh_{r-1}`` for each input (``None`` where none flows): the target sent back.

        Unscaled with fp16 (an overflow shows as inf or NaN: see :meth:`step`'s ``skip``).
        """
        grads = tuple(t.grad if torch.is_tensor(t) and t.requires_grad else None for t in inputs)
        if self.scaler is None:
            return grads
        inverse = 1.0 / self.scaler.get_scale()
        return tuple(None if g is None else g * inverse for g in grads)

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "optimizer_class": _class_name(self.optimizer),
            "synth_shapes": self.synth.shapes if self.synth is not None else None,
            "synth_dtype": _synth_dtype(self.synth),
            "synth": self.synth.state_dict() if self.synth is not None else None,
            "synth_optimizer": self.synth_optimizer.state_dict() if self.synth_optimizer else None,
            "synth_optimizer_class": _class_name(self.synth_optimizer),
            "synth_replay": [{"h": h, "y": y, "target": t} for h, y, t in self.replay_buffer],
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "synth_lr_scheduler": self.synth_lr_scheduler.state_dict() if self.synth_lr_scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; on a mismatch, raise and change nothing."""
        self.commit_load(state, self.prepare_load(state))

    def prepare_load(self, state: dict[str, Any]) -> tuple[BoundarySynthesizer | None,
                                                           torch.optim.Optimizer | None, Any]:
        """Check ``state`` against this stage and build its synthesizer from it; changes nothing.

        Returns what :meth:`commit_load` installs. Raises ``ValueError`` naming the stage
        when the state holds other tensors or shapes (a model split differently), another
        optimizer, or a synthesizer that does not fit, or an LR schedule in one of the
        checkpoint and this stage but not in the other.
        """
        _check_module_state(self.name, self.module.state_dict(), state["module"])
        _check_scheduler_state(f"{self.name}'s optimizer", "lr_scheduler", self.lr_scheduler is not None,
                               state.get("lr_scheduler"), self.optimizer is not None)
        _check_optimizer_state(f"{self.name}'s optimizer", self.optimizer, state["optimizer"],
                               state.get("optimizer_class"))
        if state.get("synth") is None:
            return None, None, None
        if self.recipe is None:
            raise ValueError(f"{self.name}: the checkpoint holds a synthesizer, but this trainer "
                             f"has none for the stage (pass synthesizer=...)")
        example = [torch.zeros((2, *s), device=self.device, dtype=state["synth_dtype"]) if s is not None
                   else torch.zeros(2, dtype=torch.long, device=self.device)
                   for s in state["synth_shapes"]]
        synth, synth_optimizer, synth_scheduler = self._new_synthesizer(example)
        if self.replicate is not None:
            self.replicate(synth, synth_optimizer, False)
        try:
            synth.load_state_dict(state["synth"])
        except RuntimeError as e:
            raise ValueError(f"{self.name}: the checkpoint's synthesizer does not fit this trainer's "
                             f"{self.recipe!r}: {e}") from e
        _check_optimizer_state(f"{self.name}'s synthesizer optimizer", synth_optimizer,
                               state["synth_optimizer"], state.get("synth_optimizer_class"))
        _check_scheduler_state(f"{self.name}'s synthesizer optimizer", "synth_lr_scheduler",
                               synth_scheduler is not None, state.get("synth_lr_scheduler"),
                               synth_optimizer is not None)
        if synth_optimizer is not None and state["synth_optimizer"] is not None:
            synth_optimizer.load_state_dict(state["synth_optimizer"])
        if synth_scheduler is not None:
            synth_scheduler.load_state_dict(state["synth_lr_scheduler"])
        return synth, synth_optimizer, synth_scheduler

    def commit_load(self, state: dict[str, Any],
                    prepared: tuple[BoundarySynthesizer | None, torch.optim.Optimizer | None, Any]) -> None:
        """Install a state that :meth:`prepare_load` accepted (no check fails from here on)."""
        self.module.load_state_dict(state["module"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # A checkpoint from before the first synthetic gradient has no synthesizer: the
        # stage builds a fresh one from its next activation, as that run did.
        self.synth, self.synth_optimizer, self.synth_lr_scheduler = prepared
        keep = _replay_kept(self.recipe)  # (the newest ones, where the checkpoint kept more)
        self.replay_buffer = deque(((tuple(_on(t, self.device) for t in r["h"]), _on(r["y"], self.device),
                                     tuple(_on(t, self.device) for t in r["target"]))
                                    for r in state.get("synth_replay", [])[:keep]), maxlen=keep)


def _class_name(obj: Any) -> str | None:
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


def _check_module_state(name: str, own: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    if missing or extra:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        parts = ([f"lacks {show(missing)}"] if missing else []) + ([f"has {show(extra)} besides"] if extra else [])
        raise ValueError(f"{name}: the checkpoint's {name} {' and '.join(parts)}: the model was split "
                         f"differently (another balance or points) or is another model")
    for k, t in own.items():
        v = saved[k]
        if torch.is_tensor(v) and tuple(v.shape) != tuple(t.shape):
            raise ValueError(f"{name}: {k!r} has shape {tuple(v.shape)} in the checkpoint but "
                             f"{tuple(t.shape)} in this trainer's model")


def _check_optimizer_state(what: str, optimizer: torch.optim.Optimizer | None, saved: dict[str, Any] | None,
                           saved_class: str | None) -> None:
    if optimizer is None or saved is None:
        return
    own_class = _class_name(optimizer)
    if saved_class is not None and saved_class != own_class:
        raise ValueError(f"{what}: the checkpoint was saved with {saved_class}, this trainer uses {own_class}")
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    # (initial_lr is an LR scheduler's, not the optimizer's: _check_scheduler_state names that)
    lacking = sorted({k for g in groups for k in g} - {k for g in saved_groups for k in g} - {"initial_lr"})
    if lacking:  # a checkpoint older than the class names: another optimizer's settings
        raise ValueError(f"{what}: the checkpoint's optimizer state has no {', '.join(lacking)}: it was saved "
                         f"with another optimizer than this trainer's {own_class}")
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved_groups]
    if sizes != saved_sizes:
        raise ValueError(f"{what}: the checkpoint has parameter groups of sizes {saved_sizes}, "
                         f"this trainer {sizes}")


def _check_scheduler_state(what: str, option: str, own: bool, saved: Any, has_optimizer: bool) -> None:
    """A schedule saved but not given (or given but not saved) would silently change the learning rate."""
    if not has_optimizer or own == (saved is not None):
        return
    if own:
        raise ValueError(f"{what}: this trainer has an {option}, but the checkpoint was saved without one, so "
                         f"the schedule's step would restart at 0 at the checkpoint's step; resume without "
                         f"{option} (or start the scheduled run from step 0)")
    raise ValueError(f"{what}: the checkpoint was saved with an {option}, but this trainer has none, so the "
                     f"learning rate would stay at the checkpoint's value; pass the same {option}")


def _scheduler(factory: SchedulerFactory | None, optimizer: torch.optim.Optimizer | None, what: str) -> Any:
    """``factory(optimizer)`` (``None`` without either), checked to be a scheduler."""
    if factory is None or optimizer is None:
        return None
    scheduler = factory(optimizer)
    if not (callable(getattr(scheduler, "step", None)) and callable(getattr(scheduler, "state_dict", None))):
        raise TypeError(f"{what}: the LR scheduler factory must return a scheduler (with step() and "
                        f"state_dict(), e.g. torch.optim.lr_scheduler.LambdaLR(optimizer, ...)), "
                        f"got {type(scheduler).__name__}")
    return scheduler


def _step_scheduler(scheduler: Any) -> None:
    # A skipped first update (an fp16 overflow, a skipped non-finite step) makes PyTorch warn
    # that the scheduler stepped before the optimizer: intended, the schedule follows the step id.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def running_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The buffers a training-mode forward updates: BatchNorm / InstanceNorm running stats.

    (``running_mean``, ``running_var`` and ``num_batches_tracked`` of every norm layer
    that tracks running statistics; other buffers, such as positional tables, are
    constants and are not copied.)
    """
    return [b for m in _tracking_norms(module) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if isinstance(b, torch.Tensor)]


def _tracking_norms(module: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    """The BatchNorm / InstanceNorm layers of ``module`` that track running statistics."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def _replay_kept(recipe: Synthesizer | None) -> int:
    """How many past targets a stage keeps for its synthesizer to revisit."""
    return recipe.replay - 1 if recipe is not None else 0


def _copy(t: Any) -> Any:
    """A detached copy of a tensor (anything else as it is)."""
    return t.detach().clone() if torch.is_tensor(t) else t


def _on(t: Any, device: torch.device) -> Any:
    return t.to(device) if torch.is_tensor(t) else t


def _labels_on(y: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return y.to(device, non_blocking=True) if torch.is_tensor(y) else None


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _synth_dtype(synth: BoundarySynthesizer | None) -> torch.dtype:
    if synth is not None:
        for p in synth.parameters():
            return p.dtype
    return torch.float32


def all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    """True if every given tensor is free of NaN and infinity.

    Checked through the sum, one cheap pass (``isfinite(t).all()`` takes five on CPU:
    about 1.7 ms for a 256 x 1024 float tensor against 0.05 ms): NaN and infinity
    propagate through a sum, so a finite sum proves every element finite. Only a
    non-finite sum, a real NaN/inf or an overflow of the sum, is confirmed element by
    element.
    """
    for t in tensors:
        if t is None or not torch.is_tensor(t) or not (t.is_floating_point() or t.is_complex()):
            continue
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True
