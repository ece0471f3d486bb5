"""stages/materialize.py: stages built on the meta device, allocated only where they run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import synthpipe as sp
from synthpipe.stages.materialize import materialize, on_meta
from synthpipe.stages.stage import Stage

from multiprocess import run_ranks
from reference import assert_states_close, plain_backprop


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


class Scale(nn.Module):
    """A parameter of its own and no reset_parameters: needs an ``init``."""

    def __init__(self, n: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.gain


def test_materialize_allocates_and_runs_each_modules_own_initialisation():
    with torch.device("meta"):
        m = nn.ModuleDict({"lin": nn.Linear(64, 32), "bn": nn.BatchNorm1d(32), "ln": nn.LayerNorm(32),
                           "emb": nn.Embedding(10, 32), "attn": nn.MultiheadAttention(32, 4)})
    assert on_meta(m)
    materialize(m, torch.device("cpu"))
    assert not on_meta(m)
    bound = 1 / math.sqrt(64)  # nn.Linear's kaiming-uniform bound: garbage would exceed it
    assert 0 < m["lin"].weight.abs().max() <= bound and m["lin"].weight.std() > bound / 4
    assert torch.equal(m["bn"].running_var, torch.ones(32)) and torch.equal(m["bn"].running_mean, torch.zeros(32))
    assert int(m["bn"].num_batches_tracked) == 0
    assert torch.equal(m["ln"].weight, torch.ones(32)) and torch.equal(m["ln"].bias, torch.zeros(32))
    assert 0.5 < m["emb"].weight.std() < 1.5  # N(0, 1)
    xavier = math.sqrt(6 / (32 + 3 * 32))  # MultiheadAttention._reset_parameters
    assert 0 < m["attn"].in_proj_weight.abs().max() <= xavier
    assert torch.equal(m["attn"].in_proj_bias, torch.zeros(96))


def test_a_tensor_nothing_would_initialise_is_named_unless_init_is_given():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 4), Scale(4))
    with pytest.raises(ValueError, match=r"stage 2 was built on the meta device, but nothing would initialise "
                                         r"1\.gain \(Scale\).*pass init=fn"):
        materialize(m, torch.device("cpu"), name="stage 2")
    assert on_meta(m), "a refused module is left untouched"

    def init(module):
        module[1].gain.fill_(2.0)

    materialize(m, torch.device("cpu"), init=init)
    assert torch.equal(m[1].gain, torch.full((4,), 2.0))


def test_mixed_meta_and_allocated_tensors_are_refused():
    m = nn.Sequential(nn.Linear(4, 4))
    with torch.device("meta"):
        m.append(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"stage 0 mixes meta and allocated tensors \(0\.weight"):
        materialize(m, torch.device("cpu"), name="stage 0")


def test_init_that_leaves_a_tensor_on_meta_is_an_error():
    with torch.device("meta"):
        m = nn.Sequential(Scale(3))
    with pytest.raises(ValueError, match="0.gain still on the meta device"):
        materialize(m, torch.device("cpu"),
                    init=lambda module: setattr(module[0], "gain", nn.Parameter(torch.ones(3, device="meta"))))


def test_stage_of_a_meta_module_needs_a_device_and_allocates_there():
    with torch.device("meta"):
        module = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="stage 0: give a device to run on"):
        Stage(0, 2, module, sgd)
    stage = Stage(0, 2, module, sgd, device="cpu")
    assert all(p.device.type == "cpu" for p in stage.module.parameters())
    assert stage.optimizer is not None and len(stage.optimizer.param_groups[0]["params"]) == 2


def meta_model() -> nn.Sequential:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Tanh(),
                             nn.Linear(32, 5))


def fixed_init(module: nn.Module) -> None:
    """Values that depend only on each parameter's shape: the same in any stage or model."""
    for p in module.parameters():
        n = p.numel()
        p.copy_((torch.arange(n, dtype=p.dtype).remainder(7) - 3).reshape(p.shape) / (7 * math.sqrt(p.shape[-1])))


def batches(n: int = 6) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def test_trainer_in_one_process_trains_a_meta_built_model():
    trainer = sp.Trainer(sp.split(meta_model(), balance=[3, 3]), nn.CrossEntropyLoss(), adam, gradients="backprop",
                         device="cpu", init=fixed_init, progress=False)
    trainer.fit(batches())
    dense = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Tanh(),
                          nn.Linear(32, 5))
    with torch.no_grad():
        fixed_init(dense)
    assert_states_close(trainer.state_dict(), plain_backprop(dense, batches(), adam), atol=1e-5)


def fit_meta(rank: int, data: list, directory: str) -> dict:
    stages = sp.split(meta_model(), balance=[3, 3])
    trainer = sp.Trainer(stages, nn.CrossEntropyLoss(), adam, gradients="backprop", init=fixed_init, progress=False)
    trainer.fit(data)
    trainer.save(directory)
    out = {"state": trainer.state_dict(), "mine_on_meta": on_meta(stages[rank]),
           "other_on_meta": on_meta(stages[1 - rank])}
    trainer.close()
    # a fresh meta-built trainer (default initialisation) resumes from the checkpoint
    resumed = sp.Trainer(sp.split(meta_model(), balance=[3, 3]), nn.CrossEntropyLoss(), adam,
                         gradients="backprop", progress=False)
    resumed.load(directory)
    out["resumed"] = resumed.state_dict()
    resumed.close()
    return out


@pytest.mark.timeout(120)
def test_each_rank_allocates_only_its_own_stage_and_trains_like_the_dense_model(tmp_path):
    results = run_ranks(fit_meta, 2, batches(), str(tmp_path / "ckpt"))
    dense = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Tanh(),
                          nn.Linear(32, 5))
    with torch.no_grad():
        fixed_init(dense)
    expected = plain_backprop(dense, batches(), adam)
    for rank, r in enumerate(results):
        assert not r["mine_on_meta"], f"rank {rank}: its stage was not allocated"
        assert r["other_on_meta"], f"rank {rank} allocated a stage it does not run"
        assert_states_close(r["state"], expected, atol=1e-5)
        assert_states_close(r["resumed"], r["state"], atol=0.0)
