"""stages/stage.py: the update rule's pieces, checked against their textbook formulas."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import synthpipe as sp
from synthpipe.stages.stage import Stage, all_finite
from synthpipe.stages.synthesizer import per_batch, per_example


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def stage_with_synth(kind: str = "lowrank", scale: float = 1.0) -> Stage:
    torch.manual_seed(0)
    synth = sp.Synthesizer(kind, conditional=True, num_classes=5, **({"rank": 4} if kind == "lowrank" else {}))
    return Stage(0, 2, nn.Linear(6, 6), sgd, synthesizer=synth, synth_optimizer=sgd, synthetic_scale=scale)


def randomise(module: nn.Module) -> None:
    """Synthesizers start at zero output; give every parameter a value so the test can fail."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp"])
def test_synthetic_gradient_is_scale_times_prediction_over_batch(kind):
    stage = stage_with_synth(kind, scale=0.5)
    h, y = torch.randn(8, 6, 5), torch.randint(0, 5, (8,))
    stage.ensure_synthesizer((h,))
    randomise(stage.synth)
    stage.synth.eval()  # the mlp kind has BatchNorm: compare in a fixed mode
    (grad,) = stage.synthetic_gradient((h,), y)
    (pred,) = stage.synth((h,), y)
    torch.testing.assert_close(grad, 0.5 * per_batch(pred.detach()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "lowrank"])
def test_train_synthesizer_matches_mse_on_per_example_targets(kind):
    """The closed-form MSE step equals autograd through F.mse_loss(M(h, y), B * target)."""
    stage = stage_with_synth(kind)
    h, y = torch.randn(8, 6, 5), torch.randint(0, 5, (8,))
    target = (torch.randn(8, 6, 5) / 8,)
    stage.ensure_synthesizer((h,))
    randomise(stage.synth)
    reference = copy.deepcopy(stage.synth)
    ref_opt = sgd(reference.parameters())

    loss = stage.train_synthesizer((h,), y, target)

    (pred,) = reference((h,), y)
    ref_loss = F.mse_loss(pred, per_example(target[0]))
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_opt.step()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for p, q in zip(stage.synth.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_train_synthesizer_skips_tensors_without_target_and_sums_the_rest():
    torch.manual_seed(0)
    stage = Stage(0, 2, nn.Identity(), sgd, synthesizer=sp.Synthesizer("linear", replay=1), synth_optimizer=sgd)
    h = (torch.randn(4, 3), torch.arange(4), torch.randn(4, 2))
    stage.ensure_synthesizer(h)
    randomise(stage.synth)
    ones = (torch.ones(4, 3) / 4, None, torch.ones(4, 2) / 4)
    preds = stage.synth(h)
    expected = F.mse_loss(preds[0], torch.ones(4, 3)) + F.mse_loss(preds[2], torch.ones(4, 2))
    assert stage.train_synthesizer(h, None, ones) == pytest.approx(expected.item(), rel=1e-5)
    only_first = (ones[0], None, None)
    before = [p.detach().clone() for p in stage.synth.parts[2].parameters()]
    stage.train_synthesizer(h, None, only_first)
    for p, b in zip(stage.synth.parts[2].parameters(), before, strict=True):
        assert torch.equal(p, b)  # no target, no update
    assert stage.train_synthesizer(h, None, (None, None, None)) == 0.0


def test_half_precision_regression_loss_is_reported_without_overflow():
    stage = Stage(0, 2, nn.Identity(), sgd, synthesizer=sp.Synthesizer("linear"), synth_optimizer=sgd)
    h = torch.randn(64, 512, dtype=torch.bfloat16)
    loss = stage.train_synthesizer((h,), None, (torch.full((64, 512), 10.0, dtype=torch.bfloat16),))
    assert loss == pytest.approx(640.0 ** 2, rel=1e-2)  # zero prediction, per-example target 640


def test_all_finite():
    big = torch.full((8,), 3e38)  # finite, but its float32 sum overflows
    assert all_finite([torch.randn(5), None, torch.arange(3), big, torch.empty(0)])
    assert not all_finite([torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.randn(3), torch.tensor([float("inf"), 1.0])])
    assert not all_finite([torch.tensor([float("inf"), -float("inf")])])
    assert not all_finite([torch.tensor([3e38, float("-inf")], dtype=torch.float32)])
    assert all_finite([torch.full((4,), 60000.0, dtype=torch.float16)])  # half: sum overflows, values do not


def norm_stage() -> Stage:
    torch.manual_seed(0)
    # inputs (B, 6, 5): Linear acts on the last dim, the norms on the 6 channels
    module = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(5, 5),
                           nn.InstanceNorm1d(6, track_running_stats=True), nn.LazyBatchNorm1d())
    return Stage(1, 2, module, sgd, loss_fn=nn.MSELoss())


def buffers(stage: Stage) -> dict:
    return {k: v.clone() for k, v in stage.module.named_buffers()}


def test_undo_forward_restores_the_running_statistics_of_a_skipped_batch():
    stage = norm_stage()
    stage.forward((torch.randn(8, 6, 5),))  # materialises the lazy layer; that forward is kept
    before = buffers(stage)
    assert before["1.num_batches_tracked"] == 1 and before["5.num_batches_tracked"] == 1
    stage.forward((torch.full((8, 6, 5), float("nan")),))
    poisoned = buffers(stage)
    assert not torch.isfinite(poisoned["1.running_mean"]).all()
    assert poisoned["1.num_batches_tracked"] == 2
    stage.undo_forward()
    after = buffers(stage)
    assert after.keys() == before.keys() and len(after) == 9  # BatchNorm, InstanceNorm, lazy BatchNorm
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_undo_forward_of_a_lazy_norm_layers_first_forward_leaves_fresh_statistics():
    stage = norm_stage()
    # BatchNorm and InstanceNorm have statistics; the lazy layer's buffers do not exist yet
    before = {k: v.clone() for k, v in stage.module.named_buffers() if not k.startswith("5.")}
    assert before
    stage.forward((torch.full((8, 6, 5), float("nan")),))
    assert not torch.isfinite(stage.module[5].running_mean).all()  # the lazy layer took the NaN batch
    stage.undo_forward()
    after = buffers(stage)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    # the lazy layer now has its shape and a fresh layer's statistics, as if it had never seen a batch
    assert torch.equal(after["5.running_mean"], torch.zeros(6))
    assert torch.equal(after["5.running_var"], torch.ones(6))
    assert after["5.num_batches_tracked"] == 0
    # later steps save and undo as usual
    stage.forward((torch.randn(8, 6, 5),))
    kept = buffers(stage)
    stage.forward((torch.full((8, 6, 5), float("nan")),))
    stage.undo_forward()
    for k, v in buffers(stage).items():
        assert torch.equal(v, kept[k]), k


def test_undo_forward_takes_back_only_the_last_training_forward():
    stage = norm_stage()
    stage.forward((torch.randn(8, 6, 5),))
    stage.forward((torch.randn(8, 6, 5),))
    kept = buffers(stage)
    stage.forward((torch.randn(8, 6, 5) * 5,))
    stage.module.eval()
    stage.forward((torch.randn(8, 6, 5),), requires_grad=False)  # eval: statistics unchanged, nothing saved
    stage.module.train()
    stage.undo_forward()
    stage.undo_forward()  # idempotent
    assert all(torch.equal(buffers(stage)[k], v) for k, v in kept.items())


def test_stage_without_norm_layers_saves_nothing():
    stage = Stage(0, 2, nn.Sequential(nn.Linear(4, 4), nn.ReLU()), sgd, synthesizer=sp.Synthesizer("linear"))
    stage.forward((torch.randn(3, 4),))
    assert stage._stats_before is None
    stage.undo_forward()  # a no-op


def test_a_flattening_synthesizer_refuses_another_sequence_length_by_name():
    # Only the token synthesizer takes any T; a linear one was built for (B, 7, 8) and
    # used to fail inside its matmul with no stage named.
    stage = Stage(0, 2, nn.Identity(), sgd, synthesizer=sp.Synthesizer("linear"), synth_optimizer=sgd)
    stage.synthetic_gradient((torch.randn(4, 7, 8),), None)
    with pytest.raises(sp.StageInputError, match=r"stage 0: boundary tensor 0 has shape \(4, 11, 8\), "
                                                 r"but its synthesizer was built for \(B, 7, 8\)"):
        stage.synthetic_gradient((torch.randn(4, 11, 8),), None)
    token = Stage(0, 2, nn.Identity(), sgd, synthesizer=sp.Synthesizer("token"), synth_optimizer=sgd)
    token.synthetic_gradient((torch.randn(4, 7, 8),), None)
    assert token.synthetic_gradient((torch.randn(4, 11, 8),), None)[0].shape == (4, 11, 8)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 1, 7, 2]), r"labels must lie in \[0, 5\)"),
    (torch.zeros(4), "integer class labels"),
    (torch.tensor([0, 1]), "labels have batch size 2 but the activation has 4"),
])
def test_labels_a_conditional_synthesizer_cannot_take_name_the_stage(labels, message):
    stage = stage_with_synth()
    with pytest.raises(sp.StageInputError, match=r"stage 0: its synthesizer could not take output \(4, 6\):float32 "
                                                 r"with labels .*" + message):
        stage.synthetic_gradient((torch.randn(4, 6),), labels)


def test_training_modes_are_restored_per_submodule():
    from synthpipe.stages.stage import restore_training_modes, training_modes

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model[1].eval()  # a frozen BatchNorm in a model that trains
    saved = training_modes(model)
    model.eval()
    restore_training_modes(saved)
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_a_state_that_does_not_fit_is_refused_and_changes_nothing():
    stage = stage_with_synth()
    stage.synthetic_gradient((torch.randn(4, 6),), torch.tensor([0, 1, 2, 3]))  # builds the synthesizer
    state = copy.deepcopy(stage.state_dict())
    randomise(stage.module)
    before = copy.deepcopy(stage.module.state_dict())
    synth = stage.synth

    wide = copy.deepcopy(state)
    wide["module"]["weight"] = torch.zeros(7, 6)
    with pytest.raises(ValueError, match=r"stage 0: 'weight' has shape \(7, 6\) in the checkpoint but \(6, 6\)"):
        stage.load_state_dict(wide)
    renamed = copy.deepcopy(state)
    renamed["module"]["0.weight"] = renamed["module"].pop("weight")
    with pytest.raises(ValueError, match="lacks weight and has 0.weight besides"):
        stage.load_state_dict(renamed)
    adam_state = copy.deepcopy(state)
    adam_state["optimizer_class"] = "torch.optim.adam.Adam"
    with pytest.raises(ValueError, match="stage 0's optimizer: the checkpoint was saved with torch.optim.adam.Adam, "
                                         "this trainer uses torch.optim.sgd.SGD"):
        stage.load_state_dict(adam_state)
    old_adam = copy.deepcopy(state)  # a checkpoint from before class names were saved
    del old_adam["optimizer_class"]
    old_adam["optimizer"]["param_groups"][0].pop("momentum")
    with pytest.raises(ValueError, match="has no momentum: it was saved with another optimizer"):
        stage.load_state_dict(old_adam)
    other_synth = copy.deepcopy(state)
    other_synth["synth"] = {k + "_": v for k, v in state["synth"].items()}
    with pytest.raises(ValueError, match="stage 0: the checkpoint's synthesizer does not fit"):
        stage.load_state_dict(other_synth)

    assert all(torch.equal(v, stage.module.state_dict()[k]) for k, v in before.items())
    assert stage.synth is synth
    stage.load_state_dict(state)  # the right state still loads
    assert torch.equal(stage.module.weight, state["module"]["weight"]) and stage.synth is not synth



# -- traced stages fix the shapes they were traced with -----------------------------------------

class Flatten(nn.Module):
    """A CNN tail that flattens with the batch size (a common idiom), after a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return self.fc(h.view(x.size(0), -1))


def traced_stage() -> tuple[Stage, nn.Module]:
    torch.manual_seed(0)
    model = Flatten()
    stages = sp.split(model, points=["fc"], example_input=torch.randn(8, 3, 4, 4))
    return Stage(0, 2, stages[0], sgd), model


class Regroup(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.mid(self.a(x)).view(x.size(0), 2, 4))


def test_a_traced_stage_given_another_batch_size_says_it_was_traced_with_another():
    torch.manual_seed(0)
    stages = sp.split(Regroup(), points=["mid"], example_input=torch.randn(8, 6))
    stage = Stage(1, 3, stages[1], sgd)  # (a middle stage: no loss needed)
    assert stage.forward((torch.randn(8, 8),))[1][0].shape == (8, 2, 2)  # the traced shape: fine
    with pytest.raises(sp.StageInputError, match=r"stage 1 failed on its input \(\(5, 8\):float32\): shape "
                                                 r"'\[8, 2, 4\]' is invalid for input of size 40. This stage was "
                                                 r"traced \(split at points\) with input \(8, 8\).*drop_last=True"):
        stage.forward((torch.randn(5, 8),))


def test_a_traced_stage_that_mixes_examples_is_stopped_and_leaves_its_norm_layers_as_they_were():
    stage, model = traced_stage()
    stats = [t.clone() for t in (model.bn.running_mean, model.bn.num_batches_tracked)]
    # 4 examples fit view(8, -1): the stage runs and pairs them up, which must not pass silently
    with pytest.raises(sp.StageInputError,
                       match=r"stage 0 turned a batch of 4 \(\(4, 3, 4, 4\):float32\) into "
                             r"outputs \(\(8, 32\):float32\) whose first dimension was the batch when traced.*"
                             r"traced \(split at points\) with input \(8, 3, 4, 4\)"):
        stage.forward((torch.randn(4, 3, 4, 4),))
    assert torch.equal(model.bn.running_mean, stats[0]) and torch.equal(model.bn.num_batches_tracked, stats[1])
    assert stage.forward((torch.randn(8, 3, 4, 4),))[1][0].shape == (8, 64)


def test_a_stage_that_fails_leaves_its_norm_statistics_as_they_were():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2), nn.Linear(3, 2))  # the second Linear cannot take it
    stage = Stage(0, 2, model, sgd)
    before = copy.deepcopy(model[0].state_dict())
    with pytest.raises(sp.StageInputError, match=r"stage 0 failed on its input \(\(6, 4\):float32\)"):
        stage.forward((torch.randn(6, 4),))
    assert all(torch.equal(v, before[k]) for k, v in model[0].state_dict().items())


class TokenHead(nn.Module):
    """Per-token classification: the last stage hands the loss (B * T, C), by design."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids)))).reshape(-1, 5)


def test_an_output_that_was_not_batch_first_when_traced_may_change_with_the_batch():
    stages = sp.split(TokenHead(), points=["mid"], example_input=torch.randint(0, 20, (8, 6)))
    last = Stage(1, 2, stages[1], sgd, loss_fn=nn.CrossEntropyLoss())
    _, out = last.forward((torch.randn(4, 6, 8),))  # a smaller last batch
    assert out[0].shape == (24, 5)  # (4 * 6, 5): not a batch of 4, and not an error


def test_a_bounded_synthetic_gradient_never_exceeds_bound_times_the_targets_it_was_trained_on():
    """The loop that makes synthetic gradients diverge: the activation grows, and an
    unnormalised synthesizer's prediction grows with it. The bound holds the applied
    gradient to ``bound`` times the running RMS of the true targets."""
    torch.manual_seed(0)
    recipe = sp.Synthesizer("linear", conditional=True, num_classes=5, bound=2.0, normalize=False)
    stage = Stage(0, 2, nn.Linear(6, 6), sgd, synthesizer=recipe, synth_optimizer=sgd)
    h, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    target = (torch.randn(8, 6) / 8,)  # batch-mean gradients: per-example RMS about 1
    stage.train_synthesizer((h,), y, target)
    expected_rms = float(per_example(target[0]).pow(2).mean().sqrt())
    assert float(stage.synth.target_rms[0]) == pytest.approx(expected_rms, rel=1e-5)
    randomise(stage.synth)
    for scale in (1.0, 1e3, 1e6):
        (grad,) = stage.synthetic_gradient((scale * h,), y)
        rms = float(per_example(grad).pow(2).mean().sqrt())
        assert rms <= 2.0 * expected_rms * (1 + 1e-5)
    assert rms == pytest.approx(2.0 * expected_rms, rel=1e-5)  # the large activation's is cut to the bound
    unbounded = Stage(0, 2, nn.Linear(6, 6), sgd, synthetic_scale=1.0, synth_optimizer=sgd,
                      synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=5, normalize=False))
    unbounded.ensure_synthesizer((h,))
    unbounded.synth.load_state_dict(stage.synth.state_dict())
    (free,) = unbounded.synthetic_gradient((1e6 * h,), y)
    assert float(per_example(free).pow(2).mean().sqrt()) > 1e3 * expected_rms


def test_train_synthesizer_feeds_the_quality_gate():
    """With min_quality, the stage applies zero synthetic gradients until M_r has learnt
    to explain that share of its targets, then its predictions."""
    torch.manual_seed(0)
    recipe = sp.Synthesizer("linear", conditional=False, min_quality=0.5, target_momentum=0.5)
    stage = Stage(0, 2, nn.Linear(6, 6), sgd, synthesizer=recipe,
                  synth_optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    h = torch.randn(32, 6)
    target = (h @ torch.randn(6, 6) * 0.1 / 32,)  # a linear function of h: learnable exactly
    stage.train_synthesizer((h,), None, target)
    assert torch.count_nonzero(stage.synthetic_gradient((h,), None)[0]) == 0  # M_r knows nothing yet
    for _ in range(200):
        stage.train_synthesizer((h,), None, target)
    assert float(stage.synth.quality[0]) > 0.5
    (grad,) = stage.synthetic_gradient((h,), None)
    assert F.cosine_similarity(grad.flatten(), target[0].flatten(), dim=0) > 0.9


def _replay_stage(replay: int, **recipe) -> Stage:
    torch.manual_seed(0)
    synth = sp.Synthesizer("linear", conditional=True, num_classes=5, replay=replay, **recipe)
    return Stage(0, 2, nn.Identity(), sgd, synthesizer=synth, synth_optimizer=sgd)


def _batches(n: int):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g),
             torch.randn(8, 6, generator=g) / 8) for _ in range(n)]


def _one_step(synth: nn.Module, opt: torch.optim.Optimizer, h, y, target) -> None:
    (pred,) = synth((h,), y)
    opt.zero_grad()
    F.mse_loss(pred, per_example(target)).backward()
    opt.step()


def test_replay_revisits_the_last_targets_newest_first_and_keeps_replay_minus_one():
    """replay=3: target t is regressed on at t, t + 1 and t + 2; the stage holds 2 triples."""
    stage = _replay_stage(3)
    batches = _batches(5)
    stage.ensure_synthesizer((batches[0][0],))
    randomise(stage.synth)
    reference = copy.deepcopy(stage.synth)
    ref_opt = sgd(reference.parameters())
    for t, (h, y, target) in enumerate(batches):
        stage.train_synthesizer((h,), y, (target,))
        for s in range(t, max(t - 3, -1), -1):  # the new one, then the kept ones, newest first
            _one_step(reference, ref_opt, *batches[s])
        assert len(stage.replay_buffer) == min(t + 1, 2)
        for p, q in zip(stage.synth.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_replay_one_keeps_nothing_and_steps_once():
    stage = _replay_stage(1)
    (h, y, target), = _batches(1)
    stage.ensure_synthesizer((h,))
    randomise(stage.synth)
    reference = copy.deepcopy(stage.synth)
    stage.train_synthesizer((h,), y, (target,))
    _one_step(reference, sgd(reference.parameters()), h, y, target)
    assert len(stage.replay_buffer) == 0
    for p, q in zip(stage.synth.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_replay_keeps_copies_of_buffers_the_caller_reuses():
    """A transport may receive the next target into the same buffer: the kept one must not change."""
    stage, twin = _replay_stage(2), _replay_stage(2)
    b0, b1 = _batches(2)
    h, y, target = (t.clone() for t in b0)
    stage.train_synthesizer((h,), y, (target,))
    twin.train_synthesizer((b0[0],), b0[1], (b0[2],))
    for buf, new in ((h, b1[0]), (y, b1[1]), (target, b1[2])):
        buf.copy_(new)  # the caller reuses its buffers for the next batch
    stage.train_synthesizer((h,), y, (target,))
    twin.train_synthesizer((b1[0],), b1[1], (b1[2],))
    for p, q in zip(stage.synth.parameters(), twin.synth.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_replayed_targets_do_not_count_in_the_quality_and_the_schedule_steps_once_per_target():
    torch.manual_seed(0)
    synth = sp.Synthesizer("linear", replay=3, bound=1e6)
    stage = Stage(0, 2, nn.Identity(), sgd, synthesizer=synth, synth_optimizer=sgd,
                  synth_lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    for h, _, target in _batches(4):
        stage.train_synthesizer((h,), None, (target,))
    assert stage.synth.observed.tolist() == [4]  # 4 new targets, 9 regression steps
    assert stage.synth_lr_scheduler.last_epoch == 4


def test_the_replay_buffer_is_saved_and_a_resumed_stage_regresses_as_an_uninterrupted_one():
    batches = _batches(4)
    stage = _replay_stage(3)
    for h, y, target in batches[:2]:
        stage.train_synthesizer((h,), y, (target,))
    state = copy.deepcopy(stage.state_dict())
    assert len(state["synth_replay"]) == 2
    resumed = _replay_stage(3)
    resumed.load_state_dict(state)
    assert len(resumed.replay_buffer) == 2
    for h, y, target in batches[2:]:
        stage.train_synthesizer((h,), y, (target,))
        resumed.train_synthesizer((h,), y, (target,))
    for p, q in zip(stage.synth.parameters(), resumed.synth.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    shorter = _replay_stage(2)  # a smaller replay keeps the newest of the saved ones
    shorter.load_state_dict(state)
    assert len(shorter.replay_buffer) == 1
    torch.testing.assert_close(shorter.replay_buffer[0][2][0], state["synth_replay"][0]["target"][0])
