"""Training history (engine/history.py): merging the ranks' logs, JSON, and the training-curves plot."""
from __future__ import annotations

import json
import math

import pytest

from synthpipe.engine.history import History, _moving_average, merge_logs

NaN = float("nan")


def history(steps: int = 120, boundaries: int = 2, epochs: int = 3, synth: bool = True) -> History:
    rows = [{"step": i, "epoch": i * epochs // steps, "loss": 2.0 / (1 + i), "time": 0.01 * i,
             "synth_loss": [(1e-3 / (1 + i) if synth and (i + b) % 3 else NaN) for b in range(boundaries)]}
            for i in range(steps)]
    ends = [{"epoch": e, "steps": steps // epochs, "samples": 100, "time": 1.0, "samples_per_s": 100.0,
             "eval_loss": 1.0, "eval_accuracy": 0.3 + 0.1 * e} for e in range(epochs)]
    return History(steps=rows, epochs=ends)


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_merge_logs_puts_every_rank_s_values_in_one_row_per_step():
    rows = merge_logs([{0: {"epoch": 0, "time": 0.1, "synth_loss/0": 0.5}, 1: {"epoch": 0}},
                       {0: {"loss": 2.0}, 1: {"loss": 1.5, "synth_loss/1": 0.25}}], n_boundaries=2)
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["loss"] == 2.0 and rows[0]["synth_loss"][0] == 0.5 and math.isnan(rows[0]["synth_loss"][1])
    assert rows[1]["synth_loss"][1] == 0.25 and math.isnan(rows[1]["time"])


def test_json_writes_nan_as_null(tmp_path):
    h = history(steps=6, epochs=1)
    h.to_json(str(tmp_path / "h.json"))
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["steps"][0]["synth_loss"][0] is None and data["steps"][1]["synth_loss"][0] == pytest.approx(5e-4)


def test_moving_average():
    assert _moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]
    assert _moving_average([1.0, 2.0], 1) == [1.0, 2.0]


@pytest.mark.parametrize("kind", ["synthetic", "backprop", "no epochs", "empty"])
def test_the_training_curves_are_written_as_png(tmp_path, kind):
    h = {"synthetic": history(), "backprop": history(synth=False), "no epochs": history(epochs=1),
         "empty": History()}[kind]
    if kind == "no epochs":
        h.epochs = []
    path = tmp_path / "training.png"
    h.plot(str(path), title=kind, reference_accuracy=0.55)
    assert is_png(path) and path.stat().st_size > 5000
