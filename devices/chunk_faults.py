"""Faults on a device's incoming update chunks, after the channel and before the device: corrupt, duplicate, reorder.

``ChunkFaults`` is the tap a device agent hands every update chunk it receives (``receive``); it returns what
reaches the device now. The run arms it when a scenario event fires: flip bits in the next N chunks, deliver
the next N twice, deliver the next N in a shuffled order. Pure and seeded: it owns no clock and no task (the
agent passes the time, and asks ``release_due`` at ``next_release_s`` for chunks held back to reorder); each
arming brings its own ``numpy.random.Generator``, so what is flipped and how chunks are shuffled depend only
on the scenario's seed.

Armed faults act in the order a link would: corruption, then duplication, then reordering; each counts the
chunks that reach it (the two copies of a duplicated chunk count twice for a reordering). Two receive paths have
one: an emulated device's agent, and a serial board's bridge (before the serial line; ``TapsChunks``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np

from devices.energy import radio_seconds

REORDER_HOLD_MIN_S = 1.0
"""A reordered group that stops short (its update had fewer chunks) is released after this long without a chunk,"""
REORDER_HOLD_CHUNK_TIMES = 3
"""or after this many chunk airtimes at the downlink rate, when that is longer (a slow link's chunks come seconds
apart)."""


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the device's MQTT client received it (the faults act on update chunks only)."""

    topic: str
    payload: bytes
    qos: int


@runtime_checkable
class TapsChunks(Protocol):
    """A device's receive path the run can arm chunk faults on: an emulated agent, or a serial board's bridge."""

    chunk_faults: ChunkFaults


@dataclass
class _Corruption:
    remaining: int
    bits: int
    rng: np.random.Generator


@dataclass
class _Reordering:
    remaining: int
    rng: np.random.Generator


def flip_bits(data: bytes, bits: int, rng: np.random.Generator) -> bytes:
    """``data`` with ``bits`` distinct bits flipped (every bit, if it has fewer), the positions drawn from ``rng``."""
    total = 8 * len(data)
    positions = rng.choice(total, size=min(bits, total), replace=False)
    flipped = bytearray(data)
    for position in positions:
        flipped[int(position) // 8] ^= 0x80 >> (int(position) % 8)
    return bytes(flipped)


def shuffled_order(count: int, rng: np.random.Generator) -> list[int]:
    """A permutation of ``range(count)`` drawn from ``rng``, never the identity when ``count`` ≥ 2."""
    order = [int(index) for index in rng.permutation(count)]
    if count >= 2 and order == sorted(order):
        order = order[1:] + order[:1]
    return order


class ChunkFaults:
    """The faults armed on one device's receive path (none until the run arms some); see the module docstring."""

    def __init__(self, downlink_rate_bps: float | None = None) -> None:
        self.downlink_rate_bps = downlink_rate_bps
        self._corruptions: deque[_Corruption] = deque()
        self._duplicates = 0
        self._reorderings: deque[_Reordering] = deque()
        self._held: list[ReceivedMessage] = []
        self._release_at_s: float | None = None
        self.corrupted = 0
        """Chunks delivered with bits flipped."""
        self.duplicated = 0
        """Chunks delivered a second time."""
        self.reordered = 0
        """Chunks delivered in a shuffled group of two or more."""
        self.dropped = 0
        """Chunks held for reordering when the connection they came on was lost (lost with it)."""

    def corrupt(self, chunks: int, bits: int, rng: np.random.Generator) -> None:
        """Flip ``bits`` bits (positions from ``rng``) in each of the next ``chunks`` chunks."""
        if chunks < 1 or bits < 1:
            raise ValueError(f"corrupt needs chunks >= 1 and bits >= 1, got chunks={chunks}, bits={bits}")
        self._corruptions.append(_Corruption(chunks, bits, rng))

    def duplicate(self, chunks: int) -> None:
        """Deliver each of the next ``chunks`` chunks twice."""
        if chunks < 1:
            raise ValueError(f"duplicate needs chunks >= 1, got {chunks}")
        self._duplicates += chunks

    def reorder(self, chunks: int, rng: np.random.Generator) -> None:
        """Hold the next ``chunks`` chunks and deliver them in an order drawn from ``rng`` (never their own)."""
        if chunks < 2:
            raise ValueError(f"reorder needs chunks >= 2, got {chunks}")
        self._reorderings.append(_Reordering(chunks, rng))

    @property
    def armed(self) -> bool:
        """Whether some fault still waits for chunks, or chunks are held."""
        return bool(self._corruptions or self._duplicates or self._reorderings or self._held)

    def receive(self, chunk: ReceivedMessage, now_s: float) -> list[ReceivedMessage]:
        """What reaches the device now that ``chunk`` arrived at ``now_s`` (nothing while it is held to reorder)."""
        if self._corruptions:
            corruption = self._corruptions[0]
            chunk = replace(chunk, payload=flip_bits(chunk.payload, corruption.bits, corruption.rng))
            self.corrupted += 1
            corruption.remaining -= 1
            if corruption.remaining == 0:
                self._corruptions.popleft()
        copies = [chunk]
        if self._duplicates:
            self._duplicates -= 1
            self.duplicated += 1
            copies.append(chunk)
        delivered: list[ReceivedMessage] = []
        for copy in copies:
            delivered.extend(self._reorder(copy, now_s))
        return delivered

    def _reorder(self, chunk: ReceivedMessage, now_s: float) -> list[ReceivedMessage]:
        if not self._reorderings:
            return [chunk]
        reordering = self._reorderings[0]
        self._held.append(chunk)
        hold_s = max(REORDER_HOLD_MIN_S,
                     REORDER_HOLD_CHUNK_TIMES * radio_seconds(len(chunk.payload), self.downlink_rate_bps))
        self._release_at_s = now_s + hold_s
        reordering.remaining -= 1
        if reordering.remaining > 0:
            return []
        return self._release()

    def _release(self) -> list[ReceivedMessage]:
        """The held chunks in their shuffled order; the group's reordering is done with them."""
        held, self._held, self._release_at_s = self._held, [], None
        if not held:
            return []
        reordering = self._reorderings[0]
        if reordering.remaining == 0:
            self._reorderings.popleft()
        if len(held) >= 2:
            self.reordered += len(held)
            return [held[index] for index in shuffled_order(len(held), reordering.rng)]
        return held

    def next_release_s(self) -> float | None:
        """When held chunks are due even if the rest of their group never comes (None: nothing held)."""
        return self._release_at_s

    def release_due(self, now_s: float) -> list[ReceivedMessage]:
        """The held chunks, shuffled, once no chunk has come for their hold time; the group's remaining
        count carries on with the next chunks."""
        if self._release_at_s is None or now_s < self._release_at_s:
            return []
        return self._release()

    def drop_held(self) -> int:
        """The connection the held chunks came on is gone: they are lost with it (counted in ``dropped``)."""
        lost = len(self._held)
        self.dropped += lost
        self._held, self._release_at_s = [], None
        return lost
