"""Balancing: exact contiguous partition, parameter counts, and side-effect-free profiling."""
import copy
import itertools
import random

import pytest
import torch
import torch.nn as nn

from synthpipe.stages.balance import (
    balance_by_params,
    balance_by_time,
    block_sums,
    param_costs,
    partition,
    whole_layers,
)


def brute_force_best(costs, n_parts):
    """Smallest achievable max block sum over all compositions of len(costs) into n_parts."""
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), n_parts - 1):
        bounds = (0,) + cuts + (n,)
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


def check_balance(balance, n, n_parts):
    assert len(balance) == n_parts
    assert all(isinstance(b, int) and b >= 1 for b in balance)
    assert sum(balance) == n


@pytest.mark.parametrize("seed", range(40))
def test_partition_is_optimal_on_random_integer_costs(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    costs = [rng.randint(0, 20) for _ in range(n)]
    for n_parts in range(1, n + 1):
        balance = partition(costs, n_parts)
        check_balance(balance, n, n_parts)
        assert max(block_sums(costs, balance)) == brute_force_best(costs, n_parts)


@pytest.mark.parametrize("seed", range(10))
def test_partition_is_optimal_on_random_float_costs(seed):
    rng = random.Random(1000 + seed)
    n = rng.randint(2, 8)
    costs = [rng.uniform(0.0, 3.0) for _ in range(n)]
    for n_parts in range(1, n + 1):
        balance = partition(costs, n_parts)
        check_balance(balance, n, n_parts)
        assert max(block_sums(costs, balance)) == pytest.approx(brute_force_best(costs, n_parts))


def test_partition_prefers_the_most_even_optimum():
    assert partition([1, 1, 1, 1], 2) == [2, 2]
    assert partition([1, 1, 1, 1, 1, 1], 3) == [2, 2, 2]
    assert partition([5, 1, 1, 1, 1, 1], 2) == [1, 5]
    assert partition([0, 0, 0], 3) == [1, 1, 1]
    assert partition([7], 1) == [1]


def test_partition_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"cannot partition 3 costs into 5 non-empty parts"):
        partition([1, 2, 3], 5)
    with pytest.raises(ValueError, match=r"n_parts must be at least 1, got 0"):
        partition([1, 2, 3], 0)
    with pytest.raises(ValueError, match=r"cost 1 is -2.0"):
        partition([1, -2, 3], 2)
    with pytest.raises(ValueError, match=r"cost 0 is nan"):
        partition([float("nan"), 1], 1)


def test_balance_by_params_isolates_one_huge_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(512, 512),
                          nn.Linear(4, 4), nn.Linear(4, 4))
    assert balance_by_params(model, 3) == [2, 1, 2]
    assert balance_by_params(model, 1) == [5]


def test_balance_by_params_spreads_parameter_free_children():
    model = nn.Sequential(nn.ReLU(), nn.ReLU(), nn.Tanh(), nn.ReLU())
    assert balance_by_params(model, 2) == [2, 2]
    with pytest.raises(ValueError, match=r"cannot partition 4 costs into 5"):
        balance_by_params(model, 5)


class Pair(nn.Module):
    """Returns a tuple; the next child takes it as one argument."""

    def forward(self, x):
        return x, 2 * x


class Join(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, pair):
        a, b = pair
        return self.lin(a) + b


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                         Pair(), Join(16), nn.Linear(16, 4))


def test_balance_by_time_leaves_the_model_untouched():
    model = make_model()
    model.train()
    model[1].eval()  # a mixed-mode model: both flags must come back as they were
    model[6].weight.grad = torch.ones_like(model[6].weight)  # an existing grad survives
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    modes = {k: m.training for k, m in model.named_modules()}
    x = torch.randn(32, 8)
    rng = torch.get_rng_state()
    balance = balance_by_time(model, 3, x, repeats=2)
    check_balance(balance, len(model), 3)

    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
        if k == "6.weight":
            assert torch.equal(v.grad, torch.ones_like(v))
        else:
            assert v.grad is None, k
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert {k: m.training for k, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_balance_by_time_restores_running_stats_of_a_model_in_eval_mode():
    model = make_model().eval()
    before = copy.deepcopy(model.state_dict())
    balance_by_time(model, 2, torch.randn(16, 8), repeats=1)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not any(m.training for m in model.modules())


def test_balance_by_time_finds_the_slow_layer():
    # One layer does >10x the work of any other; it must get a stage of its own.
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 1024),
                          nn.Linear(1024, 1024), nn.Linear(1024, 64), nn.Linear(64, 64))
    balance = balance_by_time(model, 3, torch.randn(128, 64), repeats=3)
    check_balance(balance, 6, 3)
    # Any block holding child 3 and another child costs more than child 3 alone.
    owner = next(i for i in range(3) if sum(balance[:i]) <= 3 < sum(balance[:i + 1]))
    assert balance[owner] == 1, balance


def test_balance_by_time_errors():
    model = make_model()
    with pytest.raises(ValueError, match=r"cannot partition 7 costs into 8"):
        balance_by_time(model, 8, torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"repeats must be at least 1, got 0"):
        balance_by_time(model, 2, torch.randn(4, 8), repeats=0)


def test_a_meta_built_model_balances_by_params_but_not_by_time():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    assert balance_by_params(model, 2) == balance_by_params(copy.deepcopy(model).to_empty(device="cpu"), 2)
    with pytest.raises(ValueError, match="built on the meta device"):
        balance_by_time(model, 2, torch.randn(3, 8))


def test_whole_layers_keep_a_layer_with_its_norm_activation_and_dropout():
    children = [nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 8), nn.LayerNorm(8),
                nn.GELU(), nn.MultiheadAttention(8, 2), nn.Tanh(), nn.Linear(8, 2)]
    assert whole_layers(children) == [4, 3, 2, 1]
    assert whole_layers([nn.ReLU(), nn.Linear(2, 2)]) == [1, 1]  # (a first child starts a layer, whatever it is)


def test_balance_cuts_between_whole_layers_only_where_it_can():
    # By parameters alone the best cut of 3 blocks is inside the middle one (between its Linear and its
    # BatchNorm, as the costs alone would put it); kept whole, the cut falls after a ReLU.
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU())],
                          nn.Linear(64, 2))
    assert partition(param_costs(model), 2) == [4, 6], "the unconstrained partition cuts before a BatchNorm"
    balance = balance_by_params(model, 2)
    assert balance == [6, 4] and isinstance(model[sum(balance[:1]) - 1], nn.ReLU)
    for n in (2, 3, 4):
        cuts = itertools.accumulate(balance_by_params(model, n))
        assert all(isinstance(model[c - 1], nn.ReLU) for c in list(cuts)[:-1]), n
    # fewer whole layers than stages: the children are balanced one by one
    assert balance_by_params(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh()), 3) == [1, 1, 1]
