"""Quantiles of lateness in bounded memory: a log-bucketed sketch (2% relative error) that merges and subtracts exactly.

Like DDSketch: a value ``x`` in ``[SMALLEST_S, LARGEST_S]`` is counted in bucket ``i = ceil(log_γ x)``, which
holds ``(γ^(i-1), γ^i]``, with ``γ = (1 + α) / (1 − α)``; a quantile is read as the bucket's ``2γ^i / (γ + 1)``,
within ``α`` of every value in it. Values below ``SMALLEST_S`` (and negative ones: released ahead of time) count
as 0, values above ``LARGEST_S`` as ``LARGEST_S``. So a sketch holds at most ``MAX_BUCKETS`` counts however many
values it takes, and two sketches of the same values are equal: no sampling, no seed, and the sketch of a round
is the run's sketch at its end minus the one at its start (``since``).
"""

from __future__ import annotations

import math

from channel.errors import ChannelError

RELATIVE_ACCURACY = 0.02
"""α: a reported quantile is within this fraction of the value at its rank (above ``SMALLEST_S``)."""
SMALLEST_S = 1e-6
"""Lateness below a microsecond is counted as none."""
LARGEST_S = 1e4
"""Lateness above this is counted as this."""

_GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_INVERSE_LOG_GAMMA = 1.0 / math.log(_GAMMA)
_LOWEST_INDEX = math.ceil(math.log(SMALLEST_S) * _INVERSE_LOG_GAMMA)
_HIGHEST_INDEX = math.ceil(math.log(LARGEST_S) * _INVERSE_LOG_GAMMA)
MAX_BUCKETS = _HIGHEST_INDEX - _LOWEST_INDEX + 2
"""Most counts one sketch keeps (the buckets between ``SMALLEST_S`` and ``LARGEST_S``, and the zero bucket)."""


class LatenessSketch:
    """Counts of seconds-late values in logarithmic buckets; ``quantile(q)`` reads them back within ``α``."""

    __slots__ = ("_buckets", "zero_count", "count")

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self.zero_count = 0
        """Values below ``SMALLEST_S`` (on time, or released early)."""
        self.count = 0
        """Values added."""

    def add(self, seconds: float) -> None:
        """Count one value (seconds late; at most 0 = on time)."""
        if seconds >= SMALLEST_S:
            index = math.ceil(math.log(seconds if seconds < LARGEST_S else LARGEST_S) * _INVERSE_LOG_GAMMA)
            buckets = self._buckets
            buckets[index] = buckets.get(index, 0) + 1
        elif seconds < SMALLEST_S:
            self.zero_count += 1
        else:
            raise ChannelError(f"lateness {seconds!r} is invalid: expected a number of seconds")
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """The value at rank ``ceil(q · count)`` (at least the first), within ``α``; None if the sketch is empty."""
        if not 0.0 <= q <= 1.0:
            raise ChannelError(f"quantile {q!r} is invalid: expected a fraction in [0, 1]")
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = self.zero_count
        if seen >= rank:
            return 0.0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return 2.0 * _GAMMA**index / (_GAMMA + 1.0)
        raise AssertionError("bucket counts do not add up to count")  # pragma: no cover - kept by add/merge/since

    def copy(self) -> LatenessSketch:
        """An independent sketch of the same values."""
        twin = LatenessSketch()
        twin._buckets = dict(self._buckets)
        twin.zero_count, twin.count = self.zero_count, self.count
        return twin

    def merge(self, other: LatenessSketch) -> None:
        """Add every value ``other`` holds (the sketch of both lists of values)."""
        buckets = self._buckets
        for index, count in other._buckets.items():
            buckets[index] = buckets.get(index, 0) + count
        self.zero_count += other.zero_count
        self.count += other.count

    def since(self, earlier: LatenessSketch) -> LatenessSketch:
        """The values added after ``earlier`` was copied from this sketch (ChannelError if it was not)."""
        if earlier.count > self.count or earlier.zero_count > self.zero_count or any(
                count > self._buckets.get(index, 0) for index, count in earlier._buckets.items()):
            raise ChannelError("LatenessSketch.since: the earlier sketch holds values this one does not "
                               "(it must be a copy taken from this sketch before)")
        later = self.copy()
        for index, count in earlier._buckets.items():
            left = later._buckets[index] - count
            if left:
                later._buckets[index] = left
            else:
                del later._buckets[index]
        later.zero_count -= earlier.zero_count
        later.count -= earlier.count
        return later

    @property
    def buckets_used(self) -> int:
        """Counts held (at most ``MAX_BUCKETS``)."""
        return len(self._buckets) + 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatenessSketch):
            return NotImplemented
        return (self.count, self.zero_count, self._buckets) == (other.count, other.zero_count, other._buckets)

    def __repr__(self) -> str:
        return f"LatenessSketch(count={self.count}, p50={self.quantile(0.5)}, p99={self.quantile(0.99)})"
