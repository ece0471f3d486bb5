"""The torchrun entry point: build the job from a :class:`JobConfig`, train, report.

    python -m synthpipe.launch.train [flags]                              # one process
    torchrun --nproc-per-node 3 -m synthpipe.launch.train --stages 3 ...  # one rank per stage

Every rank builds the same model (seeded with ``seed``) and splits it the same way; the
:class:`synthpipe.Trainer` reads the torchrun environment (``WORLD_SIZE = dp x stages``:
rank r keeps stage ``r % stages`` of pipeline ``r // stages``). The first rank of every
pipeline builds the data (each trains on its own share); only rank 0 prints. After training, with
``compare_backprop``, rank 0 trains the unsplit model with plain single-process backprop
on the same data order for the same number of steps and prints both test accuracies; in a
multi-process run this happens after the pipeline has finished and the other ranks have
left (they simply exit).

Exit codes: 0 success, 2 a configuration or setup error (one line on stderr, no
traceback), 1 a failure during training.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Sequence

from ..stages.stage import adam
from .config import JobConfig, add_train_arguments, load_config, overrides_from_args, train_options

__all__ = ["MNIST1D_FEATURES", "NUM_CLASSES", "EVAL_BATCH", "LaunchError", "env_rank", "env_world", "data_shape",
           "resolve_device", "preflight", "build_model", "build_data", "check_labels", "train_loader", "eval_loader",
           "choose_balance", "method_name", "aux_head_for", "train_backprop", "time_to_target",
           "pipeline_curve", "stop_exit_code", "run", "build_parser", "main"]

MNIST1D_FEATURES = 40
NUM_CLASSES = 10
EVAL_BATCH = 1000


class LaunchError(Exception):
    """A configuration or setup problem: reported as one line, exit code 2."""


# -- environment ------------------------------------------------------------------------

def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _say(message: str) -> None:
    """Print a setup error once per node (local rank 0), to stderr."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"synthpipe train: error: {message}", file=sys.stderr, flush=True)


# -- what the job is made of --------------------------------------------------------------

def data_shape(cfg: JobConfig) -> tuple[int, int | None]:
    """(input features, number of label classes or ``None`` for unlabelled data)."""
    if cfg.data == "mnist1d":
        return MNIST1D_FEATURES, NUM_CLASSES
    return (cfg.features or MNIST1D_FEATURES), NUM_CLASSES


def resolve_device(cfg: JobConfig) -> Any:
    import torch

    from ..engine.distributed import default_device

    if cfg.device == "auto":
        return default_device()
    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("--device cuda was asked for, but CUDA is not available on this machine; "
                          "use --device cpu (or auto)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def preflight(cfg: JobConfig, world: int) -> None:
    """Checks that need no process group: run before anything heavy (and by ``synthpipe train --nproc``).

    Raises :class:`LaunchError` for: a world size that is not the number of stages, a
    conditional synthesizer on data without labels, a CUDA device or the nccl backend
    without CUDA.
    """
    from ..engine.distributed import backend_for

    if world > 1 and world % cfg.n_stages != 0:
        raise LaunchError(f"the job has {world} processes but the model has {cfg.n_stages} stages; the processes "
                          f"must be a multiple of the stages (dp pipelines of pp stages): launch {cfg.n_stages}, "
                          f"{2 * cfg.n_stages}, ... processes (--nproc {cfg.n_stages}) or split into {world} stages "
                          f"(--stages {world})")
    if cfg.num_samples < 10:
        raise LaunchError(f"num_samples must be at least 10 (80/20 train/test split); got {cfg.num_samples}")
    _, num_classes = data_shape(cfg)
    if cfg.conditional and steps_on_synthesizer(cfg) and num_classes is None:
        raise LaunchError(f"a conditional synthesizer (cDNI) needs class labels, but data {cfg.data!r} has none; "
                          "pass --no-conditional for plain DNI")
    device = resolve_device(cfg)
    try:
        backend_for(device, cfg.backend)
    except (RuntimeError, ValueError) as e:
        raise LaunchError(str(e)) from None
    _check_paths(cfg)


def _check_paths(cfg: JobConfig) -> None:
    """Output paths of the wrong kind would fail only after training, losing it."""
    for flag, path in (("--checkpoint", cfg.checkpoint), ("--output", cfg.output)):
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise LaunchError(f"{flag} {path} is a file; it must be a directory (it is created if missing)")
    if cfg.export is not None and os.path.isdir(cfg.export):
        raise LaunchError(f"--export {cfg.export} is a directory; give a file path such as {cfg.export}/model.pt")
    if cfg.resume is not None and not os.path.isfile(os.path.join(cfg.resume, "meta.json")):
        raise LaunchError(f"--resume {cfg.resume} is not a complete synthpipe checkpoint (no meta.json)")


def build_model(cfg: JobConfig, in_features: int, num_classes: int) -> Any:
    """The model of ``cfg``, initialised from ``cfg.seed`` (identical on every rank)."""
    import torch

    from .. import models

    torch.manual_seed(cfg.seed)
    if cfg.model == "wide_mlp":
        kw0: dict[str, Any] = {"in_features": in_features, "num_classes": num_classes}
        if cfg.depth is not None:
            kw0["depth"] = cfg.depth
        if cfg.hidden is not None:
            kw0["hidden"] = cfg.hidden
        return models.wide_mlp(**kw0)
    if cfg.model == "paper_mlp":
        kw: dict[str, Any] = {"in_features": in_features, "num_classes": num_classes}
        if cfg.depth is not None:
            kw["depth"] = cfg.depth
        if cfg.hidden is not None:
            kw["hidden"] = cfg.hidden
        return models.paper_mlp(**kw)
    if cfg.model == "paper_cnn":
        kw = {"in_channels": 1, "length": in_features, "num_classes": num_classes}
        if cfg.depth is not None:
            kw["blocks"] = cfg.depth
        if cfg.hidden is not None:
            kw["channels"] = cfg.hidden
        return models.paper_cnn(**kw)
    kw = {"in_features": in_features, "num_classes": num_classes}
    if cfg.depth is not None:
        kw["depth"] = cfg.depth
    if cfg.hidden is not None:
        kw["hidden"] = cfg.hidden
    return models.deep_mlp(**kw)


def build_data(cfg: JobConfig) -> tuple[Any, Any]:
    """``(train, test)`` datasets of ``(x, y)``."""
    from torch.utils.data import TensorDataset

    from .. import data

    if cfg.data == "mnist1d":
        return data.mnist1d(num_samples=cfg.num_samples)  # the canonical data seed (42)
    features, num_classes = data_shape(cfg)
    full = data.synthetic_classification(cfg.num_samples, features, num_classes or NUM_CLASSES, seed=cfg.seed)
    x, y = full.tensors
    n_train = int(0.8 * len(y))  # num_samples >= 10: both splits are non-empty
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def steps_on_synthesizer(cfg: JobConfig) -> bool:
    """Does ``cfg``'s gradient source step on synthesizers (``synthetic``, ``corrected``)?"""
    from ..engine.sources import SOURCES

    source = SOURCES.get(cfg.gradients)
    return source is not None and source.uses_synthesizer


def check_labels(cfg: JobConfig, dataset: Any, num_classes: int | None) -> None:
    """The data must yield integer labels in range when the synthesizer is conditional."""
    import torch

    if not (cfg.conditional and steps_on_synthesizer(cfg)):
        return
    tensors = getattr(dataset, "tensors", None)
    if tensors is None or len(tensors) < 2:
        raise LaunchError(f"a conditional synthesizer (cDNI) needs (input, label) data; {cfg.data!r} has no labels; "
                          "pass --no-conditional")
    y = tensors[1]
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise LaunchError(f"a conditional synthesizer (cDNI) needs integer class labels; {cfg.data!r} has "
                          f"{y.dtype} targets; pass --no-conditional")
    if num_classes is None or (y.numel() and int(y.max()) >= num_classes):
        raise LaunchError(f"the number of classes of {cfg.data!r} is unknown; a conditional synthesizer needs it; "
                          "pass --no-conditional")


def train_loader(cfg: JobConfig, dataset: Any) -> Any:
    """Seeded shuffling: a fresh loader with the same seed yields the same batch order.

    A last batch of a single example is dropped (training-mode BatchNorm cannot take it).
    """
    from .. import data

    return data.loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed,
                       drop_last=len(dataset) > cfg.batch_size and len(dataset) % cfg.batch_size == 1)


def eval_loader(dataset: Any) -> Any:
    from .. import data

    return data.loader(dataset, min(EVAL_BATCH, len(dataset)))


def choose_balance(cfg: JobConfig, model: Any, in_features: int, device: Any, world: int) -> list[int] | None:
    """The balance to split with (``None``: let ``split`` balance by parameters).

    ``split_by="time"`` measures on this machine; in a multi-process run rank 0 measures
    and every rank uses its result (measurements differ between processes, and all ranks
    must cut the model at the same places).
    """
    import torch

    if cfg.balance is not None:
        return list(cfg.balance)
    if cfg.split_by != "time":
        return None
    from ..stages.balance import balance_by_time

    def measure() -> list[int]:
        if cfg.n_stages > len(model):
            raise LaunchError(f"cannot split a model with {len(model)} children into {cfg.n_stages} stages")
        example = torch.randn(cfg.batch_size, in_features, device=device)
        return balance_by_time(model.to(device), cfg.n_stages, example)

    if world == 1:
        return measure()
    import torch.distributed as dist

    from ..engine.distributed import backend_for, init_process_group

    init_process_group(device, backend_for(device, cfg.backend))  # the Trainer reuses this group
    box: list[Any] = [measure() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def lr_scheduler_for(cfg: JobConfig) -> Any:
    """The ``Trainer(lr_scheduler=...)`` of ``--lr-schedule`` / ``--lr-warmup-steps`` (``None``: constant).

    Linear and cosine reach 0 at the run's last step: ``max_steps``, else ``epochs`` times
    the batches per epoch (every rank builds the (seeded, identical) training set to count them).
    """
    from ..engine.schedules import named_schedule

    if cfg.lr_schedule == "constant" and cfg.lr_warmup_steps == 0:
        return None
    total = cfg.max_steps
    if total is None:
        total = len(train_loader(cfg, build_data(cfg)[0])) * cfg.epochs
    return named_schedule(cfg.lr_schedule, max(total, 1), cfg.lr_warmup_steps)


def method_name(cfg: JobConfig) -> str:
    """The gradient source as the report names it (``"delayed (predict)"``, ``"cDNI"``, ...)."""
    if cfg.gradients == "backprop":
        return "pipeline backprop"
    if cfg.gradients == "synthetic":
        return "cDNI" if cfg.conditional else "DNI"
    if cfg.gradients == "corrected":
        return "corrected " + ("cDNI" if cfg.conditional else "DNI") + (f" ({cfg.staleness})" if cfg.staleness else "")
    return cfg.gradients + (f" ({cfg.staleness})" if cfg.staleness else "")


def aux_head_for(cfg: JobConfig, num_classes: int | None) -> Any:
    """The ``Trainer(aux_head=...)`` recipe of ``local`` and ``interlocking`` (``None`` for the other sources)."""
    import synthpipe as sp

    if cfg.gradients not in ("local", "interlocking"):
        return None
    if num_classes is None:
        raise LaunchError(f"gradients={cfg.gradients!r} trains on a local loss with class labels, but data "
                          f"{cfg.data!r} has none")
    return sp.AuxHead(cfg.aux_head, num_classes=num_classes, hidden=128 if cfg.aux_head == "mlp" else None)


# -- plain backprop baseline ------------------------------------------------------------------

def train_backprop(cfg: JobConfig, train_set: Any, test_set: Any, steps: int, device: Any) -> dict[str, Any]:
    """The unsplit model, plain single-process backprop, same init and batch order, ``steps`` steps.

    Returns ``accuracy``, ``loss``, ``steps``, ``time`` (training seconds, evaluation
    excluded) and ``curve``: the test accuracy after every full epoch (and at the end), as
    ``{"epoch", "steps", "time", "accuracy"}``, the points at which the pipeline's own
    run is evaluated, for the time to a target accuracy.
    """
    import torch.nn.functional as F

    from ..engine.progress import open_bar

    in_features, num_classes = data_shape(cfg)
    model = build_model(cfg, in_features, num_classes or NUM_CLASSES).to(device)
    optimizer = adam(cfg.lr)(model.parameters())
    loader = train_loader(cfg, train_set)
    from ..engine.reference import evaluate_model

    curve: list[dict[str, float]] = []
    elapsed = 0.0
    step = epoch = 0
    metrics: dict[str, float] = {}

    def evaluate() -> None:
        nonlocal metrics
        metrics = evaluate_model(model, eval_loader(test_set), device)  # (leaves the model in eval mode)
        model.train()
        curve.append({"epoch": epoch, "steps": step, "time": elapsed, "accuracy": metrics["accuracy"]})

    model.train()
    bar = open_bar(steps, 0, cfg.progress, "backprop x1")  # (log lines, not a bar, off a terminal)
    try:
        while step < steps and len(loader) > 0:
            start = time.perf_counter()
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                step += 1
                bar.update(1)
                if step >= steps:
                    break
            elapsed += time.perf_counter() - start
            epoch += 1
            evaluate()
    finally:
        bar.close()
    if not curve:
        evaluate()
    return {"accuracy": metrics["accuracy"], "loss": metrics["loss"], "steps": step, "time": elapsed,
            "curve": curve}


def time_to_target(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first point of ``curve`` (``{"epoch", "steps", "time", "accuracy"}``) at or above ``target``, or ``None``."""
    return next((p for p in curve if p["accuracy"] >= target - 1e-9), None)


def pipeline_curve(history: Any) -> list[dict[str, float]]:
    """The pipeline run's test accuracy after each epoch, with the training seconds up to it."""
    curve, elapsed, steps = [], 0.0, 0
    for e in history.epochs:
        elapsed += float(e["time"])
        steps += int(e["steps"])
        if e.get("eval_accuracy") is not None:
            curve.append({"epoch": int(e["epoch"]) + 1, "steps": steps, "time": elapsed,
                          "accuracy": float(e["eval_accuracy"])})
    return curve


# -- the job ------------------------------------------------------------------------------

def stop_exit_code(stopped: str) -> int:
    """The exit code of a run that stopped cleanly on a signal: ``128 + signal``, as if the
    signal had killed it (130 for SIGINT, 143 for SIGTERM), so schedulers and shells see
    what stopped it. ``stopped`` is :attr:`Trainer.stopped`, e.g. ``"SIGINT on rank 1"``."""
    name = stopped.split()[0]
    return 128 + int(signal.Signals[name]) if name in signal.Signals.__members__ else 1


def _throughput(history: Any, steps_run: int, batch_size: int) -> tuple[int, float]:
    """(samples, seconds) of training in this fit, from the epoch records or the step times."""
    if history.epochs:
        return (sum(int(e["samples"]) for e in history.epochs), sum(float(e["time"]) for e in history.epochs))
    times = [s["time"] for s in history.steps if s.get("time") == s.get("time") and s.get("time") is not None]
    return steps_run * batch_size, (max(times) if times else 0.0)


def _say_interrupted(cfg: JobConfig, where: str = "") -> None:
    """Rank 0 says what a Ctrl-C left behind."""
    if env_rank() != 0:
        return
    from ..engine.checkpoint import read_meta

    kept = "nothing was saved" + (" (no --checkpoint)" if cfg.checkpoint is None else "")
    if cfg.checkpoint is not None:
        try:
            kept = f"the checkpoint of step {read_meta(cfg.checkpoint)['step']} in {cfg.checkpoint} is kept"
        except (TypeError, OSError, ValueError, KeyError):  # nothing (complete) saved there yet
            pass
    print(f"\nsynthpipe train: interrupted{where}; {kept}", file=sys.stderr, flush=True)


def run(cfg: JobConfig) -> int:
    """Train the job ``cfg`` in this process (one rank of it under torchrun). Returns the exit code.

    Ctrl-C ends it with 130 (128 + SIGINT) and a line saying what was saved, not a traceback."""
    try:
        return _run(cfg)
    except KeyboardInterrupt:  # before training started, or after it ended
        _say_interrupted(cfg)
        return 128 + signal.SIGINT


@dataclasses.dataclass
class _Job:
    """What :func:`_build` made: the trainer and, on rank 0, the data."""

    trainer: Any
    world: int
    rank: int
    train_set: Any = None
    test_set: Any = None
    loader: Any = None
    loader_eval: Any = None


@dataclasses.dataclass
class _Trained:
    """What :func:`_train` leaves for the report."""

    history: Any
    metrics: dict[str, float]
    wall: float
    steps_total: int


def _run(cfg: JobConfig) -> int:
    import torch

    torch.set_num_threads(cfg.threads)
    try:
        job = _build(cfg, env_world(), env_rank())
    except (LaunchError, ValueError, RuntimeError) as e:  # ours, and the Trainer's, split's and models' checks
        _say(str(e))
        return 2
    outcome = _train(cfg, job)
    if isinstance(outcome, int):
        return outcome
    if job.rank == 0:
        _report(cfg, job, outcome)
    sys.stdout.flush()
    return 0


def _build(cfg: JobConfig, world: int, rank: int) -> _Job:
    """Check the job, build and split the model, make the Trainer and (rank 0) the data.

    Raises:
        LaunchError, ValueError, RuntimeError: a configuration or setup problem (exit code 2).
    """
    import torch.nn as nn

    import synthpipe as sp

    preflight(cfg, world)
    in_features, num_classes = data_shape(cfg)
    device = resolve_device(cfg)
    model = build_model(cfg, in_features, num_classes or NUM_CLASSES)
    balance = choose_balance(cfg, model, in_features, device, world)
    stages = sp.split(model, balance=balance) if balance is not None else \
        sp.split(model, n_stages=cfg.n_stages, by="params")
    synthesizer = sp.Synthesizer(cfg.synthesizer, conditional=cfg.conditional,
                                 num_classes=num_classes if cfg.conditional else None, replay=cfg.synth_replay)
    if cfg.log_dir is not None:
        from ..engine.tensorboard import require_tensorboard
        try:
            require_tensorboard("--tensorboard")
        except ImportError as e:
            raise LaunchError(str(e)) from None
    trainer = sp.Trainer(stages, loss_fn=nn.CrossEntropyLoss(), optimizer=adam(cfg.lr), synthesizer=synthesizer,
                         synth_lr=cfg.synth_lr, device=device, backend=cfg.backend,
                         aux_head=aux_head_for(cfg, num_classes),
                         lr_scheduler=lr_scheduler_for(cfg), **train_options(cfg))
    job = _Job(trainer, world, rank)
    if trainer.drives_data:  # every pipeline's first rank: each reads its own share
        job.train_set, job.test_set = build_data(cfg)
        check_labels(cfg, job.train_set, num_classes)
        job.loader, job.loader_eval = train_loader(cfg, job.train_set), eval_loader(job.test_set)
        if len(job.loader) == 0:
            raise LaunchError(f"no training batches: {len(job.train_set)} training examples at batch size "
                              f"{cfg.batch_size}")
    return job


def _train(cfg: JobConfig, job: _Job) -> _Trained | int:
    """Fit, evaluate, export and close; an exit code instead when the run stopped or failed."""
    trainer = job.trainer
    start = time.perf_counter()
    try:
        history = trainer.fit(job.loader, epochs=cfg.epochs, eval_loader=job.loader_eval, max_steps=cfg.max_steps,
                              resume=cfg.resume, checkpoint=cfg.checkpoint, checkpoint_every=cfg.checkpoint_every)
        if trainer.stopped is not None:  # SIGTERM or Ctrl-C: the checkpoint is saved; skip the rest
            return _stopped(cfg, job)
        metrics = _final_metrics(job, history)
        wall = time.perf_counter() - start
        if cfg.export is not None:
            trainer.export(cfg.export)
        steps_total = trainer.step
        trainer.close()
    except KeyboardInterrupt:  # a second Ctrl-C, or the first one without --checkpoint
        _say_interrupted(cfg, f" at step {trainer.step}")
        return 128 + signal.SIGINT
    except (ValueError, RuntimeError, ArithmeticError, OSError) as e:
        where = f" on rank {job.rank}" if job.world > 1 else ""
        print(f"synthpipe train: training failed{where}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if os.environ.get("SYNTHPIPE_TRACEBACK"):
            raise
        return 1
    return _Trained(history, metrics, wall, steps_total)


def _stopped(cfg: JobConfig, job: _Job) -> int:
    """A fit stopped by a signal: say where it was saved, close, and exit as the signal would."""
    trainer = job.trainer
    # We are already exiting as asked. A second SIGTERM (torchrun sends one to the
    # other ranks when the first exits) must not kill us mid-close.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if job.rank == 0:
        print(f"synthpipe train: stopped by {trainer.stopped} at step {trainer.step}; checkpoint saved "
              f"to {cfg.checkpoint}; continue with --resume {cfg.checkpoint}", file=sys.stderr, flush=True)
    trainer.close()
    return stop_exit_code(trainer.stopped)


def _final_metrics(job: _Job, history: Any) -> dict[str, float]:
    """The test metrics after training: the last epoch's evaluation when it ran at the very end, else a fresh one."""
    trainer = job.trainer
    final_epoch_eval = (bool(history.epochs) and "eval_accuracy" in history.final
                        and history.final["epoch"] == trainer.epoch - 1 and trainer.step_in_epoch == 0)
    if final_epoch_eval:
        return {"accuracy": history.final["eval_accuracy"], "loss": history.final["eval_loss"]}
    return trainer.evaluate(job.loader_eval)  # every rank takes part


def _report(cfg: JobConfig, job: _Job, done: _Trained) -> None:
    """Rank 0: print the results, run the backprop comparison, write the output directory."""
    trainer, history, metrics = job.trainer, done.history, done.metrics
    steps_run = len(history.steps)  # steps of this fit (after a resume: the new ones)
    samples, seconds = _throughput(history, steps_run, cfg.batch_size * trainer.dp)
    name = method_name(cfg)
    procs = f"{job.world} processes" if job.world > 1 else "1 process"
    procs += f" ({trainer.dp} pipelines)" if trainer.dp > 1 else ""
    print(f"{name}: {cfg.model} on {cfg.data}, {cfg.n_stages} stages, {procs}, device {trainer.device}")
    resumed = f" (resumed; now at step {done.steps_total})" if cfg.resume is not None else ""
    print(f"trained {steps_run} steps{resumed} in {done.wall:.1f} s, {samples / max(seconds, 1e-9):.0f} samples/s")
    print(f"{name} test accuracy {100 * metrics['accuracy']:.2f}% (test loss {metrics['loss']:.4f})")
    if cfg.checkpoint is not None:
        print(f"checkpoint saved to {cfg.checkpoint}")
    if cfg.export is not None:
        print(f"model state_dict exported to {cfg.export}")
    summary: dict[str, Any] = {"config": cfg.to_dict(), "world_size": job.world, "steps": done.steps_total,
                               "epochs": trainer.epoch, "time": done.wall,
                               "samples_per_s": samples / max(seconds, 1e-9),
                               "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"]}
    if cfg.compare_backprop and done.steps_total > 0:
        summary["backprop"] = _compare_with_backprop(cfg, job, done)
    if cfg.output is not None:
        _write_outputs(cfg.output, history, summary,
                       title=f"{name}: {cfg.model} on {cfg.data}, {cfg.n_stages} stages, {procs}")


def _compare_with_backprop(cfg: JobConfig, job: _Job, done: _Trained) -> dict[str, Any]:
    """Train the unsplit model with plain backprop for as many steps; print both accuracies
    and both times to the target (backprop's final accuracy minus 1 point)."""
    name, accuracy = method_name(cfg), done.metrics["accuracy"]
    base = train_backprop(cfg, job.train_set, job.test_set, done.steps_total, job.trainer.device)
    print(f"backprop (1 process, unsplit): {base['steps']} steps in {base['time']:.1f} s, "
          f"test accuracy {100 * base['accuracy']:.2f}%")
    print(f"{name} test accuracy {100 * accuracy:.1f}% vs backprop {100 * base['accuracy']:.1f}% (same steps)")
    target = base["accuracy"] - 0.01
    mine = time_to_target(pipeline_curve(done.history), target) if cfg.resume is None else None
    theirs = time_to_target(base["curve"], target)
    base["target_accuracy"] = target
    base["time_to_target"] = theirs["time"] if theirs else None
    base["pipeline_time_to_target"] = mine["time"] if mine else None
    if cfg.resume is not None:
        return base  # this fit's epochs are not the run's: no time to target to compare
    procs = f"{job.world} processes" if job.world > 1 else "1 process"

    def said(hit: dict[str, float] | None) -> str:
        return (f"{hit['time']:.1f} s (epoch {hit['epoch']:.0f}, step {hit['steps']:.0f})" if hit
                else "not reached")

    print(f"time to {100 * target:.1f}% test accuracy (backprop's final minus 1 point; training time, evaluation "
          f"excluded): {name} on {procs} {said(mine)}, backprop in 1 process {said(theirs)}"
          + (f": {_sooner(theirs['time'] / mine['time'], name)}" if mine and theirs and mine["time"] > 0 else ""))
    return base


def _sooner(ratio: float, name: str) -> str:
    """``ratio`` = backprop's time to target / the pipeline's, in words."""
    if ratio >= 1:
        return f"{name} {ratio:.2f}x sooner"
    return f"backprop {1 / ratio:.2f}x sooner"


def _write_outputs(output: str, history: Any, summary: dict[str, Any], title: str) -> None:
    """``history.json``, ``summary.json`` and ``training.png`` in the directory ``output``."""
    os.makedirs(output, exist_ok=True)
    history.to_json(os.path.join(output, "history.json"))
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    history.plot(os.path.join(output, "training.png"), title=title,
                 reference_accuracy=summary["backprop"]["accuracy"] if "backprop" in summary else None)
    print(f"history, summary and training curves (training.png) written to {output}")


def build_parser(prog: str = "python -m synthpipe.launch.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train with synthetic gradients: one process, or one rank per stage under torchrun.")
    return add_train_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, overrides_from_args(args))
    except ValueError as e:
        _say(str(e))
        return 2
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
