"""Model math only (no torch.distributed): splitting, balancing, synthesizers, the Stage."""
from .aux import AuxHead
from .balance import balance_by_params, balance_by_time, partition
from .split import compose, split
from .stage import NonFiniteError, Stage, StageInputError
from .synthesizer import Synthesizer

__all__ = ["AuxHead", "NonFiniteError", "Stage", "StageInputError", "Synthesizer", "balance_by_params",
           "balance_by_time", "compose", "partition", "split"]
