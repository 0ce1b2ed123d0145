"""Self-resetting int32 arrival counters for kernels whose last-arriving program finishes the work of a group
(split-K in ``triton_linear``, the context split of ``triton_attention``).

Such a kernel takes a ticket from its group's counter with an ``atomic_add``; the program that draws the last ticket
combines the group's partials in a fixed order and puts the counter back to zero. So each launch needs counters that
are zero when it starts and that no concurrently running launch shares, without a memset (a memset would be one
more launch per call, and inside a CUDA graph it would have to be captured too).

Every launch takes its own run of consecutive slots from one zeroed buffer per device (``take``); it finds them zero
and leaves them zero. Why that is safe:

- a launch captured into a CUDA graph keeps its slots for every replay, so captured launches take slots above
  ``EAGER_SLOTS`` that nothing else ever gets: two graphs never share a counter, whichever streams replay them and
  however many launches came between their captures. When that region is used up, ``take`` returns None and later
  captures run their kernel unsplit (logged once): slower, never shared;
- eager launches take slots below ``EAGER_SLOTS``, wrapping around. Launches on one stream run one after another,
  so each finds its slots as the previous user left them: zero. Launches that may overlap on different streams hold
  different slots unless ``EAGER_SLOTS`` slots were handed out between them (hundreds of launches even of the
  largest projections).

The buffer is created zeroed (waited for once, so a launch on another stream cannot read it before the fill),
outside any CUDA-graph capture (a buffer made during a capture would come from the graph's private pool and be
zeroed only at replay): a call captured before any eager call on the device gets None and runs unsplit.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

COUNTER_RING = 1 << 22  # int32 arrival counters per device (16 MB): the first EAGER_SLOTS for eager launches
EAGER_SLOTS = 1 << 16  # (wrapping), the rest handed once each to launches captured into CUDA graphs


@dataclass
class _Ring:
    """A device's counters and where the next eager and captured runs start."""

    buffer: torch.Tensor
    next: int = 0  # the next eager slot
    captured: int = EAGER_SLOTS  # the next slot for a captured launch
    warned: bool = False


_RINGS: dict[torch.device, _Ring] = {}
_RING_LOCK = threading.Lock()


def take(device: torch.device, tiles: int, user: str) -> torch.Tensor | None:
    """``tiles`` zeroed int32 counters for one launch, or None (no buffer yet and the stream is capturing, or no
    room for them): the caller then runs its kernel unsplit. ``user`` names the kernel in warnings."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    with _RING_LOCK:
        ring = _RINGS.get(device)
        if ring is None:
            if capturing:
                logger.warning("%s: first used inside a CUDA-graph capture on %s; running it unsplit (run one call "
                               "outside the capture first)", user, device)
                return None
            ring = _RINGS[device] = _Ring(torch.zeros(COUNTER_RING, dtype=torch.int32, device=device))
            if device.type == "cuda":  # once per device: the zeros are written before any stream's launch reads them
                torch.cuda.current_stream(device).synchronize()
        if capturing:
            if ring.captured + tiles > COUNTER_RING:
                if not ring.warned:
                    ring.warned = True
                    logger.warning("%s: the arrival counters for captured launches on %s are used up (%d slots); "
                                   "later captures run unsplit", user, device, COUNTER_RING - EAGER_SLOTS)
                return None
            start, ring.captured = ring.captured, ring.captured + tiles
            return ring.buffer[start:start + tiles]
        if tiles > EAGER_SLOTS:
            return None
        if ring.next + tiles > EAGER_SLOTS:
            ring.next = 0
        start, ring.next = ring.next, ring.next + tiles
        return ring.buffer[start:start + tiles]


def counters_idle() -> bool:
    """Whether every arrival counter is zero, as each launch leaves its own (for tests and benchmarks; synchronize
    first)."""
    with _RING_LOCK:
        return all(not bool(ring.buffer.any()) for ring in _RINGS.values())
