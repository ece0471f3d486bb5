"""Trainer drives any runner through the runner protocol (engine/runner.py) alone."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.engine.history import StepLog
from synthpipe.engine.metrics import NULL_TIMERS
from synthpipe.engine.step import LiveStats


class FakeRunner:
    """The smallest runner: no stages of its own, records every protocol call."""

    drives_data = True
    progress = 0
    timers = NULL_TIMERS

    def __init__(self) -> None:
        self.log = StepLog()
        self.calls: list[str] = []
        self.weight = torch.zeros(3)
        self.loaded: Any = None

    @property
    def stages(self) -> list:
        return []

    def train_step(self, step: int, x: Any, y: torch.Tensor) -> float:
        self.calls.append(f"train {step}")
        self.weight += 1
        self.log.put(step, "loss", float(step))
        return float(step)

    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        n = sum(int(y.shape[0]) for _, y in batches)
        self.calls.append("evaluate")
        return {"loss": 1.0, "accuracy": 0.5, "samples": n}

    def serve_fit(self) -> int:
        raise AssertionError("a runner that drives the data is never asked to serve")

    def serve_evaluation(self) -> dict[str, float]:
        raise AssertionError("a runner that drives the data is never asked to serve")

    def end_fit(self) -> None:
        self.calls.append("end_fit")

    def live_stats(self) -> LiveStats:
        return LiveStats(loss=1.0, loss_step=0.0, synth_losses=[2.0])

    def states(self) -> list[tuple[int, dict[str, Any]]]:
        self.calls.append("states")
        return [(0, {"stage": {"w": self.weight.clone()}, "cache": []}),
                (1, {"stage": {}, "cache": []})]

    def prepare_load(self, read: Callable[[int], dict[str, Any]],
                     explain: Callable[[int, Exception], Exception]) -> Any:
        self.calls.append("prepare_load")
        return [read(0), read(1)]

    def commit_load(self, prepared: Any) -> dict[str, Any]:
        self.calls.append("commit_load")
        self.weight = prepared[0]["stage"]["w"].clone()
        return prepared[0]

    def module_states(self) -> list[dict[str, torch.Tensor]]:
        return [{"0.weight": self.weight.clone()}, {"1.weight": torch.ones(1)}]

    def share(self, value: Any) -> Any:
        return value

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def barrier(self) -> None:
        self.calls.append("barrier")

    def close(self) -> None:
        self.calls.append("close")


def test_trainer_runs_fit_evaluate_save_load_and_export_on_a_fake_runner(tmp_path, monkeypatch):
    fake = FakeRunner()
    monkeypatch.setattr(sp.Trainer, "_make_runner", lambda self, *args: fake)
    trainer = sp.Trainer([nn.Identity(), nn.Identity()], nn.CrossEntropyLoss(), progress=False)
    batches = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    history = trainer.fit(batches, epochs=2, eval_loader=batches)
    assert [c for c in fake.calls if c.startswith("train")] == [f"train {i}" for i in range(6)]
    assert history.losses == [float(i) for i in range(6)] and history.final["eval_accuracy"] == 0.5
    assert trainer.evaluate(batches)["samples"] == 12
    trainer.save(str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["step"] == 6 and meta["n_stages"] == 2
    saved_weight = fake.weight.clone()
    trainer.fit(batches, epochs=3)  # trains on; the checkpoint keeps step 6
    assert not torch.equal(fake.weight, saved_weight)
    trainer.load(str(tmp_path))
    assert torch.equal(fake.weight, saved_weight) and trainer.step == 6 and trainer.epoch == 2
    trainer.export(str(tmp_path / "model.pt"))
    exported = torch.load(os.path.join(tmp_path, "model.pt"))
    assert set(exported) == {"0.weight", "1.weight"} and torch.equal(exported["0.weight"], saved_weight)
    assert "prepare_load" in fake.calls and "commit_load" in fake.calls
