"""Tests of rate traces (channel.trace): strict parsers, round trips, and their effect on the link model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.link import LinkModel, LinkParameters
from channel.trace import (
    MahimahiTrace,
    RateScheduleTrace,
    load_trace,
    parse_mahimahi,
    parse_rate_csv,
)


def model(params: LinkParameters, seed: int = 0) -> LinkModel:
    return LinkModel(params, np.random.default_rng(seed))


# ---------------------------------------------------------------- link behaviour


def test_one_opportunity_per_ms_carries_12_mbit() -> None:
    trace = parse_mahimahi("".join(f"{ms}\n" for ms in range(1, 1001)))
    assert trace.mean_rate_bps == pytest.approx(12e6)
    params = LinkParameters(rate_bps=None, trace=trace)
    link = model(params)
    n = 10_000
    for _ in range(n):
        link.transmit(0.0, 1460)  # 1500 B on the wire: exactly one opportunity each
    assert link.last_delivery_s == pytest.approx(10.0)  # packet k leaves at (k + 1) ms
    wire_rate = link.counters.wire_bytes * 8 / link.last_delivery_s
    assert wire_rate == pytest.approx(12e6, rel=1e-9)
    assert params.goodput_bps == pytest.approx(12e6 * 1460 / 1500)


def test_mahimahi_opportunities_are_shared_by_small_packets_and_wasted_when_idle() -> None:
    link = model(LinkParameters(rate_bps=None, trace=parse_mahimahi("10\n20\n20\n40\n")))
    assert link.packet_fates(0.0, 750) == [pytest.approx(0.010)]
    assert link.packet_fates(0.0, 750) == [pytest.approx(0.010)]  # same opportunity, 750 B left
    assert link.packet_fates(0.0, 1600) == [pytest.approx(0.020)]  # spans the two at 20 ms
    assert link.packet_fates(0.025, 100) == [pytest.approx(0.040)]  # waits for the next one
    # nothing used 40..50 ms: the loop's next opportunities are 50, 60, 60, 80 ms
    assert link.packet_fates(0.045, 1500) == [pytest.approx(0.050)]
    assert link.packet_fates(0.045, 3000) == [pytest.approx(0.060)]
    assert link.packet_fates(0.045, 1) == [pytest.approx(0.080)]


def test_csv_trace_changes_rate_at_the_right_time() -> None:
    trace = parse_rate_csv("t_seconds,rate\n0,100kbit\n1.0,200kbit\n")
    link = model(LinkParameters(rate_bps=None, trace=trace))
    departures = [link.transmit(0.0, 1460) for _ in range(14)]
    # bucket holds one packet; 1500 B take 0.12 s at 100 kbit/s, 0.06 s at 200 kbit/s
    expected = [0.12 * k for k in range(9)] + [1.04, 1.10, 1.16, 1.22, 1.28]
    assert departures == pytest.approx(expected)
    assert trace.rate_at(0.5) == 100_000 and trace.rate_at(1.0) == 200_000 and trace.rate_at(99) == 200_000


def test_csv_trace_with_a_zero_rate_stalls_the_link() -> None:
    trace = parse_rate_csv("0,1Mbit\n1,0\n3,1Mbit\n")
    link = model(LinkParameters(rate_bps=None, trace=trace))
    times = [link.packet_fates(0.0, 1500)[0] for _ in range(120)]
    assert not any(1.0 < t < 3.0 for t in times)
    assert times[-1] > 3.0


def test_trace_time_counts_from_first_use() -> None:
    trace = parse_rate_csv("0,12kbit\n10,1200kbit\n")
    link = model(LinkParameters(rate_bps=None, trace=trace))
    assert link.transmit(50.0, 1460) == pytest.approx(50.0)
    assert link.transmit(50.0, 1460) == pytest.approx(51.0)  # 1500 B at 1500 B/s: still the slow part


def test_same_seed_same_results_with_trace_loss_and_jitter() -> None:
    params = LinkParameters(rate_bps=None, trace=parse_mahimahi("1\n3\n3\n7\n"), delay_s=0.02, jitter_s=0.01,
                            delay_distribution="normal", loss=0.05)
    a, b = model(params, 5), model(params, 5)
    sends = [(i * 0.0007, 200 + i % 1200) for i in range(3000)]
    assert [a.transmit(t, s) for t, s in sends] == [b.transmit(t, s) for t, s in sends]
    assert a.counters == b.counters


def test_trace_and_fixed_rate_exclude_each_other() -> None:
    with pytest.raises(ChannelError, match=r"LinkParameters.trace=.*rate_bps=None"):
        LinkParameters(rate_bps=1e6, trace=parse_mahimahi("1\n"))
    with pytest.raises(ChannelError, match=r"LinkParameters.trace='12Mbps.trace'"):
        LinkParameters(rate_bps=None, trace="12Mbps.trace")  # type: ignore[arg-type]


def test_description_names_the_trace() -> None:
    params = LinkParameters(rate_bps=None, trace=parse_mahimahi("1\n", name="12Mbps"))
    assert params.description.startswith("Mahimahi trace 12Mbps (mean 12 Mbit/s, period 1 ms), 0 ms")


# ---------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("\n", "line 1"),
        ("5\n3\n", r"line 2: 3 ms is before"),
        ("1\n2\nx\n", r"line 3: 'x'"),
        ("1\n-2\n", r"line 2: '-2'"),
        ("1.5\n", r"line 1: '1.5'"),
        ("0\n0\n", r"line 2: the last timestamp must be > 0"),
        ("1\n\n2\n", r"line 2: ''"),
        ("\u0661\n", "line 1"),  # Arabic-Indic digit one: int() would take it, the format does not
    ],
)
def test_bad_mahimahi_lines_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ChannelError, match=message):
        parse_mahimahi(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("t_seconds,rate\n# nothing\n", "is empty"),
        ("0,1000\n1,2000,3\n", r"line 2: .*exactly two fields"),
        ("0,fast\n", r"line 1: rate 'fast'"),
        ("0,50kbps\n", r"line 1: rate '50kbps'"),
        ("1,1000\n", r"line 1: the first row must be at 0 s"),
        ("0,1000\n2,1000\n1,1000\n", r"line 3: 1.0 s does not come after"),
        ("0,1000\nnan,1\n", r"line 2: time 'nan'"),
        ("0,1e400\n", r"line 1: rate '1e400'"),
        ("0,1000\n1,0\n", "the last rate must be > 0"),
        ("0,-5\n", r"line 1: rate '-5'"),
    ],
)
def test_bad_csv_lines_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ChannelError, match=message):
        parse_rate_csv(text)


def test_csv_units() -> None:
    trace = parse_rate_csv("# a comment\n0, 50kbit\n0.5,1.5Mbit/s\n1.5, 2GBIT\n2,800 bit\n3,1e3\n")
    assert trace.rates_bps == (50e3, 1.5e6, 2e9, 800.0, 1000.0)
    assert trace.times_s == (0.0, 0.5, 1.5, 2.0, 3.0)


def test_load_trace_by_suffix(tmp_path: Path) -> None:
    (tmp_path / "cell.csv").write_text("t_seconds,rate\n0,1mbit\n")
    (tmp_path / "cell.up").write_text("1\n2\n")
    assert isinstance(load_trace(tmp_path / "cell.csv"), RateScheduleTrace)
    mahimahi = load_trace(tmp_path / "cell.up")
    assert isinstance(mahimahi, MahimahiTrace) and mahimahi.name == "cell.up"
    with pytest.raises(ChannelError, match="cannot read trace"):
        load_trace(tmp_path / "missing.up")
    (tmp_path / "binary.up").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ChannelError, match="cannot read trace"):
        load_trace(tmp_path / "binary.up")


mahimahi_traces = st.lists(st.integers(0, 10_000), min_size=1, max_size=200).map(sorted).filter(
    lambda times: times[-1] > 0
).map(lambda times: MahimahiTrace(tuple(times)))


@st.composite
def rate_schedules(draw: st.DrawFn) -> RateScheduleTrace:
    gaps = draw(st.lists(st.floats(1e-6, 1e6), max_size=50))
    times = [0.0]
    for gap in gaps:
        nxt = times[-1] + gap
        if nxt > times[-1]:
            times.append(nxt)
    rates = draw(st.lists(st.floats(0, 1e12), min_size=len(times), max_size=len(times)))
    rates[-1] = draw(st.floats(1e-3, 1e12))
    return RateScheduleTrace(tuple(times), tuple(rates))


@given(mahimahi_traces)
def test_mahimahi_round_trip(trace: MahimahiTrace) -> None:
    assert parse_mahimahi(trace.to_text()) == trace


@given(rate_schedules())
def test_csv_round_trip(trace: RateScheduleTrace) -> None:
    assert parse_rate_csv(trace.to_csv()) == trace


@settings(max_examples=300)
@given(st.text())
def test_garbage_raises_only_channel_error(text: str) -> None:
    for parse in (parse_mahimahi, parse_rate_csv):
        try:
            parse(text)
        except ChannelError:
            pass


@settings(max_examples=200)
@given(mahimahi_traces, st.data())
def test_a_corrupted_line_is_reported_with_its_number(trace: MahimahiTrace, data: st.DataObject) -> None:
    lines = trace.to_text().splitlines()
    index = data.draw(st.integers(0, len(lines) - 1))
    garbage = data.draw(st.text(min_size=1).filter(
        lambda s: "\n" not in s and not (s.strip().isascii() and s.strip().isdigit())
    ))
    lines[index] = garbage
    with pytest.raises(ChannelError, match=rf"line {index + 1}: "):
        parse_mahimahi("\n".join(lines) + "\n")


@given(rate_schedules(), st.floats(0, 2e6))
def test_capacity_inverse(trace: RateScheduleTrace, t: float) -> None:
    capacity = trace.capacity_bytes(t)
    back = trace.time_for_capacity(capacity)
    # Time is only as precise as float capacity allows: at 1e15 bytes a ULP is 0.125 B, which a
    # 1 bit/s tail needs a second to carry. So "not later than t" is checked in capacity terms.
    assert back <= t + 1e-6 * max(1.0, t) or trace.capacity_bytes(t) == pytest.approx(
        trace.capacity_bytes(back), rel=1e-12)
    assert trace.capacity_bytes(back) == pytest.approx(capacity, rel=1e-9, abs=1e-6)
    assert math.isfinite(trace.mean_rate_bps)
