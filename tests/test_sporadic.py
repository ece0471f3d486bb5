"""Sporadic updates (engine/sporadic.py, ``p_update``): exact draws, in one process and across ranks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.engine.config import TrainConfig
from synthpipe.engine.sporadic import drawn_steps, update_drawn

from multiprocess import run_ranks
from reference import assert_states_close, plain_backprop


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.BatchNorm1d(32),
                         nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


def make_batches(n: int = 16, batch: int = 16, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


SYNTH = {"gradients": "synthetic", "delay": 2, "synth_lr": 1e-2,
         "synthesizer": sp.Synthesizer("linear", conditional=True, num_classes=5)}


def trainer_for(n_stages: int, **options) -> sp.Trainer:
    options.setdefault("progress", False)
    return sp.Trainer(sp.split(make_model(), n_stages=n_stages), loss_fn=nn.CrossEntropyLoss(),
                      optimizer=adam, **options)


def test_the_draw_is_a_pure_function_of_seed_stage_and_step():
    draws = [update_drawn(0.3, 7, r, t) for r in range(3) for t in range(4000)]
    assert draws == [update_drawn(0.3, 7, r, t) for r in range(3) for t in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.02
    per_stage = [drawn_steps(0.3, 7, r, range(4000)) for r in range(3)]
    assert per_stage[0] != per_stage[1] != per_stage[2], "stages draw independently"
    assert drawn_steps(0.3, 8, 0, range(4000)) != per_stage[0], "the seed changes the draws"
    assert drawn_steps(1.0, 7, 0, range(50)) == list(range(50))


def test_p_update_one_equals_the_plain_run():
    batches = make_batches()
    trainer = trainer_for(3, gradients="backprop", p_update=1.0)
    trainer.fit(batches)
    assert_states_close(trainer.state_dict(), plain_backprop(make_model(), batches, adam), atol=1e-6)
    plain, explicit = trainer_for(3, **SYNTH), trainer_for(3, p_update=1, **SYNTH)
    plain.fit(batches)
    explicit.fit(batches)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, explicit.state_dict()[k]), k


def record_updates(trainer: sp.Trainer) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Per stage: the steps its parameters changed at, its optimizer stepped at, its synthesizer trained at."""
    runner = trainer.runner
    changed: list[list[int]] = [[] for _ in runner.stages]
    stepped: list[list[int]] = [[] for _ in runner.stages]
    synth: list[list[int]] = [[] for _ in runner.stages]
    inner = runner.train_step
    now = [-1]

    def train_step(step, x, y):
        now[0] = step
        before = [[p.detach().clone() for p in s.module.parameters()] for s in runner.stages]
        out = inner(step, x, y)
        for r, s in enumerate(runner.stages):
            if any(not torch.equal(a, p) for a, p in zip(before[r], s.module.parameters(), strict=True)):
                changed[r].append(step)
        return out
    runner.train_step = train_step
    for r, s in enumerate(runner.stages):
        def train_synthesizer(h, y, target, _r=r, _inner=s.train_synthesizer):
            synth[_r].append(now[0])
            return _inner(h, y, target)
        s.train_synthesizer = train_synthesizer

        def step(skip=False, _r=r, _inner=s.step):
            if not skip:
                stepped[_r].append(now[0])
            return _inner(skip=skip)
        s.step = step
    return changed, stepped, synth


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_each_stage_updates_exactly_at_the_steps_its_draw_selects(p):
    n = 24
    trainer = trainer_for(3, p_update=p, p_update_seed=3, **SYNTH)
    changed, stepped, synth = record_updates(trainer)
    history = trainer.fit(make_batches(n))
    for r in range(3):
        assert stepped[r] == drawn_steps(p, 3, r, range(n)), f"stage {r}"
        # nothing changes at a skipped step (a zero-initialised synthesizer may also give no change at first)
        assert set(changed[r]) <= set(stepped[r]), f"stage {r}"
    assert changed[2] == stepped[2], "the last stage changes at every step it backpropagates its loss"
    assert 0 < len(stepped[0]) < n
    # M_r trains at step t on step t - 2's target, which exists only where stage r + 1 backpropagated
    for r in range(2):
        assert synth[r] == [t for t in range(2, n) if update_drawn(p, 3, r + 1, t - 2)], f"synthesizer {r}"
    assert [s["step"] for s in history.steps] == list(range(n))
    assert all(math.isfinite(s["loss"]) for s in history.steps), "the last stage reports every forward's loss"
    assert all(src.in_flight() <= 2 for src in trainer.runner.sources[:-1]), "skipped targets are let go"


def test_backprop_with_sporadic_updates_skips_every_stage_below_a_skipped_one():
    n = 16
    trainer = trainer_for(3, gradients="backprop", p_update=0.5, p_update_seed=1)
    changed, stepped, _ = record_updates(trainer)
    trainer.fit(make_batches(n))
    for r in range(3):  # a locked stage gets no gradient when a stage above it skipped
        expected = [t for t in range(n) if all(update_drawn(0.5, 1, q, t) for q in range(r, 3))]
        assert stepped[r] == expected and changed[r] == expected, f"stage {r}"
    assert 0 < len(stepped[0]) < len(stepped[2]) < n


def test_two_runs_with_the_same_seed_are_identical_and_another_seed_differs():
    batches = make_batches()
    states = []
    for seed in (5, 5, 6):
        trainer = trainer_for(3, p_update=0.3, p_update_seed=seed, **SYNTH)
        trainer.fit(batches)
        states.append(trainer.state_dict())
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert any(not torch.equal(v, states[2][k]) for k, v in states[0].items())


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_p_update_must_be_a_probability(value):
    with pytest.raises(ValueError, match="p_update must be a probability"):
        TrainConfig(p_update=value)


@pytest.mark.parametrize("gradients", ["delayed", "local", "interlocking"])
def test_p_update_is_refused_by_name_where_a_source_runs_its_own_updates(gradients):
    with pytest.raises(ValueError, match=rf"p_update=0.5 cannot apply to gradients='{gradients}'"):
        TrainConfig(gradients=gradients, p_update=0.5)
    TrainConfig(gradients=gradients, p_update=1.0)  # (the plain run is every source's)


def fit_and_state(rank: int, batches: list, options: dict) -> dict:
    trainer = trainer_for(2, **options)
    history = trainer.fit(batches, epochs=1)
    synth = trainer.runner.stage.synth
    out = {"model": trainer.state_dict(), "history": history.steps,
           "synth": {k: v.clone() for k, v in synth.state_dict().items()} if synth is not None else None}
    trainer.close()
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("gradients", ["synthetic", "backprop"])
def test_two_ranks_with_sporadic_updates_equal_the_single_process_trainer(gradients):
    batches = make_batches(n=14)
    options = {**SYNTH, "gradients": gradients, "p_update": 0.5, "p_update_seed": 2}
    if gradients == "backprop":
        options = {"gradients": "backprop", "p_update": 0.5, "p_update_seed": 2}
    results = run_ranks(fit_and_state, 2, batches, options, timeout=120)
    reference = trainer_for(2, **options)
    history = reference.fit(batches)
    expected = reference.state_dict()
    for r in results:
        assert_states_close(r["model"], expected, atol=1e-6)
    if gradients == "synthetic":
        assert_states_close(results[0]["synth"], reference.runner.stages[0].synth.state_dict(), atol=1e-6)
    assert [s["loss"] for s in results[0]["history"]] == pytest.approx([s["loss"] for s in history.steps], abs=1e-5)
    assert drawn_steps(0.5, 2, 0, range(14)) != list(range(14)), "some steps were skipped"
