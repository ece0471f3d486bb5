"""Sporadic updates (``p_update``): which steps each stage backpropagates and updates.

The DNI paper's asynchronous-update experiment stands in for straggling or intermittent
devices: at every step each stage still runs its forward (and sends its activation on),
but does its backward and optimizer step only with probability ``p_update``,
independently of the other stages. The draw is a pure function of ``(seed, stage index,
step)`` (a keyed hash, not a random generator's state), so the one-process trainer and
every rank of a multi-process run draw the same steps, whatever else drew random numbers,
and a resumed run draws what an uninterrupted one would.

What a skipped step does on stage r:

* no backward and no optimizer step (the LR schedule still advances: it follows the step id);
  the forward's effect on norm layers' running statistics stays, as that forward ran;
* it sends stage r - 1 a *skipped* gradient message for that step, so nothing waits
  for a gradient that never comes, and stage r - 1's synthesizer has no target for that
  step (it regresses only on steps stage r backpropagated);
* its own synthesizer still trains on the targets stage r + 1 sent (they depend on stage
  r + 1's draw, not on stage r's).
"""
from __future__ import annotations

import hashlib

__all__ = ["update_drawn", "drawn_steps"]

_SCALE = float(2 ** 64)


def _uniform(seed: int, stage: int, step: int) -> float:
    """A uniform number in [0, 1) determined by ``(seed, stage, step)`` alone."""
    key = f"synthpipe-p_update:{int(seed)}:{int(stage)}:{int(step)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / _SCALE


def update_drawn(p_update: float, seed: int, stage: int, step: int) -> bool:
    """Does stage ``stage`` update at ``step`` (probability ``p_update``)?

    Always ``True`` for ``p_update >= 1``.
    """
    return p_update >= 1.0 or _uniform(seed, stage, step) < p_update


def drawn_steps(p_update: float, seed: int, stage: int, steps: range | list[int]) -> list[int]:
    """The steps of ``steps`` at which ``stage`` updates."""
    return [s for s in steps if update_drawn(p_update, seed, stage, s)]
