"""The fault tap on a device's incoming chunks (corrupt, duplicate, reorder) and when a damaged transfer asks for repair."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.chunk_faults import ChunkFaults, ReceivedMessage, flip_bits, shuffled_order
from devices.chunk_repair import REPAIR_QUIET_MIN_S, DamagedTransfer


def chunks(count: int, size: int = 64) -> list[ReceivedMessage]:
    return [ReceivedMessage(f"update/1/{index}", bytes([index % 256]) * size, 1) for index in range(count)]


def bit_difference(first: bytes, second: bytes) -> int:
    return sum(bin(a ^ b).count("1") for a, b in zip(first, second))


def feed(faults: ChunkFaults, incoming: list[ReceivedMessage], gap_s: float = 0.01) -> list[ReceivedMessage]:
    """Every chunk in turn, `gap_s` apart, then whatever is still held once its hold time passed."""
    delivered: list[ReceivedMessage] = []
    now = 0.0
    for chunk in incoming:
        now += gap_s
        delivered += faults.release_due(now) + faults.receive(chunk, now)
    release_at = faults.next_release_s()
    if release_at is not None:
        delivered += faults.release_due(release_at)
    return delivered


def test_an_unarmed_tap_passes_every_chunk_through_untouched():
    faults = ChunkFaults(50_000.0)
    incoming = chunks(5)
    assert feed(faults, incoming) == incoming
    assert not faults.armed and (faults.corrupted, faults.duplicated, faults.reordered) == (0, 0, 0)


def test_corrupt_flips_the_bits_of_the_next_chunks_only():
    faults = ChunkFaults()
    faults.corrupt(2, 3, np.random.default_rng(1))
    incoming = chunks(4)
    delivered = feed(faults, incoming)
    assert [bit_difference(a.payload, b.payload) for a, b in zip(incoming, delivered)] == [3, 3, 0, 0]
    assert [chunk.topic for chunk in delivered] == [chunk.topic for chunk in incoming]
    assert faults.corrupted == 2 and not faults.armed


def test_duplicate_delivers_the_next_chunks_twice_in_place():
    faults = ChunkFaults()
    faults.duplicate(2)
    incoming = chunks(3)
    assert feed(faults, incoming) == [incoming[0], incoming[0], incoming[1], incoming[1], incoming[2]]
    assert faults.duplicated == 2


def test_reorder_holds_its_group_and_releases_it_shuffled():
    faults = ChunkFaults()
    faults.reorder(3, np.random.default_rng(4))
    incoming = chunks(5)
    assert faults.receive(incoming[0], 0.0) == [] and faults.receive(incoming[1], 0.1) == []
    group = faults.receive(incoming[2], 0.2)
    assert sorted(group, key=lambda chunk: chunk.topic) == incoming[:3] and group != incoming[:3]
    assert faults.receive(incoming[3], 0.3) == [incoming[3]]  # the group is done: the rest passes
    assert faults.reordered == 3 and faults.next_release_s() is None


def test_a_reordered_group_cut_short_is_released_after_its_hold_time():
    faults = ChunkFaults(8_000.0)  # 64-byte chunks: 64 ms each, so the hold is the 1 s minimum
    faults.reorder(10, np.random.default_rng(0))
    incoming = chunks(3)
    for index, chunk in enumerate(incoming):
        assert faults.receive(chunk, index * 0.1) == []
    release_at = faults.next_release_s()
    assert release_at == pytest.approx(0.2 + 1.0)
    assert faults.release_due(release_at - 0.01) == []
    released = faults.release_due(release_at)
    assert sorted(released, key=lambda chunk: chunk.topic) == incoming and released != incoming
    assert faults.armed  # 7 chunks of the group are still to come
    assert faults.receive(chunks(1)[0], 5.0) == []


def test_a_slow_link_holds_reordered_chunks_for_several_chunk_airtimes():
    faults = ChunkFaults(250.0)  # LoRa SF12: a 1 KiB chunk takes 33 s
    faults.reorder(2, np.random.default_rng(0))
    faults.receive(ReceivedMessage("update/1/0", bytes(1024), 1), 10.0)
    assert faults.next_release_s() == pytest.approx(10.0 + 3 * 1024 * 8 / 250.0)


def test_held_chunks_are_lost_with_their_connection():
    faults = ChunkFaults()
    faults.reorder(4, np.random.default_rng(0))
    for chunk in chunks(2):
        faults.receive(chunk, 0.0)
    assert faults.drop_held() == 2 and faults.dropped == 2 and faults.next_release_s() is None


def test_faults_act_in_link_order_corrupt_then_duplicate_then_reorder():
    faults = ChunkFaults()
    faults.corrupt(1, 1, np.random.default_rng(2))
    faults.duplicate(1)
    faults.reorder(2, np.random.default_rng(3))
    first, second = chunks(2)
    delivered = faults.receive(first, 0.0)  # corrupted, then two copies: the reordered group of two is complete
    assert len(delivered) == 2 and delivered[0] == delivered[1] and bit_difference(delivered[0].payload,
                                                                                  first.payload) == 1
    assert faults.receive(second, 0.1) == [second]


@pytest.mark.parametrize("bad", [lambda f: f.corrupt(0, 1, np.random.default_rng()),
                                 lambda f: f.corrupt(1, 0, np.random.default_rng()),
                                 lambda f: f.duplicate(0), lambda f: f.reorder(1, np.random.default_rng())])
def test_arming_with_nothing_to_do_is_an_error(bad):
    with pytest.raises(ValueError):
        bad(ChunkFaults())


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(min_value=1, max_value=3000), st.integers(0, 2**32 - 1))
def test_flip_bits_flips_exactly_that_many_distinct_bits(data: bytes, bits: int, seed: int):
    flipped = flip_bits(data, bits, np.random.default_rng(seed))
    assert len(flipped) == len(data)
    assert bit_difference(data, flipped) == min(bits, 8 * len(data))
    assert flipped == flip_bits(data, bits, np.random.default_rng(seed))  # the seed decides


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=2, max_value=40), st.integers(0, 2**32 - 1))
def test_a_shuffled_order_is_a_permutation_and_never_the_identity(count: int, seed: int):
    order = shuffled_order(count, np.random.default_rng(seed))
    assert sorted(order) == list(range(count)) and order != list(range(count))


_arming = st.lists(st.one_of(
    st.tuples(st.just("corrupt"), st.integers(1, 6), st.integers(1, 16)),
    st.tuples(st.just("duplicate"), st.integers(1, 6), st.just(0)),
    st.tuples(st.just("reorder"), st.integers(2, 6), st.just(0)),
), max_size=4)


@settings(max_examples=200, deadline=None)
@given(_arming, st.integers(min_value=0, max_value=25), st.integers(0, 2**32 - 1))
def test_every_chunk_arrives_once_or_twice_and_nothing_else_does(arming, count: int, seed: int):
    rng = np.random.default_rng(seed)
    faults = ChunkFaults(100_000.0)
    for action, amount, bits in arming:
        if action == "corrupt":
            faults.corrupt(amount, bits, rng)
        elif action == "duplicate":
            faults.duplicate(amount)
        else:
            faults.reorder(amount, rng)
    incoming = chunks(count)
    delivered = feed(faults, incoming)
    copies = Counter(chunk.topic for chunk in delivered)
    assert set(copies) == {chunk.topic for chunk in incoming}
    assert all(copies[topic] in (1, 2) for topic in copies)
    assert sum(copies.values()) == count + faults.duplicated
    assert faults.next_release_s() is None  # nothing is left held
    originals = {chunk.topic: chunk.payload for chunk in incoming}
    assert len({chunk.topic for chunk in delivered if chunk.payload != originals[chunk.topic]}) == faults.corrupted


def test_a_damaged_transfer_asks_for_repair_once_the_chunks_stop():
    damage = DamagedTransfer(None)
    damage.chunk_arrived(10.0, 1024)
    damage.chunk_refused()
    assert damage.next_check_s() == 10.0 + REPAIR_QUIET_MIN_S
    damage.chunk_arrived(11.0, 1024)  # the transfer still moves: wait on
    assert not damage.repair_due(12.5, in_flight=True)
    assert damage.repair_due(13.0, in_flight=True)
    assert not damage.repair_due(20.0, in_flight=True) and damage.next_check_s() is None  # once per damage
    assert damage.repairs_asked == 1


def test_a_forged_chunk_followed_by_the_genuine_update_asks_nothing():
    damage = DamagedTransfer(50_000.0)
    damage.chunk_arrived(0.0, 200)
    damage.chunk_refused()
    damage.update_applied()
    assert not damage.repair_due(100.0, in_flight=True) and damage.repairs_asked == 0


def test_nothing_in_flight_means_nothing_to_repair():
    damage = DamagedTransfer(None)
    damage.chunk_arrived(0.0, 200)
    damage.chunk_refused()
    assert not damage.repair_due(100.0, in_flight=False)
    assert not damage.repair_due(200.0, in_flight=True)  # that damage is forgotten


def test_a_slow_link_waits_several_chunk_airtimes_before_asking():
    damage = DamagedTransfer(250.0)
    damage.chunk_arrived(0.0, 1024)
    damage.chunk_refused()
    assert damage.next_check_s() == pytest.approx(4 * 1024 * 8 / 250.0)
