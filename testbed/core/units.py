"""Parsing of unit-bearing scenario values (`50kbit`, `200ms`, `2%`, `4KiB`) into plain SI numbers."""

from __future__ import annotations

import math
import re
from testbed.core.errors import TestbedError

# A sign is parsed so that `-50kbit` is told it must be positive, not that it is no rate at all.
_NUMBER_WITH_UNIT = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z%/\u00b5\u03bc]*)\s*$")

_RATE_FACTORS_BPS = {
    "bit": 1.0, "bps": 1.0, "bit/s": 1.0, "b/s": 1.0,
    "kbit": 1e3, "kbps": 1e3, "kbit/s": 1e3, "kb/s": 1e3,
    "mbit": 1e6, "mbps": 1e6, "mbit/s": 1e6, "mb/s": 1e6,
    "gbit": 1e9, "gbps": 1e9, "gbit/s": 1e9, "gb/s": 1e9,
}
_DURATION_FACTORS_S = {"us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
_SIZE_FACTORS_BYTES = {
    "b": 1, "byte": 1, "bytes": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


class UnitError(TestbedError):
    """A value that does not parse as the unit its field expects."""


def _split(value: object, kind: str, example: str) -> tuple[float, str]:
    """(number, lower-case unit) of a string value, or of a bare int/float (unit '')."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UnitError(f"not a {kind}: {value!r} (expected a number with a unit, e.g. {example!r})")
    if isinstance(value, str):
        match = _NUMBER_WITH_UNIT.match(value)
        if match is None:
            raise UnitError(f"not a {kind}: {value!r} (expected a number with a unit, e.g. {example!r})")
        text, unit = match.group(1), match.group(2).lower()
    else:
        text, unit = value, ""
    try:
        number = float(text)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise UnitError(f"not a {kind}: {value!r} (the number must be finite)")
    return number, unit


def parse_rate_bps(value: str | int | float) -> float:
    """Bit rate in bit/s from `50kbit`, `1.5Mbit/s`, `20kbps` or a bare number of bit/s."""
    number, unit = _split(value, "rate", "50kbit")
    unit = unit or "bit"
    if isinstance(value, str) and value.rstrip().endswith(("B/s", "Bps")):
        raise UnitError(f"byte rate {value!r} is ambiguous here; give the rate in bits, e.g. '50kbit'")
    if unit not in _RATE_FACTORS_BPS:
        raise UnitError(f"unknown rate unit {unit!r} in {value!r} (use bit, kbit, Mbit, Gbit)")
    rate = number * _RATE_FACTORS_BPS[unit]
    if not 0 < rate < math.inf:
        raise UnitError(f"rate must be positive and finite, got {value!r}")
    return rate


def parse_duration_s(value: str | int | float) -> float:
    """Duration in seconds from `200ms`, `1.5s`, `50us` or a bare number of seconds."""
    number, unit = _split(value, "duration", "200ms")
    unit = unit or "s"
    if unit not in _DURATION_FACTORS_S:
        raise UnitError(f"unknown duration unit {unit!r} in {value!r} (use us, ms, s, min, h)")
    if number < 0:
        raise UnitError(f"duration must not be negative, got {value!r}")
    seconds = number * _DURATION_FACTORS_S[unit]
    if not math.isfinite(seconds):
        raise UnitError(f"duration must be finite, got {value!r}")
    return seconds


def parse_fraction(value: str | int | float) -> float:
    """A probability in [0, 1] from `2%`, `0.5 %` or a bare fraction such as 0.02."""
    number, unit = _split(value, "percentage", "2%")
    if unit not in ("%", ""):
        raise UnitError(f"unknown unit {unit!r} in {value!r} (use a percentage like '2%' or a fraction)")
    fraction = number / 100.0 if unit == "%" else number
    if not 0.0 <= fraction <= 1.0:
        raise UnitError(f"must be between 0% and 100%, got {value!r}")
    return fraction


def parse_size_bytes(value: str | int) -> int:
    """A size in bytes from `4KiB`, `1kB`, `512` (bytes)."""
    if isinstance(value, bool):
        raise UnitError(f"not a size: {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        number, unit = _split(value, "size", "4KiB")
        unit = unit or "b"
        if unit not in _SIZE_FACTORS_BYTES:
            raise UnitError(f"unknown size unit {unit!r} in {value!r} (use B, kB, KiB, MB, MiB, GB, GiB)")
        scaled = number * _SIZE_FACTORS_BYTES[unit]
        if not math.isfinite(scaled):
            raise UnitError(f"size must be finite, got {value!r}")
        size = int(round(scaled))
    else:
        raise UnitError(f"not a size: {value!r}")
    if size <= 0:
        raise UnitError(f"size must be positive, got {value!r}")
    return size


def format_duration(seconds: float) -> str:
    """Human form of a duration in the unit a reader expects, e.g. 0.1 -> '100 ms', 100 -> '100 s'.

    A bare number in a scenario is seconds, so `delay: 100` is echoed back as '100 s', not '100000 ms'.
    """
    if seconds >= 1.0:
        return f"{seconds:g} s"
    if seconds >= 1e-3 or seconds == 0:
        return f"{seconds * 1e3:g} ms"
    return f"{seconds * 1e6:g} us"


def format_rate(rate_bps: float) -> str:
    """Human form of a bit rate, e.g. 50000 -> '50 kbit/s'."""
    for factor, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if rate_bps >= factor:
            return f"{rate_bps / factor:g} {unit}"
    return f"{rate_bps:g} bit/s"
