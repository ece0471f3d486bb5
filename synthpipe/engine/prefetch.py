"""Bounded prefetch queue that feeds rank 0 (docs/guide.md, "The prefetch queue").

A background thread iterates the user's loader. On CUDA it pins each batch, copies it to
the device on a dedicated stream with ``non_blocking=True`` and records an event; the
consumer makes its current stream wait on that event (no host synchronisation) and
marks the tensors as used on its stream so the caching allocator does not reuse them
early. On CPU the same queue simply overlaps loading with compute.

Errors raised by the loader are re-raised in the consumer; closing the queue (or
leaving a ``with`` block) stops the thread even when the consumer stops early.
"""
from __future__ import annotations

import functools
import queue
import threading
from typing import Any, Callable, Generator, Iterable

import torch

__all__ = ["THREAD_NAME", "PrefetchQueue"]

_END = object()

THREAD_NAME = "synthpipe-prefetch"  # (the watchdog shows this thread's stack when a rank stalls)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _record_stream(t: torch.Tensor, stream: Any) -> None:
    t.record_stream(stream)


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(b, fn) for b in batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    return batch


class PrefetchQueue:
    """Iterate ``loader`` with up to ``depth`` batches loaded (and copied) ahead.

    Args:
        loader: any iterable of batches (tensors, or tuples/lists/dicts of tensors).
        device: where the batches are needed. CUDA devices use a copy stream and pinned memory.
        depth: the most batches held ahead of the consumer (memory bound).
        pin_memory: pin CPU batches before copying (CUDA only; default True).

    Yields batches on ``device``; on CUDA they are safe to use on the consumer's current stream.
    """

    def __init__(self, loader: Iterable[Any], device: torch.device | str = "cpu", depth: int = 2,
                 pin_memory: bool = True):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.loader = loader
        self.device = torch.device(device)
        self.depth = depth
        self.cuda = self.device.type == "cuda"
        self.pin_memory = pin_memory and self.cuda
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            for batch in self.loader:
                if self._stop.is_set():
                    return
                event = None
                if self.cuda:
                    if self.pin_memory:
                        batch = _map_tensors(batch, lambda t: t if t.is_cuda or t.is_pinned() else t.pin_memory())
                    with torch.cuda.stream(self.stream):
                        batch = _map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
                        event = torch.cuda.Event()
                        event.record(self.stream)
                else:
                    batch = _map_tensors(batch, lambda t: t.to(self.device))
                if not self._put((batch, event)):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer
            self._put(_Failure(e))

    def __iter__(self) -> Generator[Any, None, None]:
        self.close()
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, name=THREAD_NAME, daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    _map_tensors(batch, functools.partial(_record_stream, stream=current))
                yield batch
        finally:
            self.close()

    def close(self) -> None:
        """Stop the producer thread (safe to call more than once)."""
        self._stop.set()
        if self._thread is not None:
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "PrefetchQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
