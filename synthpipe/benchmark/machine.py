"""What the benchmark ran on: cores, threads, versions, devices, and how busy the machine was.

Every output of ``synthpipe bench`` carries :func:`describe` so a number is never
reported without its machine (docs/guide.md, "Measuring fairly on CPU").
"""
from __future__ import annotations

import os
import platform
import socket
import warnings
from typing import Any

import torch

__all__ = ["cpu_model", "usable_cores", "cgroup_cpu_limit", "gpu_names", "describe", "oversubscribed", "check_fairness",
           "summary_line"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (affinity mask, else the logical count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_limit() -> float | None:
    """The container's CPU quota in cores (cgroup v2 ``cpu.max`` or v1), if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            text_quota, text_period = f.read().split()[:2]
            if text_quota != "max":
                return int(text_quota) / int(text_period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def gpu_names() -> list[str]:
    """Names of the visible GPUs: torch.cuda first, pynvml as a fallback; empty without GPUs."""
    names: list[str] = []
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if not names:
        try:
            import pynvml
            pynvml.nvmlInit()
            try:
                for i in range(pynvml.nvmlDeviceGetCount()):
                    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                    names.append(name.decode() if isinstance(name, bytes) else str(name))
            finally:
                pynvml.nvmlShutdown()
        except Exception:
            pass
    return names


def describe(ranks: int = 1, threads: int = 1, device: str = "cpu") -> dict[str, Any]:
    """A JSON-friendly description of the machine and of the run's layout.

    Keys: ``hostname``, ``platform``, ``python``, ``torch``, ``cpu_model``,
    ``logical_cores``, ``physical_cores``, ``usable_cores``, ``cgroup_cpu_limit``,
    ``memory_gb``, ``load_average`` (1, 5, 15 min, at the time of the call), ``device``,
    ``device_names`` (the CPU model, or the GPU names), ``gpus``, ``ranks``,
    ``threads_per_rank``, ``oversubscribed`` (ranks x threads > usable cores).
    """
    import psutil

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = []
    gpus = gpu_names()
    cores = usable_cores()
    limit = cgroup_cpu_limit()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": cores,
        "cgroup_cpu_limit": limit,
        "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1),
        "load_average": load,
        "device": device,
        "device_names": gpus if device.startswith("cuda") and gpus else [cpu_model()],
        "gpus": gpus,
        "ranks": ranks,
        "threads_per_rank": threads,
        "oversubscribed": oversubscribed(ranks, threads, cores, limit) if device == "cpu" else False,
    }


def oversubscribed(ranks: int, threads: int, cores: int | None = None, limit: float | None = None) -> bool:
    """True when ``ranks x threads`` exceeds the cores (or the container's CPU quota)."""
    cores = usable_cores() if cores is None else cores
    if limit is not None:
        cores = min(cores, int(limit))
    return ranks * threads > max(cores, 1)


def check_fairness(ranks: int, threads: int, device: str = "cpu") -> str | None:
    """Warn (and return the message) when a CPU run would oversubscribe the cores."""
    if device != "cpu" or not oversubscribed(ranks, threads, limit=cgroup_cpu_limit()):
        return None
    message = (f"{ranks} ranks x {threads} threads = {ranks * threads} threads on {usable_cores()} usable cores: "
               f"the ranks compete for cores, so these rows are not a fair comparison (marked '*')")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return message


def summary_line(machine: dict[str, Any]) -> str:
    """One line for a table caption."""
    dev = ", ".join(machine.get("device_names") or []) or machine.get("device", "cpu")
    load = "/".join(f"{v:.2f}" for v in machine.get("load_average") or [])
    return (f"{dev}; {machine['usable_cores']} usable cores ({machine['logical_cores']} logical); "
            f"{machine['ranks']} ranks x {machine['threads_per_rank']} threads; torch {machine['torch']}; "
            f"python {machine['python']}; load average {load or 'n/a'}")
