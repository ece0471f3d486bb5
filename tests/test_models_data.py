"""Tests for synthpipe.models and synthpipe.data."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from synthpipe.data import loader, mnist1d, synthetic_classification
from synthpipe.models import (
    LMHead,
    TokenEmbedding,
    TransformerBlock,
    char_gpt,
    deep_mlp,
    lm_loss,
    paper_cnn,
    paper_mlp,
    wide_mlp,
)


# --------------------------------------------------------------------------- models
def _children_are_leaves(model: nn.Sequential) -> bool:
    return all(len(list(c.children())) == 0 for c in model.children())


def test_paper_mlp_shapes_and_layout():
    model = paper_mlp()
    assert isinstance(model, nn.Sequential) and _children_are_leaves(model)
    kinds = [type(c) for c in model]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 3 + [nn.Linear]
    assert model(torch.randn(8, 40)).shape == (8, 10)
    x = torch.randn(8, 40)
    for i, child in enumerate(model):  # every hidden activation is (B, hidden)
        x = child(x)
        if i < len(model) - 1:
            assert x.shape == (8, 256)

    custom = paper_mlp(in_features=7, num_classes=3, hidden=16, depth=5)
    assert len(custom) == 3 * 5 + 1
    assert custom(torch.randn(4, 7)).shape == (4, 3)
    assert paper_mlp(depth=0)(torch.randn(2, 40)).shape == (2, 10)


def test_paper_cnn_shapes_and_layout():
    model = paper_cnn()
    assert isinstance(model, nn.Sequential) and _children_are_leaves(model)
    assert isinstance(model[0], nn.Unflatten) and isinstance(model[-1], nn.Linear)
    x = torch.randn(8, 40)
    shapes = []
    for child in model:
        x = child(x)
        shapes.append(tuple(x.shape))
    assert shapes[0] == (8, 1, 40)
    assert (8, 64, 20) in shapes and (8, 64, 10) in shapes
    assert shapes[-2] == (8, 640) and shapes[-1] == (8, 10)

    other = paper_cnn(in_channels=2, num_classes=5, length=33, channels=8)
    assert other(torch.randn(3, 2 * 33)).shape == (3, 5)
    model.eval()
    assert model(torch.randn(1, 40)).shape == (1, 10)


def test_deep_mlp_shapes_and_layout():
    model = deep_mlp(in_features=32, hidden=64, depth=4, num_classes=7)
    assert isinstance(model, nn.Sequential) and _children_are_leaves(model)
    assert [type(c) for c in model] == [nn.Linear, nn.ReLU] * 4 + [nn.Linear]
    assert model(torch.randn(5, 32)).shape == (5, 7)
    assert deep_mlp()(torch.randn(2, 1024)).shape == (2, 10)


def test_models_are_trainable_on_cpu():
    torch.manual_seed(0)
    for model in (paper_mlp(), paper_cnn()):
        out = model(torch.randn(4, 40))
        nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
        assert all(p.grad is not None for p in model.parameters())


def test_wide_mlp_is_a_flat_wide_bn_mlp():
    model = wide_mlp()
    assert isinstance(model, nn.Sequential) and _children_are_leaves(model)
    assert [type(c) for c in model] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 7 + [nn.Linear]
    assert model[0].in_features == 40 and model[-1].out_features == 10
    assert all(m.out_features == 1024 for m in model if isinstance(m, nn.Linear) and m is not model[-1])
    assert model(torch.randn(4, 40)).shape == (4, 10)
    assert len(wide_mlp(hidden=8, depth=2)) == 7


@pytest.mark.parametrize("n_stages", [2, 3])
def test_wide_mlp_default_splits_into_balanced_stages(n_stages):
    # 6 equal hidden blocks after the small first one: 2 and 3 stages get the same
    # parameters to within the first block and the classifier (with depth 6, 2 stages
    # got 2.15M against 3.17M, which caps any 2-stage pipeline at 1.67x one device)
    import synthpipe as sp
    sizes = [sum(p.numel() for p in s.parameters()) for s in sp.split(wide_mlp(), n_stages=n_stages)]
    assert len(sizes) == n_stages and max(sizes) / min(sizes) < 1.05, sizes
    with pytest.raises(ValueError, match="depth"):
        wide_mlp(depth=0)


def test_char_gpt_layout_and_shapes():
    model = char_gpt(vocab_size=50, dim=32, n_layers=3, heads=4, max_len=16)
    kinds = [type(c) for c in model]
    assert kinds == [TokenEmbedding] + [TransformerBlock] * 3 + [LMHead]
    idx = torch.randint(0, 50, (2, 11))
    assert model(idx).shape == (2, 11, 50)
    # It splits between any two children: every boundary is (B, T, dim), and the children
    # run one after another give the model's output.
    h = idx
    for i, child in enumerate(model):
        h = child(h)
        if i < len(model) - 1:
            assert h.shape == (2, 11, 32) and h.dtype == torch.float32
    assert torch.allclose(h, model(idx))
    assert model[0].tokens.weight.data_ptr() != model[-1].head.weight.data_ptr()  # untied head


def test_char_gpt_is_causal():
    torch.manual_seed(0)
    model = char_gpt(vocab_size=20, dim=16, n_layers=2, heads=2, max_len=12).eval()
    idx = torch.randint(0, 20, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 20
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)  # positions before 7 cannot see it
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_char_gpt_refuses_bad_shapes_by_name():
    with pytest.raises(ValueError, match="divisible"):
        char_gpt(dim=30, heads=4)
    with pytest.raises(ValueError, match="n_layers"):
        char_gpt(n_layers=0)
    model = char_gpt(vocab_size=10, dim=8, n_layers=1, heads=2, max_len=4)
    with pytest.raises(ValueError, match="max_len 4"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_lm_loss_is_token_cross_entropy():
    logits = torch.randn(3, 5, 7)
    y = torch.randint(0, 7, (3, 5))
    expected = nn.functional.cross_entropy(logits.reshape(15, 7), y.reshape(15))
    assert torch.allclose(lm_loss(logits, y), expected)
    assert torch.allclose(lm_loss(torch.zeros(2, 4, 7), y[:2, :4]), torch.log(torch.tensor(7.0)))
    with pytest.raises(ValueError, match="targets"):
        lm_loss(logits, y[:, :4])


def test_char_gpt_learns_a_repeating_text():
    torch.manual_seed(0)
    model = char_gpt(vocab_size=8, dim=32, n_layers=2, heads=2, max_len=16)
    seq = torch.arange(17) % 8  # 0 1 2 ... 7 0 1 ...: the next byte is a function of this one
    x, y = seq[None, :-1].repeat(4, 1), seq[None, 1:].repeat(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        first = float(lm_loss(model(x), y))
    for _ in range(60):
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 1.5 and float(loss.detach()) < 0.2


def test_models_train_as_pipeline_stages_in_the_reference_trainer():
    import synthpipe as sp
    from synthpipe.data import loader

    torch.manual_seed(0)
    model = char_gpt(vocab_size=16, dim=16, n_layers=2, heads=2, max_len=8)
    x = torch.randint(0, 16, (32, 8))
    data = torch.utils.data.TensorDataset(x, (x + 1) % 16)
    trainer = sp.Trainer([model[:2], model[2:]], lm_loss, progress=False, delay=1,
                         synthesizer=sp.Synthesizer("token", conditional=True, num_classes=16, hidden=8))
    history = trainer.fit(loader(data, 8), epochs=2)
    losses = [v for v in history.losses if v == v]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.runner.stages[0].synth is not None  # stage 0 trained on synthetic gradients


# --------------------------------------------------------------------------- mnist1d
@pytest.fixture(scope="module")
def small_mnist1d():
    return mnist1d(num_samples=1000, seed=3)


def test_mnist1d_shapes_and_dtypes(small_mnist1d):
    train, test = small_mnist1d
    x, y = train.tensors
    xt, yt = test.tensors
    assert x.shape == (800, 40) and xt.shape == (200, 40)
    assert y.shape == (800,) and yt.shape == (200,)
    assert x.dtype == xt.dtype == torch.float32
    assert y.dtype == yt.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert set(y.tolist()) == set(range(10))
    assert len(train) == 800 and train[0][0].shape == (40,)


def test_mnist1d_standardised_with_train_statistics(small_mnist1d):
    (x, _), (xt, _) = small_mnist1d[0].tensors, small_mnist1d[1].tensors
    assert abs(float(x.mean())) < 1e-5
    assert abs(float(x.std()) - 1.0) < 1e-4
    # the test split uses the train statistics, so it is close to but not exactly standard
    assert abs(float(xt.mean())) < 0.2 and abs(float(xt.std()) - 1.0) < 0.2


def test_mnist1d_deterministic_and_seed_dependent(small_mnist1d):
    train, test = small_mnist1d
    again_train, again_test = mnist1d(num_samples=1000, seed=3)
    assert torch.equal(train.tensors[0], again_train.tensors[0])
    assert torch.equal(train.tensors[1], again_train.tensors[1])
    assert torch.equal(test.tensors[0], again_test.tensors[0])
    # every call returns its own tensors: mutating one leaves the cache intact
    again_train.tensors[0].zero_()
    assert not torch.equal(mnist1d(num_samples=1000, seed=3)[0].tensors[0], again_train.tensors[0])
    other, _ = mnist1d(num_samples=1000, seed=4)
    assert not torch.equal(train.tensors[0], other.tensors[0])


def test_mnist1d_leaves_global_rngs_alone():
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), float(np.random.rand()))
    random.seed(123)
    np.random.seed(123)
    mnist1d(num_samples=100, seed=7)
    assert (random.random(), float(np.random.rand())) == expected


def test_mnist1d_train_split():
    train, test = mnist1d(num_samples=100, seed=5, train_split=0.5)
    assert len(train) == 50 and len(test) == 50


# --------------------------------------------------------------------------- synthetic
def test_synthetic_classification_deterministic():
    a = synthetic_classification(256, 20, num_classes=5, seed=1)
    b = synthetic_classification(256, 20, num_classes=5, seed=1)
    c = synthetic_classification(256, 20, num_classes=5, seed=2)
    x, y = a.tensors
    assert x.shape == (256, 20) and x.dtype == torch.float32
    assert y.shape == (256,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 5
    assert len(torch.unique(y)) > 1
    assert torch.equal(x, b.tensors[0]) and torch.equal(y, b.tensors[1])
    assert not torch.equal(x, c.tensors[0])


def test_synthetic_classification_is_learnable():
    torch.manual_seed(0)
    x, y = synthetic_classification(512, 16, num_classes=4, seed=0).tensors
    model = nn.Linear(16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


# --------------------------------------------------------------------------- loader
def test_loader_seeded_shuffle():
    data = synthetic_classification(50, 4, seed=0)

    def order(seed):
        return torch.cat([y for _, y in loader(data, 8, shuffle=True, seed=seed)])

    def first_x(seed):
        return next(iter(loader(data, 8, shuffle=True, seed=seed)))[0]

    assert torch.equal(order(3), order(3))
    assert torch.equal(first_x(3), first_x(3))
    assert not torch.equal(first_x(3), first_x(4))
    plain = list(loader(data, 8))
    assert torch.equal(plain[0][0], data.tensors[0][:8])  # no shuffle: dataset order
    assert [len(b[0]) for b in plain] == [8] * 6 + [2]
    assert [len(b[0]) for b in loader(data, 8, drop_last=True)] == [8] * 6
