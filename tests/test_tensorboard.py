"""TensorBoard scalars (engine/tensorboard.py): written by a fit, read back from the event file."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.engine.tensorboard import tag_of

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard package is not installed (pip install 'synthpipe[tensorboard]')")


def make_trainer(**options) -> sp.Trainer:
    torch.manual_seed(0)
    stages = sp.split(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)),
                      balance=[2, 2, 1])
    return sp.Trainer(stages, nn.CrossEntropyLoss(), progress=False, device="cpu",
                      synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=3), delay=1, **options)


def batches(n: int) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def read(directory: str) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(directory)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_fit_writes_every_scalar_and_they_read_back(tmp_path) -> None:
    trainer = make_trainer(log_dir=str(tmp_path), log_every=2, clip_grad_norm=1.0)
    history = trainer.fit(batches(8), epochs=2, eval_loader=batches(2))
    trainer.close()
    scalars = read(str(tmp_path))
    expected = {"train/loss", "synthesizer/loss/boundary_0", "synthesizer/loss/boundary_1", "train/samples_per_s",
                "eval/loss", "eval/accuracy", "time/busy_fraction/rank_0", "time/wait_fraction/rank_0",
                *(f"train/{kind}/stage_{r}" for kind in ("lr", "grad_norm") for r in range(3))}
    assert expected <= set(scalars), sorted(set(scalars))
    losses = {s["step"]: s["loss"] for s in history.steps}
    assert [s for s, _ in scalars["train/loss"]] == list(range(0, 16, 2))  # every log_every-th step
    assert all(v == pytest.approx(losses[s]) for s, v in scalars["train/loss"])
    assert [v for _, v in scalars["train/lr/stage_1"]] == pytest.approx([1e-3] * 8)
    assert [s for s, _ in scalars["eval/accuracy"]] == [8, 16]
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([e["eval_loss"] for e in history.epochs])
    assert all(0.0 < v <= 1.0 for _, v in scalars["time/busy_fraction/rank_0"])
    assert all(v > 0 for _, v in scalars["train/grad_norm/stage_2"])


def test_without_tensorboard_log_dir_is_refused_by_name(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ImportError, match=r"log_dir writes TensorBoard scalars and needs the tensorboard package.*"
                                          r"synthpipe\[tensorboard\]"):
        make_trainer(log_dir=str(tmp_path))


def test_tags() -> None:
    assert tag_of("loss") == "train/loss" and tag_of("synth_loss/1") == "synthesizer/loss/boundary_1"
    assert tag_of("grad_norm/0") == "train/grad_norm/stage_0" and tag_of("time") is None


def fit_two_ranks(rank: int, log_dir: str) -> list[str]:
    trainer = make_two_stage_trainer(log_dir=log_dir, log_every=1)
    trainer.fit(batches(4), epochs=1)
    trainer.close()
    return sorted(read(trainer_dir(log_dir, rank)))


def make_two_stage_trainer(**options) -> sp.Trainer:
    torch.manual_seed(0)
    stages = sp.split(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), balance=[2, 1])
    return sp.Trainer(stages, nn.CrossEntropyLoss(), progress=False, device="cpu", delay=1,
                      synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=3), **options)


def trainer_dir(log_dir: str, rank: int) -> str:
    return f"{log_dir}/rank{rank}"


@pytest.mark.timeout(120)
def test_each_rank_writes_its_own_values_into_its_own_run(tmp_path) -> None:
    from multiprocess import run_ranks

    tags = run_ranks(fit_two_ranks, 2, str(tmp_path), timeout=90)
    assert set(tags[0]) >= {"train/samples_per_s", "synthesizer/loss/boundary_0", "train/lr/stage_0",
                            "train/grad_norm/stage_0", "time/busy_fraction/rank_0", "time/wait_fraction/rank_0"}
    assert "train/loss" not in tags[0]  # the loss is the last rank's
    assert set(tags[1]) >= {"train/loss", "train/lr/stage_1", "train/grad_norm/stage_1", "time/busy_fraction/rank_1"}
    assert not any(t.endswith("stage_0") or t.endswith("rank_0") for t in tags[1])
