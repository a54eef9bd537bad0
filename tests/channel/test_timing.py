"""Tests of the lateness sketch (channel.timing): its quantiles against exact ones, merging, subtracting, its bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.timing import LARGEST_S, MAX_BUCKETS, RELATIVE_ACCURACY, SMALLEST_S, LatenessSketch

# Lateness as the proxy sees it: mostly tiny, sometimes negative (released within the timer slack), rarely huge.
latenesses = st.lists(st.one_of(
    st.floats(min_value=-0.001, max_value=0.0),
    st.floats(min_value=0.0, max_value=1e-5),
    st.floats(min_value=0.0, max_value=LARGEST_S),
), max_size=300)
fractions = st.floats(min_value=0.0, max_value=1.0)
# float round-off at a bucket's edge (log and ceil of a value on the boundary)
ROUND_OFF = 1e-9


def sketch_of(values: list[float]) -> LatenessSketch:
    sketch = LatenessSketch()
    for value in values:
        sketch.add(value)
    return sketch


def exact_quantile(values: list[float], q: float) -> float:
    """The value at rank ceil(q·n) (at least 1) of the sorted values, as the sketch defines its quantiles."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@given(latenesses, fractions)
def test_a_quantile_is_within_the_relative_accuracy_of_the_exact_one(values: list[float], q: float) -> None:
    sketch = sketch_of(values)
    assert sketch.count == len(values)
    if not values:
        assert sketch.quantile(q) is None
        return
    exact, estimate = exact_quantile(values, q), sketch.quantile(q)
    assert estimate is not None
    if exact < SMALLEST_S:
        assert estimate == 0.0
    else:
        assert abs(estimate - exact) <= (RELATIVE_ACCURACY + ROUND_OFF) * exact, (estimate, exact)


@given(latenesses, fractions, fractions)
def test_quantiles_do_not_decrease_with_the_fraction(values: list[float], q1: float, q2: float) -> None:
    sketch = sketch_of(values)
    low, high = sorted((q1, q2))
    if values:
        assert sketch.quantile(low) <= sketch.quantile(high)  # type: ignore[operator]


@given(latenesses, latenesses)
def test_merging_is_the_sketch_of_both_lists(first: list[float], second: list[float]) -> None:
    merged = sketch_of(first)
    merged.merge(sketch_of(second))
    assert merged == sketch_of(first + second)


@given(latenesses, latenesses)
def test_since_an_earlier_copy_is_the_sketch_of_what_came_after(before: list[float], after: list[float]) -> None:
    sketch = sketch_of(before)
    earlier = sketch.copy()
    for value in after:
        sketch.add(value)
    assert sketch.since(earlier) == sketch_of(after)
    assert earlier == sketch_of(before)  # the copy did not move with the sketch


@given(st.lists(st.floats(min_value=-1e6, max_value=1e12), max_size=2000))
def test_memory_is_bounded_whatever_the_values(values: list[float]) -> None:
    assert sketch_of(values).buckets_used <= MAX_BUCKETS


def test_the_bound_holds_across_the_whole_range() -> None:
    sketch = sketch_of([SMALLEST_S * 1.001**i for i in range(25_000)])  # 1 µs ... 70 s, every bucket
    assert sketch.buckets_used <= MAX_BUCKETS < 1000


def test_values_beyond_the_range_are_counted_at_its_edges() -> None:
    sketch = sketch_of([-5.0, SMALLEST_S / 2, 1e9])
    assert sketch.zero_count == 2
    assert sketch.quantile(0.5) == 0.0
    assert sketch.quantile(1.0) == pytest.approx(LARGEST_S, rel=RELATIVE_ACCURACY)


def test_bad_input_is_refused_in_one_line() -> None:
    sketch = sketch_of([0.001])
    with pytest.raises(ChannelError, match=r"^lateness nan is invalid: expected a number of seconds$"):
        sketch.add(float("nan"))
    with pytest.raises(ChannelError, match=r"^quantile 1.5 is invalid: expected a fraction in \[0, 1\]$"):
        sketch.quantile(1.5)
    with pytest.raises(ChannelError, match="earlier sketch holds values this one does not"):
        LatenessSketch().since(sketch)
    with pytest.raises(ChannelError, match="earlier sketch holds values this one does not"):
        sketch_of([0.5]).since(sketch)  # same count, other values
