"""The command line and TOML of precision, clipping, LR schedules and TensorBoard (launch/)."""
from __future__ import annotations

import argparse
import os
import sys

import pytest

from synthpipe.launch import train
from synthpipe.launch.config import add_train_arguments, load_config, overrides_from_args, overrides_to_argv

FLAGS = ["--precision", "bf16", "--clip-grad-norm", "0.5", "--lr-schedule", "cosine", "--lr-warmup-steps", "3",
         "--tensorboard", "runs/a"]


def parse(argv: list[str]) -> dict:
    return overrides_from_args(add_train_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_flags_and_toml_set_the_new_options(tmp_path) -> None:
    given = parse(FLAGS)
    assert given == {"precision": "bf16", "clip_grad_norm": 0.5, "lr_schedule": "cosine", "lr_warmup_steps": 3,
                     "log_dir": "runs/a"}  # (--tensorboard is the flag of the engine's log_dir)
    assert parse(overrides_to_argv(given)) == given  # (what synthpipe train --nproc hands to torchrun)
    path = tmp_path / "job.toml"
    path.write_text('precision = "fp16"\nclip_grad_norm = 1\nlr_schedule = "linear"\nlr_warmup_steps = 10\n')
    cfg = load_config(str(path), {"precision": "bf16"})
    assert (cfg.precision, cfg.clip_grad_norm, cfg.lr_schedule, cfg.lr_warmup_steps) == ("bf16", 1.0, "linear", 10)


@pytest.mark.parametrize("values, message", [
    ({"precision": "fp8"}, r"precision must be one of \('fp32', 'bf16', 'fp16'\), got 'fp8'"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of constant, linear, cosine"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps must be >= 0"),
    ({"clip_grad_norm": 0.0}, "clip_grad_norm must be a positive"),
])
def test_bad_values_are_refused_by_name(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, values)


def test_a_named_schedule_runs_to_zero_at_the_last_step() -> None:
    import torch

    assert train.lr_scheduler_for(load_config(None, {})) is None
    cfg = load_config(None, {"lr_schedule": "linear", "data": "synthetic", "num_samples": 200, "batch_size": 40,
                             "epochs": 2})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = train.lr_scheduler_for(cfg)(opt)
    lrs = []
    for _ in range(8):  # 160 training examples / 40 = 4 batches per epoch, 2 epochs
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    stepped = train.lr_scheduler_for(load_config(None, {"lr_schedule": "cosine", "max_steps": 4}))(opt)
    assert stepped.lr_lambdas[0](4) == pytest.approx(0.0)


def test_a_run_with_every_new_option_writes_tensorboard(tmp_path, capsys) -> None:
    pytest.importorskip("torch.utils.tensorboard", reason="the tensorboard package is not installed")
    runs = tmp_path / "runs"
    code = train.main(["--data", "synthetic", "--num-samples", "200", "--epochs", "1", "--stages", "2",
                       "--precision", "bf16", "--clip-grad-norm", "1", "--lr-schedule", "cosine",
                       "--lr-warmup-steps", "1", "--tensorboard", str(runs), "--no-compare", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(runs))


def test_tensorboard_without_the_package_is_refused_by_name(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code = train.main(["--data", "synthetic", "--num-samples", "50", "--tensorboard", str(tmp_path), "--no-compare"])
    assert code == 2
    assert "--tensorboard writes TensorBoard scalars and needs the tensorboard package" in capsys.readouterr().err
