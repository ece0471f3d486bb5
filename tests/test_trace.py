"""synthpipe.stages.trace: the tracing half of split (the full behaviour is in test_split.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from synthpipe.stages.trace import original_name, split_traced, traced_input_shapes, traced_output_shapes


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_a_second_call_maps_back_to_the_model_name():
    assert original_name("blk@1.weight") == "blk.weight"
    assert original_name("layers.2@3") == "layers.2"
    assert original_name("blk.weight") == "blk.weight"
    assert original_name("email@host") == "email@host"  # only a numbered call suffix is removed


def test_traced_stages_record_their_shapes():
    torch.manual_seed(0)
    model = Two()
    x = torch.randn(5, 4)
    stages = split_traced(model, ["b"], x)
    assert len(stages) == 2
    assert traced_input_shapes(stages[0]) == [(5, 4)] and traced_output_shapes(stages[0]) == [(5, 6)]
    assert traced_input_shapes(stages[1]) == [(5, 6)] and traced_output_shapes(stages[1]) == [(5, 3)]
    assert torch.allclose(stages[1](stages[0](x)), model(x))


def test_an_untraced_module_has_no_traced_shapes():
    assert traced_input_shapes(nn.Linear(2, 2)) is None and traced_output_shapes(nn.Linear(2, 2)) is None
    assert split_traced(nn.Linear(2, 2), [], None)[0].__class__ is nn.Linear  # no points: the model itself
