"""What a fit shows (engine/progress.py): a bar on a terminal, plain periodic lines elsewhere."""
from __future__ import annotations

import io

import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.engine.progress import LogLines, open_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_a_line_per_interval_not_a_redraw_per_update() -> None:
    out, clock = io.StringIO(), Clock()
    lines = LogLines(total=100, initial=0, description="synthpipe synthetic x3", stream=out, interval=30.0, clock=clock)
    for _ in range(100):
        clock.now += 1.0  # one step a second: 100 updates, a line every 30 s
        lines.update(1)
        lines.set_postfix({"loss": "0.5000"})
    lines.write("epoch 0: 100 steps")
    lines.close()
    text = out.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [
        "synthpipe synthetic x3: step 30/100 (30%), 30 s, loss=0.5000",
        "synthpipe synthetic x3: step 60/100 (60%), 60 s, loss=0.5000",
        "synthpipe synthetic x3: step 90/100 (90%), 90 s, loss=0.5000",
        "epoch 0: 100 steps",
        "synthpipe synthetic x3: step 100/100 (100%), 100 s, loss=0.5000",  # the end, once
    ]
    lines.close()
    assert len(out.getvalue().splitlines()) == 5  # nothing new since: no second final line


def test_open_bar_picks_lines_off_a_terminal_and_a_bar_on_one() -> None:
    assert isinstance(open_bar(10, 0, True, "x", stream=io.StringIO()), LogLines)
    bar = open_bar(10, 0, True, "x", stream=Terminal())
    assert not isinstance(bar, LogLines) and hasattr(bar, "set_postfix")
    bar.close()
    assert not isinstance(open_bar(10, 0, False, "x", stream=io.StringIO()), LogLines)  # disabled: silent bar


def test_a_fit_into_a_log_file_writes_plain_lines(capsys) -> None:
    torch.manual_seed(0)
    stages = sp.split(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), n_stages=2)
    trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), device="cpu", log_every=1)
    batches = [(torch.randn(4, 4), torch.randint(0, 3, (4,))) for _ in range(25)]
    trainer.fit(batches, epochs=1)
    err = capsys.readouterr().err  # (pytest's capture is not a terminal)
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2, lines  # the epoch line and the final progress line, not 25 redraws
    assert lines[0].startswith("epoch 0: 25 steps")
    assert lines[1].startswith("synthpipe synthetic x2: step 25/25 (100%)") and "loss=" in lines[1]


def test_synthpipe_train_s_backprop_baseline_writes_plain_lines_into_a_log(capsys) -> None:
    from synthpipe.launch import train
    from synthpipe.launch.config import JobConfig

    cfg = JobConfig(model="paper_mlp", num_samples=600, batch_size=64, progress=True)
    train_set, test_set = train.build_data(cfg)
    result = train.train_backprop(cfg, train_set, test_set, steps=12, device=torch.device("cpu"))
    assert result["steps"] == 12
    err = capsys.readouterr().err  # (not a terminal: no tqdm redraws)
    assert "\r" not in err
    assert err.splitlines() == [next(line for line in err.splitlines() if line.startswith("backprop x1: step 12/12"))]
