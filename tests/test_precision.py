"""Mixed precision (stages/precision.py and its use by Stage and the step): bf16, fp16 with a scaler."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.engine.config import TrainConfig
from synthpipe.engine.sources import make_source
from synthpipe.engine.step import StageStep
from synthpipe.stages.precision import autocast_dtype, make_scaler, to_float32, user_autocast
from synthpipe.stages.stage import Stage, adam


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def make_batches(n: int = 5, batch: int = 32, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 5, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 12, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def fit_losses(precision: str, gradients: str = "synthetic", steps: int = 5,
               **options) -> tuple[list[float], sp.Trainer]:
    stages = sp.split(make_model(), balance=[2, 3])
    trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), optimizer=adam(1e-2), gradients=gradients,
                         synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=5),
                         precision=precision, delay=1, progress=False, device="cpu", **options)
    history = trainer.fit(make_batches(steps), epochs=1)
    return history.losses, trainer


@pytest.mark.parametrize("gradients", ["synthetic", "backprop"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_within_two_percent_of_fp32(precision: str, gradients: str) -> None:
    fp32, _ = fit_losses("fp32", gradients)
    low, trainer = fit_losses(precision, gradients)
    assert all(math.isfinite(v) for v in low)
    assert low[-1] < low[0]  # it trains (a user's autocast region would not: see below)
    assert abs(low[-1] - fp32[-1]) <= 0.02 * fp32[-1], (precision, low, fp32)
    assert low != fp32  # it did run in another precision
    for stage in trainer.local_stages:  # weights and optimizer state stay fp32
        assert all(p.dtype == torch.float32 for p in stage.module.parameters())
        assert (stage.scaler is not None) == (precision == "fp16")


def test_forward_runs_in_the_low_precision_and_the_synthesizer_in_fp32() -> None:
    stage = Stage(0, 2, nn.Linear(4, 6), adam(), synthesizer=sp.Synthesizer("linear"), precision="bf16")
    _, out = stage.forward((torch.randn(3, 4),))
    assert out[0].dtype == torch.bfloat16
    grads = stage.synthetic_gradient(out, None)
    assert stage.synth is not None and all(p.dtype == torch.float32 for p in stage.synth.parameters())
    assert grads[0].dtype == torch.float32
    loss = stage.train_synthesizer(out, None, (torch.randn(3, 6, dtype=torch.bfloat16),))
    assert math.isfinite(loss)
    asked = Stage(0, 2, nn.Linear(4, 6), adam(), synthesizer=sp.Synthesizer("linear"), precision="bf16",
                  synth_precision="bf16")
    _, out = asked.forward((torch.randn(3, 4),))
    with torch.no_grad(), asked._synth_autocast():
        pred = asked.ensure_synthesizer(to_float32(out))(to_float32(out), None)
    assert pred[0].dtype == torch.bfloat16  # asked for: the synthesizer's forward under bf16 autocast


class Links:
    def __init__(self) -> None:
        self.sent: list[tuple[int, tuple, bool]] = []

    def send_activation(self, step, outputs, y):
        pass

    def send_gradient(self, step, grads, skipped):
        self.sent.append((step, grads, skipped))

    def wait_gradient(self, step):
        raise AssertionError

    def wait_received(self, step):
        raise AssertionError

    def poll(self):
        pass


def last_stage_step(precision: str, seed: int = 0) -> tuple[StageStep, Links]:
    torch.manual_seed(seed)
    stage = Stage(1, 2, nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), adam(1e-2),
                  loss_fn=nn.CrossEntropyLoss(), precision=precision)
    links = Links()
    return StageStep(stage, TrainConfig(precision=precision), make_source(stage, TrainConfig()), links), links


def test_fp16_sends_the_input_gradient_unscaled() -> None:
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    step16, links16 = last_stage_step("fp16")
    step32, links32 = last_stage_step("fp32")
    assert step16.stage.scaler.get_scale() == 65536.0  # the backward ran 2**16 times larger
    step16.run(0, (x,), y)
    step32.run(0, (x,), y)
    (_, g16, skipped), (_, g32, _) = links16.sent[0], links32.sent[0]
    assert not skipped
    # what crosses to stage 0 (and what its synthesizer regresses) is the true gradient, not 2**16 times it
    torch.testing.assert_close(g16[0].float(), g32[0], rtol=2e-2, atol=1e-4)


def test_fp16_overflow_skips_the_step_tells_upstream_and_lowers_the_scale() -> None:
    step, links = last_stage_step("fp16")
    stage = step.stage
    stage.scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # the scaled fp16 backward must overflow
    before = [p.detach().clone() for p in stage.module.parameters()]
    loss = step.run(0, (torch.randn(8, 6),), torch.randint(0, 3, (8,)))
    assert loss is not None and math.isfinite(loss)  # (the loss itself was fine: no NonFiniteError)
    assert links.sent == [(0, (), True)]  # stage 0 is told the step was skipped: no inf target
    assert all(torch.equal(a, p) for a, p in zip(before, stage.module.parameters(), strict=False))
    assert stage.scaler.get_scale() == pytest.approx(0.5e38)


def test_fp16_scaler_state_is_checkpointed(tmp_path) -> None:
    _, trainer = fit_losses("fp16", steps=3)
    for s, scale in zip(trainer.local_stages, (128.0, 512.0), strict=False):
        s.scaler.update(scale)  # (as after overflows: not the initial 2**16)
    trainer.save(str(tmp_path))
    fresh = sp.Trainer(sp.split(make_model(), balance=[2, 3]), nn.CrossEntropyLoss(), precision="fp16",
                       synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=5), progress=False)
    fresh.load(str(tmp_path))
    assert [s.scaler.get_scale() for s in fresh.local_stages] == [128.0, 512.0]


def test_fit_inside_a_users_autocast_is_refused_with_the_reason() -> None:
    stages = sp.split(make_model(), balance=[2, 3])
    trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), progress=False, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert user_autocast(["cpu"]) == "cpu"
        with pytest.raises(RuntimeError, match="caches the first low-precision copy.*precision='bf16'"):
            trainer.fit(make_batches(2))
    assert user_autocast(["cpu"]) is None
    assert trainer.step == 0


def test_precision_names_are_checked() -> None:
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp32") is None
    assert make_scaler(torch.device("cpu"), "bf16") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="half")
    with pytest.raises(ValueError, match="synth_precision.*own"):
        TrainConfig(synth_precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        Stage(0, 1, nn.Linear(2, 2), adam(), loss_fn=nn.MSELoss(), precision="int8")


def fit_fp16(rank: int, steps: int) -> dict:
    trainer = two_stage_fp16_trainer()
    trainer.fit(make_batches(steps), epochs=1)
    state = trainer.state_dict()
    scales = [s.scaler.get_scale() for s in trainer.local_stages]
    trainer.close()
    return {"model": state, "scales": scales}


def two_stage_fp16_trainer() -> sp.Trainer:
    from torch.optim.lr_scheduler import LambdaLR

    trainer = sp.Trainer(sp.split(make_model(), balance=[2, 3]), nn.CrossEntropyLoss(), optimizer=adam(1e-2),
                         synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=5), precision="fp16",
                         clip_grad_norm=0.5, lr_scheduler=lambda opt: LambdaLR(opt, lambda t: 1.0 / (1 + t)),
                         delay=1, progress=False, device="cpu", gradients="backprop", warmup_steps=0)
    # a start scale so large that the first steps overflow: the skipped steps must cross ranks as in one process
    for stage in trainer.local_stages:
        stage.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    return trainer


@pytest.mark.timeout(120)
def test_fp16_on_two_ranks_computes_what_one_process_does() -> None:
    from multiprocess import run_ranks

    steps = 8
    results = run_ranks(fit_fp16, 2, steps, timeout=90)
    single = two_stage_fp16_trainer()
    single.fit(make_batches(steps), epochs=1)
    expected = single.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(results[0]["model"][key], value, rtol=0, atol=0)
    scales = [s.scaler.get_scale() for s in single.local_stages]
    assert [r["scales"][0] for r in results] == scales
    assert scales[1] < 2.0 ** 24  # the last stage overflowed (and its stage 0 skipped those steps)
    untrained = two_stage_fp16_trainer().state_dict().values()
    assert any(not torch.equal(value, before) for value, before in zip(expected.values(), untrained, strict=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_low_precision_trains_within_two_percent_of_fp32(precision: str) -> None:
    def losses(p: str) -> tuple[list[float], sp.Trainer]:
        stages = sp.split(make_model(), balance=[2, 3])
        trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), optimizer=adam(1e-2), precision=p, delay=1,
                             synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=5),
                             progress=False, device="cuda")
        return trainer.fit(make_batches(5), epochs=1).losses, trainer
    fp32, _ = losses("fp32")
    low, trainer = losses(precision)
    assert abs(low[-1] - fp32[-1]) <= 0.02 * fp32[-1], (low, fp32)
    if precision == "fp16":
        assert all(s.scaler is not None and s.scaler.get_scale() > 0 for s in trainer.local_stages)
