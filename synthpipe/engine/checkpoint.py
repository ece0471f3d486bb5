"""Checkpoint files: one per stage plus ``meta.json``, and export to the original model's names.

Layout of a checkpoint directory::

    meta.json             version, n_stages, step, epoch, step_in_epoch, config, and per
                          stage file its name, size and sha256 (written last)
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
overwrite the files the old ``meta.json`` names.)

Loading checks a stage file's size and sha256 against ``meta.json`` before anything is
unpickled (a truncated, damaged or swapped file is a :class:`CheckpointError` naming it),
then reads it with ``torch.load(weights_only=True)``: a checkpoint holds only tensors,
numbers, strings, dtypes and lists, tuples and dicts of them (the RNG states are
tensors; optimizer classes are saved by name), so a file from elsewhere cannot run code.
Saving refuses, before writing, a state holding anything else (see :func:`check_plain`).

Versions: 1 named the files ``stage-<r>.pt``; 2 named them by step (crash-safe saves);
3 added the suffix; 4 records each file's size and sha256 and saves only plain data.
Versions 1 to 3 still load (their NumPy RNG state is allowed as plain arrays), without
the size and checksum check; a version newer than :data:`VERSION` is refused by number.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import secrets
import zipfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..stages.split import original_name

__all__ = ["VERSION", "META", "CheckpointError", "stage_file", "save_suffix", "rng_state", "set_rng_state",
           "check_plain", "save_stage", "saved_stage_file", "remove_stale_stages", "write_meta", "read_meta",
           "load_stage", "merge_module_states", "export_checkpoint"]

VERSION = 4
META = "meta.json"
_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file is damaged, truncated, from another checkpoint or not loadable
    as plain data; the message names the file (and the rank that read it) and what is wrong."""


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


def saved_stage_file(directory: str, meta: Mapping[str, Any], rank: int) -> str:
    """The path of stage ``rank``'s file in the checkpoint ``meta`` describes.

    Raises:
        FileNotFoundError: it is missing (the message names the file and the step).
    """
    path = stage_file(directory, rank, meta["step"], meta.get("suffix", ""))
    if os.path.exists(path):
        return path
    legacy = os.path.join(directory, f"stage-{rank}.pt")  # version 1
    if os.path.exists(legacy):
        return legacy
    raise FileNotFoundError(f"checkpoint {directory} (step {meta['step']}) is missing {os.path.basename(path)}")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data: ``torch`` (and ``cuda``) byte tensors, the
    NumPy and Python Mersenne-Twister states as int64 tensors plus their few numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    keys = np.asarray(keys)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`'s output (or a version 1-3 checkpoint's NumPy/Python tuples)."""
    torch.set_rng_state(state["torch"])
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, Mapping):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    if isinstance(python_state, Mapping):
        python_state = (python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"])
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


_PLAIN_LEAVES = (torch.Tensor, bool, int, float, str, bytes, type(None), torch.dtype, torch.device)


def check_plain(obj: Any, what: str) -> None:
    """Raise ``TypeError`` unless ``obj`` is plain data that ``torch.load(weights_only=True)``
    reads: tensors, numbers, strings, dtypes, devices, and lists, tuples and dicts of them.

    ``what`` names ``obj`` in the message (e.g. ``"stage 1's state"``); the message gives
    the path to the first other object, e.g. ``['optimizer']['state'][0]['k']``.
    """
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _PLAIN_LEAVES):
            continue
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, (str, int, float, bool, type(None))):
                    raise TypeError(f"{what} cannot be checkpointed: {what}{path} has a key of type "
                                    f"{type(k).__qualname__}; checkpoints hold only plain data (tensors, numbers, "
                                    f"strings, and lists, tuples and dicts of them) so that they load with "
                                    f"torch.load(weights_only=True)")
                stack.append((v, f"{path}[{k!r}]"))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
        else:
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            raise TypeError(f"{what} cannot be checkpointed: {what}{path} is a {kind}; checkpoints hold only "
                            f"plain data (tensors, numbers, strings, and lists, tuples and dicts of them) so "
                            f"that they load with torch.load(weights_only=True) and cannot run code")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_save(obj: Any, path: str) -> dict[str, Any]:
    """Write ``obj`` to ``path`` through a temporary file; returns the file's record
    (``name``, ``bytes``, ``sha256``), taken before the rename so it describes what was written."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    record = {"name": os.path.basename(path), "bytes": os.path.getsize(tmp), "sha256": _sha256(tmp)}
    os.replace(tmp, path)
    return record


def save_stage(directory: str, rank: int, step: int, state: dict[str, Any], suffix: str = "") -> dict[str, Any]:
    """Write stage ``rank``'s ``state`` at ``step``; returns its record for ``meta.json``'s ``files``.

    Raises:
        TypeError: ``state`` holds something other than plain data (see :func:`check_plain`);
            nothing is written then.
    """
    check_plain(state, f"stage {rank}'s state")
    os.makedirs(directory, exist_ok=True)
    return _atomic_save(state, stage_file(directory, rank, step, suffix))


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


def _weights_only_globals() -> list[Any]:
    """What a version 1-3 stage file needs beyond plain data: NumPy's RNG state array."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _damage(path: str) -> str:
    """What is wrong with a file torch.load could not read, when no record says its size:
    a zip archive (what torch.save writes) whose end is missing was cut short."""
    with open(path, "rb") as f:
        starts_like_zip = f.read(4) == b"PK\x03\x04"
    if starts_like_zip and not zipfile.is_zipfile(path):
        return "truncated (a zip archive, as torch.save writes, without its end)"
    return "corrupt"


def _read_stage_file(path: str, record: Mapping[str, Any] | None, device: torch.device | str,
                     fail: Callable[[str], CheckpointError]) -> dict[str, Any]:
    """Check ``path`` against its ``meta.json`` record, then load it as plain data.
    ``fail(what)`` builds the :class:`CheckpointError` for the reason ``what``."""
    if record is not None:
        size, expected = os.path.getsize(path), int(record["bytes"])
        if size < expected:
            raise fail(f"the file is truncated: it has {size} bytes, and meta.json recorded {expected} when it "
                       f"was saved")
        if size > expected:
            raise fail(f"the file is not the one that was saved: it has {size} bytes, and meta.json recorded "
                       f"{expected} (it is corrupt, or another checkpoint's file)")
        digest = _sha256(path)
        if digest != record["sha256"]:
            raise fail(f"the file is corrupt: its sha256 is {digest[:16]}..., and meta.json recorded "
                       f"{str(record['sha256'])[:16]}... when it was saved (damaged on disk or in a copy, or "
                       f"replaced by another checkpoint's file)")
    try:
        with torch.serialization.safe_globals([] if record is not None else _weights_only_globals()):
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:
            raise fail(f"the file holds a {unsafe.group(1)}, which is not plain data, so it is not loaded "
                       f"(torch.load(weights_only=True) refuses what could run code; synthpipe writes only "
                       f"plain data, so this file was written by something else)") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n|$)", text)
        raise fail(f"the file is corrupt: it is not a readable torch.save file "
                   f"({detail.group(1) if detail else type(e).__name__})") from None
    except Exception as e:  # miniz, EOF, seek, decoding...: all mean the bytes are not what torch.save wrote
        text = str(e).split(". This is an internal miniz error")[0]
        raise fail(f"the file is {_damage(path)}: torch.load failed with {type(e).__name__}: {text[:200]}") from None
    if not isinstance(state, dict) or "stage" not in state:
        raise fail(f"the file is not a synthpipe stage file (it holds a {type(state).__name__}"
                   f"{' without a stage entry' if isinstance(state, dict) else ''})")
    return state


def load_stage(directory: str, meta: Mapping[str, Any], rank: int, n_stages: int,
               device: torch.device | str = "cpu", reader: int | None = None) -> dict[str, Any]:
    """Stage ``rank``'s saved state, from the checkpoint ``meta`` (:func:`read_meta`) describes.

    Args:
        reader: the rank of the process that reads the file, for messages (``None``: a
            single-process run).

    Raises:
        ValueError: the checkpoint has another number of stages, or its version is newer.
        FileNotFoundError: the stage file is missing.
        CheckpointError: the file is truncated, corrupt, another checkpoint's, or holds
            objects other than plain data (found before unpickling where ``meta.json``
            records its size and sha256).
    """
    if meta["n_stages"] != n_stages:
        raise ValueError(f"checkpoint {directory} has {meta['n_stages']} stages, this trainer has {n_stages}")
    version = meta.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(f"checkpoint {directory} is of version {version!r}, written by a newer synthpipe; this "
                         f"one reads versions 1 to {VERSION}")
    path = saved_stage_file(directory, meta, rank)
    record = None
    if version >= 4:
        record = (meta.get("files") or {}).get(str(rank))
        if not isinstance(record, Mapping) or not {"bytes", "sha256"} <= set(record):
            raise CheckpointError(f"{os.path.join(directory, META)} is corrupt: checkpoint version {version} "
                                  f"records no size and sha256 for stage {rank}'s file")
    who = f"rank {reader} " if reader is not None else ""

    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{who}cannot load stage {rank}'s file {path} (checkpoint version {version}): "
                               f"{what}")
    return _read_stage_file(path, record, device, fail)


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
    states = [load_stage(directory, meta, r, meta["n_stages"])["stage"]["module"] for r in range(meta["n_stages"])]
    merged = merge_module_states(states)
    _atomic_save(merged, path)
    return merged
