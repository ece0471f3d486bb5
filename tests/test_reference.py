"""The single-process reference trainer (engine/reference.py) through the public Trainer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe import data, models

from reference import assert_states_close, plain_backprop


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.BatchNorm1d(32),
                         nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


def make_batches(n: int = 12, batch: int = 32, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_backprop_mode_equals_plain_training_of_the_unsplit_model(n_stages):
    batches = make_batches()
    trainer = sp.Trainer(sp.split(make_model(), n_stages=n_stages), nn.CrossEntropyLoss(), adam,
                         gradients="backprop", progress=False)
    trainer.fit(batches)
    expected = plain_backprop(make_model(), batches, adam)
    assert_states_close(trainer.state_dict(), expected, atol=1e-6)
    assert not torch.equal(expected["0.weight"], make_model().state_dict()["0.weight"])


class TrueGradient(nn.Module):
    """A 'synthesizer' that returns the true per-example gradient dL/dh by running the rest of the model."""

    def __init__(self, downstream: list[nn.Module]):
        super().__init__()
        self.downstream = downstream  # plain list: not registered, so not trained as synthesizer

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            out = h
            for stage in self.downstream:
                out = stage(out)
            loss = nn.functional.cross_entropy(out, y)
            (grad,) = torch.autograd.grad(loss, h)
        return grad * h.shape[0]  # per-example normalisation, as every synthesizer


def test_synthetic_mode_with_a_true_gradient_synthesizer_equals_backprop():
    # BatchNorm's running statistics would see each downstream forward twice; leave it out here.
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    batches = make_batches()
    stages = sp.split(model(), n_stages=3)
    oracle = sp.Synthesizer(lambda boundary, example: TrueGradient(stages[boundary + 1:]))
    trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), adam, synthesizer=oracle, gradients="synthetic",
                         progress=False)
    trainer.fit(batches)
    assert_states_close(trainer.state_dict(), plain_backprop(model(), batches, adam), atol=1e-6)


def test_synthetic_mode_changes_every_stage_and_trains_the_synthesizers():
    batches = make_batches(n=20)
    trainer = sp.Trainer(sp.split(make_model(), n_stages=3), nn.CrossEntropyLoss(), adam,
                         synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=5), progress=False)
    history = trainer.fit(batches)
    before = make_model().state_dict()
    after = trainer.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in ("0.weight", "2.weight", "5.weight", "7.weight"))
    delay = 2  # the default target delay of a single process
    trained = [s for s in history.steps if not math.isnan(s["synth_loss"][0])]
    assert [s["step"] for s in trained] == list(range(delay, 20))
    assert len(trainer.runner.caches[0]) == delay  # the newest targets wait for the next fit


def test_warmup_steps_use_true_gradients():
    batches = make_batches(n=5)
    warm = sp.Trainer(sp.split(make_model(), n_stages=3), nn.CrossEntropyLoss(), adam,
                      synthesizer=sp.Synthesizer("linear"), warmup_steps=5, progress=False)
    warm.fit(batches)
    assert_states_close(warm.state_dict(), plain_backprop(make_model(), batches, adam), atol=1e-6)
    synth = warm.runner.stages[0].synth
    assert synth.parts[0].out.weight.abs().sum() > 0, "targets trained the synthesizer during warm-up"


def norm_model() -> nn.Sequential:
    """BatchNorm in both stages of a 2-way split: a NaN batch reaches every running statistic."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32),
                         nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 5))


def module_states(trainer: sp.Trainer) -> list[dict]:
    return [{k: v.clone() for k, v in s.module.state_dict().items()} for s in trainer.runner.stages]


def assert_unchanged(before: list[dict], after: list[dict]) -> None:
    for r, (b, a) in enumerate(zip(before, after, strict=True)):
        assert any("running_mean" in k for k in b), f"stage {r} has no BatchNorm"
        for k in b:
            assert torch.equal(a[k], b[k]), f"stage {r}: {k} changed in a step that was not taken"


@pytest.mark.parametrize("mode, message", [
    ("backprop", r"stage 1: the loss is not finite \(nan\) at step 2"),
    ("synthetic", r"stage 0: the synthetic gradient is not finite at step 2")])
def test_nonfinite_loss_raises_by_default_and_leaves_the_stages_as_they_were(mode, message):
    batches = make_batches(n=4)
    nan_batch = (torch.full_like(batches[2][0], float("nan")), batches[2][1])
    trainer = sp.Trainer(sp.split(norm_model(), balance=[3, 4]), nn.CrossEntropyLoss(), adam, gradients=mode,
                         synthesizer=sp.Synthesizer("linear"), delay=1, progress=False)
    trainer.fit(batches[:2])
    before = module_states(trainer)
    with pytest.raises(sp.NonFiniteError, match=message):
        trainer.fit([nan_batch], epochs=2)
    assert_unchanged(before, module_states(trainer))
    assert all(torch.isfinite(v).all() for v in trainer.state_dict().values())


@pytest.mark.parametrize("mode", ["backprop", "synthetic"])
def test_nonfinite_steps_can_be_skipped_without_touching_parameters_or_running_statistics(mode):
    batches = make_batches(n=4)
    nan_batch = (torch.full_like(batches[2][0], float("nan")), batches[2][1])
    skipping = sp.Trainer(sp.split(norm_model(), balance=[3, 4]), nn.CrossEntropyLoss(), adam, gradients=mode,
                          nonfinite="skip", delay=1, progress=False)
    skipping.fit(batches[:2])
    before = module_states(skipping)
    skipped = skipping.fit([nan_batch], epochs=2)
    assert [s["step"] for s in skipped.steps] == [2] and math.isnan(skipped.steps[0]["loss"])
    assert_unchanged(before, module_states(skipping))
    after = skipping.fit([batches[3]], epochs=3)
    assert [s["step"] for s in after.steps] == [3] and math.isfinite(after.steps[0]["loss"])
    assert all(torch.isfinite(v).all() for v in skipping.state_dict().values())
    if mode == "synthetic":
        synth = skipping.runner.stages[0].synth
        assert all(torch.isfinite(p).all() for p in synth.parameters())
    assert math.isfinite(skipping.evaluate(batches)["loss"])


def test_shape_a_stage_cannot_take_is_reported_with_stage_and_shapes():
    trainer = sp.Trainer(sp.split(make_model(), n_stages=2), nn.CrossEntropyLoss(), adam, progress=False)
    bad = [(torch.randn(8, 7), torch.randint(0, 5, (8,)))]
    with pytest.raises(sp.StageInputError, match=r"stage 0 failed on its input \(\(8, 7\):float32\)"):
        trainer.fit(bad)


def test_history_and_evaluate():
    batches = make_batches(n=6)
    trainer = sp.Trainer(sp.split(make_model(), n_stages=2), nn.CrossEntropyLoss(), adam, progress=False)
    history = trainer.fit(batches, epochs=2, eval_loader=batches[:2])
    assert [e["epoch"] for e in history.epochs] == [0, 1]
    assert [s["step"] for s in history.steps] == list(range(12))
    assert all(e["samples"] == 6 * 32 and e["samples_per_s"] > 0 for e in history.epochs)
    metrics = trainer.evaluate(batches[:2])
    assert metrics["samples"] == 64 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["loss"] == pytest.approx(history.epochs[-1]["eval_loss"])
    # A second fit continues the same run: epochs count from its start.
    with pytest.warns(RuntimeWarning, match="fit\\(epochs=2\\) trains nothing"):  # and says so
        assert trainer.fit(batches, epochs=2).steps == []
    assert [s["step"] for s in trainer.fit(batches, epochs=3).steps] == list(range(12, 18))


def test_evaluate_restores_each_layers_own_mode():
    model = make_model()
    model.eval()  # inference after training: evaluate must leave every layer in eval mode
    trainer = sp.Trainer(sp.split(model, n_stages=3), nn.CrossEntropyLoss(), adam, progress=False)
    trainer.evaluate(make_batches(n=1))
    assert not any(m.training for m in model.modules())
    model.train()
    model[4].eval()  # a frozen BatchNorm
    trainer.evaluate(make_batches(n=1))
    assert [m.training for m in model.modules()] == [True] * 5 + [False] + [True] * 3


def test_empty_loaders_warn_and_report_nan_not_zero():
    trainer = sp.Trainer(sp.split(make_model(), n_stages=2), nn.CrossEntropyLoss(), adam, progress=False)
    one_shot = (b for b in make_batches(n=3))
    with pytest.warns(RuntimeWarning, match="epoch 1: the training loader yielded no batches") as caught:
        history = trainer.fit(one_shot, epochs=3)
    assert caught[0].filename == __file__  # the user's line, not synthpipe's
    assert [(e["epoch"], e["steps"]) for e in history.epochs] == [(0, 3)] and trainer.epoch == 1
    with pytest.warns(RuntimeWarning, match="evaluate: the loader yielded no batches"):
        metrics = trainer.evaluate([])
    assert metrics["samples"] == 0 and math.isnan(metrics["loss"]) and math.isnan(metrics["accuracy"])


def test_a_fit_after_one_that_raised_reports_only_its_own_steps():
    trainer = sp.Trainer(sp.split(make_model(), n_stages=2), nn.CrossEntropyLoss(), adam, progress=False)
    batches = make_batches(n=4)
    with pytest.raises(sp.StageInputError):
        trainer.fit(batches[:2] + [(torch.randn(32, 7), batches[0][1])])
    assert trainer.step == 2
    history = trainer.fit(batches, epochs=2)
    assert [s["step"] for s in history.steps] == list(range(2, 8))


@pytest.mark.parametrize("option, value", [("delay", 1.5), ("delay", -1), ("log_every", 0), ("max_inflight", 0),
                                           ("warmup_steps", 2.0), ("prefetch", 0)])
def test_step_counts_must_be_whole_numbers(option, value):
    with pytest.raises(ValueError, match=f"{option} must be a whole number >= ., got {value!r}"):
        sp.Trainer(sp.split(make_model(), n_stages=2), nn.CrossEntropyLoss(), adam, **{option: value})


def test_bad_options_are_named():
    stages = sp.split(make_model(), n_stages=2)
    with pytest.raises(ValueError, match="gradients must be one of"):
        sp.Trainer(stages, nn.CrossEntropyLoss(), gradients="magic")
    with pytest.raises(RuntimeError, match="nccl backend needs CUDA"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        sp.Trainer(stages, nn.CrossEntropyLoss(), backend="nccl")
    trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), progress=False)
    with pytest.raises(ValueError, match=r"\(input, target\) batches"):
        trainer.fit([torch.randn(4, 12)])


def test_cdni_on_mnist1d_comes_within_three_points_of_backprop():
    """The DNI paper's MLP, 3 stages, cDNI with linear synthesizers vs backprop, same steps."""
    train, test = data.mnist1d(num_samples=5000)
    results = {}
    for mode in ("backprop", "synthetic"):
        torch.manual_seed(0)
        trainer = sp.Trainer(sp.split(models.paper_mlp(depth=3), n_stages=3), nn.CrossEntropyLoss(),
                             lambda p: torch.optim.Adam(p, lr=1e-3),
                             synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=10),
                             gradients=mode, progress=False)
        history = trainer.fit(data.loader(train, 64, shuffle=True), epochs=20)
        results[mode] = trainer.evaluate(data.loader(test, 500))["accuracy"]
        assert history.steps[-1]["step"] == 20 * 63 - 1
    assert results["synthetic"] > 0.5, f"cDNI reached only {results['synthetic']:.3f} (chance is 0.1)"
    assert results["synthetic"] >= results["backprop"] - 0.03, results


@pytest.mark.parametrize("value", ["5", True, 0, -1.0, float("nan"), float("inf")])
def test_stall_warning_must_be_a_positive_number_of_seconds_or_none(value):
    import re

    from synthpipe.engine.config import TrainConfig

    with pytest.raises(ValueError, match=r"stall_warning must be a positive, finite number of seconds \(or None\), "
                                         rf"got {re.escape(repr(value))}$"):
        TrainConfig(stall_warning=value)
    assert TrainConfig(stall_warning=None).stall_warning is None and TrainConfig(stall_warning=2).stall_warning == 2


def test_a_dict_batch_without_its_target_is_refused_with_the_form_to_use():
    trainer = sp.Trainer(sp.split(make_model(), n_stages=2), nn.CrossEntropyLoss(), adam, progress=False)
    x, y = make_batches(n=1)[0]
    with pytest.raises(ValueError, match=r"batch 0 is a dict \(keys \['x', 'labels'\]\): give keyword inputs as "
                                         r"\(dict_of_inputs, target\)"):
        trainer.fit([{"x": x, "labels": y}])
