"""LR schedules (engine/schedules.py, Trainer(lr_scheduler=...)), clipping, and the options check."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

import synthpipe as sp
from synthpipe.engine.schedules import lr_factor, named_schedule
from synthpipe.stages.stage import adam

BASE_LR = 1e-2


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))


def make_batches(n: int = 6, batch: int = 8, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g) * 3, torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


def drop_to_zero(step: int) -> float:
    return 1.0 if step < 3 else 0.0


def make_trainer(**options) -> sp.Trainer:
    options.setdefault("lr_scheduler", lambda opt: LambdaLR(opt, drop_to_zero))
    return sp.Trainer(sp.split(make_model(), balance=[2, 2, 1]), nn.CrossEntropyLoss(), optimizer=adam(BASE_LR),
                      synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=5), delay=1,
                      progress=False, device="cpu", **options)


def weights(trainer: sp.Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for s in trainer.local_stages for p in s.module.parameters()]


def test_a_schedule_that_drops_the_lr_to_zero_freezes_the_weights_exactly() -> None:
    trainer = make_trainer()
    batches = make_batches(6)
    seen = []
    for t in range(6):
        trainer.fit(batches, epochs=1, max_steps=t + 1)  # one more step per call
        seen.append(weights(trainer))
    assert trainer.step == 6
    assert any(not torch.equal(a, b) for a, b in zip(seen[0], seen[2], strict=False))  # steps 0..2 train
    for later in seen[3:]:  # steps 3.. run at lr 0: not a bit changes
        assert all(torch.equal(a, b) for a, b in zip(seen[2], later, strict=False))
    for stage in trainer.local_stages:  # every stage follows the schedule by step id
        assert stage.lr_scheduler.last_epoch == 6 and stage.lr == 0.0


def test_the_schedule_is_resumed_from_a_checkpoint_at_the_right_step(tmp_path) -> None:
    batches = make_batches(6)
    whole = make_trainer()
    whole.fit(batches, epochs=1)
    first = make_trainer()
    first.fit(batches, epochs=1, max_steps=2, checkpoint=str(tmp_path))
    resumed = make_trainer()
    resumed.load(str(tmp_path))
    for stage in resumed.local_stages:
        assert stage.lr_scheduler.last_epoch == 2 and stage.lr == BASE_LR  # the LR of step 2, not of step 0
    resumed.fit(batches, epochs=1)
    assert resumed.step == 6
    assert all(torch.equal(a, b) for a, b in zip(weights(whole), weights(resumed), strict=False))
    for stage in resumed.local_stages:
        assert stage.lr_scheduler.last_epoch == 6 and stage.lr == 0.0


def test_a_schedule_in_only_one_of_checkpoint_and_trainer_is_refused(tmp_path) -> None:
    plain = make_trainer(lr_scheduler=None)
    plain.fit(make_batches(2), epochs=1, checkpoint=str(tmp_path))
    scheduled = make_trainer()
    before = weights(scheduled)
    with pytest.raises(ValueError, match="stage 0's optimizer: this trainer has an lr_scheduler, but the checkpoint"):
        scheduled.load(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(before, weights(scheduled), strict=False))  # nothing was loaded
    make_trainer().fit(make_batches(2), epochs=1, checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="saved with an lr_scheduler, but this trainer has none"):
        make_trainer(lr_scheduler=None).load(str(tmp_path))


def test_the_schedule_steps_on_skipped_steps_too() -> None:
    trainer = make_trainer(nonfinite="skip")
    batches = make_batches(4)
    batches[1] = (torch.full_like(batches[1][0], math.nan), batches[1][1])
    trainer.fit(batches, epochs=1)
    for stage in trainer.local_stages:
        assert stage.lr_scheduler.last_epoch == 4


def test_the_synthesizers_get_their_own_schedule(tmp_path) -> None:
    trainer = make_trainer(lr_scheduler=None, synth_lr_scheduler=lambda opt: LambdaLR(opt, lambda t: 0.5 ** t))
    trainer.fit(make_batches(4), epochs=1, checkpoint=str(tmp_path))
    stage = trainer.local_stages[0]
    trained = stage.synth_lr_scheduler.last_epoch
    assert trained >= 2  # one step per regression step
    assert stage.synth_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** trained)
    resumed = make_trainer(lr_scheduler=None, synth_lr_scheduler=lambda opt: LambdaLR(opt, lambda t: 0.5 ** t))
    resumed.load(str(tmp_path))
    assert resumed.local_stages[0].synth_lr_scheduler.last_epoch == trained


def test_clipping_bounds_each_stages_gradient_norm() -> None:
    def norms(trainer: sp.Trainer) -> list[float]:
        return [float(torch.nn.utils.get_total_norm([p.grad for p in s.module.parameters()]))
                for s in trainer.local_stages]
    free = make_trainer(lr_scheduler=None, gradients="backprop")
    free.fit(make_batches(3), epochs=1)
    limit = 0.5 * min(norms(free))  # below what every stage's gradient had: clipping must act everywhere
    clipped = make_trainer(lr_scheduler=None, gradients="backprop", clip_grad_norm=limit)
    history = clipped.fit(make_batches(3), epochs=1)
    assert all(n <= limit * (1 + 1e-5) for n in norms(clipped))
    assert all(n == pytest.approx(limit, rel=1e-4) for n in norms(clipped))  # clipped to it, not zeroed
    assert all(math.isfinite(v) for v in history.losses)


def test_the_step_log_holds_each_stages_norm_and_lr_when_metrics_are_logged() -> None:
    trainer = make_trainer(lr_scheduler=None, clip_grad_norm=1e-3, gradients="backprop")
    for s in trainer.local_stages:
        s.log_metrics = True
    seen: list[tuple[int, str, float]] = []
    trainer.runner.log.sink = lambda step, key, value: seen.append((step, key, value))
    trainer.fit(make_batches(2), epochs=1)
    keys = {(step, key) for step, key, _ in seen}
    assert {(t, f"{kind}/{r}") for t in (0, 1) for kind in ("grad_norm", "lr") for r in range(3)} <= keys
    assert all(value > 1e-3 for _, key, value in seen if key.startswith("grad_norm"))  # the norm before clipping


def test_named_schedules() -> None:
    assert [round(lr_factor("linear", t, 10, 2), 3) for t in (0, 1, 2, 6, 10, 12)] == [0.333, 0.667, 1.0, 0.5, 0.0, 0.0]
    assert lr_factor("cosine", 2, 10, 2) == 1.0 and lr_factor("cosine", 6, 10, 2) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10, 2) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("constant", 9, 10, 0) == 1.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = named_schedule("linear", total_steps=4)(opt)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="must be one of constant, linear, cosine"):
        named_schedule("step", 10)
    with pytest.raises(ValueError, match="total_steps must be a whole number >= 1"):
        named_schedule("cosine", 0)


def test_unknown_trainer_options_are_refused_with_the_known_ones() -> None:
    with pytest.raises(TypeError, match=r"unknown Trainer option 'clip_grad' \(did you mean 'clip_grad_norm'\?\).*"
                                        r"known options are: .*lr_scheduler.*warmup_steps"):
        make_trainer(clip_grad=1.0)
    with pytest.raises(TypeError, match="must return a scheduler"):
        make_trainer(lr_scheduler=lambda opt: 0.5)
    with pytest.raises(ValueError, match="clip_grad_norm must be a positive"):
        make_trainer(clip_grad_norm=0.0)
