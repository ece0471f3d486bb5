"""What ``synthpipe bench`` is told: :class:`BenchConfig`, its synthetic-gradient
:class:`Variant` s, and the checks that refuse a value before any job starts
(:meth:`BenchConfig.validate`, :class:`BenchConfigError`)."""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Any, Callable

from .pipelining import MULTI_STAGE
from .pipelining import SCHEDULES as PP_SCHEDULES
from .profiles import check_devices
from .workload import Workload

__all__ = ["MNIST1D_FEATURES", "VARIANT_MODES", "VARIANT_SYNTHS", "SOURCE_NAMES", "BenchConfigError", "Variant",
           "Source", "BenchConfig", "model_children", "quick_config"]

MNIST1D_FEATURES = 40


VARIANT_MODES = ("dni", "cdni")
# Synthesizer kinds that build on the benchmark's (batch, features) activations (the
# conv and token kinds need image or sequence activations, which these MLPs never have).
VARIANT_SYNTHS = ("linear", "lowrank", "mlp")
# The gradient sources the time-to-accuracy runs take besides the synthetic variants.
SOURCE_NAMES = ("delayed", "corrected", "local", "interlocking")
STALENESS = ("lr", "predict")
AUX_KINDS = ("linear", "mlp")


class BenchConfigError(ValueError):
    """A :class:`BenchConfig` value that cannot run, found before any job starts.

    ``field`` is the offending field (``workload.batch`` for a field of a workload); the
    message names fields as :meth:`BenchConfig.validate` was told to (the command line
    passes its option names).
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _show(value: Any) -> str:
    """A value as the command line would spell it (lists comma-separated)."""
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value) or "''"
    if isinstance(value, (Variant, Source)):
        return value.name
    return value if isinstance(value, str) and value else repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class Variant:
    """A synthetic-gradient configuration: ``dni`` / ``cdni`` with a synthesizer kind.

    Raises ``ValueError`` for a mode other than :data:`VARIANT_MODES`, a kind other than
    :data:`VARIANT_SYNTHS` or a rank below 1.
    """

    mode: str = "cdni"
    synth: str = "linear"
    rank: int = 32

    def __post_init__(self) -> None:
        if self.mode not in VARIANT_MODES:
            raise ValueError(f"the mode must be dni or cdni; got {self.mode!r}")
        if self.synth not in VARIANT_SYNTHS:
            raise ValueError(f"unknown synthesizer kind {self.synth!r}; choose one of {', '.join(VARIANT_SYNTHS)}")
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"the low-rank synthesizer's rank must be an integer >= 1; got {self.rank!r}")

    @property
    def name(self) -> str:
        if self.synth == "linear":
            return self.mode
        return f"{self.mode}-{self.synth}{self.rank if self.synth == 'lowrank' else ''}"

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """``"cdni"``, ``"dni:linear"``, ``"cdni:lowrank:32"``, ``"cdni:mlp"``.

        Raises ``ValueError`` naming ``text`` for anything else.
        """
        parts = text.strip().split(":")
        try:
            if len(parts) > 3:
                raise ValueError("expected mode[:kind[:rank]]")
            synth = parts[1] if len(parts) > 1 and parts[1] else "linear"
            if len(parts) > 2 and synth != "lowrank":
                raise ValueError(f"only the lowrank synthesizer takes a rank, not {synth}")
            try:
                rank = int(parts[2]) if len(parts) > 2 else 32
            except ValueError:
                raise ValueError(f"the rank must be an integer; got {parts[2]!r}") from None
            return cls(parts[0].lower(), synth, rank)
        except ValueError as e:
            raise ValueError(f"variant {text!r}: {e}") from None


@dataclasses.dataclass
class Source:
    """A gradient source of the time-to-accuracy runs: a synthetic :class:`Variant`, or
    ``delayed`` or ``corrected`` (with an optional staleness correction), ``local`` or
    ``interlocking`` (with an auxiliary head kind).

    Attributes:
        gradients: ``"synthetic"``, ``"delayed"``, ``"corrected"``, ``"local"`` or ``"interlocking"``.
        variant: the synthetic variant (``gradients="synthetic"`` only).
        staleness: ``delayed``'s and ``corrected``'s correction, ``None``, ``"lr"`` or ``"predict"``.
        aux_head: ``"linear"`` or ``"mlp"`` (``local`` and ``interlocking``).
    """

    gradients: str
    variant: Variant | None = None
    staleness: str | None = None
    aux_head: str = "linear"

    @property
    def name(self) -> str:
        if self.variant is not None:
            return self.variant.name
        if self.staleness:
            return f"{self.gradients}-{self.staleness}"
        return self.gradients + (f"-{self.aux_head}" if self.aux_head != "linear" else "")

    @classmethod
    def parse(cls, text: str) -> "Source":
        """``"cdni"``, ``"dni:lowrank:32"`` (see :meth:`Variant.parse`), ``"delayed"``,
        ``"delayed:lr"``, ``"delayed:predict"``, ``"corrected"`` (a conditional linear synthesizer's
        step now, the true gradient's correction later; ``"corrected:predict"``), ``"local"``,
        ``"local:mlp"``, ``"interlocking"``.

        Raises ``ValueError`` naming ``text`` for anything else.
        """
        parts = text.strip().lower().split(":")
        head, rest = parts[0], parts[1:]
        if head in VARIANT_MODES:
            return cls("synthetic", variant=Variant.parse(text))
        if head not in SOURCE_NAMES:
            raise ValueError(f"source {text!r}: unknown gradient source {head!r}; choose one of "
                             f"{', '.join(VARIANT_MODES + SOURCE_NAMES)}")
        if len(rest) > 1:
            raise ValueError(f"source {text!r}: expected name[:option]")
        if head in ("delayed", "corrected"):
            if rest and rest[0] not in STALENESS:
                raise ValueError(f"source {text!r}: {head}'s staleness correction is one of {', '.join(STALENESS)}")
            return cls(head, staleness=rest[0] if rest else None)
        if rest and rest[0] not in AUX_KINDS:
            raise ValueError(f"source {text!r}: the auxiliary head is one of {', '.join(AUX_KINDS)}")
        return cls(head, aux_head=rest[0] if rest else "linear")


def _default_sources() -> list[Source]:
    return [Source.parse(s) for s in ("cdni", "delayed", "delayed:predict", "local", "interlocking")]


@dataclasses.dataclass
class BenchConfig:
    """Everything ``synthpipe bench`` can be told (see :func:`cli.add_bench_arguments`).

    :meth:`validate` (called by :func:`run_benchmark` before any job starts) raises
    :class:`BenchConfigError` for values that cannot run.
    """

    output: str = "bench-results"
    quick: bool = False
    ranks: int = 2
    stages: int | None = None
    threads: int = 1
    device: str = "cpu"
    workload: Workload = dataclasses.field(default_factory=Workload)
    steps: int = 30
    warmup: int = 5
    repeats: int = 3
    microbatches: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 8])
    schedules: list[str] = dataclasses.field(default_factory=lambda: ["gpipe", "1f1b", "interleaved1f1b", "zbv"])
    variants: list[Variant] = dataclasses.field(default_factory=lambda: [
        Variant("dni"), Variant("cdni"), Variant("cdni", "lowrank", 32)])
    backprop: bool = True
    ceiling: bool = True
    max_inflight: int = 4
    balance: list[int] | None = None
    baseline_every: int = 4
    throughput: bool = True
    converge: bool = True
    conv_workload: Workload = dataclasses.field(default_factory=lambda: Workload(
        model="wide_mlp", in_features=40, hidden=1024, depth=7, batch=256, data="mnist1d", num_samples=20000))
    conv_epochs: int = 5
    conv_target: float | None = None
    conv_margin: float = 0.01
    conv_sources: list[Source] = dataclasses.field(default_factory=_default_sources)
    conv_evals: int = 2
    devices: list[int] = dataclasses.field(default_factory=lambda: [2, 4, 8, 16])
    pin: bool = False
    timeout: float = 600.0
    plots: bool = True
    timeline: bool = True

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["variants"] = [v.name for v in self.variants]
        d["conv_sources"] = [v.name for v in self.conv_sources]
        return d

    def validate(self, names: dict[str, str] | None = None, check_output: bool = True) -> "BenchConfig":
        """Check every value before anything runs; returns ``self``.

        Raises :class:`BenchConfigError` for the first value that cannot run: counts
        below their minimum (``ranks`` >= 2; ``threads``, ``steps``, ``warmup``,
        ``repeats``, ``conv_epochs``, ``max_inflight`` >= 1; ``baseline_every`` >= 0),
        a non-finite or non-positive ``timeout`` or learning rate, ``conv_target``
        outside (0, 1], unknown schedules or variants, entries listed twice,
        micro-batch counts that do not divide the batch, a ``balance`` that is not one
        positive entry per rank summing to the model's children, a model with fewer
        children than the pipeline stages of the parts that run, too few MNIST-1D
        samples for one training batch, ``device="cuda"`` without one GPU per rank,
        ``devices`` outside 1..:data:`~synthpipe.benchmark.profiles.MAX_DEVICES`, an ``output`` that is a
        file or cannot be created (unless ``check_output`` is false), or nothing to run.
        ``names`` maps field names (``"ranks"``, ``"workload.batch"``, ...) to the names
        the message should use (the command line passes its options).
        """
        def n(field: str) -> str:
            return (names or {}).get(field, field)

        def fail(field: str, message: str) -> None:
            raise BenchConfigError(field, message)

        def count(field: str, value: Any, minimum: int) -> None:
            if not _is_int(value) or value < minimum:
                fail(field, f"{n(field)} must be an integer >= {minimum}; got {_show(value)}")

        def positive(field: str, value: Any) -> None:
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                fail(field, f"{n(field)} must be a finite number > 0; got {_show(value)}")

        def int_list(field: str, values: Any, minimum: int, unique: bool = True) -> None:
            if not isinstance(values, (list, tuple)):
                fail(field, f"{n(field)} must be a list of integers; got {_show(values)}")
            for v in values:
                if not _is_int(v) or v < minimum:
                    fail(field, f"{n(field)}: every entry must be an integer >= {minimum}; got {_show(v)} "
                                f"(in {_show(values)})")
            if unique:
                distinct(field, values)

        def distinct(field: str, values: Any) -> None:
            seen = [v.name if isinstance(v, (Variant, Source)) else v for v in values]
            twice = sorted({_show(v) for v in seen if seen.count(v) > 1})
            if twice:
                fail(field, f"{n(field)} lists {', '.join(twice)} more than once; got {_show(values)}")

        if not (self.throughput or self.converge):
            fail("throughput", f"nothing to run: {n('throughput=False')} and {n('converge=False')} together "
                               f"leave no part of the benchmark")
        # plain values, each on its own
        count("ranks", self.ranks, 2)
        if self.stages is not None:
            count("stages", self.stages, 2)
            if self.ranks % self.stages:
                raise BenchConfigError("stages", f"{n('ranks')} {self.ranks} is not a multiple of {n('stages')} "
                                                 f"{self.stages} (dp pipelines of {self.stages} stages)")
            if self.stages < self.ranks and self.workload.batch % (self.ranks // self.stages):
                raise BenchConfigError("stages", f"{n('workload.batch')} {self.workload.batch} does not split into "
                                                 f"{self.ranks // self.stages} equal pipeline shares")
            if self.stages < self.ranks and self.balance is not None:
                raise BenchConfigError("stages", f"{n('balance')} applies to {self.ranks}-stage pipelines; leave it "
                                                 f"out with {n('stages')} {self.stages}")
        count("threads", self.threads, 1)
        if self.device not in ("cpu", "cuda"):
            fail("device", f"{n('device')} must be cpu or cuda; got {_show(self.device)}")
        # warm-up >= 1: the first step builds the synthesizers and torch's schedules
        for field in ("steps", "warmup", "repeats", "conv_epochs", "max_inflight"):
            count(field, getattr(self, field), 1)
        count("baseline_every", self.baseline_every, 0)
        positive("timeout", self.timeout)
        if self.conv_target is not None and (not _is_number(self.conv_target) or not 0 < self.conv_target <= 1):
            fail("conv_target", f"{n('conv_target')} must be an accuracy in (0, 1]; got {_show(self.conv_target)} "
                                f"(unset, it is single-device backprop's final accuracy minus {n('conv_margin')})")
        if not _is_number(self.conv_margin) or not 0 <= self.conv_margin < 1:
            fail("conv_margin", f"{n('conv_margin')} must be an accuracy in [0, 1); got {_show(self.conv_margin)}")
        count("conv_evals", self.conv_evals, 1)
        if not isinstance(self.conv_sources, (list, tuple)) or not all(isinstance(v, Source)
                                                                        for v in self.conv_sources):
            fail("conv_sources", f"{n('conv_sources')} must be a list of Source; got {_show(self.conv_sources)}")
        distinct("conv_sources", self.conv_sources)
        for prefix, w in (("workload", self.workload), ("conv_workload", self.conv_workload)):
            if not isinstance(w, Workload):
                fail(prefix, f"{n(prefix)} must be a Workload; got {type(w).__name__}")
            for field in ("in_features", "hidden", "depth", "batch", "num_samples"):
                count(f"{prefix}.{field}", getattr(w, field), 1)
            count(f"{prefix}.num_classes", w.num_classes, 2)
            positive(f"{prefix}.lr", w.lr)
            positive(f"{prefix}.synth_lr", w.synth_lr)
            if w.data == "mnist1d" and w.in_features != MNIST1D_FEATURES:
                fail(f"{prefix}.in_features", f"{n(prefix + '.in_features')} must be {MNIST1D_FEATURES} for "
                                              f"MNIST-1D data; got {w.in_features}")
            if w.model in ("paper_mlp", "wide_mlp") and w.batch < 2:
                # training-mode BatchNorm needs more than one example per batch
                fail(f"{prefix}.batch", f"{n(prefix + '.batch')} must be >= 2 (the paper MLP's BatchNorm needs "
                                        f"two examples); got {w.batch}")
        int_list("microbatches", self.microbatches, 1)
        if not isinstance(self.schedules, (list, tuple)):
            fail("schedules", f"{n('schedules')} must be a list of names; got {_show(self.schedules)}")
        for sched in self.schedules:
            if sched not in PP_SCHEDULES:
                fail("schedules", f"{n('schedules')}: unknown torch schedule {_show(sched)}; "
                                  f"choose from {', '.join(PP_SCHEDULES)}")
        distinct("schedules", self.schedules)
        if not isinstance(self.variants, (list, tuple)) or not all(isinstance(v, Variant) for v in self.variants):
            fail("variants", f"{n('variants')} must be a list of Variant; got {_show(self.variants)}")
        distinct("variants", self.variants)
        if self.balance is not None:
            int_list("balance", self.balance, 1, unique=False)
        try:
            check_devices(self.devices, n("devices"))
        except ValueError as e:
            fail("devices", str(e))
        self._check_combinations(n)
        if check_output:
            self._check_output(n)
        if self.device == "cuda":
            self._check_cuda(n)
        return self

    def _check_combinations(self, n: Callable[[str], str]) -> None:
        """Values that only fail together: micro-batches and batch, model and stages."""
        w, cw = self.workload, self.conv_workload
        if self.throughput:
            if self.schedules and not self.microbatches:
                raise BenchConfigError("microbatches", f"{n('microbatches')} is empty, but the torch schedules "
                                                       f"{_show(self.schedules)} need a micro-batch count")
            for m in self.microbatches:
                if w.batch % m:
                    raise BenchConfigError("microbatches", f"{n('microbatches')}: {m} does not divide "
                                                           f"{n('workload.batch')} {w.batch}")
                if w.model in ("paper_mlp", "wide_mlp") and w.batch // m < 2:
                    raise BenchConfigError("microbatches", f"{n('microbatches')}: {m} micro-batches of "
                                                           f"{n('workload.batch')} {w.batch} hold one example each; "
                                                           f"the paper MLP's BatchNorm needs two")
            children = model_children(w)
            multi = [s for s in self.schedules if s in MULTI_STAGE]
            stages = self.ranks * (2 if multi else 1)
            if children < stages:
                why = f"2 stages per rank ({', '.join(multi)}) x {self.ranks} ranks" if multi else f"{self.ranks} ranks"
                raise BenchConfigError("workload.depth", f"{n('workload.depth')} {w.depth} gives {w.model} "
                                                         f"{children} layers (children), too few for {why}")
            if self.balance is not None:
                if len(self.balance) != self.ranks:
                    raise BenchConfigError("balance", f"{n('balance')} {_show(self.balance)} has "
                                                      f"{len(self.balance)} entries; {n('ranks')} is {self.ranks}, "
                                                      f"so it needs {self.ranks} (children per stage)")
                if sum(self.balance) != children:
                    raise BenchConfigError("balance", f"{n('balance')} {_show(self.balance)} sums to "
                                                      f"{sum(self.balance)}, but {w.model} with {n('workload.depth')} "
                                                      f"{w.depth} has {children} children")
        if self.converge:
            children = model_children(cw)
            if children < self.ranks:
                raise BenchConfigError("conv_workload.depth", f"{n('conv_workload.depth')} {cw.depth} gives "
                                                              f"{cw.model} {children} layers (children), too few "
                                                              f"for {self.ranks} ranks")
            total = cw.num_samples // 10 * 10  # synthpipe.data.mnist1d: 10 classes, 80% for training
            train = int(0.8 * total)
            if cw.data == "mnist1d" and (train < cw.batch or total - train < 1):
                raise BenchConfigError("conv_workload.num_samples",
                                       f"{n('conv_workload.num_samples')} {cw.num_samples} gives {train} training "
                                       f"examples (80%), fewer than one batch of {n('conv_workload.batch')} "
                                       f"{cw.batch}")

    def _check_output(self, n: Callable[[str], str]) -> None:
        """The output directory must be one, or be creatable: found now, not after the run."""
        if not isinstance(self.output, str) or not self.output:
            raise BenchConfigError("output", f"{n('output')} must be a directory path; got {_show(self.output)}")
        path = os.path.abspath(self.output)
        if os.path.exists(path) and not os.path.isdir(path):
            raise BenchConfigError("output", f"{n('output')} {self.output} is a file; it must be a directory "
                                             f"(created if missing)")
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise BenchConfigError("output", f"{n('output')} {self.output} cannot be created: {parent} is a file")
        try:  # a real attempt: os.access says yes to root even where the file system says no
            os.rmdir(tempfile.mkdtemp(prefix=".synthpipe-bench-check-", dir=parent))
        except OSError as e:
            raise BenchConfigError("output", f"{n('output')} {self.output} cannot be written: "
                                             f"{e.strerror or e} in {parent}") from None

    def _check_cuda(self, n: Callable[[str], str]) -> None:
        import torch

        if not torch.cuda.is_available():
            raise BenchConfigError("device", f"{n('device')} cuda: CUDA is not available on this machine "
                                             f"(torch {torch.__version__}); use {n('device')} cpu")
        gpus = torch.cuda.device_count()
        if gpus < self.ranks:
            raise BenchConfigError("device", f"{n('device')} cuda runs rank r on cuda:r, but {n('ranks')} is "
                                             f"{self.ranks} and only {gpus} GPU(s) are visible")


def model_children(w: Workload) -> int:
    """The number of children of :func:`workload.build_model`'s ``nn.Sequential`` (what
    ``balance`` counts and pipeline stages split): ``2 * depth + 1`` for ``deep_mlp``
    (Linear, ReLU per layer), ``3 * depth + 1`` for ``paper_mlp`` (Linear, BatchNorm, ReLU)."""
    return (2 if w.model == "deep_mlp" else 3) * w.depth + 1


# the quick preset's time-to-accuracy workload (the command line's quick defaults read it too)
QUICK_CONV = {"hidden": 512, "depth": 5, "samples": 20000, "epochs": 5}


def quick_config(**overrides: Any) -> BenchConfig:
    """The ``--quick`` preset: about two minutes on 2 cores (a narrower, shallower ``wide_mlp``)."""
    cfg = BenchConfig(steps=12, warmup=2, repeats=1, microbatches=[2, 4],
                      schedules=["gpipe", "1f1b", "zbv"], conv_epochs=QUICK_CONV["epochs"], quick=True,
                      conv_workload=Workload(model="wide_mlp", in_features=40, hidden=QUICK_CONV["hidden"],
                                             depth=QUICK_CONV["depth"], batch=256, data="mnist1d",
                                             num_samples=QUICK_CONV["samples"]))
    fields = {f.name for f in dataclasses.fields(cfg)}
    for k, v in overrides.items():
        if k not in fields:  # setattr would add a new attribute that nothing reads
            raise TypeError(f"quick_config() got an unknown field {k!r}")
        setattr(cfg, k, v)
    return cfg


# -- planning ------------------------------------------------------------------------------
