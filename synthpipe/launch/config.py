"""The job configuration of ``synthpipe train``: one flat dataclass, a TOML file, CLI flags.

Precedence: dataclass defaults < TOML file (``--config``) < command-line flags the user
actually gave. The engine's options are not restated here: :class:`JobConfig` extends
:class:`synthpipe.engine.config.TrainConfig`, so each of them has the engine's one name,
default and check (``TrainConfig.__post_init__``), and its flag and help are derived from
that field (:func:`engine_flags`). Every field has exactly one flag (see :data:`FLAGS`);
the same argparse
definition (:func:`add_train_arguments`) is used by ``synthpipe train`` and by
``python -m synthpipe.launch.train`` (the torchrun entry point), so the two never drift,
and :func:`overrides_to_argv` turns parsed overrides back into those flags when
``synthpipe train --nproc N`` hands them on to torchrun.

A config file is flat TOML, one key per field::

    model = "paper_mlp"
    depth = 3
    data = "mnist1d"
    epochs = 15
    n_stages = 3
    balance = [4, 3, 3]
    conditional = true
    stall_warning = "off"

An optional option (one whose value may be ``None``) takes the word ``none`` on the
command line and in TOML (TOML has no null); ``--stall-warning off``, ``--delay auto`` and
``--backend auto`` say the same in the option's own terms.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import typing
from typing import Any, Callable, Optional

from ..engine.config import TrainConfig
from ..engine.schedules import SCHEDULES
from ..stages.synthesizer import KINDS

__all__ = ["JobConfig", "load_config", "read_toml", "add_train_arguments", "overrides_from_args",
           "overrides_to_argv", "train_options", "engine_flags", "field_docs", "check_type", "Flag", "FLAGS",
           "MODELS", "DATASETS", "AUX_HEADS", "ENGINE_DEFAULTS", "AUTO"]

MODELS = ("wide_mlp", "paper_mlp", "paper_cnn", "deep_mlp")
AUX_HEADS = ("linear", "mlp")
AUTO = "auto"
# The engine options whose launcher default differs from TrainConfig's (the main job's
# gradient source; "auto" resolves by the source: see JobConfig.staleness).
ENGINE_DEFAULTS: dict[str, Any] = {"gradients": "delayed", "staleness": AUTO}
# The main job's size: about two minutes on 2 cores, the pipeline and the backprop comparison together.
MAIN_JOB: dict[str, int] = {"num_samples": 20000, "epochs": 4}
DATASETS = ("mnist1d", "synthetic")
SPLIT_BY = ("params", "time")
SYNTHESIZERS = KINDS
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("gloo", "nccl")


@dataclasses.dataclass
class JobConfig(TrainConfig):
    """Everything one ``synthpipe train`` job needs (flat; TOML keys are the field names).

    The engine's training options (``gradients``, ``delay``, ``stall_warning``, ...) are
    the fields of :class:`~synthpipe.engine.config.TrainConfig`, inherited with their
    names, documentation and checks; each has the flag ``--name-with-dashes``
    (``synthetic_scale`` also ``--scale``), and an optional one takes ``none`` for
    ``None`` (``--stall-warning off`` turns the stall warning off). Two defaults differ
    from the engine's (:data:`ENGINE_DEFAULTS`), picked from measurements of the main job
    (docs/guide.md, "Which gradient source?"): ``gradients="delayed"``, and ``staleness``
    ``"auto"``, which becomes ``"predict"`` (weight prediction) with ``delayed`` and
    ``None`` with every other source. The fields below are the launcher's own.

    Model:
        model: ``"wide_mlp"`` (the convergence workload: a wide, deep BN-MLP,
            40 -> 1024 x 7 -> 10), ``"paper_mlp"`` (the DNI paper's MLP: Linear-BN-ReLU
            blocks), ``"paper_cnn"`` (the paper's small CNN, 1-D) or ``"deep_mlp"`` (a
            deep Linear-ReLU stack for speed tests). Flag ``--model``.
        depth: hidden blocks (``wide_mlp``/``paper_mlp``/``deep_mlp`` ``depth``,
            ``paper_cnn`` ``blocks``); ``None``: the model's default (7, 3, 2 and 8).
            Flag ``--depth``.
        hidden: width (``wide_mlp``/``paper_mlp``/``deep_mlp`` ``hidden``, ``paper_cnn``
            ``channels``); ``None``: the model's default (1024, 256, 64 and 1024).
            Flag ``--hidden``.
        aux_head: the auxiliary head of every stage but the last for ``gradients="local"``
            and ``"interlocking"``: ``"linear"`` (the activation -> 10 logits) or ``"mlp"``
            (through one hidden layer of 128 units); other sources ignore it.
            Flag ``--aux-head``.

    Data:
        data: ``"mnist1d"`` (MNIST-1D generated locally, 40 features, 10 classes, fixed
            data seed 42, 80/20 train/test split) or ``"synthetic"`` (random inputs labelled
            by a random linear teacher, 10 classes, seeded by ``seed``, 80/20 split).
            Flag ``--data``.
        num_samples: examples in train + test together. Flag ``--num-samples``.
        features: input size of the ``"synthetic"`` data (``None``: 40, like MNIST-1D);
            ignored for ``"mnist1d"``. Flag ``--features``.
        batch_size: training batch size (evaluation uses up to 1000). Flag ``--batch-size``.

    Training:
        epochs: epochs to train (counted from the start of the run, also after a resume).
            Flag ``--epochs``.
        max_steps: stop after this many steps in total (``None``: no limit).
            Flag ``--max-steps``.
        lr: Adam learning rate of every stage. Flag ``--lr``.
        lr_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` (to 0 at the run's last
            step: ``max_steps``, else ``epochs`` epochs), the same for every stage by step id.
            Flag ``--lr-schedule``.
        lr_warmup_steps: first steps whose learning rate rises linearly to ``lr`` (not
            ``warmup_steps``, which are steps on true gradients). Flag ``--lr-warmup-steps``.
        seed: seeds the model initialisation (identically on every rank), the shuffling
            and the ``"synthetic"`` data. Flag ``--seed``.

    Pipeline:
        n_stages: stages the model is split into; a multi-process run needs exactly one
            process per stage. Flag ``--stages``.
        balance: children of the (Sequential) model per stage, e.g. ``[4, 3, 3]``; ``None``:
            chosen by ``split_by``. Flag ``--balance 4,3,3``.
        split_by: ``"params"`` (parameter counts) or ``"time"`` (measured forward+backward
            time) when ``balance`` is not given. Flag ``--split-by``.

    Synthesizer:
        synthesizer: kind of synthetic-gradient model: ``"linear"``, ``"lowrank"``,
            ``"mlp"``, ``"conv"``, ``"token"`` or ``"auto"``. Flag ``--synthesizer``.
        conditional: condition the synthesizers on one-hot labels (cDNI); needs labelled
            data. Flags ``--conditional`` / ``--no-conditional``.
        synth_lr: Adam learning rate of the synthesizers. Flag ``--synth-lr``.
        synth_replay: regression steps per target: each target also trains the synthesizer
            in the next ``synth_replay - 1`` steps (1: once, as in the DNI paper). Flag
            ``--synth-replay``.

    Placement:
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU),
            ``"cpu"`` or ``"cuda"``. Flag ``--device``.
        backend: ``"gloo"`` or ``"nccl"``; ``None`` (or ``"auto"`` in TOML): nccl on CUDA,
            gloo on CPU. Flag ``--backend``.
        threads: ``torch.set_num_threads`` of every rank (and of the backprop baseline).
            Flag ``--threads``.

    Outputs:
        checkpoint: directory; a checkpoint is saved there at the end. Flag ``--checkpoint``.
        checkpoint_every: also save it every this many steps, so that a run killed midway
            loses at most that many (``None``: only at the end). Flag ``--checkpoint-every``.
        resume: checkpoint directory to continue from. Flag ``--resume``.
        export: path; the trained model's ``state_dict`` (original parameter names, for
            ``model.load_state_dict``) is written there. Flag ``--export``.
        compare_backprop: after training, train the same (unsplit) model with plain
            single-process backprop on the same data order for the same number of steps
            and print both test accuracies (on rank 0, after the pipeline has finished).
            Flags ``--compare`` / ``--no-compare``.
        output: directory for ``history.json`` (per-step and per-epoch records) and
            ``summary.json`` (config and results). Flag ``--output``.
    """

    # engine options with the launcher's own default (ENGINE_DEFAULTS)
    gradients: str = ENGINE_DEFAULTS["gradients"]
    staleness: Optional[str] = ENGINE_DEFAULTS["staleness"]
    # model
    model: str = "wide_mlp"
    depth: Optional[int] = None
    hidden: Optional[int] = None
    aux_head: str = "linear"
    # data
    data: str = "mnist1d"
    num_samples: int = MAIN_JOB["num_samples"]
    features: Optional[int] = None
    batch_size: int = 256
    # training
    epochs: int = MAIN_JOB["epochs"]
    max_steps: Optional[int] = None
    lr: float = 1e-3
    seed: int = 0
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    # pipeline
    n_stages: int = 2
    balance: Optional[list[int]] = None
    split_by: str = "params"
    # synthesizer
    synthesizer: str = "linear"
    conditional: bool = True
    synth_lr: float = 1e-3
    synth_replay: int = 2
    # placement
    device: str = "auto"
    backend: Optional[str] = None
    threads: int = 1
    # outputs
    checkpoint: Optional[str] = None
    checkpoint_every: Optional[int] = None
    resume: Optional[str] = None
    export: Optional[str] = None
    compare_backprop: bool = True
    output: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "JobConfig":
        """Check types, choices and ranges; raise ``ValueError`` naming the field.

        Types are checked for every field (a TOML value may be of any type); the engine's
        options are then checked by ``TrainConfig.__post_init__`` and the launcher's here.
        """
        if self.backend == "auto":
            self.backend = None
        if self.staleness == AUTO:
            self.staleness = "predict" if self.gradients == "delayed" else None
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name))
        TrainConfig.__post_init__(self)
        for name, choices in (("model", MODELS), ("data", DATASETS), ("split_by", SPLIT_BY), ("aux_head", AUX_HEADS),
                              ("synthesizer", SYNTHESIZERS), ("device", DEVICES), ("lr_schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (or auto); got {self.backend!r}")
        for name in ("num_samples", "batch_size", "n_stages", "threads", "synth_replay"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("depth", "hidden", "features", "max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "depth" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'depth' else 1}; got {value}")
        for name in ("epochs", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("lr", "synth_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.checkpoint_every is not None and self.checkpoint is None:
            raise ValueError("checkpoint_every needs a checkpoint directory (--checkpoint DIR) to save into")
        if self.balance is not None:
            if any(b < 1 for b in self.balance):
                raise ValueError(f"balance entries must be >= 1; got {self.balance}")
            if len(self.balance) != self.n_stages:
                raise ValueError(f"balance {self.balance} has {len(self.balance)} stages but n_stages is "
                                 f"{self.n_stages}; give --stages {len(self.balance)} or a balance of "
                                 f"{self.n_stages} entries")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (for ``summary.json``)."""
        return dataclasses.asdict(self)


def train_options(cfg: JobConfig) -> dict[str, Any]:
    """The engine's options of ``cfg``: every :class:`TrainConfig` field by name, for ``Trainer(**options)``."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}


# -- types ------------------------------------------------------------------------------

_HINTS: dict[str, Any] | None = None


def field_types() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(JobConfig)
    return _HINTS


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return _type_name(args[0])
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}[hint]


def _matches(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_matches(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(item, v) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_type(name: str, value: Any) -> None:
    """``ValueError`` naming ``name`` when ``value`` does not fit the field's type."""
    hint = field_types()[name]
    if not _matches(hint, value):
        raise ValueError(f"{name} must be {_type_name(hint)}; got {value!r} ({type(value).__name__})")


def _coerce(name: str, value: Any) -> Any:
    """Integers are valid floats; store them as float."""
    hint = field_types()[name]
    if float in (hint, *typing.get_args(hint)) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# -- loading ----------------------------------------------------------------------------

def _toml_module() -> Any:
    try:
        import tomllib  # Python 3.11+
        return tomllib
    except ImportError:
        try:
            import tomli  # the same parser, for Python 3.10
            return tomli
        except ImportError:
            raise ValueError("reading a TOML config needs Python 3.11+ (tomllib) or the tomli package "
                             "(pip install tomli)") from None


def read_toml(path: str) -> dict[str, Any]:
    """The raw key-value table of a config file (``ValueError`` if it is not valid TOML)."""
    toml = _toml_module()
    if not os.path.exists(path):
        raise ValueError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        try:
            return toml.load(f)
        except toml.TOMLDecodeError as e:
            raise ValueError(f"config file {path} is not valid TOML: {e}") from None


def _checked(values: dict[str, Any], source: str) -> dict[str, Any]:
    valid = [f.name for f in dataclasses.fields(JobConfig)]
    out = {}
    for key, value in values.items():
        if key not in valid:
            raise ValueError(f"unknown key {key!r} in {source}; valid keys are: {', '.join(valid)}")
        if isinstance(value, str) and value.lower() in _none_words(key):
            value = None  # TOML has no null
        value = _coerce(key, value)
        try:
            check_type(key, value)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        out[key] = value
    return out


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (field -> value).

    ``overrides`` should hold only what the user actually gave (see
    :func:`overrides_from_args`). A ``balance`` without ``n_stages`` sets ``n_stages`` to
    its length. Raises ``ValueError`` for an unknown key (the message
    names it and lists the valid keys), a value of the wrong type (naming the key), a
    value out of range, or an unreadable file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_checked(read_toml(path), f"config file {path}"))
    values.update(_checked(dict(overrides or {}), "the command-line options"))
    if values.get("balance") is not None and "n_stages" not in values:
        values["n_stages"] = len(values["balance"])  # a balance says how many stages
    return JobConfig(**values)


# -- command-line flags -----------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,3,3; got {text!r}") from None


def _optional(kind: Callable[[str], Any], words: tuple[str, ...]) -> Callable[[str], Any]:
    """A flag's parser for an optional value: one of ``words`` is ``None``, anything else is ``kind(text)``."""

    def parse(text: str) -> Any:
        if text.lower() in words:
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_type_name(kind)} or {' / '.join(words)}; "
                                             f"got {text!r}") from None

    parse.__name__ = kind.__name__  # argparse names the type in its own errors
    return parse


@dataclasses.dataclass(frozen=True)
class Flag:
    """The command-line flag of one :class:`JobConfig` field.

    Attributes:
        field: the field's name (also its TOML key).
        flag: the flag, e.g. ``"--batch-size"``.
        help: one line for ``--help`` (the default is appended).
        type: argparse ``type`` (``None`` for a boolean flag).
        choices: the allowed values, shown by ``--help`` and checked by argparse.
        metavar: the value's name in ``--help``.
        boolean: a ``--flag`` / ``--no-flag`` pair.
        group: the ``--help`` section.
        none: what a default of ``None`` means, for the help.
        none_words: the words that stand for ``None`` (on the command line and in TOML);
            empty when the field cannot be ``None`` from outside.
        aliases: further spellings of the flag.
    """

    field: str
    flag: str
    help: str
    type: Any = None
    choices: tuple | None = None
    metavar: str | None = None
    boolean: bool = False
    group: str = "training"
    none: str = "none"
    none_words: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


_NONE = ("none",)

LAUNCHER_FLAGS: tuple[Flag, ...] = (
    Flag("model", "--model", "model to train", str, MODELS, group="model"),
    Flag("depth", "--depth", "hidden blocks of the model", int, metavar="N", group="model", none="the model's own"),
    Flag("hidden", "--hidden", "hidden width / channels", int, metavar="N", group="model", none="the model's own"),
    Flag("aux_head", "--aux-head", "auxiliary head of local / interlocking", str, AUX_HEADS, group="model"),
    Flag("data", "--data", "data set", str, DATASETS, group="data"),
    Flag("num_samples", "--num-samples", "examples in train + test (80/20 split)", int, metavar="N", group="data"),
    Flag("features", "--features", "input size of the synthetic data", int, metavar="N", group="data", none="40"),
    Flag("batch_size", "--batch-size", "training batch size", int, metavar="B", group="data"),
    Flag("epochs", "--epochs", "epochs to train", int, metavar="N"),
    Flag("max_steps", "--max-steps", "stop after this many steps", int, metavar="N", none="no limit"),
    Flag("lr", "--lr", "Adam learning rate of the stages", float, metavar="LR"),
    Flag("seed", "--seed", "seed of initialisation, shuffling and synthetic data", int, metavar="S"),
    Flag("lr_schedule", "--lr-schedule", "learning-rate schedule of every stage (to 0 at the last step)", str,
         SCHEDULES),
    Flag("lr_warmup_steps", "--lr-warmup-steps", "first steps of linear learning-rate warmup", int, metavar="N"),
    Flag("n_stages", "--stages", "pipeline stages (one process per stage when multi-process)", int,
         metavar="N", group="pipeline"),
    Flag("balance", "--balance", "model children per stage, e.g. 4,3,3", _int_list, metavar="A,B,...",
         group="pipeline", none="chosen by --split-by"),
    Flag("split_by", "--split-by", "how to balance stages without --balance", str, SPLIT_BY, group="pipeline"),
    Flag("synthesizer", "--synthesizer", "synthetic-gradient model kind", str, SYNTHESIZERS, group="synthesizer"),
    Flag("conditional", "--conditional", "condition synthesizers on labels (cDNI)", boolean=True,
         group="synthesizer"),
    Flag("synth_lr", "--synth-lr", "Adam learning rate of the synthesizers", float, metavar="LR",
         group="synthesizer"),
    Flag("synth_replay", "--synth-replay", "regression steps per synthesizer target", int, metavar="K",
         group="synthesizer"),
    Flag("device", "--device", "device of every rank", str, DEVICES, group="placement"),
    Flag("backend", "--backend", "process-group backend", _optional(str, ("auto",)), metavar="{gloo,nccl,auto}",
         group="placement", none="nccl on CUDA, gloo on CPU", none_words=("auto",)),
    Flag("threads", "--threads", "torch threads per rank", int, metavar="T", group="placement"),
    Flag("checkpoint", "--checkpoint", "save a checkpoint here at the end", str, metavar="DIR", group="outputs"),
    Flag("checkpoint_every", "--checkpoint-every", "also save the checkpoint every N steps", int, metavar="N",
         group="outputs"),
    Flag("resume", "--resume", "continue from this checkpoint", str, metavar="DIR", group="outputs"),
    Flag("export", "--export", "write the trained model's state_dict here", str, metavar="PATH", group="outputs"),
    Flag("compare_backprop", "--compare", "also train with plain backprop and compare accuracy", boolean=True,
         group="outputs"),
    Flag("output", "--output", "directory for history.json and summary.json", str, metavar="DIR",
         group="outputs"),
)

# Command-line spellings of engine options beyond --name-with-dashes and "none" (kept so that
# existing command lines go on working); names, defaults, help and checks are TrainConfig's.
_ENGINE_ALIASES: dict[str, tuple[str, ...]] = {"synthetic_scale": ("--scale",), "log_dir": ("--tensorboard",)}
_ENGINE_NONE_WORDS: dict[str, tuple[str, ...]] = {"delay": ("none", "auto"), "stall_warning": ("none", "off")}
_METAVARS = {int: "N", float: "X", str: "NAME"}


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the ``Attributes:`` section of ``cls``'s docstring (joined to one line)."""
    docs: dict[str, str] = {}
    name = None
    in_section = False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        if line.strip() == "Attributes:":
            in_section = True
            continue
        if not in_section:
            continue
        entry = re.match(r"^    (\w+(?:, \w+)*): (.*)$", line)
        if entry:
            for one in entry.group(1).split(", "):
                docs[one] = entry.group(2)
            name = entry.group(1)
        elif line.startswith("        ") and name is not None:
            for one in name.split(", "):
                docs[one] += " " + line.strip()
        elif line.strip():
            break  # the next section
    return docs


def _first_sentence(text: str) -> str:
    text = text.replace("``", "").replace("%", "%%")  # (argparse formats help with %)
    end = re.search(r"\.(\s|$)", text)
    return text[:end.start()] if end else text


def engine_flags() -> tuple[Flag, ...]:
    """One flag per :class:`TrainConfig` field: ``--name-with-dashes``, its type from the field's,
    its help the first sentence of the field's documentation."""
    docs = field_docs(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    flags = []
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        optional = type(None) in typing.get_args(hint)
        kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        help_text = _first_sentence(docs.get(f.name, f.name.replace("_", " ")))
        if kind is bool:
            flags.append(Flag(f.name, "--" + f.name.replace("_", "-"), help_text, boolean=True, group="engine"))
            continue
        words = _ENGINE_NONE_WORDS.get(f.name, _NONE) if optional else ()
        flags.append(Flag(f.name, "--" + f.name.replace("_", "-"), help_text,
                          _optional(kind, words) if optional else kind, metavar=_METAVARS.get(kind),
                          group="engine", none_words=words, aliases=_ENGINE_ALIASES.get(f.name, ())))
    return tuple(flags)


FLAGS: tuple[Flag, ...] = engine_flags() + LAUNCHER_FLAGS

_GROUPS = ("model", "data", "training", "pipeline", "engine", "synthesizer", "placement", "outputs")
_GROUP_TITLES = {"engine": "engine options (synthpipe.TrainConfig)"}


def _none_words(name: str) -> tuple[str, ...]:
    return next((f.none_words for f in FLAGS if f.field == name), ())


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config FILE`` and one flag per :class:`JobConfig` field to ``parser``.

    Flags have no argparse default (``SUPPRESS``), so the parsed namespace holds only the
    flags the user gave; :func:`overrides_from_args` turns it into ``load_config``'s
    overrides. The help shows the dataclass defaults.
    """
    defaults = JobConfig()
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML file with JobConfig fields (flags override it)")
    groups = {g: parser.add_argument_group(_GROUP_TITLES.get(g, f"{g} options")) for g in _GROUPS}
    for f in FLAGS:
        default = getattr(defaults, f.field)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        extra = f"; {'/'.join(f.none_words)} for None" if f.none_words else ""
        help_text = f"{f.help} (default: {f.none if shown is None else shown}{extra})"
        group = groups[f.group]
        if f.boolean:
            group.add_argument(f.flag, *f.aliases, dest=f.field, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(f.flag, *f.aliases, dest=f.field, type=f.type, choices=f.choices,
                               metavar=f.metavar, default=argparse.SUPPRESS, help=help_text)
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`JobConfig` fields given on the command line (field -> value)."""
    given = vars(args)
    return {f.field: given[f.field] for f in FLAGS if f.field in given}


def overrides_to_argv(overrides: dict[str, Any]) -> list[str]:
    """The flags that :func:`add_train_arguments` parses back into ``overrides``.

    Raises:
        ValueError: a ``None`` for a field whose flag has no word for it.
    """
    by_field = {f.field: f for f in FLAGS}
    argv: list[str] = []
    for name, value in overrides.items():
        f = by_field[name]
        if f.boolean:
            argv.append(f.flag if value else "--no-" + f.flag[2:])
        elif value is None:
            if not f.none_words:
                raise ValueError(f"{name} cannot be given as None on the command line")
            argv += [f.flag, f.none_words[0]]
        elif isinstance(value, list):
            argv += [f.flag, ",".join(str(v) for v in value)]
        else:
            argv += [f.flag, str(value)]
    return argv
