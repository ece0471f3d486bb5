"""Ground truth for the engine tests: plain training of the unsplit model, and state comparison."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn


def plain_backprop(model: nn.Module, batches: list,
                   optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]) -> dict:
    """The unsplit model trained with cross-entropy, one optimizer step per batch."""
    opt = optimizer(model.parameters())
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


def assert_states_close(a: dict, b: dict, atol: float) -> None:
    """Same keys, and every tensor within ``atol`` (absolute)."""
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item() if a[k].numel() else 0.0
        assert diff <= atol, f"{k} differs by {diff}"
