"""Tests for synthpipe.stages.synthesizer (the synthetic-gradient models M_r)."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from synthpipe.stages.synthesizer import (
    KINDS,
    BoundarySynthesizer,
    Synthesizer,
    one_hot_labels,
    per_batch,
    per_example,
)

NUM_CLASSES = 10

# An example activation of a natural shape for every kind (batch first).
EXAMPLE_SHAPES = {
    "linear": (6, 12),
    "lowrank": (6, 12),
    "mlp": (6, 12),
    "conv": (6, 3, 5, 4),
    "token": (6, 7, 12),
}
# (kind, example shape) pairs: every concrete kind, and "auto" on 2-D, 3-D and 4-D.
KIND_CASES = [(k, s) for k, s in EXAMPLE_SHAPES.items()] + [
    ("auto", (6, 12)), ("auto", (6, 7, 12)), ("auto", (6, 3, 5, 4))]
# Small options so the tests stay fast.
OPTIONS = {"lowrank": {"rank": 4}, "mlp": {"hidden": 32}, "conv": {"hidden": 8},
           "token": {"hidden": 16}}


def make(kind, conditional=False, **extra):
    options = {**OPTIONS.get(kind, {}), **extra}
    return Synthesizer(kind, conditional=conditional,
                       num_classes=NUM_CLASSES if conditional else None, **options)


def labels(batch, gen=None):
    return torch.randint(0, NUM_CLASSES, (batch,), generator=gen)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_kinds_listed():
    assert set(KINDS) == {"auto", "linear", "lowrank", "mlp", "conv", "token"}


# --------------------------------------------------------------------------- init
@pytest.mark.parametrize("conditional", [False, True], ids=["dni", "cdni"])
@pytest.mark.parametrize("kind,shape", KIND_CASES, ids=[f"{k}-{len(s)}d" for k, s in KIND_CASES])
def test_zero_output_at_initialisation(kind, shape, conditional):
    h = torch.randn(shape)
    synth = make(kind, conditional).build(0, (h,))
    assert isinstance(synth, BoundarySynthesizer)
    y = labels(shape[0]) if conditional else None
    (g,) = synth((torch.randn(shape),), y)
    assert g.shape == h.shape
    assert g.dtype == h.dtype
    assert torch.count_nonzero(g) == 0
    # the model itself is not degenerate: it has trainable parameters
    assert any(p.requires_grad for p in synth.parameters())


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp", "auto"])
@pytest.mark.parametrize("conditional", [False, True], ids=["dni", "cdni"])
def test_shape_2d_batch_may_change(kind, conditional):
    synth = make(kind, conditional).build(0, (torch.randn(8, 12),))
    for batch in (8, 3, 17):
        y = labels(batch) if conditional else None
        (g,) = synth((torch.randn(batch, 12),), y)
        assert g.shape == (batch, 12)


@pytest.mark.parametrize("kind", ["token", "auto"])
@pytest.mark.parametrize("conditional", [False, True], ids=["dni", "cdni"])
def test_shape_3d_token_sequence_length_may_change(kind, conditional):
    synth = make(kind, conditional).build(1, (torch.randn(4, 7, 12),))
    for batch, seq in ((4, 7), (2, 3), (5, 11)):
        y = labels(batch) if conditional else None
        (g,) = synth((torch.randn(batch, seq, 12),), y)
        assert g.shape == (batch, seq, 12)


def test_token_per_token_labels():
    synth = make("token", conditional=True).build(0, (torch.randn(4, 7, 12),))
    y = torch.randint(0, NUM_CLASSES, (3, 5))  # (B, T): one label per position
    (g,) = synth((torch.randn(3, 5, 12),), y)
    assert g.shape == (3, 5, 12)


@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp"])
def test_shape_3d_flattened_kinds(kind):
    synth = make(kind).build(0, (torch.randn(4, 7, 12),))
    (g,) = synth((torch.randn(2, 7, 12),))
    assert g.shape == (2, 7, 12)


@pytest.mark.parametrize("kind", ["conv", "auto", "linear", "lowrank", "mlp"])
@pytest.mark.parametrize("conditional", [False, True], ids=["dni", "cdni"])
def test_shape_4d(kind, conditional):
    synth = make(kind, conditional).build(0, (torch.randn(4, 3, 5, 4),))
    y = labels(2) if conditional else None
    (g,) = synth((torch.randn(2, 3, 5, 4),), y)
    assert g.shape == (2, 3, 5, 4)


def test_conv_spatial_size_may_change():
    synth = make("conv").build(0, (torch.randn(4, 3, 5, 4),))
    (g,) = synth((torch.randn(2, 3, 9, 6),))
    assert g.shape == (2, 3, 9, 6)


def test_auto_picks_kind_by_rank():
    h2, h3, h4 = torch.randn(4, 12), torch.randn(4, 7, 12), torch.randn(4, 3, 5, 4)
    synth = make("auto").build(0, (h2, h3, h4))
    names = [type(p).__name__ for p in synth.parts]
    assert names == ["LinearSynth", "TokenSynth", "ConvSynth"]


# --------------------------------------------------------------------------- tuples
@pytest.mark.parametrize("conditional", [False, True], ids=["dni", "cdni"])
def test_tuple_boundary_integer_tensor_gets_none(conditional):
    h = torch.randn(4, 12)
    mask = torch.ones(4, 12, dtype=torch.long)
    other = torch.randn(4, 7, 12)
    synth = make("auto", conditional).build(2, (h, mask, other))
    assert synth.has_part == [True, False, True]
    assert synth.shapes == [(12,), None, (7, 12)]
    y = labels(4) if conditional else None
    out = synth((h, mask, other), y)
    assert isinstance(out, tuple) and len(out) == 3
    assert out[1] is None
    assert out[0].shape == h.shape and out[2].shape == other.shape


def test_tuple_boundary_bool_tensor_gets_none():
    synth = make("linear").build(0, (torch.randn(4, 12), torch.zeros(4, dtype=torch.bool)))
    g, none = synth((torch.randn(4, 12), torch.zeros(4, dtype=torch.bool)))
    assert none is None and g.shape == (4, 12)


def test_tuple_length_mismatch_is_an_error():
    synth = make("linear").build(0, (torch.randn(4, 12), torch.randn(4, 3)))
    with pytest.raises(ValueError, match="2 boundary tensors"):
        synth((torch.randn(4, 12),))


# --------------------------------------------------------------------------- errors
def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown synthesizer kind"):
        Synthesizer("quadratic")


def test_conditional_without_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        Synthesizer("linear", conditional=True)
    with pytest.raises(ValueError, match="num_classes"):
        Synthesizer("linear", conditional=True, num_classes=0)


@pytest.mark.parametrize("bad", [-3, 2.5, True, "3"])
def test_num_classes_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=f"num_classes must be a positive int, got {bad!r}"):
        Synthesizer("linear", conditional=True, num_classes=bad)


@pytest.mark.parametrize("kind", ["conv", "auto"])
def test_an_even_conv_kernel_is_refused_when_the_recipe_is_made(kind):
    # An even kernel with padding k // 2 grows H and W by one: the error came only at the
    # first step, as a gradient of the wrong shape.
    with pytest.raises(ValueError, match="kernel_size must be odd.*got 4"):
        Synthesizer(kind, kernel_size=4)
    assert Synthesizer(kind, kernel_size=3).build(0, (torch.randn(2, 3, 6, 6),)).parts[0](
        torch.randn(2, 3, 6, 6)).shape == (2, 3, 6, 6)


@pytest.mark.parametrize("kind,shape", KIND_CASES, ids=[f"{k}-{len(s)}d" for k, s in KIND_CASES])
def test_conditional_without_labels_at_call(kind, shape):
    synth = make(kind, conditional=True).build(0, (torch.randn(shape),))
    with pytest.raises(ValueError, match="needs the labels"):
        synth((torch.randn(shape),))


@pytest.mark.parametrize("bad", [NUM_CLASSES, 25, -1])
def test_labels_out_of_range(bad):
    synth = make("linear", conditional=True).build(0, (torch.randn(4, 12),))
    y = labels(4)
    y[2] = bad
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        synth((torch.randn(4, 12),), y)


def test_float_labels_rejected():
    synth = make("linear", conditional=True).build(0, (torch.randn(4, 12),))
    with pytest.raises(TypeError, match="integer class labels"):
        synth((torch.randn(4, 12),), torch.zeros(4))


def test_unconditional_ignores_labels():
    synth = make("linear").build(0, (torch.randn(4, 12),))
    assert synth.parts[0].num_classes is None
    (g,) = synth((torch.randn(4, 12),), labels(4))  # labels given but not used
    assert g.shape == (4, 12)


def test_conv_on_2d_input_is_an_error():
    with pytest.raises(ValueError, match=r"\(B, C, L\), \(B, C, H, W\) or \(B, C, D, H, W\)"):
        make("conv").build(0, (torch.randn(4, 12),))


def test_token_on_2d_input_is_an_error():
    with pytest.raises(ValueError, match="3-D"):
        make("token").build(0, (torch.randn(4, 12),))


def test_unbatched_activation_is_an_error():
    with pytest.raises(ValueError, match="batched"):
        make("linear").build(3, (torch.randn(12),))


# --------------------------------------------------------------------------- learning
def _linear_target(h: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """A fixed linear map acting on the feature/channel dimension of h."""
    if h.dim() == 4:
        return torch.einsum("bchw,cd->bdhw", h, mix)
    return h @ mix


@pytest.mark.parametrize("conditional", [False, True], ids=["dni", "cdni"])
@pytest.mark.parametrize("kind,shape", KIND_CASES, ids=[f"{k}-{len(s)}d" for k, s in KIND_CASES])
def test_adam_regression_onto_linear_target_learns(kind, shape, conditional):
    gen = torch.Generator().manual_seed(1)
    batch = 32
    shape = (batch,) + tuple(shape[1:])
    h = torch.randn(shape, generator=gen)
    channels = shape[1] if len(shape) == 4 else shape[-1]
    mix = torch.randn(channels, channels, generator=gen) / channels ** 0.5
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    target = _linear_target(h, mix)
    if conditional:  # plus a label-dependent offset, so the labels carry information
        offset = torch.randn((NUM_CLASSES,) + tuple(shape[1:]), generator=gen)
        target = target + offset[y]

    synth = make(kind, conditional).build(0, (h,))
    opt = torch.optim.Adam(synth.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        (pred,) = synth((h,), y if conditional else None)
        loss = nn.functional.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert all(p.grad is not None for p in synth.parameters() if p.requires_grad)


def test_conditioning_uses_the_labels():
    """A target that depends only on y: cDNI fits it, plain DNI cannot beat the variance."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(64, 8, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (64,), generator=gen)
    table = torch.randn(NUM_CLASSES, 8, generator=gen)
    target = table[y]
    finals = {}
    for conditional in (False, True):
        torch.manual_seed(0)
        synth = make("linear", conditional).build(0, (h,))
        opt = torch.optim.Adam(synth.parameters(), lr=5e-2)
        for _ in range(200):
            (pred,) = synth((h,), y)
            loss = nn.functional.mse_loss(pred, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        finals[conditional] = loss.item()
    assert finals[True] < 1e-3
    assert finals[False] > 10 * finals[True]


# --------------------------------------------------------------------------- helpers
def test_per_example_per_batch_are_inverses():
    g = torch.randn(5, 3, 4, dtype=torch.float64)
    assert torch.allclose(per_example(g), g * 5)
    assert torch.allclose(per_batch(g), g / 5)
    assert torch.allclose(per_batch(per_example(g)), g)
    assert torch.allclose(per_example(per_batch(g)), g)


def test_one_hot_labels_dtype_and_shapes():
    like = torch.zeros(1, dtype=torch.float64)
    y = torch.tensor([0, 3, 9])
    oh = one_hot_labels(y, 10, like)
    assert oh.shape == (3, 10) and oh.dtype == torch.float64
    assert torch.equal(oh.argmax(1), y)
    assert one_hot_labels(torch.zeros(2, 5, dtype=torch.int32), 10, like).shape == (2, 5, 10)


def test_build_follows_example_dtype():
    h = torch.randn(4, 12, dtype=torch.float64)
    synth = make("mlp", conditional=True).build(0, (h,))
    assert all(p.dtype == torch.float64 for p in synth.parameters())
    (g,) = synth((h,), labels(4))
    assert g.dtype == torch.float64


def test_options_reach_the_model():
    synth = make("lowrank", rank=3).build(0, (torch.randn(4, 12),))
    assert synth.parts[0].down.out_features == 3
    synth = Synthesizer("mlp", hidden=16, depth=3).build(0, (torch.randn(4, 12),))
    assert sum(isinstance(m, nn.Linear) for m in synth.modules()) == 4


def test_repr_mentions_kind():
    assert "lowrank" in repr(make("lowrank"))


# --------------------------------------------------------------------------- custom
def test_custom_callable_kind():
    calls = []

    class Scale(nn.Module):
        def __init__(self, features):
            super().__init__()
            self.w = nn.Parameter(torch.full((features,), 2.0))

        def forward(self, h, y=None):
            return h * self.w + (0 if y is None else y[:, None].to(h.dtype))

    def factory(boundary, example):
        calls.append((boundary, tuple(example.shape), example.dtype))
        return Scale(example.shape[-1])

    spec = Synthesizer(factory)
    assert "factory" in repr(spec)
    example = torch.randn(4, 6, dtype=torch.float64)
    synth = spec.build(5, (example, torch.arange(4)))
    assert calls == [(5, (4, 6), torch.float64)]  # called once, for the float tensor only
    assert synth.parts[0].w.dtype == torch.float64  # moved to the example's dtype
    h = torch.randn(3, 6, dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    g, none = synth((h, torch.arange(3)), y)
    assert none is None
    assert torch.allclose(g, 2 * h + y[:, None].double())
    # it is part of the module tree, so an optimizer over synth.parameters() trains it
    assert any(p is synth.parts[0].w for p in synth.parameters())


def test_options_a_kind_does_not_take_are_refused_when_the_recipe_is_made():
    with pytest.raises(ValueError, match=r"the linear synthesizer takes no option 'hidden'; "
                                         r"its options are \['classifier', 'critic'\]"):
        Synthesizer("linear", hidden=64)
    with pytest.raises(ValueError, match=r"the lowrank synthesizer takes no option 'rnak'; its options are \['rank'\]"):
        Synthesizer("lowrank", rnak=8)
    with pytest.raises(ValueError, match=r"the auto synthesizer takes no option 'rank'"):
        Synthesizer("auto", rank=8)
    Synthesizer("auto", hidden=8, kernel_size=3)  # options of the kinds auto may pick
    with pytest.raises(ValueError, match=r"the linear synthesizer's classifier must be True or False, got 1"):
        Synthesizer("linear", classifier=1)


def test_a_kind_that_cannot_take_the_boundary_names_it():
    with pytest.raises(ValueError, match=r"boundary 2 \(activations \(4, 16\)\): the conv synthesizer cannot take "
                                         r"them: the conv synthesizer needs \(B, C, L\)"):
        Synthesizer("conv").build(2, [torch.randn(4, 16)])


def test_a_linear_synthesizer_of_a_whole_feature_map_warns_or_is_refused():
    import warnings

    from synthpipe.stages import synthesizer as s

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Synthesizer("linear").build(0, [torch.randn(2, 64)])  # small: quiet
    with pytest.warns(UserWarning, match=r"boundary 0: a linear synthesizer of activations of shape \(B, 8, 32, 32\) "
                                         r"has 67,117,056 parameters \(0.3 GiB.*Synthesizer\('lowrank'"):
        Synthesizer("linear").build(0, [torch.randn(2, 8, 32, 32, device="meta")])
    with pytest.raises(ValueError, match=r"boundary 1: a linear synthesizer of activations of shape \(B, 64, 32, 32\) "
                                         r"has 4,295,032,832 parameters \(16.0 GiB"):
        Synthesizer("linear").build(1, [torch.randn(2, 64, 32, 32, device="meta")])  # (refused before allocating)
    assert s.LINEAR_WARN_PARAMS < 67_117_056 < s.LINEAR_MAX_PARAMS < 4_295_032_832


@pytest.mark.parametrize("kind, options, message", [
    ("lowrank", {"rank": 0}, r"the lowrank synthesizer's rank must be a whole number >= 1, got 0"),
    ("conv", {"kernel_size": "3"}, r"the conv synthesizer's kernel_size must be a whole number >= 1, got '3'"),
    ("conv", {"kernel_size": True}, r"kernel_size must be a whole number >= 1, got True"),
    ("token", {"hidden": -1}, r"the token synthesizer's hidden must be a whole number >= 1, got -1"),
    ("mlp", {"depth": 1.5}, r"the mlp synthesizer's depth must be a whole number >= 0, got 1.5"),
])
def test_sizes_must_be_whole_numbers(kind, options, message):
    with pytest.raises(ValueError, match=message):
        Synthesizer(kind, **options)
    Synthesizer("mlp", depth=0)  # no hidden layer: a plain linear map, allowed


# --------------------------------------------------------------------------- normalisation, bound, quality gate
def _randomised(synth: BoundarySynthesizer) -> BoundarySynthesizer:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in synth.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return synth.eval()


@pytest.mark.parametrize("kind,shape", [("linear", (6, 12)), ("lowrank", (6, 12)), ("token", (6, 7, 12))])
def test_a_normalising_synthesizer_ignores_the_activation_scale(kind, shape):
    h, y = torch.randn(*shape), torch.randint(0, NUM_CLASSES, (shape[0],))
    plain = _randomised(make(kind, conditional=True, normalize=False).build(0, (h,)))
    normed = _randomised(make(kind, conditional=True, normalize=True).build(0, (h,)))
    (small,), (large,) = normed((h,), y), normed((1000 * h + 3,), y)
    # (A token prediction is then divided by each position's scale, as behind a LayerNorm.)
    if kind == "token":
        torch.testing.assert_close(small, large * 1000, rtol=1e-3, atol=1e-3)
    else:
        torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-4)
    (a,), (b,) = plain((h,), y), plain((1000 * h,), y)
    assert not torch.allclose(a, b)  # the plain model's prediction follows the scale


def test_the_bound_scales_a_prediction_down_to_bound_times_the_running_target_rms():
    synth = make("linear", bound=2.0, target_momentum=0.5).build(0, (torch.randn(4, 3),))
    pred = (torch.full((4, 3), 10.0),)
    assert torch.equal(synth.bound_(tuple(p.clone() for p in pred))[0], pred[0])  # no target yet: as is
    # Batch-mean gradients of RMS 0.25 on a batch of 4: per-example RMS 1.
    synth.observe((torch.full((4, 3), 0.25),), (0.5,))
    assert synth.target_rms.tolist() == [1.0] and synth.error_ms.tolist() == [0.5]
    synth.observe((torch.full((4, 3), 0.75),), (1.5,))  # RMS 3: the average moves halfway
    assert synth.target_rms.tolist() == [2.0] and synth.error_ms.tolist() == [1.0]
    assert synth.quality.tolist() == [0.75]
    big = torch.randn(4, 3) * 100
    (out,) = synth.bound_((big.clone(),))
    assert float(out.pow(2).mean().sqrt()) == pytest.approx(4.0, rel=1e-5)  # 2 x 2.0
    torch.testing.assert_close(out / out.norm(), big / big.norm())  # direction kept
    small = torch.full((4, 3), 0.5)
    assert torch.equal(synth.bound_((small.clone(),))[0], small)  # within the bound: untouched


def test_non_finite_targets_leave_the_running_averages_alone():
    synth = make("linear", bound=1.0).build(0, (torch.randn(4, 3),))
    synth.observe((torch.ones(4, 3),), (1.0,))
    synth.observe((torch.full((4, 3), float("inf")),), (1.0,))
    assert synth.observed.tolist() == [1]
    synth.observe((torch.ones(4, 3),), (float("nan"),))
    assert synth.target_rms.tolist() == [4.0] and synth.error_ms.tolist() == [1.0]


def test_the_quality_gate_zeroes_predictions_until_the_model_explains_enough():
    synth = make("linear", min_quality=0.5, target_momentum=1.0).build(0, (torch.randn(4, 3),))
    pred = torch.randn(4, 3)
    assert torch.count_nonzero(synth.bound_((pred.clone(),))[0]) == 0  # no target yet
    synth.observe((torch.ones(4, 3) / 4,), (0.6,))  # explains 40% of the targets' power
    assert synth.quality.tolist() == [pytest.approx(0.4)]
    assert torch.count_nonzero(synth.bound_((pred.clone(),))[0]) == 0
    synth.observe((torch.ones(4, 3) / 4,), (0.4,))  # 60%
    assert torch.equal(synth.bound_((pred.clone(),))[0], pred)


def test_without_bound_or_gate_nothing_is_tracked_and_predictions_pass():
    synth = make("linear").build(0, (torch.randn(4, 3),))
    synth.observe((torch.ones(4, 3),), (1.0,))
    assert synth.observed.tolist() == [0] and not synth.tracks
    pred = torch.randn(4, 3) * 1e6
    assert torch.equal(synth.bound_((pred.clone(),))[0], pred)


def test_running_averages_are_saved_and_an_older_state_without_them_loads():
    h = torch.randn(4, 3)
    synth = make("linear", bound=1.0).build(0, (h,))
    synth.observe((torch.ones(4, 3),), (2.0,))
    fresh = make("linear", bound=1.0).build(0, (h,))
    fresh.load_state_dict(synth.state_dict())
    assert fresh.target_rms.tolist() == [4.0] and fresh.error_ms.tolist() == [2.0]
    assert fresh.observed.tolist() == [1]
    old = {k: v for k, v in synth.state_dict().items() if k not in ("target_rms", "error_ms", "observed")}
    fresh.load_state_dict(old)
    assert fresh.observed.tolist() == [0] and torch.isnan(fresh.quality).all()


@pytest.mark.parametrize("options,message", [
    ({"bound": 0}, "bound"), ({"bound": -1.0}, "bound"), ({"bound": float("inf")}, "bound"), ({"bound": True}, "bound"),
    ({"bound": "2"}, "bound"), ({"min_quality": 1.0}, "min_quality"), ({"min_quality": "0.1"}, "min_quality"),
    ({"target_momentum": 0}, "target_momentum"), ({"target_momentum": 1.5}, "target_momentum"),
    ({"normalize": "yes"}, "normalize"), ({"replay": 0}, "replay"), ({"replay": 1.5}, "replay"),
    ({"replay": True}, "replay")])
def test_bad_bound_gate_and_normalisation_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        Synthesizer("linear", **options)


def test_a_custom_model_sees_the_activation_unnormalised():
    seen = []

    class Probe(nn.Module):
        def forward(self, h, y=None):
            seen.append(h)
            return torch.zeros_like(h)

    h = torch.randn(4, 3) * 50
    synth = Synthesizer(lambda boundary, example: Probe(), normalize=True).build(0, (h,))
    synth((h,))
    assert torch.equal(seen[0], h)


# --------------------------------------------------------------------------- conv of any rank
@pytest.mark.parametrize("shape", [(4, 3, 9), (4, 3, 5, 4), (4, 2, 3, 4, 5)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("conditional", [False, True], ids=["dni", "cdni"])
def test_conv_takes_any_spatial_rank(shape, conditional):
    synth = make("conv", conditional).build(0, (torch.randn(shape),))
    convs = [m for m in synth.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert convs and {type(m) for m in convs} == {(nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(shape) - 3]}
    assert convs[0].in_channels == shape[1] + (NUM_CLASSES if conditional else 0)
    h = torch.randn(2, *shape[1:])
    (g,) = synth((h,), labels(2) if conditional else None)
    assert g.shape == h.shape and torch.equal(g, torch.zeros_like(g))  # the output layer starts at zero
    synth.parts[0].out.weight.data.normal_()
    (g,) = synth((h,), labels(2) if conditional else None)
    assert g.abs().sum() > 0


def test_conv_1d_takes_a_batch_of_one_in_training_mode():
    synth = make("conv").build(0, (torch.randn(4, 3, 1),))
    synth.train()
    (g,) = synth((torch.randn(1, 3, 1),))  # one value per channel: running statistics instead
    assert g.shape == (1, 3, 1)


def test_conv_refuses_more_than_three_spatial_dimensions_and_says_what_takes_them():
    with pytest.raises(ValueError, match=r"per-example shape \(2, 2, 2, 2, 2\); 'mlp', 'lowrank' or 'linear'"):
        make("conv").build(0, (torch.randn(4, 2, 2, 2, 2, 2),))


def _conv1d_stage() -> nn.Module:
    return nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2))


@pytest.mark.parametrize("stage, shape, expected", [
    (_conv1d_stage(), (4, 8, 20), "ConvSynth"),  # a Conv1d's (B, C, L) feature map
    (nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU()), (4, 2, 3, 4, 5), "ConvSynth"),
    (nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8)), (4, 20, 8), "TokenSynth"),  # a sequence (B, T, D)
    (nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), (4, 20, 8), "TokenSynth"),
    # A Conv1d whose output was moved to (B, L, C) and projected is a sequence again.
    (nn.Sequential(nn.Conv1d(1, 8, 3), nn.Linear(8, 8)), (4, 20, 8), "TokenSynth"),
    # Channels that do not match the last convolution: not its feature map.
    (nn.Sequential(nn.Conv1d(1, 8, 3)), (4, 20, 8), "TokenSynth"),
    (None, (4, 8, 20), "TokenSynth"),  # no module given: by rank, as before
    (None, (4, 2, 3, 4, 5), "LinearSynth"),
])
def test_auto_picks_conv_for_what_a_convolution_made(stage, shape, expected):
    synth = make("auto").build(1, (torch.randn(shape),), module=stage)
    assert type(synth.parts[0]).__name__ == expected


class _ResBlock1d(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a 1x1 conv where the width changes), then ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(cin, cout, 5, padding=2), nn.BatchNorm1d(cout)
        self.conv2, self.bn2 = nn.Conv1d(cout, cout, 5, padding=2), nn.BatchNorm1d(cout)
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(h + self.skip(x))


def test_a_resnet_style_conv1d_model_on_mnist1d_gets_conv_synthesizers_from_auto_and_learns():
    import synthpipe as sp
    from synthpipe import data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (1, 40)), _ResBlock1d(1, 16), _ResBlock1d(16, 16), nn.MaxPool1d(2),
                          _ResBlock1d(16, 16), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 10))
    train, _ = data.mnist1d(num_samples=1000, seed=0)
    batches = list(data.loader(train, batch_size=50, shuffle=True, seed=0))
    trainer = sp.Trainer(sp.split(model, balance=[2, 2, 4]), nn.CrossEntropyLoss(),
                         lambda p: torch.optim.Adam(p, lr=3e-3), gradients="synthetic",
                         synthesizer=sp.Synthesizer("auto", conditional=True, num_classes=10, hidden=16),
                         synth_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), progress=False)
    history = trainer.fit(batches, epochs=3)
    # Both boundaries are (B, 16, 40) and (B, 16, 20) feature maps of Conv1d stages.
    parts = [s.synth.parts[0] for s in trainer.runner.stages[:2]]
    assert [type(p).__name__ for p in parts] == ["ConvSynth", "ConvSynth"]
    assert all(isinstance(m, nn.Conv1d) for p in parts for m in p.modules() if isinstance(m, nn.modules.conv._ConvNd))
    losses = history.losses
    assert len(losses) == 3 * len(batches)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


def test_the_classifier_term_is_only_built_for_a_conditional_linear_synthesizer():
    h = torch.randn(6, 12)
    conditional = Synthesizer("linear", conditional=True, num_classes=5).build(0, [h]).parts[0]
    assert conditional.read is not None and conditional.back is not None
    assert conditional.read.weight.shape == (5, 12) and conditional.back.weight.shape == (12, 5)
    assert Synthesizer("linear").build(0, [h]).parts[0].read is None  # no labels: no p - y
    plain = Synthesizer("linear", conditional=True, num_classes=5, classifier=False).build(0, [h]).parts[0]
    assert plain.read is None and plain.back is None
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in conditional.parameters()) == n_plain + 2 * 5 * 12 + 5


def test_the_classifier_term_starts_at_zero_and_follows_p_minus_y():
    torch.manual_seed(0)
    h, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    part = Synthesizer("linear", conditional=True, num_classes=5, normalize=False).build(0, [h]).parts[0]
    assert torch.equal(part(h, y), torch.zeros_like(h))  # A and W start at zero
    with torch.no_grad():
        part.back.weight.normal_()
    p = torch.softmax(part.read(h), dim=1)
    expected = (p - torch.nn.functional.one_hot(y, 5).float()) @ part.back.weight.t()
    torch.testing.assert_close(part(h, y), expected)


def test_the_token_classifier_term_is_built_for_a_conditional_token_synthesizer_and_its_cost():
    h = torch.randn(6, 7, 12)
    part = Synthesizer("token", conditional=True, num_classes=5, hidden=16).build(0, [h]).parts[0]
    assert part.read.weight.shape == (5, 12) and part.back.weight.shape == (12, 5)
    assert Synthesizer("token", hidden=16).build(0, [h]).parts[0].read is None  # no labels: no p - y
    plain = Synthesizer("token", conditional=True, num_classes=5, hidden=16,
                        classifier=False).build(0, [h]).parts[0]
    assert plain.read is None and plain.back is None
    assert sum(p.numel() for p in part.parameters()) == sum(p.numel() for p in plain.parameters()) + 2 * 5 * 12 + 5
    with pytest.raises(ValueError, match="classifier"):
        Synthesizer("token", conditional=True, num_classes=5, classifier=1)


def test_the_token_classifier_term_is_a_layernormed_heads_input_gradient():
    """With the MLP part zero and ``W = V^T``, the boundary's token prediction is exactly
    autograd's input gradient of a softmax head read through a LayerNorm (the term's
    projection and the division by each position's scale together)."""
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8) * 3 + 1
    y = torch.randint(0, 4, (3, 5))
    synth = Synthesizer("token", conditional=True, num_classes=4, hidden=16).build(0, [h])
    part = synth.parts[0]
    assert torch.equal(synth((h,), y)[0], torch.zeros_like(h))  # starts at zero
    with torch.no_grad():
        part.read.weight.normal_()
        part.read.bias.normal_()
        part.back.weight.copy_(part.read.weight.t())
    x = h.clone().requires_grad_()
    logits = part.read(torch.nn.functional.layer_norm(x, (8,)))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 4), y.reshape(-1), reduction="sum")
    (expected,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(synth((h,), y)[0], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("conditional", [False, True])
def test_a_token_prediction_is_divided_by_each_positions_scale(conditional):
    """A stream grown c-fold (at one position, or everywhere) gets a prediction c times
    smaller there, as the true gradient behind a LayerNorm; other positions keep theirs."""
    torch.manual_seed(0)
    h = torch.randn(4, 6, 12)
    y = labels(4) if conditional else None
    synth = make("token", conditional=conditional).build(0, [h])
    with torch.no_grad():
        for p in synth.parameters():
            p.normal_()
    base = synth((h,), y)[0]
    close = dict(rtol=1e-4, atol=1e-4 * float(base.abs().max()))  # (LayerNorm's eps: not exact)
    torch.testing.assert_close(synth((10 * h,), y)[0], base / 10, **close)
    grown = h.clone()
    grown[:, 2] *= 5
    pred = synth((grown,), y)[0]
    torch.testing.assert_close(pred[:, 2], base[:, 2] / 5, **close)
    torch.testing.assert_close(pred[:, [0, 1, 3, 4, 5]], base[:, [0, 1, 3, 4, 5]])
    # Without normalisation the model sees the stream as it is and is not rescaled.
    raw = make("token", conditional=conditional, normalize=False).build(0, [h])
    raw.load_state_dict(synth.state_dict())
    torch.testing.assert_close(raw((h,), y)[0], raw.parts[0](h, y))


def fitted_error(batch: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], features: int,
                 classes: int, **options: Any) -> float:
    """The error left, as a fraction of the targets' power, after 1500 Adam steps of a
    conditional linear synthesizer (``options``) regressed on ``batch()``'s targets."""
    torch.manual_seed(1)
    part = Synthesizer("linear", conditional=True, num_classes=classes, normalize=False,
                       **options).build(0, [torch.zeros(2, features)]).parts[0]
    opt = torch.optim.Adam(part.parameters(), lr=1e-2)
    for _ in range(1500):
        h, y, target = batch()
        loss = (part(h, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    h, y, target = batch()
    with torch.no_grad():
        return float((part(h, y) - target).pow(2).mean() / target.pow(2).mean())


def test_the_classifier_term_fits_a_gradient_a_linear_map_cannot():
    """Targets shaped like a softmax head's input gradient, ``U^T (softmax(U h) - y)``: the
    regression fits them with the classifier term far better than without it."""
    torch.manual_seed(0)
    features, classes = 16, 4
    head = torch.randn(classes, features) * 2

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.randn(64, features)
        y = torch.randint(0, classes, (64,))
        target = (torch.softmax(h @ head.t(), 1) - torch.nn.functional.one_hot(y, classes).float()) @ head
        return h, y, target

    with_term = fitted_error(batch, features, classes, classifier=True)
    without = fitted_error(batch, features, classes, classifier=False)
    assert with_term < 0.5 * without, (with_term, without)


def test_the_critic_term_is_built_only_when_asked_with_a_fixed_start_and_its_cost():
    h = torch.randn(6, 12)
    base = Synthesizer("linear", conditional=True, num_classes=5).build(0, [h]).parts[0]
    assert base.critic_in is None and base.critic_head is None and base.critic_back is None  # off by default
    torch.manual_seed(1)
    part = Synthesizer("linear", conditional=True, num_classes=5, critic=7).build(0, [h]).parts[0]
    state = torch.get_rng_state()
    torch.manual_seed(2)
    again = Synthesizer("linear", conditional=True, num_classes=5, critic=7).build(0, [h]).parts[0]
    assert part.critic_in.weight.shape == (7, 12) and part.critic_head.weight.shape == (5, 7)
    assert part.critic_back.weight.shape == (12, 7)
    # the same start whatever the global random state, and units that differ
    assert torch.equal(part.critic_in.weight, again.critic_in.weight)
    assert torch.equal(part.critic_head.weight, again.critic_head.weight)
    assert not torch.equal(part.critic_in.weight[0], part.critic_in.weight[1])
    torch.manual_seed(1)
    Synthesizer("linear", conditional=True, num_classes=5).build(0, [h])
    assert torch.equal(torch.get_rng_state(), state)  # the term draws nothing from the global generator
    n_base = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in part.parameters()) == n_base + (12 * 7 + 7) + (7 * 5 + 5) + 7 * 12


def test_the_critic_term_starts_at_zero_and_is_the_input_gradient_shape_of_a_relu_classifier():
    torch.manual_seed(0)
    h, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    part = Synthesizer("linear", conditional=True, num_classes=5, classifier=False, critic=6,
                       normalize=False).build(0, [h]).parts[0]
    assert torch.equal(part(h, y), torch.zeros_like(h))  # A and K start at zero
    with torch.no_grad():
        part.critic_back.weight.copy_(part.critic_in.weight.t())  # K = U^T: the exact input gradient
    z = h.clone().requires_grad_(True)
    logits = part.critic_head(torch.relu(part.critic_in(z)))
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction="sum"), z)
    torch.testing.assert_close(part(h, y), grad)


def test_the_critic_term_fits_the_gradient_behind_a_relu_layer_better_than_the_classifier_term():
    """Targets shaped like the input gradient of a one-hidden-layer ReLU classifier: the
    regression fits them with the critic term better than with the classifier term alone."""
    torch.manual_seed(0)
    features, hidden, classes = 16, 32, 4
    inner, head = torch.randn(hidden, features), torch.randn(classes, hidden) / 2

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.randn(64, features)
        y = torch.randint(0, classes, (64,))
        z = h.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(torch.relu(z @ inner.t()) @ head.t(), y, reduction="sum")
        (target,) = torch.autograd.grad(loss, z)
        return h, y, target

    with_critic = fitted_error(batch, features, classes, critic=32)
    without = fitted_error(batch, features, classes, critic=0)
    assert with_critic < 0.5 * without, (with_critic, without)


def test_the_critic_term_is_refused_without_labels_and_as_a_negative_or_fractional_size():
    with pytest.raises(ValueError, match=r"the critic term \(critic=8\) .* needs the labels: pass conditional=True"):
        Synthesizer("linear", critic=8)
    with pytest.raises(ValueError, match=r"the linear synthesizer's critic must be a whole number >= 0, got -1"):
        Synthesizer("linear", conditional=True, num_classes=3, critic=-1)
    with pytest.raises(ValueError, match=r"the linear synthesizer's critic must be a whole number >= 0, got 2.5"):
        Synthesizer("linear", conditional=True, num_classes=3, critic=2.5)
    Synthesizer("linear", conditional=True, num_classes=3, critic=0)  # 0: no critic term
