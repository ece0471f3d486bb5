"""Training options of the engine, as one plain dataclass (torchtitan style)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Optional, Sequence

from .sources.registry import SOURCES

__all__ = ["TrainConfig", "check_options", "NONFINITE_POLICIES", "PRECISIONS", "DEFAULT_DELAY"]

NONFINITE_POLICIES = ("raise", "skip")
PRECISIONS = ("fp32", "bf16", "fp16")  # see synthpipe.engine.precision
DEFAULT_DELAY = 2  # a target arrives about two steps after its activation left (docs/guide.md, section 2)


@dataclasses.dataclass
class TrainConfig:
    """How stages are trained.

    Attributes:
        gradients: the gradient source of every stage but the last, a name registered in
            :mod:`synthpipe.engine.sources`: ``"synthetic"`` (DNI/cDNI: update at once with
            M_r's prediction), ``"backprop"`` (wait for the true gradient: exact, locked
            model parallelism), ``"delayed"`` (the true gradient, applied when it arrives,
            with stashed weights), ``"corrected"`` (M_r's prediction now, plus its error
            against the true gradient when that arrives), ``"local"`` (a local loss through an auxiliary head;
            nothing travels back), ``"interlocking"`` (local losses, one hop back), and
            any other registered there (docs/guide.md, "Which gradient source?").
        delay: ``synthetic``: train the synthesizers at step t on exactly the targets of
            step t - delay; ``None``: in a multi-process run, use targets as they arrive
            (fastest, not deterministic); in a single process, model ``DEFAULT_DELAY``.
            ``delayed``: the per-hop delay, stage r applying at step t the gradient of
            step t - (N-1-r) * delay (``None``: 1, PipeDream's schedule; 0: backprop);
            ``corrected``: the same, for the correction (and the synthesizer's target).
            ``local``, ``interlocking``: refused (nothing waits for a delayed gradient).
        synthetic_scale: factor on the synthetic gradient before it is applied.
        warmup_steps: the first steps use true gradients (locked) while targets already
            train the synthesizers.
        max_inflight: cached activations waiting for their target, per stage; when full,
            the stage waits for the oldest target (bounds memory and staleness). With
            ``delayed``, the most weight versions a stage may stash: at least
            ``(N-1) * delay + 1``, or the trainer is refused.
        staleness: a correction of ``delayed``'s stale gradients: ``"lr"`` scales stage
            r's learning rate by 1 / (1 + its staleness in steps); ``"predict"`` runs its
            forwards on weights extrapolated ahead along the last update (``predict_ahead``).
            ``None``: no correction (and the only value other sources take).
        predict_ahead: with ``staleness="predict"``, how far ahead stage r's forward weights
            are extrapolated, in units of its staleness ``lag_r``: the forward of step t runs
            on ``W + predict_ahead * lag_r * (W - W_before)``. 1: where the weights will be
            when the gradient is applied (SpecTrain, PipeMare); above 1 the gradient is also
            taken further along the update, a look-ahead like Nesterov momentum's. ``None``:
            ``DEFAULT_PREDICT_AHEAD`` of ``synthpipe.engine.sources.delayed`` (3, measured
            best: docs/guide.md, "Which gradient source?"). Refused without
            ``staleness="predict"``.
        nonfinite: ``"raise"`` stops on a NaN/inf loss or synthetic gradient; ``"skip"``
            drops that step's update (and its target) and goes on.
        failure_timeout: seconds after which a silent rank is declared dead.
        stall_warning: seconds without progress on a rank (no step, batch or gradient
            done: a stuck data loader, say) after which that rank prints a warning with
            its main thread's stack, then again after twice as long; the job goes on.
            ``None``: no warning. Multi-process runs only.
        log_every: steps between progress-bar updates.
        progress: show a progress bar (rank 0 only).
        prefetch: batches loaded ahead on rank 0.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: each stage's forward and loss run
            under ``torch.autocast`` in that type, per step (weights and optimizer state stay
            fp32); ``"fp16"`` adds a gradient scaler per stage (docs/guide.md, "Mixed precision").
        synth_precision: ``"fp32"`` (default: synthesizers and their regression in fp32
            whatever ``precision`` is) or ``"bf16"`` (their forward under bf16 autocast).
        clip_grad_norm: clip each stage's gradient to this 2-norm before its step (per
            stage, over that stage's parameters; ``None``: no clipping).
        p_update: sporadic updates: each stage does its backward and optimizer step at a
            step with this probability, independently of the other stages (its forward
            always runs; a skipped step sends stage r - 1 a skipped message, so that step
            gives stage r - 1's synthesizer no target). ``1.0``: every step (the plain run).
            Only ``gradients="synthetic"`` and ``"backprop"`` take values below 1.
        p_update_seed: the seed of the ``p_update`` draws; whether stage r updates at step
            t is a pure function of ``(p_update_seed, r, t)``, the same in one process and
            on every rank.
        synthetic_inputs: forward unlocking (the DNI paper's complete unlock): every stage
            r > 0 owns an input synthesizer ``I_r(x)`` predicting its input ``h_{r-1}`` from
            the data ``x``, runs its forward and update on that prediction, and trains
            ``I_r`` by regression on the real input (docs/paper.md). Needs
            ``gradients="synthetic"`` and at least 2 stages; one pipeline (``dp`` 1). Across
            processes rank 0 sends each batch straight to every later rank.
        input_synth_hidden: the hidden width of each input synthesizer (a two-layer MLP).
        log_dir: write TensorBoard scalars into this directory (needs the ``tensorboard``
            package: ``pip install synthpipe[tensorboard]``); ``None``: none.
    """

    gradients: str = "synthetic"
    delay: Optional[int] = None
    synthetic_scale: float = 1.0
    warmup_steps: int = 0
    max_inflight: int = 4
    staleness: Optional[str] = None
    predict_ahead: Optional[float] = None
    nonfinite: str = "raise"
    failure_timeout: float = 30.0
    stall_warning: Optional[float] = 300.0
    log_every: int = 10
    progress: bool = True
    prefetch: int = 2
    precision: str = "fp32"
    synth_precision: str = "fp32"
    clip_grad_norm: Optional[float] = None
    log_dir: Optional[str] = None
    p_update: float = 1.0
    p_update_seed: int = 0
    synthetic_inputs: bool = False
    input_synth_hidden: int = 256

    def __post_init__(self) -> None:
        if self.gradients not in SOURCES:
            raise ValueError(f"gradients must be one of {tuple(SOURCES)}, got {self.gradients!r}")
        corrections = getattr(SOURCES[self.gradients], "staleness_modes", ())
        if self.staleness is not None and self.staleness not in corrections:
            raise ValueError(f"staleness={self.staleness!r} is not a correction of gradients={self.gradients!r} "
                             f"(its corrections: {', '.join(map(repr, corrections)) or 'none'})")
        if self.predict_ahead is not None:
            if self.staleness != "predict":
                raise ValueError(f"predict_ahead={self.predict_ahead!r} sets how far staleness='predict' looks "
                                 f"ahead, but staleness={self.staleness!r}")
            if (isinstance(self.predict_ahead, bool) or not isinstance(self.predict_ahead, (int, float))
                    or not 0 < self.predict_ahead < math.inf):
                raise ValueError(f"predict_ahead must be a positive, finite number (in units of each stage's "
                                 f"staleness), got {self.predict_ahead!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        # Step counts index steps: 1.5 would silently never match a step id.
        _check_count("delay", self.delay, minimum=0, optional=True)
        _check_count("max_inflight", self.max_inflight, minimum=1)
        _check_count("warmup_steps", self.warmup_steps, minimum=0)
        _check_count("log_every", self.log_every, minimum=1)
        _check_count("prefetch", self.prefetch, minimum=1)
        if not 1 < self.failure_timeout < math.inf:  # (NaN fails this too)
            raise ValueError(f"failure_timeout must be a finite number of seconds above 1, got {self.failure_timeout}")
        if self.stall_warning is not None and (isinstance(self.stall_warning, bool) or not isinstance(
                self.stall_warning, (int, float)) or not 0 < self.stall_warning < math.inf):
            raise ValueError(f"stall_warning must be a positive, finite number of seconds (or None), "
                             f"got {self.stall_warning!r}")
        if not math.isfinite(self.synthetic_scale):
            raise ValueError(f"synthetic_scale must be finite, got {self.synthetic_scale}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.synth_precision not in ("fp32", "bf16"):
            raise ValueError(f"synth_precision must be 'fp32' or 'bf16', got {self.synth_precision!r} (fp16 "
                             f"synthesizers would need a gradient scaler of their own)")
        if self.clip_grad_norm is not None and (isinstance(self.clip_grad_norm, bool) or not isinstance(
                self.clip_grad_norm, (int, float)) or not 0 < self.clip_grad_norm < math.inf):
            raise ValueError(f"clip_grad_norm must be a positive, finite number (or None), got {self.clip_grad_norm!r}")
        if isinstance(self.p_update, bool) or not isinstance(self.p_update, (int, float)) or not (
                0 < self.p_update <= 1):
            raise ValueError(f"p_update must be a probability in (0, 1], got {self.p_update!r}")
        self.p_update = float(self.p_update)
        _check_count("p_update_seed", self.p_update_seed, minimum=0)
        if self.p_update < 1 and not getattr(SOURCES[self.gradients], "sporadic_updates", False):
            takes = [n for n, c in SOURCES.items() if getattr(c, "sporadic_updates", False)]
            raise ValueError(f"p_update={self.p_update} cannot apply to gradients={self.gradients!r}, which runs "
                             f"its updates itself; sporadic updates take gradients={' or '.join(map(repr, takes))}")
        _check_count("input_synth_hidden", self.input_synth_hidden, minimum=1)
        if self.synthetic_inputs not in (True, False):
            raise ValueError(f"synthetic_inputs must be True or False, got {self.synthetic_inputs!r}")
        if self.synthetic_inputs and self.gradients != "synthetic":
            raise ValueError(f"synthetic_inputs=True trains each stage on a predicted input without waiting for "
                             f"the forward pass, so it cannot also wait for a true gradient: it needs "
                             f"gradients='synthetic', got gradients={self.gradients!r}")
        if self.synthetic_inputs and self.warmup_steps:
            raise ValueError(f"synthetic_inputs=True cannot run warmup_steps={self.warmup_steps} (locked steps "
                             f"wait for true gradients): leave it 0")
        if self.log_dir is not None and not isinstance(self.log_dir, (str, os.PathLike)):
            raise ValueError(f"log_dir must be a directory path (or None), got {self.log_dir!r}")
        if self.log_dir is not None:
            self.log_dir = os.fspath(self.log_dir)  # (the config is saved as JSON in checkpoints)


def check_options(options: dict[str, object], others: Sequence[str] = ()) -> None:
    """Refuse keyword options that are not :class:`TrainConfig` fields.

    Args:
        options: the keyword arguments given.
        others: the caller's own keyword parameters, listed as known too.

    Raises:
        TypeError: naming each unknown option, the closest known names and every known one.
    """
    known = sorted({f.name for f in dataclasses.fields(TrainConfig)} | set(others))
    unknown = [k for k in options if k not in known]
    if unknown:
        hints = [f"{k!r} (did you mean {', '.join(map(repr, close))}?)" if close else repr(k)
                 for k in unknown for close in [difflib.get_close_matches(k, known, n=2)]]
        raise TypeError(f"unknown Trainer option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                        f"the known options are: {', '.join(known)}")


def _check_count(name: str, value: object, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
