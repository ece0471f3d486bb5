"""Process-group setup: the backend follows the device, and failures are reported by name."""
from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["env_world_size", "default_device", "backend_for", "init_process_group", "is_communication_error",
           "keep_until_exit"]


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it), or the initialised group's size."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device, requested: str | None = None) -> str:
    """NCCL for CUDA devices, gloo otherwise; a clear error for NCCL without CUDA."""
    if requested is None:
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and (device.type != "cuda" or not torch.cuda.is_available()):
        raise RuntimeError(f"the nccl backend needs CUDA devices, but this rank runs on {device} "
                           f"(CUDA available: {torch.cuda.is_available()}); use --backend gloo or a GPU")
    if requested not in ("nccl", "gloo"):
        raise ValueError(f"unknown backend {requested!r}; use 'nccl' or 'gloo'")
    return requested


def init_process_group(device: torch.device, backend: str, timeout_s: float = 1800.0) -> None:
    """Join the job described by the torchrun environment (RANK, WORLD_SIZE, MASTER_*).

    The CUDA device is set from the device (LOCAL_RANK by default) before NCCL starts,
    so each rank's communicator lives on its own GPU.
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"a multi-process run needs the torchrun environment; missing {', '.join(missing)}. "
                           f"Launch with `torchrun --nproc-per-node N ...` or `synthpipe train --nproc N`")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)


def is_communication_error(error: BaseException) -> bool:
    """Errors raised by a collective or P2P call when a peer vanished."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return any(s in text for s in ("Connection closed", "Connection reset", "Broken pipe", "gloo", "NCCL", "Socket"))


_exit_hook_registered = False


def keep_until_exit() -> None:
    """Keep the default process group for the rest of this process; destroy it at exit.

    A trainer that made the group does not destroy it when it closes: the next trainer
    of the process (a resumed run, a second model) would create a new group on the same
    MASTER_PORT, and a rank that gets there first can join the old group's store just
    before rank 0 shuts it down, then wait forever. Reusing the group avoids that race.
    Call ``torch.distributed.destroy_process_group()`` yourself to end it earlier.
    """
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_destroy_if_initialized)
        _exit_hook_registered = True


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
