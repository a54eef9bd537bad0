"""In-order delivery of a numbered frame stream with losses: a bounded reorder buffer and the sequences to ask for again."""

from __future__ import annotations

from devices.serial_framing import MAX_SEQUENCE, Frame
from devices.errors import DeviceError

SEQUENCE_SPACE = MAX_SEQUENCE + 1
HALF_SPACE = SEQUENCE_SPACE // 2
DEFAULT_REORDER_FRAMES = 64


class FrameGapTooLarge(DeviceError):
    """More frames went missing than the reorder buffer can wait for; the stream must restart."""


class FrameReorder:
    """Delivers frames in sequence order; frames after a gap wait until the missing ones are sent again.

    Pure and bounded: it holds at most `capacity` frames. A sequence at or up to half the 16-bit space
    behind the next expected one is a duplicate (a frame sent again after it had arrived) and is dropped.
    """

    def __init__(self, capacity: int = DEFAULT_REORDER_FRAMES) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.expected: int | None = None
        self._held: dict[int, Frame] = {}
        self.duplicates = 0

    def reset(self, next_sequence: int | None = None) -> None:
        """Forget everything; the next frame accepted (or `next_sequence`) starts the stream."""
        self.expected = next_sequence
        self._held.clear()

    @property
    def held_frames(self) -> int:
        return len(self._held)

    @property
    def missing(self) -> list[int]:
        """Sequences awaited before the held frames can be delivered, in order."""
        if self.expected is None or not self._held:
            return []
        furthest = max((sequence - self.expected) % SEQUENCE_SPACE for sequence in self._held)
        candidates = ((self.expected + offset) % SEQUENCE_SPACE for offset in range(furthest))
        return [sequence for sequence in candidates if sequence not in self._held]

    def accept(self, frame: Frame) -> list[Frame]:
        """The frames deliverable now, in order (empty while a gap is open); FrameGapTooLarge on overflow."""
        if self.expected is None:
            self.expected = frame.sequence
        offset = (frame.sequence - self.expected) % SEQUENCE_SPACE
        if offset >= HALF_SPACE or frame.sequence in self._held:
            self.duplicates += 1
            return []
        if offset > 0:
            if offset > self.capacity or len(self._held) >= self.capacity:
                raise FrameGapTooLarge(
                    f"{offset} frames missing before sequence {frame.sequence} (the buffer waits for at most "
                    f"{self.capacity})")
            self._held[frame.sequence] = frame
            return []
        delivered = [frame]
        self.expected = (frame.sequence + 1) % SEQUENCE_SPACE
        while self.expected in self._held:
            delivered.append(self._held.pop(self.expected))
            self.expected = (self.expected + 1) % SEQUENCE_SPACE
        return delivered
