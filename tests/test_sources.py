"""The gradient sources delayed, corrected, local and interlocking (engine/sources), in one process and across ranks."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.engine.config import TrainConfig
from synthpipe.engine.sources import SOURCES, make_source
from synthpipe.engine.sources.delayed import DEFAULT_PREDICT_AHEAD
from synthpipe.engine.step import StageStep
from synthpipe.stages.stage import NonFiniteError, Stage

from multiprocess import run_ranks
from reference import assert_states_close, plain_backprop

pytestmark = pytest.mark.timeout(240)

HEAD = sp.AuxHead("linear", num_classes=5)


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Dropout(dropout), nn.Linear(24, 24), nn.Tanh(),
                         nn.BatchNorm1d(24), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5))


def make_batches(n: int = 8, batch: int = 16, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g), torch.randint(0, 5, (batch,), generator=g)) for _ in range(n)]


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def trainer_for(n_stages: int, gradients: str, model: nn.Module | None = None, optimizer=adam, **options) -> sp.Trainer:
    options.setdefault("progress", False)
    if gradients in ("local", "interlocking"):
        options.setdefault("aux_head", HEAD)
    return sp.Trainer(sp.split(model if model is not None else make_model(), n_stages=n_stages),
                      nn.CrossEntropyLoss(), optimizer, gradients=gradients, **options)


def everything(t: sp.Trainer) -> dict:
    """Modules, optimizer states and the sources' own tensors (heads, stashed gradients) of this process."""
    out = {}
    for s, (stage, state) in zip(t.local_stages, t.runner.states(), strict=False):
        out.update({f"{stage}/module/{k}": v.clone() for k, v in s.module.state_dict().items()})
        for i, st in enumerate(s.optimizer.state_dict()["state"].values()):
            out.update({f"{stage}/opt/{i}/{k}": torch.as_tensor(v).clone() for k, v in st.items()})
        out.update({f"{stage}/source{k}": v for k, v in _tensors(state["cache"]).items()})
    return out


def _tensors(x: Any, prefix: str = "") -> dict:
    if torch.is_tensor(x):
        return {prefix: x.detach().clone()}
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


# -- delayed ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gradients", ["delayed", "corrected"])
@pytest.mark.parametrize("n_stages", [2, 3])
def test_delayed_with_no_staleness_equals_backprop_exactly(n_stages, gradients):
    batches = make_batches()
    delayed = trainer_for(n_stages, gradients, delay=0)
    delayed.fit(batches)
    backprop = trainer_for(n_stages, "backprop")
    backprop.fit(batches)
    a, b = delayed.state_dict(), backprop.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "delay=0 must be backprop, bit for bit"
    assert_states_close(a, plain_backprop(make_model(), batches, adam), atol=1e-6)
    assert [s.versions() for s in delayed.runner.sources[:-1]] == [0] * (n_stages - 1)


def last_stage_sgd_step(last: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The last stage's step by hand: backprop its loss on ``h``, SGD at 0.1; returns dL/dh."""
    hd = h.detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(last(hd), y)
    last.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in last.parameters():
            p -= 0.1 * p.grad
    assert hd.grad is not None
    return hd.grad


def test_delayed_applies_the_gradient_of_its_own_earlier_step_through_the_weights_that_step_used():
    """Two stages, SGD, delay 1, written out by hand: stage 0 steps at t on step t-1's gradient,
    backpropagated through the weights of step t-1's forward (not the current ones)."""
    torch.manual_seed(0)
    f0, f1 = nn.Linear(12, 8), nn.Sequential(nn.Tanh(), nn.Linear(8, 5))
    batches = make_batches(n=6)
    trainer = sp.Trainer([copy.deepcopy(f0), copy.deepcopy(f1)], nn.CrossEntropyLoss(), sgd, gradients="delayed",
                         progress=False)
    trainer.fit(batches)
    w0, w1 = copy.deepcopy(f0), copy.deepcopy(f1)
    pending = None  # (x, weights of its forward, dL/dh) of the step stage 0 applies next
    for x, y in batches:
        h = w0(x)  # stage 0's forward, its current weights
        stashed = copy.deepcopy(w0)
        grad = last_stage_sgd_step(w1, h, y)
        if pending is not None:  # stage 0: the gradient of the step before, through that step's weights
            px, pw, pg = pending
            pw.zero_grad()
            pw(px).backward(pg)
            with torch.no_grad():
                for p, q in zip(w0.parameters(), pw.parameters(), strict=False):
                    p -= 0.1 * q.grad
        pending = (x, stashed, grad)
    for stage, expected in zip(trainer.runner.stages, (w0, w1), strict=False):
        assert_states_close(stage.module.state_dict(), expected.state_dict(), atol=1e-6)


def gpt_and_batches(n: int = 6) -> tuple[nn.Sequential, list]:
    """A tiny char_gpt (embedding, 2 blocks with LayerNorm and attention, head) and byte batches."""
    from synthpipe.models import char_gpt
    g = torch.Generator().manual_seed(3)
    batches = [(x, torch.roll(x, -1, dims=1)) for x in torch.randint(0, 64, (n, 4, 12), generator=g)]
    torch.manual_seed(0)
    return char_gpt(vocab_size=64, dim=16, n_layers=2, heads=2, max_len=12), batches


def test_delayed_on_a_transformer_with_no_staleness_is_backprop_bit_for_bit():
    """Embeddings (a positional table indexed in forward), LayerNorm and attention all run
    through the stashed weights: delay=0 must leave exactly backprop's weights."""
    from synthpipe.models import lm_loss
    model, batches = gpt_and_batches()
    states = []
    for gradients, options in (("delayed", {"delay": 0}), ("backprop", {})):
        t = sp.Trainer(sp.split(copy.deepcopy(model), n_stages=2), lm_loss, adam, gradients=gradients,
                       progress=False, **options)
        t.fit(batches)
        states.append(t.state_dict())
    a, b = states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_delayed_on_a_transformer_matches_one_step_stale_adam_by_hand():
    """Two stages of char_gpt, Adam, delay 1: stage 0 steps at t on step t-1's output gradient,
    backpropagated through a copy of the weights step t-1's forward ran with."""
    from synthpipe.models import lm_loss
    model, batches = gpt_and_batches()
    trainer = sp.Trainer(sp.split(copy.deepcopy(model), n_stages=2), lm_loss, adam, gradients="delayed",
                         progress=False)
    trainer.fit(batches)
    s0, s1 = sp.split(copy.deepcopy(model), n_stages=2)
    o0, o1 = adam(s0.parameters()), adam(s1.parameters())
    pending = None
    for x, y in batches:
        stash = copy.deepcopy(s0)
        h = stash(x)
        hd = h.detach().requires_grad_(True)
        o1.zero_grad()
        lm_loss(s1(hd), y).backward()
        o1.step()
        if pending is not None:
            ph, pw, pg = pending
            ph.backward(pg)
            for p, q in zip(s0.parameters(), pw.parameters(), strict=True):
                p.grad = q.grad
            o0.step()
        pending = (h, stash, hd.grad)
    for stage, expected in zip(trainer.runner.stages, (s0, s1), strict=True):
        a, b = stage.module.state_dict(), expected.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{stage.name} differs from the hand-written 1-step stale Adam"
    initial = sp.split(copy.deepcopy(model), n_stages=2)[0]
    assert not any(torch.equal(p, q) for p, q in zip(s0.parameters(), initial.parameters(), strict=True))


@pytest.mark.parametrize("gradients", ["delayed", "corrected"])
@pytest.mark.parametrize("n_stages,delay", [(3, 1), (3, 2), (4, 1)])
def test_delayed_weight_versions_are_bounded_and_counted(n_stages, delay, gradients):
    model = nn.Sequential(*[nn.Sequential(nn.Linear(12, 12), nn.Tanh()) for _ in range(n_stages - 1)],
                          nn.Linear(12, 5))
    trainer = trainer_for(n_stages, gradients, model=model, delay=delay, max_inflight=(n_stages - 1) * delay + 1)
    sources = trainer.runner.sources
    peaks: list[list[int]] = [[] for _ in sources]
    stashes: list[set[int]] = [set() for _ in sources]  # the weight tensors each forward ran on
    for r, src in enumerate(sources):
        original = src.update
        stash = src.forward_parameters

        def forward_parameters(step, src=src, stash=stash, r=r):
            params = stash(step)
            stashes[r].add(next(iter(params.values())).data_ptr())
            return params
        src.forward_parameters = forward_parameters

        def update(runner, begun, downstream, src=src, original=original, r=r):
            peaks[r].append(src.versions())  # after the forward of this step, before its update
            original(runner, begun, downstream)
        src.update = update
    trainer.fit(make_batches(n=10))
    for r in range(n_stages - 1):
        lag = (n_stages - 1 - r) * delay
        assert max(peaks[r]) == lag + 1 == sources[r].most_versions  # one version per step in flight, never more
        assert peaks[r][:lag + 1] == list(range(1, lag + 2))
        assert sources[r].in_flight() == lag and sources[r].versions() == 0  # drained: gradients, no weights
        # a version whose backward is done is refilled by a later stash, never allocated anew
        assert len(stashes[r]) == lag + 1 == sources[r].held_versions()
        if gradients == "corrected":  # the (h, y) awaiting their true gradient: one per step in flight
            assert len(sources[r].cache) == lag and sources[r].applied == {}


def test_delayed_refuses_too_small_a_max_inflight_and_other_options_by_name():
    with pytest.raises(ValueError, match=r"3 stages and delay=2 keeps up to 5 weight versions.*max_inflight=4"):
        trainer_for(3, "delayed", delay=2)
    with pytest.raises(ValueError, match="warmup_steps=3 has no meaning for gradients='delayed'"):
        trainer_for(2, "delayed", warmup_steps=3)
    with pytest.raises(ValueError, match=r"staleness='lr' is not a correction of gradients='synthetic'"):
        trainer_for(2, "synthetic", staleness="lr")
    with pytest.raises(ValueError, match=r"staleness='nesterov' is not a correction of gradients='delayed' "
                                         r"\(its corrections: 'lr', 'predict'\)"):
        TrainConfig(gradients="delayed", staleness="nesterov")


def test_delayed_staleness_lr_scales_each_stages_step_by_its_staleness():
    """With SGD a step scaled by 1/(1+lag) is the unscaled run with lr/(1+lag) on that stage."""
    batches = make_batches(n=6)
    scaled = trainer_for(3, "delayed", optimizer=sgd, staleness="lr")
    scaled.fit(batches)
    assert [g["lr"] for s in scaled.runner.stages for g in s.optimizer.param_groups] == [0.1] * 3  # restored
    by_hand = trainer_for(3, "delayed", optimizer=sgd)
    for r, s in enumerate(by_hand.runner.stages):
        for g in s.optimizer.param_groups:
            g["lr"] = 0.1 / (1 + (2 - r))
    by_hand.fit(batches)
    assert_states_close(scaled.state_dict(), by_hand.state_dict(), atol=1e-6)
    plain = trainer_for(3, "delayed", optimizer=sgd)
    plain.fit(batches)
    assert not torch.allclose(plain.state_dict()["0.weight"], scaled.state_dict()["0.weight"])


@pytest.mark.parametrize("n_stages,predict_ahead,updates_ahead", [
    (2, 1.0, 1.0),  # SpecTrain: lag 1, where the weights will be when the gradient lands
    (2, None, DEFAULT_PREDICT_AHEAD),  # the default look-ahead: 3 x lag
    (3, 1.5, 3.0),  # stage 0 of 3: lag 2
])
def test_delayed_predict_runs_the_forward_on_weights_extrapolated_along_the_last_update(
        n_stages, predict_ahead, updates_ahead):
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5))
    trainer = trainer_for(n_stages, "delayed", model=model, optimizer=sgd, staleness="predict",
                          predict_ahead=predict_ahead)
    batches = make_batches(n=5)
    trainer.fit(batches[:4])
    source, stage = trainer.runner.sources[0], trainer.runner.stages[0]
    assert source.ahead == updates_ahead
    name, weight = next(iter(stage.module.named_parameters()))
    velocity = source.velocity[name].clone()
    assert velocity.abs().sum() > 0
    params = source.forward_parameters(99)
    assert torch.allclose(params[name], weight.detach() + updates_ahead * velocity, atol=1e-6)
    assert not torch.allclose(params[name], weight.detach() + (updates_ahead + 1) * velocity, atol=1e-6)


def test_predict_ahead_is_refused_without_predict_and_when_not_a_positive_number():
    with pytest.raises(ValueError, match=r"predict_ahead=2 sets how far staleness='predict' looks ahead, "
                                         r"but staleness='lr'"):
        TrainConfig(gradients="delayed", staleness="lr", predict_ahead=2)
    with pytest.raises(ValueError, match=r"predict_ahead=1.0 .* but staleness=None"):
        TrainConfig(gradients="delayed", predict_ahead=1.0)
    for bad in (0, -1.0, float("inf"), float("nan"), True, "3"):
        with pytest.raises(ValueError, match="predict_ahead must be a positive, finite number"):
            TrainConfig(gradients="delayed", staleness="predict", predict_ahead=bad)


def test_a_nonfinite_delayed_gradient_is_named_and_skip_leaves_the_stage_untouched():
    trainer = trainer_for(2, "delayed", nonfinite="skip")
    batches = make_batches(n=3)
    trainer.fit(batches[:1])
    source = trainer.runner.sources[0]
    flight = next(iter(source.flights.values()))
    flight.param_grads = None  # as if step 0's gradient had come back NaN (not yet backpropagated)
    module = trainer.runner.stages[0].module
    flight.params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
    flight.grads, flight.outputs = (torch.full((16, 24), float("nan")),), (torch.zeros(16, 24),)
    before = trainer.state_dict()["0.weight"].clone()
    trainer.fit(batches[1:2], epochs=2)
    assert torch.equal(trainer.state_dict()["0.weight"], before)  # step 0's update was skipped
    raising = trainer_for(2, "delayed")
    raising.fit(batches[:1])
    flight = next(iter(raising.runner.sources[0].flights.values()))
    flight.param_grads, flight.params = None, {}
    flight.grads, flight.outputs = (torch.full((16, 24), float("nan")),), (torch.zeros(16, 24),)
    with pytest.raises(NonFiniteError, match="stage 0: the delayed gradient is not finite at step 0"):
        raising.fit(batches[1:2], epochs=2)


# -- corrected --------------------------------------------------------------------------------

def test_corrected_with_a_zero_synthetic_gradient_is_delayed_bit_for_bit():
    """A synthesizer that predicts nothing leaves only the correction: the true gradient, delayed.
    (SGD: Adam would count the first ``lag`` zero-gradient steps, which ``delayed`` does not take.)"""
    batches = make_batches(n=10)
    corrected = trainer_for(3, "corrected", optimizer=sgd, synthetic_scale=0.0)
    corrected.fit(batches)
    delayed = trainer_for(3, "delayed", optimizer=sgd)
    delayed.fit(batches)
    a, b = corrected.state_dict(), delayed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    synth = corrected.runner.stages[0].synth
    assert synth is not None and any(p.abs().sum() > 0 for p in synth.parameters()), "M_0 trained on the way"


def test_corrected_steps_on_the_prediction_now_and_on_its_error_when_the_true_gradient_arrives():
    """Two stages, SGD, delay 1, written out by hand: stage 0's update at step t is
    J_t^T s_t + J_{t-1}^T (g_{t-1} - s_{t-1}), each J through the weights of that step's forward,
    and its synthesizer regresses at step t on the true gradient of step t - 1."""
    torch.manual_seed(0)
    f0, f1 = nn.Linear(12, 8), nn.Sequential(nn.Tanh(), nn.Linear(8, 5))
    batches = make_batches(n=6)
    g = torch.Generator().manual_seed(5)
    predictions = [torch.randn(16, 8, generator=g) * 0.01 for _ in batches]  # s_t, one per step
    trainer = sp.Trainer([copy.deepcopy(f0), copy.deepcopy(f1)], nn.CrossEntropyLoss(), sgd, gradients="corrected",
                         progress=False)
    stage0 = trainer.runner.stages[0]
    asked: list[int] = []
    regressed: list[torch.Tensor] = []
    stage0.synthetic_gradient = lambda outputs, y: (predictions[len(asked)], asked.append(0))[:1]  # type: ignore
    stage0.train_synthesizer = lambda h, y, target: (regressed.append(target[0].clone()), 0.0)[1]  # type: ignore
    trainer.fit(batches)
    w0, w1 = copy.deepcopy(f0), copy.deepcopy(f1)
    pending = None  # (x, weights of its forward, s, dL/dh) of the step whose correction comes next
    true_grads = []
    for (x, y), s in zip(batches, predictions, strict=True):
        stashed = copy.deepcopy(w0)
        h = stashed(x)
        grad = last_stage_sgd_step(w1, h, y)
        stashed.zero_grad()
        h.backward(s)
        update = [p.grad.clone() for p in stashed.parameters()]
        if pending is not None:
            px, pw, ps, pg = pending
            pw.zero_grad()
            pw(px).backward(pg - ps)
            update = [u + q.grad for u, q in zip(update, pw.parameters(), strict=True)]
        with torch.no_grad():
            for p, u in zip(w0.parameters(), update, strict=True):
                p -= 0.1 * u
        pending = (x, stashed, s, grad)
        true_grads.append(grad)
    for stage, expected in zip(trainer.runner.stages, (w0, w1), strict=False):
        assert_states_close(stage.module.state_dict(), expected.state_dict(), atol=1e-6)
    assert len(asked) == len(batches)
    assert len(regressed) == len(batches) - 1  # the last step's target trains M_0 at the next step
    for got, want in zip(regressed, true_grads, strict=False):
        assert torch.allclose(got, want, atol=1e-7)


def test_corrected_sends_the_true_input_gradient_upstream():
    """Stage 1 of 3 steps on its synthetic gradient, yet what reaches stage 0 is J^T g, the
    two backward passes through the same kept graph adding up: stage 0's targets are true."""
    batches = make_batches(n=6)
    corrected = trainer_for(3, "corrected")
    stage1 = corrected.runner.stages[1]
    sent: list[tuple[int, torch.Tensor]] = []
    original = corrected.runner.sources[0].received

    def received(step, grads, skipped):
        sent.append((step, grads[0].clone()))
        original(step, grads, skipped)
    corrected.runner.sources[0].received = received
    kept: dict[int, tuple] = {}
    source1 = corrected.runner.sources[1]
    backward = source1._backward

    def spy(runner, flight):
        # recompute, on a copy of the stashed weights, J^T g for the true g before the source subtracts s
        params = {n: t.detach().clone().requires_grad_(True) for n, t in flight.params.items()}
        x = flight.inputs[0].detach().clone().requires_grad_(True)
        out = torch.func.functional_call(stage1.module, params, (x,))
        (want,) = torch.autograd.grad(out, x, flight.grads[0])
        kept[flight.step] = want
        backward(runner, flight)
    source1._backward = spy
    corrected.fit(batches)
    assert [s for s, _ in sent] == list(range(len(batches)))
    assert source1.applied == {} and len(kept) == len(batches)
    for step, got in sent:
        assert torch.allclose(got, kept[step], atol=1e-6), f"step {step}"
    assert any(p.abs().sum() > 0 for p in stage1.synth.parameters()), "stage 1 stepped on a real prediction"


def test_a_nonfinite_synthetic_gradient_under_corrected_is_named_or_skipped_alone():
    """``raise`` names the stage and step and leaves the stage as before the step; ``skip``
    drops that step's synthetic part only: the run equals one whose prediction there was zero."""
    batches = make_batches(n=5)

    def run(nonfinite: str, bad: torch.Tensor) -> sp.Trainer:
        trainer = trainer_for(2, "corrected", optimizer=sgd, nonfinite=nonfinite)
        stage0 = trainer.runner.stages[0]
        honest = stage0.synthetic_gradient
        calls: list[int] = []

        def synthetic_gradient(outputs, y):
            calls.append(0)
            return (bad.expand_as(outputs[0]),) if len(calls) == 3 else honest(outputs, y)
        stage0.synthetic_gradient = synthetic_gradient  # type: ignore[method-assign]
        return trainer

    raising = run("raise", torch.tensor(float("nan")))
    raising.fit(batches[:2])
    stats = {k: v.clone() for k, v in raising.runner.stages[0].module.state_dict().items()}
    with pytest.raises(NonFiniteError, match="stage 0: the synthetic gradient is not finite at step 2"):
        raising.fit(batches[2:3], epochs=2)  # (the second epoch: step 2)
    after = raising.runner.stages[0].module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items()), "the stage is as it was before step 2"
    skipped = run("skip", torch.tensor(float("nan")))
    skipped.fit(batches)
    zero = run("raise", torch.tensor(0.0))
    zero.fit(batches)
    a, b = skipped.state_dict(), zero.state_dict()
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrected_refuses_fp16_and_too_small_a_max_inflight_by_name():
    with pytest.raises(ValueError, match=r"gradients='corrected' with 3 stages and delay=2 keeps up to 5 weight "
                                         r"versions.*max_inflight=4"):
        trainer_for(3, "corrected", delay=2)
    with pytest.raises(ValueError, match="warmup_steps=3 has no meaning for gradients='corrected'"):
        trainer_for(2, "corrected", warmup_steps=3)
    with pytest.raises(ValueError, match=r"gradients='corrected' keeps each step's graph for two backward passes"):
        SOURCES["corrected"].check(TrainConfig(gradients="corrected", precision="fp16"), 2)
    SOURCES["corrected"].check(TrainConfig(gradients="corrected", precision="bf16"), 2)


# -- local ------------------------------------------------------------------------------------

class RecordingLinks:
    def __init__(self, grads: dict | None = None):
        self.sent: list[tuple[str, int]] = []
        self.grads = grads or {}

    def send_activation(self, step, outputs, y):
        self.sent.append(("activation", step))

    def send_gradient(self, step, grads, skipped):
        self.sent.append(("skipped" if skipped else "gradient", step))

    def wait_gradient(self, step):
        self.sent.append(("waited", step))
        return self.grads[step], False

    def wait_received(self, step):
        raise AssertionError("nothing to wait for")

    def poll(self):
        pass


def middle_step(gradients: str, grads: dict | None = None) -> tuple[Stage, StageStep, RecordingLinks]:
    config = TrainConfig(gradients=gradients, progress=False)
    stage = Stage(1, 3, nn.Linear(4, 4), adam, loss_fn=nn.CrossEntropyLoss(),
                  aux_head=sp.AuxHead("linear", num_classes=3))
    links = RecordingLinks(grads)
    return stage, StageStep(stage, config, make_source(stage, config), links), links


def test_local_steps_at_once_on_its_auxiliary_loss_and_sends_nothing_back():
    stage, step, links = middle_step("local")
    before = stage.module.weight.detach().clone()
    for t in range(3):
        step.run(t, (torch.randn(6, 4),), torch.randint(0, 3, (6,)))
    assert links.sent == [("activation", 0), ("activation", 1), ("activation", 2)]  # no gradient message
    assert not torch.equal(stage.module.weight, before) and step.source.aux.head is not None


def test_local_without_labels_or_an_auxiliary_head_or_with_a_delay_is_refused_by_name():
    _, step, _ = middle_step("local")
    with pytest.raises(ValueError, match="stage 1: gradients='local' trains the stage on a local loss with the "
                                         "labels, but step 0 has none"):
        step.run(0, (torch.randn(6, 4),), None)
    for gradients in ("local", "interlocking"):
        with pytest.raises(ValueError, match=f"gradients='{gradients}' .* needs an auxiliary head recipe"):
            sp.Trainer(sp.split(make_model(), n_stages=2), nn.CrossEntropyLoss(), gradients=gradients)
        with pytest.raises(ValueError, match=f"delay=2 has no meaning for gradients='{gradients}'"):
            trainer_for(2, gradients, delay=2)
    with pytest.raises(ValueError, match="an auxiliary head needs num_classes"):
        sp.AuxHead("linear")


def count_messages(rank: int, gradients: str, batches: list, options: dict) -> dict:
    trainer = trainer_for(2, gradients, **options)
    worker = trainer.runner
    sent = {"activations": 0, "gradients": 0}
    for name, ch in (("activations", worker.ch.act_out), ("gradients", worker.ch.grad_out)):
        if ch is not None:
            original = ch.send

            def send(kind, *args, original=original, name=name, **kwargs):
                sent[name] += kind == 1  # TRAIN messages
                return original(kind, *args, **kwargs)
            ch.send = send
    trainer.fit(batches)
    out = {"sent": sent, "state": trainer.state_dict(), "grad_thread": worker.ch.grad_in is not None
           and worker.ch.grad_in._thread is not None}
    trainer.close()
    return out


def test_local_across_ranks_sends_no_gradient_message_and_equals_the_single_process_trainer():
    batches = make_batches(n=6)
    results = run_ranks(count_messages, 2, "local", batches, {}, timeout=120)
    assert results[0]["sent"] == {"activations": 6, "gradients": 0}
    assert results[1]["sent"] == {"activations": 0, "gradients": 0}  # (the last rank would send them)
    assert not results[0]["grad_thread"]  # no gradient was ever expected
    reference = trainer_for(2, "local")
    reference.fit(batches)
    for r in results:
        assert_states_close(r["state"], reference.state_dict(), atol=1e-6)


# -- interlocking -------------------------------------------------------------------------------

class RecordedHead(sp.AuxHead):
    """An AuxHead that keeps a copy of each head it builds, as built (for a computation by hand)."""

    built: dict[int, nn.Module] = {}

    def build(self, stage, example):
        head = super().build(stage, example)
        RecordedHead.built[stage] = copy.deepcopy(head)
        return head


def test_interlocking_gradients_reach_exactly_one_stage_back():
    """One SGD step of three stages: stage r steps on d(L_r + L_{r+1})/dθ_r, never on a later loss."""
    torch.manual_seed(0)
    f = [nn.Sequential(nn.Linear(12, 10), nn.Tanh()), nn.Sequential(nn.Linear(10, 10), nn.Tanh()), nn.Linear(10, 5)]
    x, y = make_batches(n=1)[0]
    trainer = sp.Trainer([copy.deepcopy(m) for m in f], nn.CrossEntropyLoss(), sgd, gradients="interlocking",
                         aux_head=RecordedHead("linear", num_classes=5), progress=False)
    trainer.fit([(x, y)])
    heads = RecordedHead.built
    ce = nn.functional.cross_entropy
    h0 = f[0](x)
    h1 = f[1](h0)
    local = [ce(heads[0]((h0,)), y), ce(heads[1]((h1,)), y), ce(f[2](h1), y)]
    params = [list(m.parameters()) for m in f]
    expected = [torch.autograd.grad(local[0] + local[1], params[0], retain_graph=True),
                torch.autograd.grad(local[1] + local[2], params[1], retain_graph=True),
                torch.autograd.grad(local[2], params[2], retain_graph=True)]
    for r, stage in enumerate(trainer.runner.stages):
        for p, p0, g in zip(stage.module.parameters(), params[r], expected[r], strict=False):
            assert torch.allclose(p, p0 - 0.1 * g, atol=1e-6), f"stage {r}"
    # and not two hops: stage 0 would step differently with the last stage's loss in it
    two_hops = torch.autograd.grad(local[0] + local[1] + local[2], params[0])
    assert not torch.allclose(two_hops[0], expected[0][0], atol=1e-4)


def test_interlocking_sends_its_local_gradient_back_before_it_waits():
    grads = {0: (torch.zeros(6, 4),)}
    stage, step, links = middle_step("interlocking", grads)
    step.run(0, (torch.randn(6, 4),), torch.randint(0, 3, (6,)))
    assert links.sent == [("activation", 0), ("gradient", 0), ("waited", 0)]  # the hop goes back first


# -- across ranks: fixed-delay runs equal the reference trainer -----------------------------------

def fit_and_state(rank: int, n_stages: int, gradients: str, batches: list, dropout: float, options: dict) -> dict:
    trainer = trainer_for(n_stages, gradients, model=make_model(dropout=dropout), **options)
    history = trainer.fit(batches, epochs=2)
    out = {"state": everything(trainer), "losses": [s["loss"] for s in history.steps]}
    trainer.close()
    return out


@pytest.mark.parametrize("gradients,options", [("delayed", {}), ("delayed", {"delay": 2, "max_inflight": 5,
                                                                            "staleness": "predict"}),
                                               ("interlocking", {}), ("corrected", {}), ("synthetic", {"delay": 2}),
                                               ("corrected", {"delay": 2, "max_inflight": 5})])
def test_across_ranks_equals_the_single_process_trainer(gradients, options):
    batches = make_batches(n=5)
    dropout = 0.2  # (the same masks in one process as on its rank: only one stage draws random numbers)
    results = run_ranks(fit_and_state, 3, 3, gradients, batches, dropout, options, timeout=150)
    reference = trainer_for(3, gradients, model=make_model(dropout=dropout), **options)
    history = reference.fit(batches, epochs=2)
    expected = everything(reference)
    for r, result in enumerate(results):
        own = {k: v for k, v in expected.items() if k.startswith(f"{r}/")}
        assert_states_close(result["state"], own, atol=1e-6)
    assert results[0]["losses"] == pytest.approx([s["loss"] for s in history.steps], abs=1e-5)


# -- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gradients,options", [("delayed", {}), ("delayed", {"staleness": "predict"}),
                                               ("local", {}), ("interlocking", {}), ("corrected", {})])
def test_every_source_resumes_exactly_and_exports_the_original_names(tmp_path, gradients, options):
    batches = make_batches(n=10)
    straight = trainer_for(3, gradients, **options)
    straight.fit(batches, max_steps=10)
    first = trainer_for(3, gradients, **options)
    first.fit(batches, max_steps=4)
    first.save(str(tmp_path))
    again = trainer_for(3, gradients, **options).load(str(tmp_path))
    again.fit(batches, max_steps=10)
    assert_states_close(everything(again), everything(straight), atol=1e-6)
    if gradients in ("local", "interlocking"):
        assert any("/source/aux/head/" in k for k in everything(again)), "the auxiliary heads are saved"
    if gradients == "corrected":
        assert any("/source/targets/" in k for k in everything(again)), "the awaited true targets are saved"
        assert_states_close(again.runner.stages[0].synth.state_dict(), straight.runner.stages[0].synth.state_dict(),
                            atol=1e-6)
    again.export(str(tmp_path / "model.pt"))
    model = make_model()
    model.load_state_dict(torch.load(tmp_path / "model.pt"))  # strict: the original names, no heads


def test_periodic_checkpoints_of_delayed_train_exactly_as_one_fit(tmp_path):
    batches = make_batches(n=10)
    straight = trainer_for(3, "delayed")
    straight.fit(batches, epochs=2)
    periodic = trainer_for(3, "delayed")
    periodic.fit(batches, epochs=2, checkpoint=str(tmp_path), checkpoint_every=3)
    assert_states_close(everything(periodic), everything(straight), atol=1e-6)


def resume_delayed_across_ranks(rank: int, directory: str, batches: list) -> dict:
    first = trainer_for(3, "delayed")
    first.fit(batches, max_steps=5)
    first.save(directory)
    first.close()
    resumed = trainer_for(3, "delayed")
    resumed.fit(batches, max_steps=10, resume=directory)
    straight = trainer_for(3, "delayed")
    straight.fit(batches, max_steps=10)
    out = {"resumed": everything(resumed), "straight": everything(straight),
           "outstanding": resumed.runner.outstanding}
    resumed.close()
    straight.close()
    return out


def test_delayed_resumes_exactly_across_ranks(tmp_path):
    for r, result in enumerate(run_ranks(resume_delayed_across_ranks, 3, str(tmp_path / "ckpt"), make_batches(n=10),
                                         timeout=150)):
        assert_states_close(result["resumed"], result["straight"], atol=1e-6)
        assert result["outstanding"] == 0, f"rank {r}: the drain left gradient messages in flight"


@pytest.mark.parametrize("saved,loaded", [("delayed", "local"), ("local", "synthetic"), ("synthetic", "delayed"),
                                         ("delayed", "corrected"), ("corrected", "delayed")])
def test_a_checkpoint_of_another_source_is_refused_by_name(tmp_path, saved, loaded):
    first = trainer_for(2, saved)
    first.fit(make_batches(n=2))
    first.save(str(tmp_path))
    other = trainer_for(2, loaded)
    before = everything(other)
    with pytest.raises(ValueError, match=f"stage 0: the checkpoint was saved with gradients=.*{saved}.*this "
                                         f"trainer uses gradients='{loaded}'"):
        other.load(str(tmp_path))
    assert_states_close(everything(other), before, atol=0)
