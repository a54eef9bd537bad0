"""Derive independent, reproducible seeds from the scenario seed and a path of integers."""

from __future__ import annotations

import numpy as np


def derive_seed(base: int, *path: int) -> int:
    """A non-negative 63-bit seed that depends only on `base` and `path` (e.g. round index, step)."""
    sequence = np.random.SeedSequence([int(base), *(int(part) for part in path)])
    return int(sequence.generate_state(1, dtype=np.uint64)[0]) >> 1
