"""Every random stream of a run, named and derived from the scenario seed in one way (numpy SeedSequence spawn keys).

A stream is ``SeedSequence(seed, spawn_key=(stream, *indices))``: the stream's number first, then the
indices that make one consumer distinct (round, device, cell, direction, ...). Spawn keys are mixed in
after the seed's own words, so ``(stream, 1)`` and ``(stream, 1, 0)`` differ and no two streams or
arities share state. (The plain entropy lists used before, ``[seed, 1, i]``, did not: numpy pads
entropy with zeros, so ``[seed, 1, 0]`` — device 0's test split and its link — equalled ``[seed, 1]``,
round 1's training seed.) Each stream serves one purpose; add a new member for a new one, never reuse.
Seeds handed to other libraries (torch, a link model) are one width: 63-bit non-negative ints.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """The purposes randomness serves in a run; the value is part of the spawn key, so never renumber."""

    DATA_ORDER = 1
    """Shuffling the data set and cutting it into validation, test and the rounds' arrivals."""
    INITIAL_WEIGHTS = 2
    """w⁰, per tensor: indices (fingerprint word, tensor-name word); regenerable on every device."""
    ROUND = 3
    """A round's root (index: round), split further by RoundStep."""
    DEVICE_TEST_SPLIT = 4
    """A device's local test subset (index: device number)."""
    DEVICE_LINK = 5
    """A device's own emulated link: loss, delay, outages (index: device number)."""
    CELL_LINK = 6
    """A shared cell's bottleneck (indices: cell number, direction 0 = down, 1 = up)."""
    CHUNK_FAULTS = 7
    """A corrupt or reorder event on one device's chunks: bits flipped, order drawn (indices: event, device number)."""


class RoundStep(IntEnum):
    """Uses of randomness within one server round (the index after the round)."""

    FULL_TRAINING = 1
    FINE_TUNING = 2
    RANDOM_MASK = 3


SEED_MAX = 2**63 - 1


def seed_sequence(seed: int, stream: Stream, *indices: int) -> np.random.SeedSequence:
    """The seed sequence of ``stream`` (with ``indices``) under the scenario ``seed``."""
    if seed < 0 or any(index < 0 for index in indices):
        raise ValueError(f"seeds and stream indices are non-negative, got seed {seed} and {indices}")
    return np.random.SeedSequence(int(seed), spawn_key=(int(stream), *(int(index) for index in indices)))


def generator(seed: int, stream: Stream, *indices: int) -> np.random.Generator:
    """A numpy Generator (PCG64) on ``stream``."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, stream, *indices)))


def derived_seed(seed: int, stream: Stream, *indices: int) -> int:
    """A 63-bit non-negative integer seed on ``stream``, for a consumer that takes an int (torch, a link model)."""
    return int(seed_sequence(seed, stream, *indices).generate_state(1, dtype=np.uint64)[0]) >> 1


def round_seed(seed: int, round_index: int, step: RoundStep) -> int:
    """The 63-bit seed of one step of server round ``round_index``."""
    return derived_seed(seed, Stream.ROUND, round_index, step)
