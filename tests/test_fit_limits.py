"""Small things a new user meets first: fit's limits count the total; the package's submodules."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import synthpipe as sp


def make_trainer() -> sp.Trainer:
    torch.manual_seed(0)
    stages = sp.split(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), n_stages=2)
    return sp.Trainer(stages, nn.CrossEntropyLoss(), progress=False, device="cpu")


BATCHES = [(torch.randn(4, 4), torch.randint(0, 3, (4,))) for _ in range(3)]


def test_a_second_fit_with_the_same_epochs_warns_that_epochs_counts_the_total() -> None:
    trainer = make_trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first fit has work to do: no warning
        trainer.fit(BATCHES, epochs=1)
    with pytest.warns(RuntimeWarning, match=r"fit\(epochs=1\) trains nothing: this trainer has run 1 epoch "
                                            r"already, and epochs counts the epochs in total.*pass epochs=2") as got:
        history = trainer.fit(BATCHES, epochs=1)
    assert got[0].filename == __file__  # attributed to the user's line
    assert history.steps == [] and trainer.step == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.fit(BATCHES, epochs=2)  # as the warning says: one more epoch
    assert trainer.step == 6


def test_max_steps_reached_already_warns_too() -> None:
    trainer = make_trainer()
    trainer.fit(BATCHES, epochs=5, max_steps=2)
    with pytest.warns(RuntimeWarning, match=r"fit\(max_steps=2\) trains nothing.*pass max_steps=4"):
        trainer.fit(BATCHES, epochs=5, max_steps=2)
    assert trainer.step == 2


def test_the_documented_submodules_are_reachable_from_the_package() -> None:
    code = ("import sys, synthpipe as sp\n"
            "assert 'synthpipe.data' not in sys.modules and 'mnist1d' not in sys.modules  # loaded on use\n"
            "assert callable(sp.data.loader) and callable(sp.models.paper_mlp)\n"
            "assert sp.text.__name__ == 'synthpipe.text' and sp.engine.Trainer is sp.Trainer\n"
            "assert sp.stages.split is sp.split and 'data' in dir(sp)\n"
            "try:\n    sp.nothing\nexcept AttributeError as e:\n    assert 'nothing' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
