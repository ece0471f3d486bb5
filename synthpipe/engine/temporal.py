"""``sp.TemporalTrainer``: truncated BPTT with temporal synthetic gradients (DNI for recurrent cores).

Truncated backpropagation through time cuts a sequence into chunks of ``T`` steps, runs
the core over each chunk from the (detached) state the previous chunk left, and
backpropagates each chunk's loss inside the chunk only: no credit reaches further back
than ``T`` steps. Temporal DNI (Jaderberg et al., 2017) adds a *state synthesizer*
``M(s) ~ dL_future/ds``: at the end of every chunk but the sequence's last, its prediction
for the final state is injected as that state's gradient, so the chunk learns from the
losses that come after it.

M is trained by regression on the bootstrapped target: the gradient that the next chunk's
backward leaves on the state it was started from. That backward is itself seeded with
M's prediction at the next boundary, so the target is the next chunk's own loss plus
everything M expects after it (the temporal-difference target). At the sequence's last
chunk nothing comes after, and the target is the true gradient.

Scaling (the one rule of :mod:`synthpipe.stages.synthesizer`): losses are batch means, so a
gradient scales like ``1/B``; M regresses the per-example gradient ``B * dL/ds`` and the
trainer divides by ``B`` (and multiplies by ``synthetic_scale``) when it injects it. The
objective is the sum over chunks of ``loss_fn(head(output_chunk), target_chunk)``; with a
loss that sums over time (see :mod:`synthpipe.sequences`) that is the whole sequence's
loss whatever ``T`` is.

The state may be one tensor or a tuple of them (``nn.LSTM``: ``(h, c)``). For M the
floating-point state tensors are flattened into one (B, F) matrix: each moved to put the
batch first and reshaped to (B, -1), concatenated in order. ``nn.RNN``/``nn.GRU``/``nn.LSTM``
hold their states as (layers * directions, B, H), batch in dimension 1 even when
``batch_first=True``; other cores are assumed batch-first unless ``state_batch_dim`` says.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Iterable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..stages.stage import OptimizerFactory
from ..stages.synthesizer import Synthesizer, per_batch, per_example

__all__ = ["StateLayout", "TemporalStep", "TemporalTrainer"]

State = Union[torch.Tensor, tuple]
UPDATES = ("chunk", "sequence")


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def _name(module: Any) -> str:
    return type(module).__name__


@dataclasses.dataclass
class TemporalStep:
    """What one :meth:`TemporalTrainer.step` did."""

    loss: float
    """The sum over chunks of the task loss (before any update of this step)."""
    synth_loss: float | None
    """Mean regression loss of the synthesizer over the boundaries trained; None without one."""
    aux_loss: float | None
    """Mean auxiliary loss (future synthetic gradient prediction); None when it is off."""
    chunks: int
    """Chunks the sequence was cut into."""


class StateLayout:
    """How a recurrent state maps to the (B, F) matrix a state synthesizer sees.

    Built from one example state; :meth:`check` refuses a later state of another form.

    Args:
        state: a tensor or a tuple of tensors (non-float entries are carried but get no gradient).
        batch_dim: the batch dimension of every floating-point state tensor.
        batch_size: B, which that dimension must have.
        core: the core's name, for errors.

    Raises:
        ValueError: no floating-point tensor in the state, or a tensor whose ``batch_dim`` is
            missing or is not ``batch_size`` long.
    """

    def __init__(self, state: State, batch_dim: int, batch_size: int, core: str = "core"):
        self.is_tuple = isinstance(state, (tuple, list))
        parts = tuple(state) if self.is_tuple else (state,)
        self.core = core
        self.batch_dim = batch_dim
        self.floating = [torch.is_tensor(t) and t.dtype.is_floating_point for t in parts]
        if not any(self.floating):
            raise ValueError(
                f"{core} carries no floating-point state (it returned {_describe(state)}); temporal DNI needs a "
                f"recurrent state: call the core as core(x, state) -> (output, new_state)")
        self.shapes = [tuple(t.shape) if f else None for t, f in zip(parts, self.floating, strict=False)]
        self.check(state, batch_size)
        # per-example sizes, in flattening order
        self.sizes = [math.prod(s) // batch_size if s is not None else 0 for s in self.shapes]

    @property
    def features(self) -> int:
        """F, the flattened per-example state size."""
        return sum(self.sizes)

    def parts(self, state: State) -> tuple:
        return tuple(state) if self.is_tuple else (state,)

    def check(self, state: State, batch_size: int) -> None:
        """Refuse a state whose structure or batch dimension does not fit (named by tensor and dim)."""
        parts = tuple(state) if isinstance(state, (tuple, list)) else (state,)
        if isinstance(state, (tuple, list)) != self.is_tuple or len(parts) != len(self.floating):
            raise ValueError(f"{self.core} returned a state of another form ({_describe(state)}) than before")
        for i, (t, floating) in enumerate(zip(parts, self.floating, strict=False)):
            if not floating:
                continue
            if not torch.is_tensor(t) or not t.dtype.is_floating_point:
                raise ValueError(f"{self.core}'s state tensor {i} is now {_describe(t)}, not a float tensor")
            if t.dim() <= self.batch_dim or t.shape[self.batch_dim] != batch_size:
                hint = (" (nn.RNN, nn.GRU and nn.LSTM keep states as (layers, B, H): batch in dimension 1)"
                        if self.batch_dim == 0 else "")
                raise ValueError(
                    f"{self.core}'s state tensor {i} has shape {tuple(t.shape)}, but its batch dimension "
                    f"{self.batch_dim} should have the batch size {batch_size}; pass state_batch_dim= to say "
                    f"which dimension holds the batch{hint}")
            shape = self.shapes[i]
            d = self.batch_dim
            if shape is not None and tuple(t.shape[:d]) + tuple(t.shape[d + 1:]) != shape[:d] + shape[d + 1:]:
                raise ValueError(f"{self.core}'s state tensor {i} changed shape from {self.shapes[i]} to "
                                 f"{tuple(t.shape)} (only the batch size may change)")

    def flatten(self, tensors: Sequence[torch.Tensor | None], batch_size: int, like: torch.Tensor) -> torch.Tensor:
        """(B, F): the float entries of ``tensors`` (None = zeros) batch-first, flattened and concatenated."""
        cols = []
        for t, floating, size in zip(tensors, self.floating, self.sizes, strict=False):
            if not floating:
                continue
            if t is None:
                cols.append(like.new_zeros(batch_size, size))
            else:
                cols.append(t.movedim(self.batch_dim, 0).reshape(batch_size, -1))
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def unflatten(self, z: torch.Tensor, state: State) -> list[torch.Tensor | None]:
        """Split (B, F) back into tensors shaped like ``state``'s float entries (None elsewhere)."""
        out: list[torch.Tensor | None] = []
        offset = 0
        for t, floating, size in zip(self.parts(state), self.floating, self.sizes, strict=False):
            if not floating:
                out.append(None)
                continue
            batch_first = t.movedim(self.batch_dim, 0).shape
            out.append(z[:, offset:offset + size].reshape(batch_first).movedim(0, self.batch_dim))
            offset += size
        return out


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: (" + ", ".join(_describe(v) for v in value) + ")"
    return repr(value) if value is None else f"a {type(value).__name__}"


def _is_rnn(core: nn.Module) -> bool:
    return isinstance(core, nn.RNNBase)


class TemporalTrainer:
    """Truncated BPTT over chunks of ``truncation`` steps, with a temporal synthetic gradient.

    ``core(x_chunk, state) -> (output, new_state)`` is any recurrent module: ``nn.LSTM``,
    ``nn.GRU``, ``nn.RNN`` (not bidirectional) or a user cell. It gets ``state=None`` at
    each sequence's start. Inputs are batch-first, (B, L, ...); an ``nn.RNNBase`` core with
    ``batch_first=False`` is fed (t, B, ...) and its output turned back to (B, t, ...).
    ``head(output) -> prediction`` and ``loss_fn(prediction, target_chunk) -> scalar``.

    Args:
        core: the recurrent core.
        head: the readout applied to the core's output of each chunk.
        loss_fn: a batch-mean loss of one chunk (its sum over chunks is the objective).
        truncation: T, steps per chunk (>= 1). The last chunk may be shorter.
        synthesizer: the state synthesizer ``M``: a :class:`~synthpipe.Synthesizer` recipe
            (``"linear"``, ``"lowrank"``, ``"mlp"``; not conditional), built on the flattened
            (B, F) state at the first step; or an ``nn.Module`` mapping (B, F) to the per-example
            gradient (B, F). ``None``: plain truncated BPTT. Every built model starts at zero,
            so training starts exactly as plain truncated BPTT.
        optimizer: factory ``params -> Optimizer`` for the core and head (default Adam, 1e-3).
        synth_optimizer: the same for ``M`` (default Adam, 1e-3). A module without parameters
            (an oracle) is not trained.
        aux_future: the paper's auxiliary task: a linear readout of the core's output at every
            step of a chunk predicts the synthetic gradient that ``M`` gives at the chunk's end
            (up to T steps ahead); its regression loss, times ``aux_weight``, is added to the
            chunk's loss, so the core learns to represent what lies ahead. The readout is zero
            at the start and trained by ``optimizer``.
        aux_weight: weight of the auxiliary loss.
        synthetic_scale: factor on ``M``'s prediction when injected (1.0: as predicted; below 1
            it discounts the far future, since the bootstrapped target carries it too).
        update: ``"chunk"``: one optimizer step per chunk (the paper's setting);
            ``"sequence"``: gradients of all chunks of a batch are summed and applied once
            (with a true-gradient synthesizer this is full BPTT).
        state_batch_dim: the batch dimension of the state tensors; default 1 for
            ``nn.RNNBase`` cores, 0 for any other.
        clip_grad_norm: clip the core's and head's gradient norm before each update (None: off).

    Raises:
        ValueError: ``truncation`` < 1, a core that cannot take a state (``core(x, state)``), a
            bidirectional core, a conditional synthesizer, ``aux_future`` without a
            synthesizer, an unknown ``update``, or bad numbers.
        TypeError: ``head``/``loss_fn`` not callable, an optimizer that is not a factory.
    """

    def __init__(self, core: nn.Module, head: nn.Module | Callable[[torch.Tensor], torch.Tensor],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], truncation: int,
                 synthesizer: Synthesizer | nn.Module | None = None,
                 optimizer: OptimizerFactory | None = None, synth_optimizer: OptimizerFactory | None = None,
                 aux_future: bool = False, aux_weight: float = 1.0, synthetic_scale: float = 1.0,
                 update: str = "chunk", state_batch_dim: int | None = None, clip_grad_norm: float | None = None):
        if isinstance(truncation, bool) or not isinstance(truncation, int) or truncation < 1:
            raise ValueError(f"truncation must be a whole number of steps >= 1, got {truncation!r}")
        if not isinstance(core, nn.Module):
            raise TypeError(f"core must be an nn.Module, got {type(core).__name__}")
        self._check_core_takes_state(core)
        if not callable(head):
            raise TypeError(f"head must be callable (an nn.Module), got {type(head).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if synthesizer is not None and not isinstance(synthesizer, (Synthesizer, nn.Module)):
            raise TypeError(f"synthesizer must be a Synthesizer recipe, an nn.Module (B, F) -> (B, F) or None, "
                            f"got {type(synthesizer).__name__}")
        if isinstance(synthesizer, Synthesizer):
            if synthesizer.conditional:
                raise ValueError("a temporal synthesizer cannot be conditional: the future gradient of a state "
                                 "does not depend on one class label")
            if synthesizer.kind in ("conv", "token"):
                raise ValueError(f"the {synthesizer.kind!r} synthesizer does not apply to a recurrent state, which "
                                 f"it sees flattened as (B, F); use 'linear', 'lowrank' or 'mlp'")
        if aux_future and synthesizer is None:
            raise ValueError("aux_future predicts future synthetic gradients and needs a synthesizer")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        for name, value in (("aux_weight", aux_weight), ("synthetic_scale", synthetic_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
        if state_batch_dim is not None and (isinstance(state_batch_dim, bool) or not isinstance(state_batch_dim, int)
                                            or state_batch_dim < 0):
            raise ValueError(f"state_batch_dim must be a whole number >= 0 or None, got {state_batch_dim!r}")
        for name, factory in (("optimizer", optimizer), ("synth_optimizer", synth_optimizer)):
            if factory is not None and (isinstance(factory, torch.optim.Optimizer) or not callable(factory)):
                raise TypeError(f"{name} must be a factory params -> Optimizer (e.g. lambda p: torch.optim.Adam(p)), "
                                f"got {type(factory).__name__}")
        self.core, self.head, self.loss_fn = core, head, loss_fn
        self.truncation = truncation
        self.aux_future, self.aux_weight = bool(aux_future), float(aux_weight)
        self.synthetic_scale = float(synthetic_scale)
        self.update = update
        self.state_batch_dim = (1 if _is_rnn(core) else 0) if state_batch_dim is None else state_batch_dim
        self.clip_grad_norm = clip_grad_norm
        self._synth_recipe = synthesizer if isinstance(synthesizer, Synthesizer) else None
        self.synthesizer: nn.Module | None = synthesizer if isinstance(synthesizer, nn.Module) else None
        self.has_synthesizer = synthesizer is not None
        self._synth_optimizer_factory = synth_optimizer or _default_optimizer
        self.synth_optimizer: torch.optim.Optimizer | None = None
        self.aux_head: nn.Linear | None = None
        self.layout: StateLayout | None = None
        params = list(self._model_params())
        self.optimizer = (optimizer or _default_optimizer)(params)
        if self.synthesizer is not None:
            self._make_synth_optimizer()
        self.steps = 0

    # -- construction helpers -------------------------------------------------------------------
    @staticmethod
    def _check_core_takes_state(core: nn.Module) -> None:
        if _is_rnn(core) and core.bidirectional:
            raise ValueError(f"a bidirectional {_name(core)} cannot carry its state across chunks (its backward "
                             f"direction starts at each chunk's end); use a unidirectional core")
        try:
            inspect.signature(core.forward).bind(None, None)
        except TypeError:
            raise ValueError(
                f"core {_name(core)} takes no state: a temporal core is called as core(x, state) and returns "
                f"(output, new_state), like nn.LSTM, nn.GRU and nn.RNN") from None
        except ValueError:  # no signature to read (a builtin); the first step checks what it returns
            pass

    def _model_params(self) -> Iterable[nn.Parameter]:
        seen: set[int] = set()
        for module in (self.core, self.head):
            if isinstance(module, nn.Module):
                for p in module.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield p

    def _make_synth_optimizer(self) -> None:
        assert self.synthesizer is not None
        params = [p for p in self.synthesizer.parameters() if p.requires_grad]
        self.synth_optimizer = self._synth_optimizer_factory(params) if params else None

    def _device(self) -> torch.device:
        p = next(self.core.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # -- running the core ---------------------------------------------------------------------
    def _run_core(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        time_major = _is_rnn(self.core) and not self.core.batch_first
        result = self.core(x.transpose(0, 1) if time_major else x, state)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ValueError(f"core {_name(self.core)} returned {_describe(result)}; a temporal core returns "
                             f"(output, new_state)")
        out, new_state = result
        if new_state is None:
            raise ValueError(f"core {_name(self.core)} returned no state (None); temporal DNI needs the state the "
                             f"core carries to the next step")
        if not torch.is_tensor(out):
            raise ValueError(f"core {_name(self.core)} returned an output that is {_describe(out)}, not a tensor")
        if time_major:
            out = out.transpose(0, 1)
        return out, (tuple(new_state) if isinstance(new_state, list) else new_state)

    def _build(self, state: State, batch_size: int, out: torch.Tensor) -> None:
        """First step: learn the state's layout; build M and the auxiliary readout on it."""
        # Everything is built before anything is kept: a refusal here leaves the trainer as it was.
        layout = StateLayout(state, self.state_batch_dim, batch_size, f"core {_name(self.core)}")
        like = next(t for t, f in zip(layout.parts(state), layout.floating, strict=False) if f)
        if self.aux_future and out.dim() < 3:
            raise ValueError(f"aux_future reads the core's output per step, (B, t, H); core {_name(self.core)} "
                             f"returned shape {tuple(out.shape)}")
        if self._synth_recipe is not None:
            example = like.new_zeros(batch_size, layout.features)
            self.synthesizer = self._synth_recipe.build(0, [example]).parts[0]
            self._make_synth_optimizer()
        if self.aux_future:
            width = math.prod(out.shape[2:])
            self.aux_head = nn.Linear(width, layout.features).to(device=out.device, dtype=out.dtype)
            nn.init.zeros_(self.aux_head.weight)
            nn.init.zeros_(self.aux_head.bias)
            self.optimizer.add_param_group({"params": list(self.aux_head.parameters())})
        self.layout = layout

    @property
    def _layout(self) -> StateLayout:
        if self.layout is None:
            raise RuntimeError("internal error: the state layout is built at the first chunk")
        return self.layout

    def _predict(self, z: torch.Tensor) -> torch.Tensor:
        assert self.synthesizer is not None
        pred = self.synthesizer(z)
        if not torch.is_tensor(pred) or pred.shape != z.shape:
            raise ValueError(f"the synthesizer maps the flattened state {tuple(z.shape)} to "
                             f"{_describe(pred)}; it must return the same shape (a per-example gradient)")
        return pred

    # -- training ------------------------------------------------------------------------------
    def _check_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        if not torch.is_tensor(x) or x.dim() < 2:
            raise ValueError(f"inputs must be batch-first (B, L, ...) tensors, got {_describe(x)}")
        if not torch.is_tensor(y) or y.dim() < 2:
            raise ValueError(f"targets must be batch-first (B, L, ...) tensors, got {_describe(y)}")
        if y.shape[:2] != x.shape[:2]:
            raise ValueError(f"targets of shape {tuple(y.shape)} do not fit inputs of shape {tuple(x.shape)}: both "
                             f"need the same batch size and length (B, L, ...)")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"an empty batch or sequence: inputs of shape {tuple(x.shape)}")
        if _is_rnn(self.core) and (x.dim() != 3 or x.shape[2] != self.core.input_size):
            raise ValueError(f"{_name(self.core)} core (input_size={self.core.input_size}) needs batch-first inputs "
                             f"(B, L, {self.core.input_size}), got shape {tuple(x.shape)}")
        return int(x.shape[0]), int(x.shape[1])

    def _step_model(self) -> None:
        if self.clip_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> TemporalStep:
        """Train on one batch of sequences: x (B, L, ...), y (B, L, ...) cut into chunks of T steps.

        Returns:
            A :class:`TemporalStep` with the summed loss and the synthesizer's and auxiliary losses.

        Raises:
            ValueError: shapes that do not fit (inputs/targets, the state's batch dimension), a
                core that returns no state, a loss that is not a scalar, a synthesizer output of
                the wrong shape.
        """
        batch, length = self._check_batch(x, y)
        device = self._device()
        x, y = x.to(device), y.to(device)
        if self.update == "sequence":
            self.optimizer.zero_grad(set_to_none=True)
        state: State | None = None
        total = 0.0
        synth_losses: list[float] = []
        aux_losses: list[float] = []
        bounds = list(range(0, length, self.truncation))
        for k, t0 in enumerate(bounds):
            t1 = min(t0 + self.truncation, length)
            last = k == len(bounds) - 1
            state_in = self._detached(state) if state is not None else None
            out, new_state = self._run_core(x[:, t0:t1], state_in)
            if self.layout is None:
                self._build(new_state, batch, out)
            self._layout.check(new_state, batch)
            loss = self.loss_fn(self.head(out), y[:, t0:t1])
            if not torch.is_tensor(loss) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
            total += float(loss.detach())
            roots: list[torch.Tensor] = [loss]
            seeds: list[torch.Tensor | None] = [None]
            if self.synthesizer is not None and not last:
                parts = self._layout.parts(new_state)
                z_end = self._layout.flatten(parts, batch, out).detach()
                with torch.no_grad():
                    synthetic = self._predict(z_end)
                grads = self._layout.unflatten(per_batch(synthetic, self.synthetic_scale), new_state)
                for t, g in zip(parts, grads, strict=False):
                    if g is not None and t.requires_grad:
                        roots.append(t)
                        seeds.append(g)
                if self.aux_head is not None:
                    aux_pred = self.aux_head(out.flatten(2))
                    aux = F.mse_loss(aux_pred, synthetic[:, None, :].expand_as(aux_pred))
                    aux_losses.append(float(aux.detach()))
                    roots[0] = loss + self.aux_weight * aux
            pairs = [(r, s) for r, s in zip(roots, seeds, strict=False) if r.requires_grad]
            if pairs:
                torch.autograd.backward([r for r, _ in pairs], [s for _, s in pairs])
            if state_in is not None and self.synthesizer is not None:
                synth_losses.append(self._train_synthesizer(state_in, batch, out))
            if self.update == "chunk":
                self._step_model()
            state = new_state
        if self.update == "sequence":
            self._step_model()
        self.steps += 1
        def mean(v: list[float]) -> float | None:
            return sum(v) / len(v) if v else None
        return TemporalStep(loss=total, synth_loss=mean(synth_losses) if self.has_synthesizer else None,
                            aux_loss=mean(aux_losses) if self.aux_future else None, chunks=len(bounds))

    def _detached(self, state: State) -> State:
        """The carried state as fresh leaves (float entries require grad, to read the target off them)."""
        parts = self._layout.parts(state)
        leaves = tuple(t.detach().requires_grad_(f) if f else t
                       for t, f in zip(parts, self._layout.floating, strict=False))
        return leaves if self._layout.is_tuple else leaves[0]

    def _train_synthesizer(self, state_in: State, batch: int, like: torch.Tensor) -> float:
        """Regress M(s_in) on the bootstrapped target ``B * dL/ds_in`` the chunk's backward left on s_in."""
        parts = self._layout.parts(state_in)
        floating = self._layout.floating
        z = self._layout.flatten([t.detach() if f else None for t, f in zip(parts, floating, strict=False)],
                                 batch, like)
        grads = [t.grad if f else None for t, f in zip(parts, self._layout.floating, strict=False)]
        target = per_example(self._layout.flatten(grads, batch, like).detach())
        loss = F.mse_loss(self._predict(z), target)
        if self.synth_optimizer is not None:
            self.synth_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.synth_optimizer.step()
        return float(loss.detach())

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int | None = None
            ) -> list[TemporalStep]:
        """:meth:`step` on every ``(x, y)`` of ``batches`` (at most ``steps`` of them).

        Raises:
            ValueError: a batch that is not an ``(x, y)`` pair, and whatever :meth:`step` raises.
        """
        log: list[TemporalStep] = []
        for i, batch in enumerate(batches):
            if steps is not None and i >= steps:
                break
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"fit expects (x, y) batches; batch {i} is {_describe(batch)}")
            log.append(self.step(*batch))
        return log

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``head(core(x))`` over whole sequences x (B, L, ...), in chunks of T, without training.

        The state carries across chunks as in training, so this is the prediction the trained
        objective scored. Modules are put in eval mode and restored.
        """
        if not torch.is_tensor(x) or x.dim() < 2:
            raise ValueError(f"inputs must be batch-first (B, L, ...) tensors, got {_describe(x)}")
        x = x.to(self._device())
        modules = [m for m in (self.core, self.head) if isinstance(m, nn.Module)]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            state, outs = None, []
            for t0 in range(0, x.shape[1], self.truncation):
                out, state = self._run_core(x[:, t0:t0 + self.truncation], state)
                outs.append(self.head(out))
            return torch.cat(outs, dim=1)
        finally:
            for m, mode in zip(modules, modes, strict=False):
                m.train(mode)
