"""The multi-process engine on CPU with gloo: one process per stage (engine/worker.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from multiprocess import run_ranks

pytestmark = pytest.mark.timeout(180)


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.BatchNorm1d(32),
                         nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


def make_batches(n: int = 8, batch: int = 16, last: int | None = None, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    sizes = [batch] * n
    if last is not None:
        sizes[-1] = last
    return [(torch.randn(b, 12, generator=g), torch.randint(0, 5, (b,), generator=g)) for b in sizes]


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def trainer_for(n_stages: int, **options) -> sp.Trainer:
    options.setdefault("progress", False)
    return sp.Trainer(sp.split(make_model(), n_stages=n_stages), loss_fn=nn.CrossEntropyLoss(),
                      optimizer=adam, **options)


def fit_and_state(rank: int, n_stages: int, batches: list, options: dict) -> dict:
    trainer = trainer_for(n_stages, **options)
    history = trainer.fit(batches, epochs=1)
    state = trainer.state_dict()
    synth = trainer.runner.stage.synth
    out = {"model": state, "history": history.steps,
           "synth": {k: v.clone() for k, v in synth.state_dict().items()} if synth is not None else None}
    trainer.close()
    return out


def plain_backprop(batches: list) -> dict:
    model = make_model()
    opt = adam(model.parameters())
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


def assert_states_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), f"{k} differs by {(a[k].float() - b[k].float()).abs().max()}"


@pytest.mark.parametrize("n_stages", [2, 3])
def test_backprop_mode_across_ranks_equals_single_process_backprop(n_stages):
    batches = make_batches()
    results = run_ranks(fit_and_state, n_stages, n_stages, batches, {"gradients": "backprop"})
    expected = plain_backprop(batches)
    for r in results:
        assert_states_close(r["model"], expected, atol=1e-5)
    changed = any(not torch.equal(expected[k], make_model().state_dict()[k]) for k in expected)
    assert changed, "training did not change the parameters"


def test_fixed_delay_synthetic_mode_equals_the_single_process_trainer():
    batches = make_batches(n=10)
    options = {"gradients": "synthetic", "delay": 2, "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=5),
               "synth_lr": 1e-2}
    results = run_ranks(fit_and_state, 3, 3, batches, options)
    reference = trainer_for(3, **options)
    history = reference.fit(batches)
    expected = reference.state_dict()
    for r in results:
        assert_states_close(r["model"], expected, atol=1e-6)
    for rank in range(2):
        synth = reference.runner.stages[rank].synth.state_dict()
        assert_states_close(results[rank]["synth"], synth, atol=1e-6)
        assert any(v.abs().sum() > 0 for k, v in synth.items() if "out" in k), "synthesizer never trained"
    assert [s["step"] for s in results[0]["history"]] == [s["step"] for s in history.steps]
    assert [s["loss"] for s in results[0]["history"]] == pytest.approx([s["loss"] for s in history.steps], abs=1e-5)


def test_variable_batch_size_and_free_running_synthetic_mode():
    batches = make_batches(n=9, last=5)
    options = {"gradients": "synthetic", "synthesizer": sp.Synthesizer("mlp", hidden=16, depth=1), "max_inflight": 2}
    results = run_ranks(fit_and_state, 3, 3, batches, options)
    steps = results[0]["history"]
    assert [s["step"] for s in steps] == list(range(9))
    assert all(s["loss"] == s["loss"] for s in steps), "every step has the last stage's loss"
    assert any(v == v for s in steps for v in s["synth_loss"]), "synthesizers were trained"
