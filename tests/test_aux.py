"""Auxiliary head recipes (stages/aux.py): shapes per kind and refusals by name."""
from __future__ import annotations

import pytest
import torch

import synthpipe as sp


@pytest.mark.parametrize("kind,hidden,example,out", [
    ("linear", None, (torch.randn(4, 6),), (4, 3)),
    ("linear", None, (torch.randn(4, 2, 5), torch.randn(4, 3)), (4, 3)),  # a tuple boundary: flattened, joined
    ("mlp", 8, (torch.randn(4, 6),), (4, 3)),
    ("pool", None, (torch.randn(4, 5, 7),), (4, 3)),  # (B, C, L) feature map
    ("pool", 8, (torch.randn(4, 5, 7, 7),), (4, 3)),  # (B, C, H, W)
    ("token", None, (torch.randn(4, 9, 6),), (4, 9, 3)),  # per token
])
def test_each_kind_gives_logits_of_the_shape_the_loss_takes(kind, hidden, example, out):
    head = sp.AuxHead(kind, num_classes=3, hidden=hidden).build(0, example)
    assert tuple(head(example).shape) == out
    if kind == "token":  # another sequence length and batch size later
        assert tuple(head((torch.randn(2, 4, 6),)).shape) == (2, 4, 3)


@pytest.mark.parametrize("hidden", [None, 8])
def test_the_token_head_reads_the_stream_through_a_layernorm(hidden):
    # A residual stream grown tenfold gives the same logits, so a local loss cannot be
    # lowered by growing what the next stage reads; a plain linear map's logits grow with it.
    torch.manual_seed(0)
    h = torch.randn(4, 9, 6)
    head = sp.AuxHead("token", num_classes=3, hidden=hidden).build(0, (h,))
    assert isinstance(head.norm, torch.nn.LayerNorm) and head.norm.normalized_shape == (6,)
    torch.testing.assert_close(head((10 * h,)), head((h,)), atol=1e-4, rtol=1e-4)
    plain = head.net(10 * h) - head.net(h)
    assert plain.abs().max() > 0.1
    # Two tensors of a boundary are joined first, then normalised together.
    pair = sp.AuxHead("token", num_classes=3).build(0, (h[..., :2], h[..., 2:]))
    assert pair.norm.normalized_shape == (6,)


def test_integer_boundary_tensors_are_left_out():
    example = (torch.randn(4, 6), torch.ones(4, 6, dtype=torch.long))
    head = sp.AuxHead("linear", num_classes=3).build(0, example)
    assert head.net.in_features == 6


@pytest.mark.parametrize("args,message", [
    (dict(kind="huge", num_classes=3), "unknown auxiliary head kind 'huge'"),
    (dict(kind="linear"), "needs num_classes"),
    (dict(kind="linear", num_classes=0), "needs num_classes"),
    (dict(kind="mlp", num_classes=3), "the mlp auxiliary head needs hidden"),
    (dict(kind="pool", num_classes=3, hidden=0), "hidden must be a whole number >= 1"),
    (dict(kind="linear", num_classes=3, hidden=4), "takes no hidden"),
])
def test_bad_recipes_are_refused_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        sp.AuxHead(**args)


def test_a_boundary_a_kind_cannot_take_names_the_stage_and_shapes():
    with pytest.raises(ValueError, match=r"stage 2: the token auxiliary head needs \(B, T, D\) activations"):
        sp.AuxHead("token", num_classes=3).build(2, (torch.randn(4, 6),))
    with pytest.raises(ValueError, match="stage 1: an auxiliary head needs a floating-point activation"):
        sp.AuxHead("linear", num_classes=3).build(1, (torch.ones(4, 6, dtype=torch.long),))
