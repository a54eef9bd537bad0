"""The reorder buffer: frames come out once each, in order, whatever was lost, duplicated or resent."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.frame_order import SEQUENCE_SPACE, FrameGapTooLarge, FrameReorder
from devices.serial_framing import Frame, MessageType


def frames_from(base: int, count: int) -> list[Frame]:
    return [Frame(MessageType.UPDATE_CHUNK, (base + index) % SEQUENCE_SPACE, bytes([index % 256])) for index in range(count)]


@given(base=st.integers(0, SEQUENCE_SPACE - 1), count=st.integers(1, 60),
       lost=st.sets(st.integers(1, 59)), duplicated=st.sets(st.integers(0, 59)), data=st.data())
def test_lost_frames_sent_again_on_request_come_out_once_in_order(base, count, lost, duplicated, data) -> None:
    frames = frames_from(base, count)
    lost = {index for index in lost if index < count - 1}  # the last frame arrives, so every gap is seen
    order = FrameReorder(capacity=64)
    delivered: list[Frame] = []
    for index, frame in enumerate(frames):
        if index in lost:
            continue
        delivered += order.accept(frame)
        if index in duplicated:
            delivered += order.accept(frame)  # a frame sent again after it had arrived
    resend_rounds = 0
    while order.missing:
        resend_rounds += 1
        requested = order.missing
        for sequence in data.draw(st.permutations(requested)):
            delivered += order.accept(frames[(sequence - base) % SEQUENCE_SPACE])
    assert delivered == frames
    assert order.held_frames == 0 and resend_rounds <= 1


def test_missing_lists_the_gaps_before_held_frames() -> None:
    order = FrameReorder()
    frames = frames_from(65534, 6)  # wraps around the 16-bit space
    assert order.accept(frames[0]) == [frames[0]]
    assert order.accept(frames[2]) == [] and order.accept(frames[4]) == []
    assert order.missing == [65535, 1]
    assert order.accept(frames[1]) == [frames[1], frames[2]]
    assert order.missing == [1]
    assert order.accept(frames[0]) == [] and order.duplicates == 1


def test_a_gap_beyond_the_buffer_is_an_error_and_reset_starts_over() -> None:
    order = FrameReorder(capacity=4)
    frames = frames_from(0, 10)
    order.accept(frames[0])
    with pytest.raises(FrameGapTooLarge, match="5 frames missing"):
        order.accept(frames[6])
    order.reset()
    assert order.accept(frames[6]) == [frames[6]] and order.missing == []
    with pytest.raises(ValueError):
        FrameReorder(capacity=0)
