"""Bench profiles: reading a ``profile.json`` and checking every value a prediction uses.

``synthpipe bench`` writes a profile (per-stage seconds of the measured single-device
step, transfer times, per-message costs, the measured runs); ``synthpipe simulate`` and
:mod:`synthpipe.benchmark.simulator` read one back. Everything that comes from a file
is checked here, once, with errors that name the file and the key
(:class:`ProfileError`); the simulator then trusts what it is given. Device and
micro-batch counts asked of a prediction are checked here too (:func:`check_devices`,
:func:`check_microbatches`).
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

__all__ = ["PROFILE_VERSION", "MAX_DEVICES", "MAX_MICROBATCHES", "ProfileError", "check_devices",
           "check_microbatches", "check_profile", "load_profile"]

PROFILE_VERSION = 1
# The largest device and micro-batch counts a prediction accepts. The model's cost grows
# with devices x micro-batches (each simulated step has an operation per pair); at these
# limits one table row takes seconds, while 1000s of devices would take minutes.
MAX_DEVICES = 256
MAX_MICROBATCHES = 256


class ProfileError(ValueError):
    """A profile that cannot be read or used; the message names the file and the key."""


def check_devices(devices: Sequence[int], name: str = "devices") -> list[int]:
    """``devices`` as a list, or ``ValueError``: it must list distinct whole numbers from 1
    to :data:`MAX_DEVICES` (``name`` is what the message calls it)."""
    values = list(devices) if isinstance(devices, (list, tuple)) else None
    if not values:
        raise ValueError(f"{name} must list at least one device count (1 to {MAX_DEVICES}); got {devices!r}")
    for n in values:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DEVICES:
            raise ValueError(f"{name}: device counts must be whole numbers from 1 to {MAX_DEVICES}; got {n!r}")
    if len(set(values)) < len(values):
        raise ValueError(f"{name} lists a device count more than once: {','.join(map(str, values))}")
    return values


def check_microbatches(microbatches: Sequence[int], batch: int, name: str = "microbatches") -> list[int]:
    """``microbatches`` as a list, or ``ValueError``: distinct whole numbers from 1 to
    :data:`MAX_MICROBATCHES` that divide ``batch`` (every micro-batch the same size)."""
    values = list(microbatches) if isinstance(microbatches, (list, tuple)) else None
    if not values:
        raise ValueError(f"{name} must list at least one micro-batch count; got {microbatches!r}")
    for m in values:
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_MICROBATCHES:
            raise ValueError(f"{name}: micro-batch counts must be whole numbers from 1 to {MAX_MICROBATCHES}; "
                             f"got {m!r}")
        if batch % m:
            raise ValueError(f"{name}: {m} does not divide the profile's batch of {batch}")
    if len(set(values)) < len(values):
        raise ValueError(f"{name} lists a micro-batch count more than once: {','.join(map(str, values))}")
    return values


def _seconds(value: Any, where: str, positive: bool = False) -> None:
    """A time (or other non-negative quantity) must be a finite number: NaN, infinities,
    negatives, strings and null would silently poison every prediction."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ProfileError(f"{where} must be a finite number {'> 0' if positive else '>= 0'}; got {value!r}")


def _count(value: Any, where: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProfileError(f"{where} must be a whole number >= 1; got {value!r}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProfileError(f"{where} must be a JSON object; got {type(value).__name__} {value!r:.60}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ProfileError(f"{where} must be a JSON list; got {type(value).__name__} {value!r:.60}")
    return value


def check_profile(profile: Any, source: str = "profile") -> dict[str, Any]:
    """``profile`` if the simulator can use it, else :class:`ProfileError` naming ``source``
    and the key.

    Required: ``version`` (:data:`PROFILE_VERSION`) and ``single`` with ``forward_s``,
    ``backward_s``, ``update_s`` (a step time above zero). Every other key of
    :func:`synthpipe.benchmark.bench.build_profile` is optional, but when present must
    have its type: times finite and non-negative, counts whole and positive,
    ``weight_fraction`` in [0, 1], and each run's ``stages`` a non-empty list.
    """
    try:
        p = _object(profile, "the file")
        if "single" not in p and "profile" in p and "throughput" in p:
            raise ProfileError("this is a results.json; pass the profile.json next to it")
        if "version" not in p:
            raise ProfileError("missing key 'version' (not a profile written by synthpipe bench?)")
        if p["version"] != PROFILE_VERSION:
            raise ProfileError(f"profile version {p['version']!r}; this simulator reads version {PROFILE_VERSION}")
        if "single" not in p:
            raise ProfileError("missing key 'single': no single-device measurement (the bench run's baseline "
                               "failed, or it ran with --no-throughput)")
        single = _object(p["single"], "'single'")
        for key in ("forward_s", "backward_s", "update_s"):
            if key not in single:
                raise ProfileError(f"missing key 'single.{key}'")
            _seconds(single[key], f"'single.{key}'")
        for key in ("step_s", "other_s"):
            if single.get(key) is not None:
                _seconds(single[key], f"'single.{key}'")
        if not (single.get("step_s") or single["forward_s"] + single["backward_s"] + single["update_s"] > 0):
            raise ProfileError("'single' has a step time of 0 (forward_s + backward_s + update_s); nothing to "
                               "compare with")
        workload = _object(p.get("workload", {}), "'workload'")
        if "batch" in workload:
            _count(workload["batch"], "'workload.batch'")
        machine = _object(p.get("machine", {}), "'machine'")
        names = machine.get("device_names")
        if names is not None and not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
            raise ProfileError(f"'machine.device_names' must be a list of strings; got {names!r:.60}")
        for key in ("boundary_bytes", "data_bytes", "message_s", "pp_message_s", "op_overhead_s", "step_overhead_s",
                    "input_synth_s"):
            if key in p:
                _seconds(p[key], f"'{key}'")
        if "weight_fraction" in p:
            _seconds(p["weight_fraction"], "'weight_fraction'")
            if p["weight_fraction"] > 1:
                raise ProfileError(f"'weight_fraction' must be in [0, 1]; got {p['weight_fraction']!r}")
        if "max_inflight" in p:
            _count(p["max_inflight"], "'max_inflight'")
        for key, value in _object(p.get("synth_s", {}), "'synth_s'").items():
            _seconds(value, f"'synth_s.{key}'")
        for i, t in enumerate(_list(p.get("transfer", []), "'transfer'")):
            t = _object(t, f"'transfer[{i}]'")
            for key in ("bytes", "one_way_s"):
                if key not in t:
                    raise ProfileError(f"missing key 'transfer[{i}].{key}'")
                _seconds(t[key], f"'transfer[{i}].{key}'")
        for i, c in enumerate(_list(p.get("microbatch", []), "'microbatch'")):
            c = _object(c, f"'microbatch[{i}]'")
            for key in ("m", "forward_s", "backward_s"):
                if key not in c:
                    raise ProfileError(f"missing key 'microbatch[{i}].{key}'")
            _count(c["m"], f"'microbatch[{i}].m'")
            _seconds(c["forward_s"], f"'microbatch[{i}].forward_s'")
            _seconds(c["backward_s"], f"'microbatch[{i}].backward_s'")
        for i, run in enumerate(_list(p.get("runs", []), "'runs'")):
            run = _object(run, f"'runs[{i}]'")
            for key in ("name", "schedule", "measured_step_s", "stages"):
                if key not in run:
                    raise ProfileError(f"missing key 'runs[{i}].{key}'")
            for key in ("name", "schedule"):
                if not isinstance(run[key], str):
                    raise ProfileError(f"'runs[{i}].{key}' must be a string; got {run[key]!r:.60}")
            _seconds(run["measured_step_s"], f"'runs[{i}].measured_step_s'", positive=True)
            for key in ("ranks", "microbatches", "max_inflight"):
                _count(run.get(key), f"'runs[{i}].{key}'", allow_none=True)
            stages = _list(run["stages"], f"'runs[{i}].stages'")
            if not stages:
                raise ProfileError(f"'runs[{i}].stages' is empty")
            for j, st in enumerate(stages):
                for key, value in _object(st, f"'runs[{i}].stages[{j}]'").items():
                    _seconds(value, f"'runs[{i}].stages[{j}].{key}'")
    except ProfileError as e:
        raise ProfileError(f"{source}: {e}") from None
    return p


def load_profile(path: str) -> dict[str, Any]:
    """Read and check a profile written by ``synthpipe bench`` (``profile.json``).

    Raises :class:`ProfileError` (a ``ValueError``) naming ``path``: it cannot be read, is
    not JSON, or fails :func:`check_profile`.
    """
    try:
        with open(path, encoding="utf-8") as f:
            profile = json.load(f)
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such file (a profile.json written by synthpipe bench --output DIR)") from None
    except IsADirectoryError:
        raise ProfileError(f"{path} is a directory; pass the profile.json in it") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not a JSON text file (not UTF-8)") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return check_profile(profile, path)
