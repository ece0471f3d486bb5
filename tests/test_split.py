"""Splitting: stages compose to the model, keep its keys, and share its tensors."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from synthpipe.stages.split import StageSequential, as_tuple, compose, split

# -- helpers ---------------------------------------------------------------------------


def assert_shares_model(stages, model):
    """Stage keys are the model's keys, and every stage tensor is the model's object."""
    model_sd = model.state_dict(keep_vars=True)
    seen = set()
    for stage in stages:
        for k, v in stage.state_dict(keep_vars=True).items():
            assert k in model_sd, k
            assert v is model_sd[k], k
            seen.add(k)
    assert seen == set(model_sd)
    merged = {}
    for stage in stages:
        merged.update(stage.state_dict())
    assert merged.keys() == model.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())
    params = {id(p) for p in model.parameters()}
    assert all(id(p) in params for s in stages for p in s.parameters())


def set_mode(modules, training):
    for m in modules:
        m.train(training)


def seq_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4), nn.Sigmoid())


def bn_seq_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


# -- nn.Sequential ------------------------------------------------------------------------


def test_sequential_by_balance():
    model = seq_model()
    stages = split(model, balance=[2, 3, 1])
    assert [len(s) for s in stages] == [2, 3, 1]
    assert all(isinstance(s, StageSequential) for s in stages)
    assert set(stages[1].state_dict()) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    assert stages[1][0] is model[2] and stages[2][0] is model[5]
    assert stages[0][0].weight is model[0].weight
    assert_shares_model(stages, model)
    x = torch.randn(5, 8)
    assert torch.equal(compose(stages, x), model(x))


def test_sequential_stage_keys_follow_original_names():
    model = nn.Sequential()
    for name, layer in [("embed", nn.Linear(4, 4)), ("act", nn.ReLU()), ("head", nn.Linear(4, 2))]:
        model.add_module(name, layer)
    stages = split(model, balance=[1, 2])
    assert list(stages[1].state_dict()) == ["head.weight", "head.bias"]
    assert stages[1].head is model.head


@pytest.mark.parametrize("by", ["params", "time"])
def test_sequential_by_n_stages_with_batchnorm(by):
    model = bn_seq_model()
    reference = copy.deepcopy(model)
    x = torch.randn(16, 8)
    stages = split(model, n_stages=3, by=by, example_input=x)
    assert len(stages) == 3 and sum(len(s) for s in stages) == len(model)
    assert_shares_model(stages, model)
    # Splitting (and profiling) changed nothing in the model.
    for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    # Training mode: batch statistics, and running stats update in the model itself.
    set_mode([model, reference, *stages], True)
    assert torch.equal(compose(stages, x), reference(x))
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert int(model[4].num_batches_tracked) == 1

    # Eval mode through the stages' own .eval(): running statistics are used.
    for s in stages:
        s.eval()
    reference.eval()
    assert not model[1].training
    assert torch.equal(compose(stages, x), reference(x))


def test_sequential_by_params_puts_a_huge_layer_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 256), nn.Linear(256, 256),
                          nn.Linear(256, 4), nn.ReLU())
    stages = split(model, n_stages=3)
    assert [list(s._modules) for s in stages][1] == ["3"]


def test_sequential_by_points():
    model = seq_model()
    stages = split(model, points=["2", "4"])
    assert [list(s._modules) for s in stages] == [["0", "1"], ["2", "3"], ["4", "5"]]
    x = torch.randn(3, 8)
    assert torch.equal(compose(stages, x), model(x))


def test_split_does_not_change_modes_of_the_model_children():
    model = bn_seq_model().train()
    model[1].eval()  # frozen BatchNorm
    stages = split(model, balance=[3, 4])
    assert stages[0].training and not model[1].training


class Pair(nn.Module):
    def forward(self, x):
        return torch.relu(x), torch.sigmoid(x)


class Join(nn.Module):
    """Takes the previous child's tuple as its single argument, as nn.Sequential does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, pair):
        a, b = pair
        return self.lin(a) * b


def test_sequential_tuple_boundary():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Pair(), Join(), nn.Linear(6, 2))
    stages = split(model, balance=[2, 2])
    x = torch.randn(3, 4)
    boundary = as_tuple(stages[0](x))
    assert len(boundary) == 2
    assert torch.equal(stages[1](*boundary), model(x))
    assert torch.equal(compose(stages, x), model(x))


# -- traced models --------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))  # residual branch


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.layer2 = nn.Sequential(Block(8))
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = x.mean(dim=(2, 3))
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def resnet():
    torch.manual_seed(0)
    return ResNet()


POINTS = ["layer1.1", "fc2"]


def test_traced_residual_model_keys_and_sharing():
    model = resnet()
    stages = split(model, points=POINTS, example_input=torch.randn(2, 3, 8, 8))
    assert len(stages) == 3
    keys = [set(s.state_dict()) for s in stages]
    assert "layer1.0.bn.running_mean" in keys[0]
    assert "layer1.1.conv.weight" in keys[1] and "layer2.0.bn.running_var" in keys[1]
    assert keys[2] == {"fc2.weight", "fc2.bias"}
    assert_shares_model(stages, model)
    # The leaves are the model's own modules again, not traced copies.
    assert stages[0].get_submodule("layer1.0.bn") is model.layer1[0].bn
    assert stages[2].fc2 is model.fc2
    # pipeline() patches forward() of split points; split() undoes it.
    assert "forward" not in model.fc2.__dict__ and "_orig_forward" not in model.fc2.__dict__


@pytest.mark.parametrize("traced_in, points", [
    ("train", POINTS),
    ("eval", POINTS),
    ("train", ["layer1.0.bn", "fc1"]),  # a cut inside a residual block
])
def test_traced_residual_model_eval_and_train(traced_in, points):
    model = resnet()
    getattr(model, traced_in)()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    stages = split(model, points=points, example_input=x)
    assert len(stages) == 3
    assert_shares_model(stages, model)

    # Eval: running statistics and no dropout, whatever mode the model was traced in.
    for s in stages:
        s.eval()
    reference.eval()
    assert not model.layer1[0].bn.training
    assert torch.equal(compose(stages, x), reference(x))

    # Train: batch statistics, dropout with the same random stream, running stats and
    # gradients land in the model's own tensors.
    for s in stages:
        s.train()
    reference.train()
    torch.manual_seed(1)
    out = compose(stages, x)
    torch.manual_seed(1)
    expected = reference(x)
    assert torch.equal(out, expected)
    for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert int(model.bn1.num_batches_tracked) == 1
    out.square().sum().backward()
    expected.square().sum().backward()
    for (k, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), k


class Skip(nn.Module):
    """A skip connection across one split point and another across two."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)
        self.d = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        g = self.b(h) + h        # h crosses the split at "b"
        y = self.c(g) * h        # ... and the one at "c": passed through stage 1
        return self.d(y + g)


def test_traced_skip_connections_cross_boundaries():
    torch.manual_seed(0)
    model = Skip()
    x = torch.randn(5, 4)
    stages = split(model, points=["b", "c", "d"], example_input=x)
    out0 = as_tuple(stages[0](x))
    out1 = as_tuple(stages[1](*out0))
    out2 = as_tuple(stages[2](*out1))
    assert len(out0) == 1          # h only
    assert len(out1) == 2          # g and h (h passed through stage 1)
    assert len(out2) == 1          # c(g) * h + g, folded before the split at "d"
    assert torch.equal(stages[3](*out2), model(x))
    assert torch.equal(compose(stages, x), model(x))
    assert_shares_model(stages, model)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, bias):
        return self.head(torch.relu(self.enc(x))) + bias  # bias is only used at the end


def test_traced_model_with_two_inputs():
    torch.manual_seed(0)
    model = TwoInputs()
    x, bias = torch.randn(3, 4), torch.randn(3, 2)
    stages = split(model, points=["head"], example_input=(x, bias))
    assert len(as_tuple(stages[0](x, bias))) == 2  # the unused input rides along
    assert torch.equal(compose(stages, x, bias), model(x, bias))


class SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.bn(self.lin(self.bn(x))))  # bn called twice


def test_traced_shared_batchnorm_warns_it_stays_frozen():
    model = SharedNorm()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stages = split(model, points=["out"], example_input=torch.randn(3, 4))
    messages = [str(w.message) for w in record]
    assert len(messages) == 2, messages  # both calls: 'bn' and its second call 'bn@1'
    assert all("frozen to the train/eval mode" in m for m in messages)
    assert "'bn'" in messages[0] and "'bn@1'" in messages[1]
    x = torch.randn(3, 4)
    assert torch.allclose(compose(stages, x), model(x))  # still correct in the traced mode


def test_traced_split_is_quiet_for_ordinary_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split(resnet(), points=POINTS, example_input=torch.randn(2, 3, 8, 8))


# -- errors ------------------------------------------------------------------------------


def test_sequential_errors():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    with pytest.raises(ValueError, match=r"balance \[2, 2\] sums to 4 but the model has 5 children"):
        split(model, balance=[2, 2])
    with pytest.raises(ValueError, match=r"balance \[2, 0, 3\] has entry 1 = 0"):
        split(model, balance=[2, 0, 3])
    with pytest.raises(ValueError, match=r"balance \[6, -1\] has entry 1 = -1"):
        split(model, balance=[6, -1])
    with pytest.raises(ValueError, match=r"5 children into 6 stages \(more stages than children\)"):
        split(model, n_stages=6)
    with pytest.raises(ValueError, match=r"n_stages must be at least 1, got 0"):
        split(model, n_stages=0)
    with pytest.raises(ValueError, match=r"exactly one of n_stages and balance.*n_stages=2, balance=\[2, 3\]"):
        split(model, n_stages=2, balance=[2, 3])
    with pytest.raises(ValueError, match=r"exactly one of n_stages and balance.*n_stages=None, balance=None"):
        split(model)
    with pytest.raises(ValueError, match=r"unknown by='flops'; expected one of \['params', 'time'\]"):
        split(model, n_stages=2, by="flops")
    with pytest.raises(ValueError, match=r'by="time" needs example_input'):
        split(model, n_stages=2, by="time")
    with pytest.raises(ValueError, match=r"split point '7' is not a child"):
        split(model, points=["2", "7"])
    with pytest.raises(ValueError, match=r"not\s+the first child '0'"):
        split(model, points=["0"])
    with pytest.raises(ValueError, match=r"n_stages=2 does not match 2 points \(3 stages\)"):
        split(model, n_stages=2, points=["1", "3"])
    with pytest.raises(ValueError, match=r"cannot split an empty nn.Sequential"):
        split(nn.Sequential(), n_stages=1)


def test_a_module_object_used_twice_is_kept_at_both_places():
    # named_children() lists a repeated object once: the second ReLU used to vanish.
    torch.manual_seed(0)
    act, block = nn.ReLU(), nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), act, block, act, block, act, nn.Linear(4, 2))
    x = torch.randn(5, 3)
    for kwargs in ({"balance": [1, 6]}, {"balance": [2, 5]}, {"points": ["2"]}):
        stages = split(model, **kwargs)
        assert sum(len(s) for s in stages) == len(model) == 7
        assert torch.equal(compose(stages, x), model(x))
    stages = split(model, balance=[2, 5])
    assert list(stages[1].state_dict()) == ["2.weight", "2.bias", "4.weight", "4.bias", "6.weight", "6.bias"]
    assert list(stages[1].parameters()) == [block.weight, block.bias, model[6].weight, model[6].bias]  # once each


def test_a_tensor_shared_by_two_stages_is_refused():
    block = nn.Linear(4, 4)
    model = nn.Sequential(block, nn.ReLU(), block)
    with pytest.raises(ValueError, match=r"'0.weight' \(stage 0\) and '2.weight' \(stage 1\) are the same tensor"):
        split(model, balance=[2, 1])
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match="put the children that share it in one stage"):
        split(tied, balance=[1, 2])
    assert [len(s) for s in split(tied, balance=[3])] == [3]  # one stage may share


class Tied(nn.Module):
    """Token model whose head reuses the embedding: as a tied module, functionally, or
    with a parameter of the model itself used on both sides of a point."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(11, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.scale = nn.Parameter(torch.ones(8))
        self.register_buffer("table", torch.arange(8.0))  # a constant every part reads (rotary-style)
        if how == "module":
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids) * self.scale + self.table
        h = torch.relu(self.mid(h)) + self.table
        if self.how == "functional":
            return h @ self.emb.weight.t()
        if self.how == "root":
            h = h * self.scale
        return self.head(h)


@pytest.mark.parametrize("how, message", [
    ("module", r"'emb.weight' \(stage 0\) and 'head.weight' \(stage 1\) are the same parameter"),
    ("functional", r"'emb.weight' is used by stage 0 and stage 1"),
    ("root", r"'scale' is used by stage 0 and stage 1"),
])
def test_a_parameter_used_in_two_traced_stages_is_refused(how, message):
    ids = torch.randint(0, 11, (4, 5))
    with pytest.raises(ValueError, match=message + ".*move the split points so that every use falls in one stage"):
        split(Tied(how), points=["mid"], example_input=ids)


def test_a_constant_buffer_read_by_every_stage_is_fine_and_exports_once():
    from synthpipe.engine.checkpoint import merge_module_states

    model = Tied("plain")
    ids = torch.randint(0, 11, (4, 5))
    stages = split(model, points=["mid"], example_input=ids)
    assert torch.allclose(compose(stages, ids), model(ids))
    assert all("table" in s.state_dict() for s in stages)  # a copy in each stage
    merged = merge_module_states([s.state_dict() for s in stages])
    assert set(merged) == set(model.state_dict()) and torch.equal(merged["table"], model.table)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.a = nn.Linear(6, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x):
        return self.c(self.shared(torch.relu(self.a(self.shared(x)))))


def test_a_module_called_twice_in_one_stage_exports_under_its_own_name():
    from synthpipe.engine.checkpoint import merge_module_states

    model = CalledTwice()
    x = torch.randn(3, 6)
    stages = split(model, points=["c"], example_input=x)
    assert any("@1" in k for k in stages[0].state_dict())  # the tracer's name for the second call
    merged = merge_module_states([s.state_dict() for s in stages])
    assert set(merged) == set(model.state_dict())
    fresh = CalledTwice()
    fresh.load_state_dict(merged)  # strict: no unexpected "shared@1.weight"
    assert torch.allclose(fresh(x), model(x))
    with pytest.raises(ValueError, match=r"'shared.weight' is used by stage 0 and stage 1"):
        split(model, points=["a"], example_input=x)  # the two calls on both sides of the point


def test_balance_takes_any_integer_type_and_points_must_be_a_list():
    import numpy as np

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    assert [len(s) for s in split(model, balance=np.array([3, 2]))] == [3, 2]
    with pytest.raises(ValueError, match=r"has entry 0 = 2.5; every stage needs a positive whole number"):
        split(model, balance=[2.5, 2.5])
    with pytest.raises(ValueError, match=r"has entry 1 = True"):
        split(model, balance=[4, True])
    with pytest.raises(ValueError, match=r"points must be a list of submodule names, got the string '3'"):
        split(model, points="3")


def test_traced_errors():
    model = resnet()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"unknown split point 'layer9': .*valid names include \['conv1'"):
        split(model, points=["layer9"], example_input=x)
    with pytest.raises(ValueError, match=r"unknown split point 'layer1.7'"):
        split(model, points=["layer1.7"], example_input=x)
    with pytest.raises(ValueError, match=r"split points \['fc2'\] need example_input"):
        split(model, points=["fc2"])
    with pytest.raises(ValueError, match=r"points are required to split a ResNet.*e.g. points=\['bn1', 'layer1'\]"):
        split(model, n_stages=2, example_input=x)
    with pytest.raises(ValueError, match=r"balance=\[1, 2\] only applies to nn.Sequential"):
        split(model, balance=[1, 2])
    with pytest.raises(ValueError, match=r"n_stages=4 does not match 2 points"):
        split(model, n_stages=4, points=POINTS, example_input=x)
    with pytest.raises(ValueError, match=r"contain duplicates"):
        split(model, points=["fc2", "fc2"], example_input=x)
    with pytest.raises(ValueError, match=r"split points \['conv1'\] gave 1 stages, expected 2"):
        split(model, points=["conv1"], example_input=x)  # nothing runs before conv1
    # Failed splits leave no patched forward() behind.
    assert "forward" not in model.conv1.__dict__


# -- what tracing freezes, and why it fails ---------------------------------------------------

class DropoutBlock(nn.Module):  # a block with children whose dropout is functional
    def __init__(self, p: float):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.p = p

    def forward(self, x):
        return torch.nn.functional.dropout(self.lin(x), self.p, self.training)


class Attention(nn.Module):
    def __init__(self, p: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=p, batch_first=True)
        self.block = DropoutBlock(0.5 if p else 0.0)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.block(self.enc(self.inp(x))))


@pytest.mark.parametrize("training", [True, False])
def test_dropout_left_in_traced_code_is_named_in_a_warning(training):
    model = Attention().train(training)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        split(model, points=["enc"], example_input=torch.randn(4, 5, 8))
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert messages[0].startswith("stage 1: dropout in traced code (")
    assert "enc.self_attn" in messages[0] and "block" in messages[0]
    if training:
        assert "frozen to the training mode" in messages[0] and "evaluation is random" in messages[0]
    else:
        assert "frozen to the eval mode" in messages[0] and "stays off during training" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dropout: nothing to say; nn.Dropout leaves stay live
        stages = split(Attention(p=0.0), points=["enc"], example_input=torch.randn(4, 5, 8))
    assert isinstance(stages[1].get_submodule("enc.dropout1"), nn.Dropout)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # Python control flow on a tensor value
            h = h * 2
        return self.b(h)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.blk = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        return self.c(self.blk(self.a(self.blk(x))))


def test_tracing_failures_are_explained_in_the_user_s_terms():
    with pytest.raises(ValueError, match=r"torch.export could not capture Branchy.forward\(\) as one graph.*"
                                         r"test_split.py:\d+ \(if h.sum\(\) > 0:.*use torch.where"):
        split(Branchy(), points=["b"], example_input=torch.randn(8, 4))
    model = resnet()
    with pytest.raises(ValueError, match=r"ResNet\(\*example_input\) fails when run as is.*expected input"
                                         r".*\(example_input: \(2, 5, 8, 8\):float32\)"):
        split(model, points=POINTS, example_input=torch.randn(2, 5, 8, 8))
    for point in ["blk", "blk.0"]:
        with pytest.raises(ValueError, match=rf"split point '{point}' is called 2 times by Reused.forward\(\)"):
            split(Reused(), points=[point], example_input=torch.randn(3, 4))
    model = Reused().train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="is called 2 times"):
        split(model, points=["blk"], example_input=torch.randn(3, 4))  # (found by running the model as is)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BatchNorm stats as they were
