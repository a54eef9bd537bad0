"""Unit-bearing scenario values parse to SI numbers; anything else is a UnitError naming the value."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.core.units import (
    UnitError,
    format_duration,
    format_rate,
    parse_duration_s,
    parse_fraction,
    parse_rate_bps,
    parse_size_bytes,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50kbit", 50_000.0),
        ("1.5Mbit/s", 1_500_000.0),
        ("20kbps", 20_000.0),
        ("2Gbit", 2e9),
        ("300bit", 300.0),
        ("300", 300.0),
        (" 50 kbit ", 50_000.0),
        ("50KBIT", 50_000.0),
        ("1e3kbit", 1e6),
        (".5Mbit", 500_000.0),
        (9600, 9600.0),
        (12.5, 12.5),
    ],
)
def test_parse_rate_bps(text, expected):
    assert parse_rate_bps(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200ms", 0.2),
        ("1.5s", 1.5),
        ("50us", 50e-6),
        ("50\u00b5s", 50e-6),  # micro sign
        ("50\u03bcs", 50e-6),  # Greek mu
        ("2min", 120.0),
        ("1h", 3600.0),
        ("3", 3.0),
        ("0ms", 0.0),
        (0, 0.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration_s(text, expected):
    assert parse_duration_s(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2%", 0.02), ("0.5 %", 0.005), ("100%", 1.0), ("0%", 0.0), (0.02, 0.02), ("0.02", 0.02), (1, 1.0), (0, 0.0)],
)
def test_parse_fraction(text, expected):
    assert parse_fraction(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1KiB", 1024), ("4KiB", 4096), ("1kB", 1000), ("2MiB", 2 * 1024**2), ("1MB", 10**6), ("512", 512),
     ("512B", 512), ("1.5KiB", 1536), (512, 512), (512.0, 512), ("8GiB", 8 * 1024**3), ("2GB", 2 * 10**9)],
)
def test_parse_size_bytes(text, expected):
    size = parse_size_bytes(text)
    assert size == expected
    assert isinstance(size, int)


BAD_RATES = ["-5kbit", "0kbit", "0", 0, -1, "fast", "", "50 furlongs", "50kbit/h", "kbit", "1e400kbit", "1e300Gbit",
             True, False, None, [50], {"rate": 1}, float("nan"), float("inf"), 10**400, "1MB/s", "20kBps"]
BAD_DURATIONS = ["-5ms", -1, "soon", "5 days", "", "ms", True, None, [1], float("nan"), float("inf"), "1e400s"]
BAD_FRACTIONS = ["150%", "-1%", 1.5, -0.1, "2 percent", "2kbit", "", True, False, None, float("nan"), float("inf")]
BAD_SIZES = ["-1KiB", 0, -5, "0B", "big", "1TiB", "", True, False, None, 1.5, float("nan"), float("inf"), "1e308MiB",
             [1024]]


@pytest.mark.parametrize(
    ("parse", "value"),
    [(parse_rate_bps, value) for value in BAD_RATES]
    + [(parse_duration_s, value) for value in BAD_DURATIONS]
    + [(parse_fraction, value) for value in BAD_FRACTIONS]
    + [(parse_size_bytes, value) for value in BAD_SIZES],
)
def test_bad_values_raise_unit_error_naming_the_value(parse, value):
    with pytest.raises(UnitError) as caught:
        parse(value)
    assert repr(value)[:40] in str(caught.value)


def test_unit_error_is_in_the_testbed_error_family():
    from testbed.core.errors import TestbedError

    assert issubclass(UnitError, TestbedError) and not issubclass(UnitError, ValueError)


def test_unknown_unit_message_names_the_unit():
    with pytest.raises(UnitError, match="furlong"):
        parse_rate_bps("50furlong")


positive = st.floats(min_value=1e-3, max_value=1e12, allow_nan=False, allow_infinity=False)


@given(positive)
def test_kbit_is_a_thousand_bits(x):
    assert parse_rate_bps(f"{x}kbit") == pytest.approx(1000 * x, rel=1e-12)
    assert parse_rate_bps(f"{x!r} kbit/s") == pytest.approx(1000 * x, rel=1e-12)


@given(positive)
def test_format_rate_parses_back(rate):
    text = format_rate(rate)
    assert parse_rate_bps(text) == pytest.approx(rate, rel=1e-5)


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_milliseconds_are_thousandths(x):
    assert parse_duration_s(f"{x}ms") == pytest.approx(x / 1000, rel=1e-12)


@given(st.floats(min_value=0, max_value=100, allow_nan=False))
def test_percent_is_a_hundredth(x):
    fraction = parse_fraction(f"{x}%")
    assert 0.0 <= fraction <= 1.0
    assert fraction == pytest.approx(x / 100, rel=1e-12)


@given(st.integers(min_value=1, max_value=2**40))
def test_kib_is_1024_bytes(n):
    assert parse_size_bytes(f"{n}KiB") == 1024 * n
    assert parse_size_bytes(n) == n


@given(st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.booleans(), st.none()))
def test_arbitrary_input_is_a_number_or_unit_error(value):
    for parse in (parse_rate_bps, parse_duration_s, parse_fraction, parse_size_bytes):
        try:
            result = parse(value)
        except UnitError:
            continue
        assert math.isfinite(result)
        assert result >= 0


def test_format_rate_examples():
    assert format_rate(50_000) == "50 kbit/s"
    assert format_rate(1_500_000) == "1.5 Mbit/s"
    assert format_rate(2e9) == "2 Gbit/s"
    assert format_rate(300) == "300 bit/s"


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_a_formatted_duration_parses_back_to_about_the_same_seconds(seconds: float) -> None:
    """What the run's header echoes is itself a valid scenario value for the same duration (to %g's 6 digits)."""
    assert math.isclose(parse_duration_s(format_duration(seconds)), seconds, rel_tol=1e-5, abs_tol=1e-12)
