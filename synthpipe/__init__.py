"""synthpipe: pipeline-parallel training with synthetic gradients (Decoupled Neural Interfaces).

    import synthpipe as sp
    stages = sp.split(model, n_stages=3)
    trainer = sp.Trainer(stages, loss_fn=torch.nn.CrossEntropyLoss(),
                         synthesizer=sp.Synthesizer("linear", conditional=True, num_classes=10))
    history = trainer.fit(train_loader, epochs=5, eval_loader=test_loader)
"""
from ._version import __version__
from .engine import History, PrefetchQueue, TemporalTrainer, TrainConfig, Trainer
from .stages import AuxHead, NonFiniteError, Stage, StageInputError, Synthesizer, compose, split

__all__ = ["AuxHead", "History", "NonFiniteError", "PrefetchQueue", "Stage", "StageInputError", "Synthesizer",
           "TemporalTrainer", "TrainConfig", "Trainer", "__version__", "compose", "split"]
