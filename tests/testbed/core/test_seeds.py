"""Named random streams: one purpose each, no two streams or arities share state."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.core.seeds import SEED_MAX, RoundStep, Stream, derived_seed, generator, round_seed


def test_the_old_collision_is_gone() -> None:
    # [seed, 1, 0] equalled [seed, 1] as plain entropy; as spawn keys every arity and stream differs.
    assert derived_seed(7, Stream.DEVICE_TEST_SPLIT, 0) != derived_seed(7, Stream.DEVICE_TEST_SPLIT)
    assert derived_seed(7, Stream.DEVICE_TEST_SPLIT, 0) != derived_seed(7, Stream.DEVICE_LINK, 0)
    assert round_seed(7, 1, RoundStep.FULL_TRAINING) != round_seed(7, 1, RoundStep.FINE_TUNING)


def test_streams_are_reproducible_and_63_bit() -> None:
    for stream in Stream:
        value = derived_seed(123, stream, 4)
        assert value == derived_seed(123, stream, 4) and 0 <= value <= SEED_MAX
    assert np.array_equal(generator(5, Stream.CELL_LINK, 2, 1).random(4), generator(5, Stream.CELL_LINK, 2, 1).random(4))


def test_negative_seeds_or_indices_are_refused() -> None:
    with pytest.raises(ValueError):
        derived_seed(-1, Stream.ROUND, 0)
    with pytest.raises(ValueError):
        generator(1, Stream.ROUND, -2)
