"""Utilisation sampling (a background thread in the harness) and peak memory (in each rank).

:class:`Monitor` samples, every ``interval`` seconds, the CPU use of each watched process
(psutil; percent of one core, threads included), the whole machine's CPU use, the
processes' resident memory and, where NVML is present, every GPU's utilisation and
memory. :meth:`Monitor.window` averages the samples that fall in a wall-clock window
(``time.time()``), so the sampling can run across several benchmark jobs and each job
reports its own timed region only.

Peak memory inside a rank: :func:`reset_peak_memory` / :func:`peak_memory` use the
kernel's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) and ``torch.cuda.max_memory_allocated`` on GPU.
"""
from __future__ import annotations

import resource
import threading
import time
from typing import Any, Sequence

import torch

__all__ = ["Monitor", "release_free_memory", "reset_peak_memory", "peak_memory"]


class Monitor:
    """Sample CPU (per process and machine-wide), RSS and GPU utilisation in a thread.

    Args:
        pids: processes to watch; ``set_pids`` replaces them (e.g. after a restart).
        interval: seconds between samples.
    """

    def __init__(self, pids: Sequence[int] = (), interval: float = 0.2):
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._procs: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synthpipe-bench-monitor", daemon=True)
        self._nvml: list[Any] = []
        self.gpu_available = self._init_nvml()
        self.set_pids(pids)
        psutil.cpu_percent(interval=None)
        psutil.cpu_times_percent(interval=None)

    def _init_nvml(self) -> bool:
        try:
            import pynvml
            pynvml.nvmlInit()
            self._pynvml = pynvml
            self._nvml = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            return bool(self._nvml)
        except Exception:
            return False

    def set_pids(self, pids: Sequence[int]) -> None:
        with self._lock:
            self._procs = {}
            for pid in pids:
                try:
                    p = self._psutil.Process(pid)
                    p.cpu_percent(interval=None)
                    self._procs[pid] = p
                except self._psutil.Error:
                    pass

    def start(self) -> "Monitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval + 1)
        if self._nvml:
            try:
                self._pynvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = []

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _sample(self) -> dict[str, Any]:
        times = self._psutil.cpu_times_percent(interval=None)
        sample: dict[str, Any] = {"time": time.time(), "system_cpu": self._psutil.cpu_percent(interval=None),
                                  "steal": float(getattr(times, "steal", 0.0) or 0.0),
                                  "proc_cpu": {}, "proc_rss_mb": {}}
        with self._lock:
            procs = dict(self._procs)
        for pid, p in procs.items():
            try:
                with p.oneshot():
                    sample["proc_cpu"][pid] = p.cpu_percent(interval=None)
                    sample["proc_rss_mb"][pid] = p.memory_info().rss / 2 ** 20
            except self._psutil.Error:
                pass
        if self._nvml:
            gpus = []
            for h in self._nvml:
                try:
                    util = self._pynvml.nvmlDeviceGetUtilizationRates(h)
                    mem = self._pynvml.nvmlDeviceGetMemoryInfo(h)
                    gpus.append({"util": float(util.gpu), "mem_mb": mem.used / 2 ** 20})
                except Exception:
                    gpus.append({"util": float("nan"), "mem_mb": float("nan")})
            sample["gpus"] = gpus
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            s = self._sample()
            with self._lock:
                self.samples.append(s)

    def window(self, start: float, end: float, pids: Sequence[int]) -> dict[str, Any]:
        """Means over the samples taken in ``[start, end]`` (wall-clock seconds).

        Returns ``cpu_percent`` (per pid, in the order given; percent of one core),
        ``system_cpu_percent`` (whole machine, 100 = every core busy), ``other_cpu_cores``
        (cores' worth of CPU used by *other* processes: the machine's noise),
        ``steal_percent`` (CPU time a hypervisor gave to other guests: noise inside a VM),
        ``rss_peak_mb`` (per pid, sampled), ``gpu_util_percent`` / ``gpu_mem_peak_mb``
        (per GPU; empty without NVML), and ``samples``.
        """
        # A sample covers the interval before it, so take those that end inside the window.
        with self._lock:
            chosen = [s for s in self.samples if start + 0.5 * self.interval <= s["time"] <= end + 0.5 * self.interval]
        ncores = self._psutil.cpu_count() or 1
        out: dict[str, Any] = {"samples": len(chosen), "cpu_percent": [], "rss_peak_mb": [],
                               "system_cpu_percent": None, "other_cpu_cores": None, "steal_percent": None,
                               "gpu_util_percent": [], "gpu_mem_peak_mb": []}
        if not chosen:
            return out
        for pid in pids:
            vals = [s["proc_cpu"][pid] for s in chosen if pid in s["proc_cpu"]]
            rss = [s["proc_rss_mb"][pid] for s in chosen if pid in s["proc_rss_mb"]]
            out["cpu_percent"].append(sum(vals) / len(vals) if vals else None)
            out["rss_peak_mb"].append(max(rss) if rss else None)
        system = sum(s["system_cpu"] for s in chosen) / len(chosen)
        ours = sum(v for v in out["cpu_percent"] if v is not None)
        out["system_cpu_percent"] = system
        out["steal_percent"] = sum(s.get("steal", 0.0) for s in chosen) / len(chosen)
        out["other_cpu_cores"] = max(0.0, system * ncores / 100.0 - ours / 100.0)
        if chosen and "gpus" in chosen[0]:
            n = len(chosen[0]["gpus"])
            out["gpu_util_percent"] = [sum(s["gpus"][i]["util"] for s in chosen) / len(chosen) for i in range(n)]
            out["gpu_mem_peak_mb"] = [max(s["gpus"][i]["mem_mb"] for s in chosen) for i in range(n)]
        return out


# -- in-rank peak memory ---------------------------------------------------------------------
def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so an earlier job's
    freed tensors do not count towards the next job's resident set."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: torch.device | None = None) -> None:
    """Restart the peak-memory counters of this process (RSS high-water mark, CUDA peak).

    Freed heap memory is returned to the OS first, so the peak covers what the process
    holds from now on (the torch libraries, ~300 MB, included).
    """
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | None = None) -> dict[str, float | None]:
    """``rss_mb`` (peak resident set since the last reset) and ``cuda_mb`` (peak allocated, GPU only)."""
    rss = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 1024
                    break
    except OSError:
        pass
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return {"rss_mb": rss, "cuda_mb": cuda}
