"""Checkpoint files: one per stage plus ``meta.json``, and export to the original model's names.

Layout of a checkpoint directory::

    meta.json             n_stages, step, epoch, step_in_epoch, config, version (written last)
    stage-<r>-<step>.pt   stage r at that step: module, optimizer, synthesizer, its
                          optimizer, the cache of activations waiting for targets, and
                          the RNG state of its process

A single-process run writes the same files, so a checkpoint moves between a one-process
run and an N-process run of the same split.

Saving again into the same directory never leaves a mixed or broken checkpoint: the new
stage files get new names, ``meta.json`` (which names the step, hence the files) is
replaced in one atomic rename once every stage file is complete, and only then are the
previous step's files removed. A crash at any point leaves ``meta.json`` pointing at a
complete set of stage files, the old one or the new one. (A save at the step the
directory's checkpoint is already at, a re-run into the same directory, names its files
``stage-<r>-<step>-<suffix>.pt``, with the suffix in ``meta.json``, so as not to
overwrite the files the old ``meta.json`` names.) (Checkpoints of version 1 named
their files ``stage-<r>.pt``; they still load.)
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..stages.split import original_name

META = "meta.json"


def stage_file(directory: str, rank: int, step: int, suffix: str = "") -> str:
    """Where stage ``rank``'s state at ``step`` is saved (``suffix``: see :func:`save_suffix`)."""
    return os.path.join(directory, f"stage-{rank}-{step}{'-' + suffix if suffix else ''}.pt")


def save_suffix(directory: str, step: int) -> str:
    """The file-name suffix for a save at ``step`` into ``directory``: none, unless the
    checkpoint already there is at the same step (a re-run into the same directory); its
    files are named by ``meta.json`` and must stay whole until the new ones are, so the
    new ones get other names."""
    try:
        meta = read_meta(directory)
    except (OSError, ValueError):
        return ""
    if meta["step"] != step:
        return ""
    while True:
        suffix = secrets.token_hex(4)
        if suffix != meta.get("suffix", ""):
            return suffix


def _saved_stage_file(directory: str, meta: Mapping[str, Any], rank: int) -> str:
    path = stage_file(directory, rank, meta["step"], meta.get("suffix", ""))
    if os.path.exists(path):
        return path
    legacy = os.path.join(directory, f"stage-{rank}.pt")  # version 1
    if os.path.exists(legacy):
        return legacy
    raise FileNotFoundError(f"checkpoint {directory} (step {meta['step']}) is missing {os.path.basename(path)}")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_stage(directory: str, rank: int, step: int, state: dict[str, Any], suffix: str = "") -> None:
    os.makedirs(directory, exist_ok=True)
    _atomic_save(state, stage_file(directory, rank, step, suffix))


def remove_stale_stages(directory: str, rank: int, step: int, suffix: str = "") -> None:
    """Delete stage ``rank``'s other files (once ``meta.json`` names ``step`` and ``suffix``)."""
    own = re.compile(rf"stage-{rank}(-\d+(-[0-9a-f]+)?)?\.pt(\.tmp)?")
    keep = os.path.basename(stage_file(directory, rank, step, suffix))
    for name in os.listdir(directory):
        if own.fullmatch(name) and name != keep:
            os.remove(os.path.join(directory, name))


def write_meta(directory: str, meta: dict[str, Any]) -> None:
    tmp = os.path.join(directory, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(directory, META))


def read_meta(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, META)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a complete synthpipe checkpoint (no {META})")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:  # not JSON (a file cut short, say)
        raise ValueError(f"{path} is corrupt ({type(e).__name__}: {e}); it is not a synthpipe checkpoint's "
                         f"{META}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is corrupt: it holds a JSON {type(meta).__name__}, not an object")
    missing = [k for k in ("step", "epoch", "step_in_epoch", "n_stages") if k not in meta]
    if missing:
        raise ValueError(f"{path} is corrupt: it has no {', '.join(missing)}")
    return meta


def load_stage(directory: str, meta: Mapping[str, Any], rank: int, n_stages: int,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """Stage ``rank``'s saved state, from the checkpoint ``meta`` (:func:`read_meta`) describes."""
    if meta["n_stages"] != n_stages:
        raise ValueError(f"checkpoint {directory} has {meta['n_stages']} stages, this trainer has {n_stages}")
    return torch.load(_saved_stage_file(directory, meta, rank), map_location=device, weights_only=False)


def merge_module_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state_dict from the stages' module state_dicts (their keys are the original names).

    A traced stage that calls a module twice holds it as ``name`` and ``name@1``, with
    the same tensors: both are the model's ``name``.
    """
    merged: dict[str, torch.Tensor] = {}
    for r, state in enumerate(states):
        for key, value in state.items():
            key = original_name(key)
            if key in merged and not torch.equal(merged[key].cpu(), value.cpu()):
                raise ValueError(f"stage {r} and an earlier stage both hold {key!r} with different values")
            merged[key] = value.detach().cpu()
    return merged


def export_checkpoint(directory: str, path: str) -> dict[str, torch.Tensor]:
    """Write the model's state_dict (original names, no synthesizers) from a checkpoint."""
    meta = read_meta(directory)
    states = [torch.load(_saved_stage_file(directory, meta, r), map_location="cpu", weights_only=False)["stage"]["module"]
              for r in range(meta["n_stages"])]
    merged = merge_module_states(states)
    _atomic_save(merged, path)
    return merged
