"""synthpipe: pipeline-parallel training with synthetic gradients (Decoupled Neural Interfaces).

    import synthpipe as sp
    stages = sp.split(model, n_stages=3)
    trainer = sp.Trainer(stages, loss_fn=torch.nn.CrossEntropyLoss(),
                         synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=10))
    history = trainer.fit(train_loader, epochs=5, eval_loader=test_loader)
"""
import importlib
from typing import Any

from ._version import __version__
from .engine import History, PrefetchQueue, TemporalTrainer, TrainConfig, Trainer
from .stages import AuxHead, NonFiniteError, Stage, StageInputError, Synthesizer, compose, split

__all__ = ["AuxHead", "History", "NonFiniteError", "PrefetchQueue", "Stage", "StageInputError", "Synthesizer",
           "TemporalTrainer", "TrainConfig", "Trainer", "__version__", "compose", "split"]

# The documented submodules, reachable as ``sp.data`` etc. without an import of their own;
# loaded on first use, so ``import synthpipe`` stays light (no mnist1d or matplotlib).
SUBMODULES = ("benchmark", "data", "engine", "launch", "models", "stages", "text")


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
