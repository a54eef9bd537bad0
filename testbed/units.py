"""Parsing of unit-bearing scenario values (`50kbit`, `200ms`, `2%`, `4KiB`) into plain SI numbers."""

from __future__ import annotations

import re

_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z%/]*)\s*$")

_RATE_FACTORS_BPS = {
    "bit": 1.0, "bps": 1.0, "bit/s": 1.0, "b/s": 1.0,
    "kbit": 1e3, "kbps": 1e3, "kbit/s": 1e3, "kb/s": 1e3,
    "mbit": 1e6, "mbps": 1e6, "mbit/s": 1e6, "mb/s": 1e6,
    "gbit": 1e9, "gbps": 1e9, "gbit/s": 1e9, "gb/s": 1e9,
}
_DURATION_FACTORS_S = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
_SIZE_FACTORS_BYTES = {
    "b": 1, "byte": 1, "bytes": 1,
    "kb": 1000, "mb": 1000**2, "kib": 1024, "mib": 1024**2,
}


class UnitError(ValueError):
    """A value that does not parse as the unit its field expects."""


def _split(value: str, kind: str, example: str) -> tuple[float, str]:
    match = _NUMBER_WITH_UNIT.match(value)
    if match is None:
        raise UnitError(f"not a {kind}: {value!r} (expected a number with a unit, e.g. {example!r})")
    return float(match.group(1)), match.group(2).lower()


def parse_rate_bps(value: str | int | float) -> float:
    """Bit rate in bit/s from `50kbit`, `1.5Mbit/s`, `20kbps` or a bare number of bit/s."""
    if isinstance(value, bool):
        raise UnitError(f"not a rate: {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), "bit"
    else:
        number, unit = _split(value, "rate", "50kbit")
        unit = unit or "bit"
    if unit not in _RATE_FACTORS_BPS:
        raise UnitError(f"unknown rate unit {unit!r} in {value!r} (use bit, kbit, Mbit, Gbit)")
    rate = number * _RATE_FACTORS_BPS[unit]
    if rate <= 0:
        raise UnitError(f"rate must be positive, got {value!r}")
    return rate


def parse_duration_s(value: str | int | float) -> float:
    """Duration in seconds from `200ms`, `1.5s`, `50us` or a bare number of seconds."""
    if isinstance(value, bool):
        raise UnitError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), "s"
    else:
        number, unit = _split(value, "duration", "200ms")
        unit = unit or "s"
    if unit not in _DURATION_FACTORS_S:
        raise UnitError(f"unknown duration unit {unit!r} in {value!r} (use us, ms, s, min, h)")
    if number < 0:
        raise UnitError(f"duration must not be negative, got {value!r}")
    return number * _DURATION_FACTORS_S[unit]


def parse_fraction(value: str | int | float) -> float:
    """A probability in [0, 1] from `2%`, `0.5 %` or a bare fraction such as 0.02."""
    if isinstance(value, bool):
        raise UnitError(f"not a fraction: {value!r}")
    if isinstance(value, (int, float)):
        fraction = float(value)
    else:
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
            raise UnitError(f"unknown size unit {unit!r} in {value!r} (use B, kB, KiB, MB, MiB)")
        size = int(round(number * _SIZE_FACTORS_BYTES[unit]))
    else:
        raise UnitError(f"not a size: {value!r}")
    if size <= 0:
        raise UnitError(f"size must be positive, got {value!r}")
    return size


def format_rate(rate_bps: float) -> str:
    """Human form of a bit rate, e.g. 50000 -> '50 kbit/s'."""
    for factor, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if rate_bps >= factor:
            return f"{rate_bps / factor:g} {unit}"
    return f"{rate_bps:g} bit/s"
