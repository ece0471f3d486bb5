"""Tests for synthpipe.models and synthpipe.data."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from synthpipe.data import loader, mnist1d, synthetic_classification
from synthpipe.models import deep_mlp, paper_cnn, paper_mlp


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
