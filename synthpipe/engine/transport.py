"""Point-to-point channels between neighbouring stages.

Every message is a few sends on the channel's own process group:

1. a fixed-size ``int64`` *header* (:data:`HEADER_LEN` entries): message kind, step id,
   flags, a few float64 statistics (bit-cast) and, per tensor, its dtype and shape;
2. one send per non-empty tensor, of its own memory viewed as bytes: nothing is copied
   when a tensor is already contiguous on the channel's device (the sender keeps it
   alive, unmodified, until the send completes).

Because the shapes travel in the header, batch size and sequence length may change from
one step to the next. A receiving channel takes its messages on a background thread
(the header, then at once the tensors), so the sender never waits for the receiver to
reach its ``recv`` call and the tensors cross while the receiver computes. Sent tensors
are kept alive until their sends complete; as with ``torch.distributed.isend``, they must
not be modified before then (the worker only sends fresh module outputs, gradients and the
labels of the batch). A channel holds the buffers of at most ``max_sends`` messages (see
:class:`Channel`), so its memory is bounded by that count, never by the length of a run.

Activations r -> r+1 and gradients r+1 -> r each get a process group of their own, so
the two directions never queue behind each other (on NCCL: on one stream).
"""
from __future__ import annotations

import dataclasses
import queue
import struct
import threading
from collections import deque
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = ["Channel", "Message", "TransportError", "encode_header", "decode_header", "as_bytes", "limit_sends",
           "HEADER_LEN", "N_STATS", "MAX_DIMS", "TRAIN", "EVAL", "EVAL_END", "FIT_END", "KIND_NAMES", "FLAG_SKIPPED"]

HEADER_LEN = 128
N_STATS = 32  # float64 slots for piggybacked metrics (loss, synthesizer losses, ...)
_STATS_AT = 8
_TENSORS_AT = _STATS_AT + N_STATS
MAX_DIMS = 8
DEFAULT_MAX_SENDS = 5  # TrainConfig's default max_inflight (4), plus one

# Message kinds.
TRAIN, EVAL, EVAL_END, FIT_END = 1, 2, 3, 4
KIND_NAMES = {TRAIN: "train", EVAL: "eval", EVAL_END: "eval-end", FIT_END: "fit-end"}
# Flags.
FLAG_SKIPPED = 1  # the step was skipped (non-finite loss); no gradient follows

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_NONE = -1


@dataclasses.dataclass
class Message:
    """A received message: kind, step id, flags, statistics and tensors (``None`` entries kept)."""

    kind: int
    step: int
    flags: int = 0
    stats: list[float] = dataclasses.field(default_factory=list)
    tensors: tuple = ()

    @property
    def skipped(self) -> bool:
        return bool(self.flags & FLAG_SKIPPED)


def limit_sends(channels: Iterable["Channel | None"], max_inflight: int, delay: int | None = None) -> None:
    """Bound the sending ``channels`` (``None`` entries skipped) for a stage trained with
    ``max_inflight`` targets outstanding, or a fixed ``delay``: one message more than a
    stage can have in flight, so that holding the bound never makes a running pipeline wait.
    """
    for ch in channels:
        if ch is not None:
            ch.max_sends = max(max_inflight, delay or 0) + 1


class TransportError(RuntimeError):
    """A message could not be encoded or did not match what the receiver expected."""


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(x)))[0]


def encode_header(kind: int, step: int, tensors: Sequence[torch.Tensor | None],
                  flags: int = 0, stats: Sequence[float] = ()) -> list[int]:
    """The header as a list of ints (see the module docstring for the layout)."""
    if len(stats) > N_STATS:
        raise TransportError(f"at most {N_STATS} statistics per message, got {len(stats)}")
    header = [0] * HEADER_LEN
    header[0], header[1], header[2], header[3] = kind, step, flags, len(tensors)
    nbytes = 0
    for i, s in enumerate(stats):
        header[_STATS_AT + i] = _f2i(s)
    header[4] = len(stats)
    pos = _TENSORS_AT
    for t in tensors:
        if t is None:
            entry = [_NONE, 0]
        else:
            if t.dtype not in _CODE:
                raise TransportError(f"cannot send dtype {t.dtype}")
            if t.dim() > MAX_DIMS:
                raise TransportError(f"cannot send a {t.dim()}-D tensor (at most {MAX_DIMS} dims)")
            entry = [_CODE[t.dtype], t.dim(), *t.shape]
            nbytes += t.numel() * t.element_size()
        if pos + len(entry) > HEADER_LEN:
            raise TransportError(f"too many tensors or dimensions for one message ({len(tensors)} tensors)")
        header[pos:pos + len(entry)] = entry
        pos += len(entry)
    header[5] = nbytes
    return header


TensorSpec = tuple[torch.dtype, tuple[int, ...]]


def decode_header(header: Sequence[int]) -> tuple[int, int, int, list[float], list[TensorSpec | None], int]:
    """Inverse of :func:`encode_header`: kind, step, flags, stats, tensor specs, total tensor bytes."""
    kind, step, flags, n = (int(v) for v in header[:4])
    if kind not in KIND_NAMES or not 0 <= n <= (HEADER_LEN - _TENSORS_AT) // 2:
        raise TransportError(f"corrupt header (kind {kind}, {n} tensors)")
    stats = [_i2f(header[_STATS_AT + i]) for i in range(int(header[4]))]
    specs: list[tuple[torch.dtype, tuple[int, ...]] | None] = []
    pos = _TENSORS_AT
    for _ in range(n):
        code = int(header[pos])
        if code == _NONE:
            specs.append(None)
            pos += 2
            continue
        ndim = int(header[pos + 1])
        specs.append((_DTYPES[code], tuple(int(d) for d in header[pos + 2:pos + 2 + ndim])))
        pos += 2 + ndim
    return kind, step, flags, stats, specs, int(header[5])


def as_bytes(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, contiguous, as a flat ``uint8`` view (no copy when it already is)."""
    return t.detach().to(device).contiguous().reshape(-1).view(torch.uint8)


class Channel:
    """One direction between two ranks: ``send`` on one side, ``expect``/``recv`` on the other.

    Receiving runs on a background thread, one per receiving channel: for every message
    the owner says will come (:meth:`expect`), it waits for the header, posts the
    receives of the tensors at once and puts the whole :class:`Message` in an inbox. The
    tensors therefore cross while the owner computes: gloo moves data only once its
    receive is posted, and its works cannot be polled (``is_completed`` stays false
    until ``wait``), so without the thread every tensor would cross only when the owner
    finally asked for it. Receives are never posted for messages that are not expected,
    so none is left dangling when a fit ends.

    Sending keeps each message's buffers (and works) until its sends are known to be
    complete. Polling cannot tell on gloo (see above), so the channel holds at most
    ``max_sends`` messages: a send beyond that first waits for the oldest one. That wait
    costs nothing in a running pipeline, because a message that old has already
    crossed: the peer's receiver thread posts its receive as soon as the message is
    expected, a gradient is expected before its activation even leaves, and an
    activation is expected one message ahead while the peer's own bound (``max_inflight``
    targets outstanding) keeps the sender from running further ahead than that. Only a
    peer that falls more than ``max_sends`` messages behind (an evaluation, which has
    no targets to wait for, on a slow next stage) makes the sender wait: backpressure,
    instead of memory that grows without end. No wait depends on the peer's main thread
    sending anything, so the bound cannot deadlock. On NCCL, completed sends are also
    dropped as soon as ``is_completed`` says so, and ``wait`` blocks no CPU thread (it
    orders the current stream after the send, which then frees the buffer safely).

    Args:
        group: a process group containing both ranks, used for this direction only.
        peer: the global rank at the other end.
        device: where headers and received tensors live (a CUDA device for NCCL, CPU for gloo).
        name: for error messages, e.g. ``"activations 0->1"``.
        max_sends: messages whose buffers the sending side holds at most (>= 1); the
            worker sets it from ``TrainConfig.max_inflight`` (see :func:`limit_sends`).

    Raises:
        ValueError: ``max_sends`` below 1.
    """

    def __init__(self, group: Any, peer: int, device: torch.device, name: str,
                 max_sends: int = DEFAULT_MAX_SENDS):
        self.group = group
        self.peer = peer
        self.device = device
        self.name = name
        self.max_sends = max_sends
        self._pending_sends: deque[tuple[list[Any], tuple]] = deque()
        self._credits: "queue.SimpleQueue[int | None]" = queue.SimpleQueue()
        self._inbox: "queue.SimpleQueue[Message | BaseException]" = queue.SimpleQueue()
        self._expected = 0  # messages expected and not yet taken by recv
        self._thread: threading.Thread | None = None

    @property
    def max_sends(self) -> int:
        """The most messages whose send buffers this channel holds at once."""
        return self._max_sends

    @max_sends.setter
    def max_sends(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{self.name}: max_sends must be a whole number >= 1, got {n!r}")
        self._max_sends = n

    @property
    def expected(self) -> int:
        """Messages expected (:meth:`expect`) and not yet taken by :meth:`recv`."""
        return self._expected

    @property
    def sends_in_flight(self) -> int:
        """Messages sent on this channel whose buffers are still held (at most :attr:`max_sends`)."""
        return len(self._pending_sends)

    # -- sending ------------------------------------------------------------------
    def send(self, kind: int, step: int, tensors: Sequence[torch.Tensor | None] = (),
             flags: int = 0, stats: Sequence[float] = ()) -> None:
        """Start sending a message; returns once it is posted (see the class docstring for
        when it waits for an older one). Its buffers live until its sends complete."""
        header = torch.tensor(encode_header(kind, step, tensors, flags, stats), dtype=torch.int64)
        header = header.to(self.device)
        buffers = [header] + [as_bytes(t, self.device) for t in tensors if t is not None and t.numel()]
        works = [dist.isend(b, self.peer, group=self.group) for b in buffers]
        self._pending_sends.append((works, tuple(buffers)))
        self.reap()

    def reap(self) -> None:
        """Drop the buffers of sends known to be complete, and wait for the oldest ones
        while more than :attr:`max_sends` messages are held."""
        pending = self._pending_sends
        while pending and all(w.is_completed() for w in pending[0][0]):  # (NCCL; never true on gloo)
            pending.popleft()
        while len(pending) > self._max_sends:
            works, _ = pending.popleft()
            for w in works:
                w.wait()

    def flush(self) -> None:
        """Wait until every send started on this channel has completed."""
        while self._pending_sends:
            works, _ = self._pending_sends.popleft()
            for w in works:
                w.wait()

    # -- receiving ------------------------------------------------------------------
    def expect(self, n: int = 1) -> None:
        """``n`` more messages will come: receive them in the background, in order."""
        if n <= 0:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._receive_loop, name=f"synthpipe-recv {self.name}",
                                            daemon=True)
            self._thread.start()
        self._expected += n
        for _ in range(n):
            self._credits.put(1)

    def ready(self) -> bool:
        """True if the next message has arrived whole (never blocks)."""
        return not self._inbox.empty()

    def recv(self) -> Message:
        """The next message, waiting for it (a message not yet expected is expected now)."""
        if self._expected == 0:
            self.expect(1)
        item = self._inbox.get()
        self._expected -= 1
        if isinstance(item, BaseException):
            self._expected = 0
            raise TransportError(f"{self.name}: receiving failed: {item}") from item
        return item

    def close(self) -> None:
        """Stop the receiver thread once the expected messages are in (idempotent)."""
        if self._thread is not None:
            self._credits.put(None)
            self._thread.join(timeout=5.0)
            self._thread = None

    def _receive_loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        while self._credits.get() is not None:
            try:
                self._inbox.put(self._receive_one())
            except BaseException as e:  # handed to the owner's recv; this channel is dead
                self._inbox.put(e)
                return

    def _receive_one(self) -> Message:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        _posted(dist.irecv(header, self.peer, group=self.group)).wait()
        kind, step, flags, stats, specs, _ = decode_header(header.tolist())
        tensors = tuple(None if spec is None else torch.empty(spec[1], dtype=spec[0], device=self.device)
                        for spec in specs)
        works = [_posted(dist.irecv(t.reshape(-1).view(torch.uint8), self.peer, group=self.group))
                 for t in tensors if t is not None and t.numel()]  # all posted before any wait
        for w in works:
            w.wait()
        return Message(kind, step, flags, stats, tensors)


def _posted(work: Any) -> Any:
    """The work of a point-to-point call (``None`` only for a rank outside the group, never here)."""
    if work is None:
        raise TransportError("a point-to-point receive was not posted (this rank is not in the channel's group)")
    return work
