"""Running stages: transport, prefetch queue, the per-rank worker, the reference trainer, metrics."""
from .config import TrainConfig
from .history import History
from .prefetch import PrefetchQueue
from .temporal import TemporalTrainer
from .trainer import Trainer

__all__ = ["History", "PrefetchQueue", "TemporalTrainer", "TrainConfig", "Trainer"]
