"""The ``synthpipe`` command.

    synthpipe train [--nproc N] [--config FILE] [flags]   train (in this process, or under torchrun)
    synthpipe export CHECKPOINT_DIR OUT.pt                 checkpoint -> the model's state_dict
    synthpipe bench ... / synthpipe simulate ...           synthpipe.benchmark.cli
    synthpipe --version

``synthpipe train`` with no flags trains the DNI paper's MLP on MNIST-1D with cDNI in 3
stages, on CPU in this process, and prints its test accuracy next to plain backprop's.
With ``--nproc N`` (N > 1) or ``--nnodes M`` (M > 1) it checks its arguments, then execs torchrun::

    python -m synthpipe.launch.torchrun --nproc-per-node N [torchrun flags] -m synthpipe.launch.train [flags]

(torchrun's own entry point, save that a job stopped cleanly by a signal ends with one
line and 128 + signal instead of torchrun's tracebacks and 1), so its signals are
torchrun's. Without ``--stages`` (or a balance) the job then gets one stage per process:
``n_stages = N * M``; with ``--stages S`` it runs ``N * M / S`` pipelines side by side
(``--nproc 4 --stages 2``: two pipelines of two stages, data parallel). torchrun's
multi-node flags pass through (dash or
underscore spelling); on one node without rendezvous flags ``--standalone`` is used, so
concurrent jobs never collide on a port.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .._version import __version__
from .config import add_train_arguments, load_config, overrides_from_args, overrides_to_argv, read_toml

__all__ = ["TORCHRUN_FLAGS", "BENCH_COMMANDS", "add_launcher_arguments", "build_parser", "torchrun_command",
           "run_train", "run_export", "run_benchmark_command", "usable_cores", "auto_nproc", "main"]

# (flag, alias, dest, type): torchrun's options that `synthpipe train` passes through.
TORCHRUN_FLAGS = (
    ("--nnodes", None, "nnodes", str),
    ("--node-rank", "--node_rank", "node_rank", int),
    ("--rdzv-backend", "--rdzv_backend", "rdzv_backend", str),
    ("--rdzv-endpoint", "--rdzv_endpoint", "rdzv_endpoint", str),
    ("--rdzv-id", "--rdzv_id", "rdzv_id", str),
    ("--master-addr", "--master_addr", "master_addr", str),
    ("--master-port", "--master_port", "master_port", int),
    ("--max-restarts", "--max_restarts", "max_restarts", int),
)
BENCH_COMMANDS = ("bench", "simulate")


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launcher options (passed to torchrun when it is used)")
    group.add_argument("--nproc", "--nproc-per-node", "--nproc_per_node", dest="nproc", type=_nproc, default=None,
                       metavar="N", help="processes on this node; N > 1 runs torchrun (default: auto, one process "
                                         "per stage when this machine has a core for each rank's threads, "
                                         "else 1, every stage in this process)")
    for flag, alias, dest, kind in TORCHRUN_FLAGS:
        names = [flag] + ([alias] if alias else [])
        group.add_argument(*names, dest=f"torchrun_{dest}", type=kind, default=argparse.SUPPRESS,
                           metavar=dest.upper(), help=f"torchrun {flag}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthpipe", description="Pipeline-parallel training with synthetic gradients (DNI / cDNI).")
    parser.add_argument("--version", action="version", version=f"synthpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train = sub.add_parser(
        "train", help="train a model (default: wide BN-MLP on MNIST-1D, delayed gradients with weight "
                      "prediction, 2 stages, one process each when the cores allow, against backprop)",
        description="Train a pipeline of update-unlocked stages (default: delayed gradients with weight "
                    "prediction) and compare it with single-process backprop. With --nproc N > 1 (or --nnodes > 1) "
                    "torchrun starts one process per stage; without --nproc, one process per stage when the cores "
                    "allow; otherwise every stage runs in this process.")
    add_launcher_arguments(train)
    add_train_arguments(train)
    export = sub.add_parser("export", help="write a checkpoint's model state_dict (for model.load_state_dict)",
                            description="Merge the stages of a checkpoint into the original model's state_dict.")
    export.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="directory written by train --checkpoint")
    export.add_argument("out", metavar="OUT.pt", help="file to write (torch.save of a dict of tensors)")
    sub.add_parser("bench", help="throughput benchmark (synthpipe.benchmark); see synthpipe bench --help",
                   add_help=False)
    sub.add_parser("simulate", help="pipeline schedule simulation (synthpipe.benchmark); see synthpipe simulate --help",
                   add_help=False)
    return parser


def _error(command: str, message: str) -> int:
    print(f"synthpipe {command}: error: {message}", file=sys.stderr, flush=True)
    return 2


# -- train --------------------------------------------------------------------------------

def _nproc(text: str) -> int | None:
    """``--nproc``: a number, or ``auto`` (``None``: see :func:`auto_nproc`)."""
    if text.lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes or auto; got {text!r}") from None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_nproc(n_stages: int, threads: int, cores: int | None = None) -> int:
    """``--nproc auto``: one process per stage when ``cores`` (default: :func:`usable_cores`)
    hold ``n_stages x threads`` threads, else 1 (every stage in this process)."""
    cores = usable_cores() if cores is None else cores
    return n_stages if n_stages > 1 and n_stages * threads <= cores else 1


def _nnodes(text: str) -> int | None:
    """``--nnodes`` as a number, or ``None`` for an elastic range such as ``1:2``."""
    try:
        return int(text)
    except ValueError:
        return None


def torchrun_command(nproc: int, torchrun: dict[str, Any], config: str | None,
                     overrides: dict[str, Any]) -> list[str]:
    """The torchrun command line for ``synthpipe train --nproc N``."""
    cmd = [sys.executable, "-m", "synthpipe.launch.torchrun", "--nproc-per-node", str(nproc)]
    multi_node = torchrun.get("nnodes", "1") != "1"
    rendezvous = any(k in torchrun for k in ("rdzv_backend", "rdzv_endpoint", "master_addr", "master_port"))
    if not multi_node and not rendezvous:
        cmd.append("--standalone")
    for flag, _alias, dest, _kind in TORCHRUN_FLAGS:
        if dest in torchrun:
            cmd += [flag, str(torchrun[dest])]
    cmd += ["-m", "synthpipe.launch.train"]
    if config is not None:
        cmd += ["--config", os.path.abspath(config)]
    return cmd + overrides_to_argv(overrides)


def run_train(args: argparse.Namespace) -> int:
    from . import train

    overrides = overrides_from_args(args)
    torchrun = {k[len("torchrun_"):]: v for k, v in vars(args).items() if k.startswith("torchrun_")}
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as e:
        return _error("train", str(e))
    nnodes_text = str(torchrun.get("nnodes", "1"))
    nnodes = _nnodes(nnodes_text)
    if args.nproc is None:  # auto
        args.nproc = auto_nproc(cfg.n_stages, cfg.threads) if nnodes == 1 else 1
        if args.nproc > 1:
            print(f"synthpipe train: {cfg.n_stages} stages, {usable_cores()} usable cores: one process per stage "
                  f"(--nproc 1 runs every stage in this process)", file=sys.stderr, flush=True)
    if args.nproc < 1:
        return _error("train", f"--nproc must be >= 1; got {args.nproc}")
    if nnodes is not None and nnodes < 1:
        return _error("train", f"--nnodes must be >= 1; got {nnodes_text}")
    if nnodes != 1 and not any(k in torchrun for k in ("rdzv_endpoint", "master_addr")):
        return _error("train", f"--nnodes {nnodes_text} needs a rendezvous the nodes can reach: "
                               f"--rdzv-endpoint HOST:PORT (or --master-addr and --master-port)")
    if args.nproc == 1 and nnodes == 1:
        if set(torchrun) - {"nnodes"}:
            flags = ", ".join("--" + k.replace("_", "-") for k in sorted(set(torchrun) - {"nnodes"}))
            print(f"synthpipe train: note: one process, no torchrun: ignoring {flags}", file=sys.stderr)
        return train.run(cfg)

    world = args.nproc * nnodes if nnodes is not None else None
    file_keys = set(read_toml(args.config)) if args.config else set()
    explicit_stages = {"n_stages", "balance"} & (set(overrides) | file_keys)
    if world is not None and not explicit_stages:
        overrides["n_stages"] = world
        cfg = load_config(args.config, overrides)
    if world is not None:
        try:
            train.preflight(cfg, world)
        except train.LaunchError as e:
            return _error("train", str(e))
    cmd = torchrun_command(args.nproc, torchrun, args.config, overrides)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(cfg.threads))  # also keeps torchrun from printing its warning
    print("synthpipe train: running " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Become torchrun rather than wrap it: a signal sent to this command (a scheduler's
    # SIGTERM, to this process or to its whole group, or Ctrl-C) then reaches torchrun
    # exactly once. Forwarding from a parent doubled it when both got it, and torchrun,
    # hit again while waiting for its ranks to save, gave up on them and exited early.
    os.execve(cmd[0], cmd, env)  # does not return


# -- export -------------------------------------------------------------------------------

def run_export(args: argparse.Namespace) -> int:
    from ..engine.checkpoint import export_checkpoint

    parent = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(parent, exist_ok=True)
        state = export_checkpoint(args.checkpoint, args.out)
    except (OSError, ValueError, KeyError) as e:
        return _error("export", f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e))
    values = sum(int(t.numel()) for t in state.values())
    print(f"wrote {len(state)} tensors ({values} values) to {args.out}")
    return 0


# -- bench / simulate -----------------------------------------------------------------------

def run_benchmark_command(command: str, argv: Sequence[str]) -> int:
    """``synthpipe bench|simulate``: parsed and run by ``synthpipe.benchmark.cli`` (imported here, lazily)."""
    try:
        from ..benchmark import cli as bench_cli
    except ImportError as e:
        return _error(command, f"the benchmark module synthpipe.benchmark.cli is not available ({e})")
    parser = argparse.ArgumentParser(prog=f"synthpipe {command}")
    getattr(bench_cli, f"add_{'bench' if command == 'bench' else 'simulate'}_arguments")(parser)
    args = parser.parse_args(list(argv))
    result = getattr(bench_cli, f"run_{command}")(args)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in BENCH_COMMANDS:
        return run_benchmark_command(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return run_train(args)
    if args.command == "export":
        return run_export(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
