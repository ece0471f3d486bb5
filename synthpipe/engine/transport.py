"""Point-to-point channels between neighbouring stages.

Every message is two sends on the channel's own process group:

1. a fixed-size ``int64`` *header* (:data:`HEADER_LEN` entries): message kind, step id,
   flags, a few float64 statistics (bit-cast) and, per tensor, its dtype and shape;
2. one ``uint8`` *payload* holding all tensors packed back to back (omitted when empty).

Because the shapes travel in the header, batch size and sequence length may change from
one step to the next; because a channel always has a header receive posted ahead, the
sender never waits for the receiver to reach its ``recv`` call. Send buffers are kept
alive until their work completes (``Channel.flush`` / ``Channel.reap``).

Activations r -> r+1 and gradients r+1 -> r each get a process group of their own, so
the two directions never queue behind each other (on NCCL: on one stream).
"""
from __future__ import annotations

import dataclasses
import struct
from collections import deque
from typing import Any, Sequence

import torch
import torch.distributed as dist

HEADER_LEN = 128
N_STATS = 32  # float64 slots for piggybacked metrics (loss, synthesizer losses, ...)
_STATS_AT = 8
_TENSORS_AT = _STATS_AT + N_STATS
MAX_DIMS = 8

# Message kinds.
TRAIN, EVAL, EVAL_END, FIT_END, ABORT = 1, 2, 3, 4, 5
KIND_NAMES = {TRAIN: "train", EVAL: "eval", EVAL_END: "eval-end", FIT_END: "fit-end", ABORT: "abort"}
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
            nbytes += _padded(t.numel() * t.element_size())
        if pos + len(entry) > HEADER_LEN:
            raise TransportError(f"too many tensors or dimensions for one message ({len(tensors)} tensors)")
        header[pos:pos + len(entry)] = entry
        pos += len(entry)
    header[5] = nbytes
    return header


def decode_header(header: Sequence[int]) -> tuple[int, int, int, list[float], list[tuple[torch.dtype, tuple[int, ...]] | None], int]:
    """Inverse of :func:`encode_header`: kind, step, flags, stats, tensor specs, payload bytes."""
    kind, step, flags, n = (int(v) for v in header[:4])
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


ALIGN = 16  # every tensor starts at a multiple of this, so the receiver can view it in place


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def pack(tensors: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    """All tensors as one flat uint8 buffer on ``device``, each at an aligned offset (None if empty)."""
    parts = []
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        raw = t.detach().to(device).contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        if _padded(raw.numel()) != raw.numel():
            parts.append(torch.zeros(_padded(raw.numel()) - raw.numel(), dtype=torch.uint8, device=device))
    if not parts:
        return None
    return parts[0].clone() if len(parts) == 1 else torch.cat(parts)


def unpack(buffer: torch.Tensor | None, specs: Sequence[tuple[torch.dtype, tuple[int, ...]] | None]) -> tuple:
    """Views into ``buffer`` with the given dtypes and shapes (``None`` kept)."""
    out: list[torch.Tensor | None] = []
    offset = 0
    for spec in specs:
        if spec is None:
            out.append(None)
            continue
        dtype, shape = spec
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            out.append(torch.empty(shape, dtype=dtype, device=buffer.device if buffer is not None else "cpu"))
            continue
        assert buffer is not None
        out.append(buffer[offset:offset + nbytes].view(dtype).view(shape))
        offset += _padded(nbytes)
    return tuple(out)


class Channel:
    """One direction between two ranks: ``send`` on one side, ``recv``/``poll`` on the other.

    Args:
        group: a process group containing both ranks, used for this direction only.
        peer: the global rank at the other end.
        device: where headers and payloads live (a CUDA device for NCCL, CPU for gloo).
        name: for error messages, e.g. ``"activations 0->1"``.
    """

    def __init__(self, group: Any, peer: int, device: torch.device, name: str):
        self.group = group
        self.peer = peer
        self.device = device
        self.name = name
        self._pending_sends: deque[tuple[list[Any], tuple]] = deque()
        self._header = None
        self._header_work = None

    # -- sending ------------------------------------------------------------------
    def send(self, kind: int, step: int, tensors: Sequence[torch.Tensor | None] = (),
             flags: int = 0, stats: Sequence[float] = ()) -> None:
        """Start sending a message; returns at once. Buffers live until the sends complete."""
        header = torch.tensor(encode_header(kind, step, tensors, flags, stats), dtype=torch.int64)
        header = header.to(self.device)
        payload = pack(tensors, self.device)
        works = [dist.isend(header, self.peer, group=self.group)]
        if payload is not None:
            works.append(dist.isend(payload, self.peer, group=self.group))
        self._pending_sends.append((works, (header, payload)))
        self.reap()

    def reap(self) -> None:
        """Drop send buffers whose sends have completed."""
        while self._pending_sends and all(w.is_completed() for w in self._pending_sends[0][0]):
            self._pending_sends.popleft()

    def flush(self) -> None:
        """Wait until every send started on this channel has completed."""
        while self._pending_sends:
            works, _ = self._pending_sends.popleft()
            for w in works:
                w.wait()

    # -- receiving ------------------------------------------------------------------
    def post(self) -> None:
        """Post the receive of the next header (idempotent)."""
        if self._header_work is None:
            self._header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            self._header_work = dist.irecv(self._header, self.peer, group=self.group)

    def ready(self) -> bool:
        """True if the next message's header has arrived (never blocks)."""
        self.post()
        return self._header_work.is_completed()

    def recv(self, post_next: bool = True) -> Message:
        """Wait for the next message; then post the next header receive if ``post_next``.

        The caller passes ``post_next=False`` when it knows no message follows (after a
        fit-end, or the last expected gradient), so no receive is left dangling.
        """
        self.post()
        self._header_work.wait()
        header = self._header.tolist()
        self._header = self._header_work = None
        kind, step, flags, stats, specs, nbytes = decode_header(header)
        if kind not in KIND_NAMES:
            raise TransportError(f"{self.name}: corrupt header (kind {kind})")
        payload = None
        if nbytes:
            payload = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            dist.irecv(payload, self.peer, group=self.group).wait()
        if post_next:
            self.post()
        return Message(kind, step, flags, stats, unpack(payload, specs))
