"""The target cache and the synthesizer-training rule (engine/targets.py)."""
from __future__ import annotations

import pytest
import torch

from synthpipe.engine.targets import TargetCache, train_due_synthesizer


class RecordingStage:
    def __init__(self):
        self.trained = []

    def train_synthesizer(self, h, y, target):
        self.trained.append(int(h[0].item()))
        return float(target[0].item())


def cache_with(steps, ready):
    cache = TargetCache()
    for s in steps:
        cache.add(s, (torch.tensor(float(s)),), None)
        if s in ready:
            cache.put_target(s, (torch.tensor(1.0),))
    return cache


def test_fixed_delay_trains_exactly_the_due_step_and_waits_for_it():
    stage, waited = RecordingStage(), []
    cache = cache_with([3, 4, 5], ready={4})

    def wait(step):
        waited.append(step)
        cache.put_target(step, (torch.tensor(2.0),))
    assert train_due_synthesizer(stage, cache, 5, 2, 4, wait) == 2.0
    assert stage.trained == [3] and waited == [3] and len(cache) == 2


def test_free_mode_trains_what_arrived_and_waits_only_when_full():
    stage, waited = RecordingStage(), []
    cache = cache_with([0, 1, 2, 3], ready={1, 2})
    train_due_synthesizer(stage, cache, 3, None, 4, waited.append)
    assert stage.trained == [1, 2] and waited == [] and len(cache) == 2

    cache = cache_with([0, 1, 2, 3], ready=set())

    def wait(step):
        waited.append(step)
        cache.put_target(step, (torch.tensor(0.0),))
    train_due_synthesizer(stage, cache, 3, None, 3, wait)
    assert waited == [0, 1] and len(cache) == 2


def test_skipped_targets_train_nothing_and_unknown_steps_are_errors():
    stage = RecordingStage()
    cache = cache_with([0], ready=set())
    cache.put_target(0, (), skipped=True)
    assert train_due_synthesizer(stage, cache, 0, 0, 4, lambda s: None) is None
    assert stage.trained == [] and len(cache) == 0
    with pytest.raises(KeyError, match="step 9, which is not waiting"):
        cache.put_target(9, (torch.zeros(1),))


def test_state_round_trip():
    cache = cache_with([0, 1], ready={0})
    other = TargetCache()
    other.load_state_dict(cache.state_dict(), torch.device("cpu"))
    assert [(e.step, e.ready) for e in other] == [(0, True), (1, False)]
