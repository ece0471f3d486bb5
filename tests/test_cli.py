"""The `synthpipe` command and the torchrun entry point (CPU, gloo; real torchrun runs)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch

from synthpipe.engine.checkpoint import read_meta
from synthpipe.launch import cli
from synthpipe.launch.config import FLAGS, JobConfig, load_config, overrides_from_args, overrides_to_argv

from multiprocess import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small explicit jobs (not the default one, which is sized to show the point in ~2 minutes).
SMALL = ["--model", "paper_mlp", "--gradients", "synthetic", "--batch-size", "64"]
TINY = ["--num-samples", "600", "--epochs", "1", "--no-progress", *SMALL]
SYNTHPIPE = [sys.executable, "-m", "synthpipe.launch"]  # what the console script runs


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    e.update(extra)
    return e


def start(args: list[str], cwd: str, **extra: str) -> subprocess.Popen:
    # A session of its own, so a timeout kills torchrun *and* its workers.
    return subprocess.Popen(args, cwd=cwd, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} still running after {timeout} s (killed)\nstdout:\n{out}\nstderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def run(args: list[str], cwd: str, timeout: float = 90, **extra: str) -> tuple[int, str, str]:
    return finish(start(args, cwd, **extra), timeout)


# -- parsing --------------------------------------------------------------------------------

ALL_FLAGS = ["--model", "deep_mlp", "--depth", "4", "--hidden", "32", "--data", "synthetic", "--num-samples", "300",
             "--features", "16", "--batch-size", "32", "--epochs", "2", "--max-steps", "7", "--lr", "0.01",
             "--seed", "5", "--stages", "3", "--balance", "3,3,3", "--split-by", "time", "--gradients", "backprop",
             "--synthesizer", "mlp", "--no-conditional", "--synth-lr", "0.002", "--synth-replay", "3",
             "--scale", "0.5", "--delay", "1",
             "--warmup-steps", "3", "--max-inflight", "2", "--nonfinite", "skip", "--failure-timeout", "12",
             "--stall-warning", "60", "--device", "cpu", "--backend", "gloo", "--threads", "2", "--checkpoint", "ck",
             "--resume", "old",
             "--checkpoint-every", "4", "--export", "m.pt", "--no-compare", "--no-progress", "--output", "out",
             "--log-every", "5", "--prefetch", "3", "--lr-schedule", "cosine", "--lr-warmup-steps", "2",
             "--precision", "bf16", "--synth-precision", "bf16", "--clip-grad-norm", "1.5", "--tensorboard", "tb",
             "--staleness", "none", "--predict-ahead", "none", "--p-update", "0.5", "--p-update-seed", "3",
             "--no-synthetic-inputs", "--input-synth-hidden", "64", "--aux-head", "mlp"]
EXPECTED = dict(model="deep_mlp", depth=4, hidden=32, data="synthetic", num_samples=300, features=16, batch_size=32,
                epochs=2, max_steps=7, lr=0.01, seed=5, n_stages=3, balance=[3, 3, 3], split_by="time",
                gradients="backprop", synthesizer="mlp", conditional=False, synth_lr=0.002, synth_replay=3,
                synthetic_scale=0.5,
                delay=1, warmup_steps=3, max_inflight=2, nonfinite="skip", failure_timeout=12.0, stall_warning=60.0,
                device="cpu",
                backend="gloo", threads=2, checkpoint="ck", checkpoint_every=4, resume="old", export="m.pt",
                compare_backprop=False, progress=False, output="out", log_every=5, prefetch=3,
                lr_schedule="cosine", lr_warmup_steps=2, precision="bf16", synth_precision="bf16", clip_grad_norm=1.5,
                log_dir="tb", staleness=None, predict_ahead=None, p_update=0.5, p_update_seed=3,
                synthetic_inputs=False, input_synth_hidden=64, aux_head="mlp")


def parse_train(argv: list[str]):
    return cli.build_parser().parse_args(["train", *argv])


def test_every_train_flag_maps_to_its_config_field():
    assert set(EXPECTED) == {f.name for f in JobConfig.__dataclass_fields__.values()}
    args = parse_train(["--nproc", "1", *ALL_FLAGS])
    overrides = overrides_from_args(args)
    assert overrides == EXPECTED
    assert load_config(None, overrides) == JobConfig(**EXPECTED)


def test_no_flags_is_the_default_job_and_only_given_flags_override(tmp_path):
    args = parse_train([])
    assert overrides_from_args(args) == {} and args.nproc is None and args.config is None  # nproc: auto
    config = tmp_path / "job.toml"
    config.write_text("epochs = 3\nlr = 0.01\n")
    args = parse_train(["--config", str(config), "--epochs", "5"])
    cfg = load_config(args.config, overrides_from_args(args))
    assert cfg.epochs == 5 and cfg.lr == 0.01  # the flag wins; the file's lr is not reset to the default


def test_overrides_round_trip_through_the_flags_given_to_torchrun():
    assert overrides_to_argv(EXPECTED)  # every field has a flag
    assert overrides_from_args(parse_train(overrides_to_argv(EXPECTED))) == EXPECTED
    back = overrides_from_args(parse_train(overrides_to_argv({"delay": None, "conditional": True})))
    assert back == {"delay": None, "conditional": True}
    assert len({f.flag for f in FLAGS}) == len(FLAGS)
    off = overrides_from_args(parse_train(overrides_to_argv({"stall_warning": None})))
    assert off == {"stall_warning": None}


def test_stall_warning_off_and_the_old_spellings():
    assert overrides_from_args(parse_train(["--stall-warning", "off"])) == {"stall_warning": None}
    assert overrides_from_args(parse_train(["--delay", "auto"])) == {"delay": None}
    assert overrides_from_args(parse_train(["--scale", "0.5"])) == {"synthetic_scale": 0.5}
    assert overrides_from_args(parse_train(["--synthetic-scale", "0.5"])) == {"synthetic_scale": 0.5}
    with pytest.raises(SystemExit):
        parse_train(["--stall-warning", "never"])


def test_torchrun_command_line():
    args = parse_train(["--nproc", "4", "--epochs", "2"])
    cmd = cli.torchrun_command(4, {}, None, overrides_from_args(args))
    assert cmd[:5] == [sys.executable, "-m", "synthpipe.launch.torchrun", "--nproc-per-node", "4"]
    assert "--standalone" in cmd  # one node, no rendezvous flags: a free port, no collisions
    assert cmd[cmd.index("-m", 3):] == ["-m", "synthpipe.launch.train", "--epochs", "2"]
    args = parse_train(["--nproc", "2", "--nnodes", "2", "--node_rank", "1", "--rdzv_backend", "c10d",
                        "--rdzv-endpoint", "host:29400", "--rdzv-id", "job", "--master-addr", "h",
                        "--master_port", "1234", "--max-restarts", "0", "--config", "x.toml"])
    torchrun = {k[len("torchrun_"):]: v for k, v in vars(args).items() if k.startswith("torchrun_")}
    cmd = cli.torchrun_command(args.nproc, torchrun, args.config, overrides_from_args(args))
    line = " ".join(cmd)
    assert "--standalone" not in cmd
    for part in ("--nnodes 2", "--node-rank 1", "--rdzv-backend c10d", "--rdzv-endpoint host:29400",
                 "--rdzv-id job", "--master-addr h", "--master-port 1234", "--max-restarts 0",
                 f"--config {os.path.abspath('x.toml')}"):
        assert part in line


# -- errors without starting processes --------------------------------------------------------

def test_nproc_different_from_stages_is_refused_before_launch(capsys):
    assert cli.main(["train", "--nproc", "2", "--stages", "3", *TINY]) == 2
    err = capsys.readouterr().err
    assert "2 processes" in err and "3 stages" in err and "Traceback" not in err


def test_nccl_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in (["train", "--backend", "nccl", *TINY], ["train", "--nproc", "2", "--backend", "nccl", *TINY]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "nccl" in err and "CUDA" in err and "Traceback" not in err


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_output_paths_of_the_wrong_kind_are_refused_before_training(capsys, tmp_path, nproc):
    # Before, each of these trained to the end and then failed, losing the run.
    a_file, a_dir = tmp_path / "afile", tmp_path / "adir"
    a_file.write_text("x")
    a_dir.mkdir()
    for flags, message in ((["--checkpoint", str(a_file)], f"--checkpoint {a_file} is a file"),
                           (["--output", str(a_file)], f"--output {a_file} is a file"),
                           (["--export", str(a_dir)], f"--export {a_dir} is a directory"),
                           (["--resume", str(a_dir)], f"--resume {a_dir} is not a complete synthpipe checkpoint")):
        argv = ["train", "--nproc", nproc, "--stages", "2", *TINY, *flags]
        assert cli.main(argv) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("flags, message", [
    (["--failure-timeout", "inf"], "failure_timeout must be a finite number of seconds above 1, got inf"),
    (["--failure-timeout", "nan"], "failure_timeout must be a finite number of seconds above 1, got nan"),
    (["--stall-warning", "-1"], "stall_warning must be a positive, finite number of seconds (or None), got -1.0"),
    (["--stall-warning", "0"], "stall_warning must be a positive, finite number of seconds (or None), got 0.0"),
    (["--scale", "nan"], "synthetic_scale must be finite, got nan"),
    (["--nproc", "1", "--nnodes", "2"], "--nnodes 2 needs a rendezvous the nodes can reach: --rdzv-endpoint"),
])
def test_values_that_would_hang_or_mislead_are_refused(capsys, flags, message):
    assert cli.main(["train", "--nproc", "1", "--stages", "2", *TINY, *flags]) == 2
    assert message in capsys.readouterr().err


def test_bad_config_is_a_clear_error(capsys, tmp_path):
    config = tmp_path / "job.toml"
    config.write_text("epoch = 3\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "'epoch'" in capsys.readouterr().err


def test_export_of_a_missing_checkpoint(capsys, tmp_path):
    assert cli.main(["export", str(tmp_path / "none"), str(tmp_path / "m.pt")]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_bench_and_simulate_are_delegated_lazily(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("synthpipe.benchmark.cli")
    fake.add_bench_arguments = lambda p: p.add_argument("--size", type=int, default=1)
    fake.run_bench = lambda a: calls.append(("bench", a.size)) or 0
    fake.add_simulate_arguments = lambda p: p.add_argument("--stages", type=int, default=2)
    fake.run_simulate = lambda a: calls.append(("simulate", a.stages)) or 3
    package = types.ModuleType("synthpipe.benchmark")
    package.cli = fake
    monkeypatch.setitem(sys.modules, "synthpipe.benchmark", package)
    monkeypatch.setitem(sys.modules, "synthpipe.benchmark.cli", fake)
    assert cli.main(["bench", "--size", "5"]) == 0
    assert cli.main(["simulate", "--stages", "4"]) == 3
    assert calls == [("bench", 5), ("simulate", 4)]

    monkeypatch.setitem(sys.modules, "synthpipe.benchmark", None)  # import fails as if it were missing
    monkeypatch.delitem(sys.modules, "synthpipe.benchmark.cli")
    assert cli.main(["bench"]) == 2
    assert "synthpipe.benchmark" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    import synthpipe
    assert synthpipe.__version__ in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_console_script_is_installed(tmp_path):
    exe = shutil.which("synthpipe", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe is not None, "the synthpipe console script is not installed: run pip install -e ."
    code, out, _ = run([exe, "--version"], str(tmp_path), timeout=25)
    assert code == 0 and out.startswith("synthpipe ")


# -- real runs ------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_entry_point_trains_in_one_process(tmp_path):
    code, out, err = run([sys.executable, "-m", "synthpipe.launch.train", *TINY, "--no-compare",
                          "--output", "out"], str(tmp_path))
    assert code == 0, err[-3000:]
    assert "cDNI test accuracy" in out and "2 stages, 1 process" in out
    assert (tmp_path / "out" / "history.json").exists() and (tmp_path / "out" / "summary.json").exists()
    with open(tmp_path / "out" / "training.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # the training curves


@pytest.mark.timeout(90)
def test_entry_point_names_both_numbers_when_world_size_differs_from_stages(tmp_path):
    torchrun_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    code, out, err = run([sys.executable, "-m", "synthpipe.launch.train", "--stages", "3", *TINY], str(tmp_path),
                         **torchrun_env)
    assert code == 2
    assert "2 processes" in err and "3 stages" in err and "Traceback" not in err


@pytest.mark.timeout(150)
def test_nproc_2_runs_torchrun_and_its_checkpoint_exports_into_the_model(tmp_path, capsys):
    code, out, err = run([*SYNTHPIPE, "train", "--nproc", "2", "--stages", "2", *TINY, "--checkpoint", "ck",
                          "--checkpoint-every", "4", "--export", "direct.pt"], str(tmp_path), timeout=140)
    assert code == 0, err[-3000:]
    assert "2 stages, 2 processes" in out and "cDNI test accuracy" in out and "vs backprop" in out
    assert "--standalone" in err  # the torchrun command line is shown
    steps = int(out.split("trained ")[1].split()[0])
    assert steps > 4 and read_meta(str(tmp_path / "ck"))["step"] == steps  # the last periodic save is the end
    assert sorted(os.listdir(tmp_path / "ck")) == ["meta.json", f"stage-0-{steps}.pt", f"stage-1-{steps}.pt"]

    assert cli.main(["export", str(tmp_path / "ck"), str(tmp_path / "exported.pt")]) == 0
    assert "tensors" in capsys.readouterr().out
    from synthpipe.launch.train import build_model
    job = load_config(None, {"model": "paper_mlp"})  # the model TINY trains
    model = build_model(job, 40, 10)
    state = torch.load(tmp_path / "exported.pt", weights_only=True)
    model.load_state_dict(state, strict=True)
    direct = torch.load(tmp_path / "direct.pt", weights_only=True)
    assert direct.keys() == state.keys()
    assert all(torch.equal(direct[k], state[k]) for k in state)
    assert not torch.equal(state["0.weight"], build_model(job, 40, 10)[0].weight)  # trained


@pytest.mark.timeout(150)
def test_two_nodes_on_one_machine(tmp_path):
    port = free_port()
    procs = [start([*SYNTHPIPE, "train", "--nproc", "1", "--nnodes", "2", "--node-rank", str(r),
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"t{port}",
                    *TINY, "--no-compare"], str(tmp_path))
             for r in range(2)]
    try:
        results = [finish(p, timeout=140) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    for code, _out, err in results:
        assert code == 0, err[-3000:]
    out = "".join(r[1] for r in results)
    assert "2 stages, 2 processes" in out and out.count("test accuracy") == 1  # rank 0 reports, once


def _ranks_of(proc: subprocess.Popen) -> list:
    import psutil

    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if "synthpipe.launch.train" in p.cmdline() and "synthpipe.launch.torchrun" not in p.cmdline()]


def _running(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig, to", [("SIGTERM", "command"), ("SIGTERM", "group"), ("SIGTERM", "rank 1"),
                                     ("SIGINT", "group")])
def test_a_signal_stops_torchrun_s_ranks_after_they_save(tmp_path, sig, to):
    """SIGTERM as schedulers send it: to the command (Kubernetes), to its process group (a
    terminal, ``kill -- -PGID``), or to one rank; and Ctrl-C (SIGINT to the terminal's
    foreground group, which torchrun passes on to the ranks). Every rank stops cleanly, the
    checkpoint is whole, torchrun is hit once, and the command ends only after its ranks have."""
    import time

    signum = signal.Signals[sig]

    proc = start([*SYNTHPIPE, "train", "--nproc", "2", "--stages", "2", "--num-samples", "600", "--epochs", "1000",
                  "--no-progress", "--no-compare", "--checkpoint", "ck", "--checkpoint-every", "1", *SMALL],
                 str(tmp_path))
    meta = tmp_path / "ck" / "meta.json"
    ranks = []
    try:
        deadline = time.monotonic() + 120
        while not meta.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert meta.exists() and proc.poll() is None, "training never saved its first checkpoint"
        ranks = _ranks_of(proc)
        assert len(ranks) == 2, ranks
        if to == "command":
            proc.send_signal(signum)
        elif to == "group":
            os.killpg(proc.pid, signum)
        else:
            rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
            rank1.send_signal(signum)
        code, out, err = finish(proc, timeout=90)
        orphans = [p.pid for p in ranks if _running(p)]
    finally:
        for p in ranks:
            if _running(p):
                p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert not orphans, f"the command exited while ranks {orphans} were still running\n{err[-3000:]}"
    who = "rank 1" if to == "rank 1" else "rank "
    assert f"stopped by {sig} on {who}" in err and "continue with --resume ck" in err, err[-3000:]
    assert not re.search(r"exitcode\s*:\s*-\d", err), f"a rank was killed by a signal\n{err[-3000:]}"
    assert "Traceback" not in err, f"torchrun's traceback instead of one line\n{err[-3000:]}"
    assert code == 128 + signum, (code, err[-3000:])  # what a shell expects of a command stopped by it
    step = read_meta(str(tmp_path / "ck"))["step"]
    assert 1 <= step < 1000 * 8
    # (the stop's save may come at the step just saved periodically: then its files get a suffix)
    names = sorted(os.listdir(tmp_path / "ck"))
    assert len(names) == 3 and names[0] == "meta.json", names
    assert all(re.fullmatch(rf"stage-{r}-{step}(-[0-9a-f]{{8}})?\.pt", n) for r, n in enumerate(names[1:])), names
    assert cli.main(["export", str(tmp_path / "ck"), str(tmp_path / "m.pt")]) == 0  # the checkpoint is whole


_SIGTERM_AGAIN_WHILE_CLOSING = """
import os, signal, sys
from synthpipe.engine.trainer import Trainer
from synthpipe.launch import train

saves, save, close = [], Trainer.save, Trainer.close

def save_then_stop(self, directory):
    save(self, directory)
    saves.append(self.step)
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # during the fit: a request to stop

def sigterm_then_close(self):
    os.kill(os.getpid(), signal.SIGTERM)  # after it: what torchrun sends once another rank exits 143
    close(self)

Trainer.save, Trainer.close = save_then_stop, sigterm_then_close
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_a_second_sigterm_after_a_stopped_fit_does_not_kill_the_rank(tmp_path):
    code, out, err = run([sys.executable, "-c", _SIGTERM_AGAIN_WHILE_CLOSING, "--num-samples", "600", "--epochs", "50",
                          "--no-progress", "--no-compare", "--checkpoint", "ck", "--checkpoint-every", "2", *SMALL],
                         str(tmp_path))
    assert code == 128 + signal.SIGTERM, (code, err[-3000:])  # -15 if the second SIGTERM killed it
    assert "stopped by SIGTERM on rank 0 at step 4" in err, err[-3000:]
    assert read_meta(str(tmp_path / "ck"))["step"] == 4


def interrupt_when(proc: subprocess.Popen, ready, what: str) -> tuple[int, str, str]:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once ``ready()``; the result."""
    import time

    try:
        deadline = time.monotonic() + 90
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready() and proc.poll() is None, f"{what} never happened"
        os.killpg(proc.pid, signal.SIGINT)
        return finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.timeout(120)
def test_ctrl_c_stops_one_process_with_a_checkpoint_it_resumes_from(tmp_path):
    """Ctrl-C (SIGINT) with --checkpoint: the step ends, the checkpoint is saved, the command
    says how to continue and exits with 130, as a shell reports an interrupted command."""
    args = ["--nproc", "1", "--stages", "2", "--num-samples", "600", "--no-progress", "--no-compare",
            "--checkpoint", "ck", *SMALL]
    proc = start([*SYNTHPIPE, "train", *args, "--epochs", "1000", "--checkpoint-every", "4"], str(tmp_path))
    code, out, err = interrupt_when(proc, (tmp_path / "ck" / "meta.json").exists, "the first periodic save")
    assert code == 128 + signal.SIGINT, (code, err[-3000:])
    assert "press Ctrl-C again to stop at once" in err and "Traceback" not in err, err[-3000:]
    step = read_meta(str(tmp_path / "ck"))["step"]  # saved where it stopped (said below), not at a periodic save
    assert f"stopped by SIGINT on rank 0 at step {step}; checkpoint saved to ck; continue with --resume ck" in err
    code, out, err = run([*SYNTHPIPE, "train", *args, "--resume", "ck", "--max-steps", str(step + 2)], str(tmp_path))
    assert code == 0, err[-3000:]
    assert read_meta(str(tmp_path / "ck"))["step"] == step + 2


_CTRL_C_AT_BATCH_3 = """
import os, signal, sys
from synthpipe.launch import train

make_loader = train.train_loader

class Interrupting:  # a terminal's Ctrl-C while the fit runs (the loader runs in a thread of its own)
    def __init__(self, loader):
        self.loader = loader
    def __len__(self):
        return len(self.loader)
    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 3:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

train.train_loader = lambda cfg, dataset: Interrupting(make_loader(cfg, dataset))
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_ctrl_c_without_a_checkpoint_stops_at_once_and_says_nothing_was_saved(tmp_path):
    code, out, err = run([sys.executable, "-c", _CTRL_C_AT_BATCH_3, "--stages", "2", "--num-samples", "600",
                          "--epochs", "1000", "--no-compare", "--no-progress", *SMALL], str(tmp_path))
    assert code == 128 + signal.SIGINT, (code, err[-3000:])
    assert re.search(r"interrupted at step \d+; nothing was saved \(no --checkpoint\)", err), err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_nproc_auto_is_one_process_per_stage_when_the_cores_hold_them():
    assert cli.auto_nproc(2, 1, cores=2) == 2
    assert cli.auto_nproc(3, 1, cores=2) == 1  # three ranks would share two cores: every stage in one process
    assert cli.auto_nproc(2, 2, cores=2) == 1  # 2 ranks x 2 threads on 2 cores
    assert cli.auto_nproc(1, 1, cores=8) == 1
    assert parse_train(["--nproc", "auto"]).nproc is None and parse_train(["--nproc", "3"]).nproc == 3
    with pytest.raises(SystemExit):
        parse_train(["--nproc", "many"])


def test_time_to_target_reads_the_first_evaluation_at_or_above_it():
    from synthpipe.launch.train import pipeline_curve, time_to_target

    history = types.SimpleNamespace(epochs=[
        {"epoch": 0, "steps": 62, "time": 10.0, "eval_accuracy": 0.70},
        {"epoch": 1, "steps": 62, "time": 9.0, "eval_accuracy": 0.81},
        {"epoch": 2, "steps": 62, "time": 9.5, "eval_accuracy": 0.80}])
    curve = pipeline_curve(history)  # training seconds add up over the epochs; evaluation is not in them
    assert [(p["epoch"], p["steps"], p["time"]) for p in curve] == [(1, 62, 10.0), (2, 124, 19.0), (3, 186, 28.5)]
    assert time_to_target(curve, 0.80)["epoch"] == 2
    assert time_to_target(curve, 0.82) is None


def test_synth_replay_reaches_every_stage_s_synthesizer_recipe():
    from synthpipe.launch.train import _build
    cfg = load_config(None, {"model": "paper_mlp", "data": "synthetic", "num_samples": 64, "gradients": "synthetic",
                             "synth_replay": 3, "n_stages": 2, "device": "cpu", "compare_backprop": False,
                             "progress": False})
    job = _build(cfg, world=1, rank=0)
    try:
        recipes = [stage.recipe for stage in job.trainer.runner.stages[:-1]]
        assert recipes and all(r.replay == 3 for r in recipes)
    finally:
        job.trainer.close()
