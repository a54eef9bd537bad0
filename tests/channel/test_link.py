"""Unit and property tests for the pure link model (channel.link)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.link import LinkCounters, LinkModel, LinkParameters, segment_sizes


class ScriptedRng:
    """Stands in for numpy's Generator: ``random()`` returns scripted values, ``uniform`` a fixed offset."""

    def __init__(self, randoms: list[float], uniform_value: float = 0.0) -> None:
        self.randoms = list(randoms)
        self.uniform_value = uniform_value

    def random(self) -> float:
        return self.randoms.pop(0) if self.randoms else 1.0

    def uniform(self, low: float, high: float) -> float:
        assert low <= self.uniform_value <= high
        return self.uniform_value


def model(params: LinkParameters, seed: int = 0) -> LinkModel:
    return LinkModel(params, np.random.default_rng(seed))


# ---------------------------------------------------------------- parameters


def test_description_is_one_human_line() -> None:
    params = LinkParameters(rate_bps=50_000, delay_s=0.1, jitter_s=0.01, loss=0.01)
    assert params.description == "50 kbit/s, 100 ms ± 10 ms, 1.00% loss"
    assert str(LinkParameters(rate_bps=None)) == "unlimited, 0 ms, 0.00% loss"
    assert LinkParameters(rate_bps=2e6, delay_s=0.02).description == "2 Mbit/s, 20 ms, 0.00% loss"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rate_bps", -1.0),
        ("rate_bps", 0.0),
        ("rate_bps", math.inf),
        ("delay_s", -0.001),
        ("jitter_s", -1.0),
        ("delay_s", math.nan),
        ("loss", 1.0),
        ("loss", -0.1),
        ("loss", 1.5),
        ("mss_bytes", 0),
        ("overhead_bytes", -1),
        ("min_rto_s", 0.0),
        ("max_backoffs", -1),
        ("burst_bytes", 100),
    ],
)
def test_bad_parameters_raise_naming_the_field(field: str, value: float) -> None:
    kwargs: dict[str, object] = {"rate_bps": 100_000.0, field: value}
    with pytest.raises(ChannelError, match=rf"{field}={value!r}"):
        LinkParameters(**kwargs)  # type: ignore[arg-type]


@given(
    field=st.sampled_from(["delay_s", "jitter_s", "min_rto_s"]),
    value=st.floats(max_value=-1e-9, allow_nan=False),
)
def test_any_negative_time_is_rejected(field: str, value: float) -> None:
    with pytest.raises(ChannelError, match=field):
        LinkParameters(rate_bps=None, **{field: value})  # type: ignore[arg-type]


def test_goodput_and_rto() -> None:
    params = LinkParameters(rate_bps=100_000, delay_s=0.05, jitter_s=0.01)
    assert params.goodput_bps == pytest.approx(100_000 * 1460 / 1500)
    assert params.rto_s == pytest.approx(0.2)  # floor
    assert LinkParameters(rate_bps=None, delay_s=0.3, jitter_s=0.05).rto_s == pytest.approx(0.8)
    assert LinkParameters(rate_bps=None).goodput_bps is None


def test_segment_sizes() -> None:
    assert segment_sizes(0, 1460) == []
    assert segment_sizes(1460, 1460) == [1460]
    assert segment_sizes(3000, 1460) == [1460, 1460, 80]
    with pytest.raises(ChannelError, match="mss"):
        segment_sizes(10, 0)
    with pytest.raises(ChannelError, match="n_bytes"):
        segment_sizes(-1, 1460)


@given(n=st.integers(0, 100_000), mss=st.integers(1, 9000))
def test_segment_sizes_property(n: int, mss: int) -> None:
    sizes = segment_sizes(n, mss)
    assert sum(sizes) == n
    assert all(0 < s <= mss for s in sizes)
    assert all(s == mss for s in sizes[:-1])


def test_segment_size_outside_mss_is_rejected() -> None:
    link = model(LinkParameters(rate_bps=None))
    with pytest.raises(ChannelError, match="segment size"):
        link.transmit(0.0, 1461)
    with pytest.raises(ChannelError, match="segment size"):
        link.transmit(0.0, 0)


# ---------------------------------------------------------------- hand-computed cases


def test_ten_full_segments_at_100_kbit() -> None:
    # Each packet costs 1500 B = 0.12 s at 12 500 B/s; the bucket holds one packet,
    # so the first departs at once and the tenth at 9 * 0.12 s.
    link = model(LinkParameters(rate_bps=100_000, delay_s=0.05))
    times = [link.transmit(0.0, 1460) for _ in range(10)]
    assert times == pytest.approx([0.05 + 0.12 * i for i in range(10)])
    assert link.counters == LinkCounters(
        segments=10, payload_bytes=14_600, wire_bytes=15_000, lost_segments=0, retransmissions=0,
        queueing_delay_s=pytest.approx(0.12 * sum(range(10))),
    )


def test_idle_link_refills_bucket() -> None:
    link = model(LinkParameters(rate_bps=100_000))
    assert link.transmit(0.0, 1460) == pytest.approx(0.0)
    assert link.transmit(0.06, 1460) == pytest.approx(0.12)  # half refilled, waits 0.06 more
    assert link.transmit(10.0, 1460) == pytest.approx(10.0)  # full again, capped at depth
    assert link.transmit(10.0, 1460) == pytest.approx(10.12)


def test_burst_lets_several_packets_through_at_once() -> None:
    link = model(LinkParameters(rate_bps=100_000, burst_bytes=4500))
    times = [link.transmit(0.0, 1460) for _ in range(4)]
    assert times == pytest.approx([0.0, 0.0, 0.0, 0.12])


def test_unlimited_rate_only_delays() -> None:
    link = model(LinkParameters(rate_bps=None, delay_s=0.1))
    assert [link.transmit(t, 1000) for t in (0.0, 0.0, 0.5)] == pytest.approx([0.1, 0.1, 0.6])


def test_jitter_stays_in_bounds_and_never_reorders() -> None:
    link = model(LinkParameters(rate_bps=None, delay_s=0.1, jitter_s=0.02), seed=3)
    times = [link.transmit(i * 0.05, 100) for i in range(2000)]
    for i, t in enumerate(times):
        assert 0.08 - 1e-12 <= t - i * 0.05 <= 0.12 + 1e-12 or t == times[i - 1]
    assert times == sorted(times)
    offsets = np.array(times) - np.arange(2000) * 0.05
    assert offsets.min() < 0.085 and offsets.max() > 0.115  # the jitter is really applied


def test_jitter_larger_than_delay_is_clipped_at_zero() -> None:
    link = LinkModel(LinkParameters(rate_bps=None, delay_s=0.01, jitter_s=0.05), ScriptedRng([], -0.05))  # type: ignore[arg-type]
    assert link.transmit(1.0, 100) == 1.0


def test_forced_loss_retransmits_after_rto() -> None:
    params = LinkParameters(rate_bps=100_000, delay_s=0.05, loss=0.5)
    link = LinkModel(params, ScriptedRng([0.0, 0.9]))  # type: ignore[arg-type]
    # lost at 0.0, resent at 0.0 + 0.2 (bucket refilled) and delivered after the delay
    assert link.transmit(0.0, 1460) == pytest.approx(0.25)
    assert link.counters.lost_segments == 1
    assert link.counters.retransmissions == 1
    assert link.counters.wire_bytes == 3000
    # the next segment queues behind the retransmission
    assert link.transmit(0.0, 1460) == pytest.approx(0.2 + 0.12 + 0.05)


def test_rto_doubles_per_consecutive_loss_and_is_capped() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.0, loss=0.5, max_backoffs=3)
    link = LinkModel(params, ScriptedRng([0.0] * 100))  # type: ignore[arg-type]
    # lost 4 times (0.2, 0.4, 0.8, 1.6 waits), then delivered regardless
    assert link.transmit(0.0, 100) == pytest.approx(0.2 + 0.4 + 0.8 + 1.6)
    assert link.counters.lost_segments == 4
    assert link.counters.retransmissions == 4


def test_loss_near_one_still_delivers_with_seeded_rng() -> None:
    params = LinkParameters(rate_bps=None, loss=0.999999, max_backoffs=2)
    link = model(params)
    assert link.transmit(0.0, 100) == pytest.approx(0.2 + 0.4 + 0.8)
    assert link.counters.lost_segments == 3


def test_head_of_line_blocking_holds_later_segments() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.01, loss=0.5)
    link = LinkModel(params, ScriptedRng([0.0, 0.9, 0.9]))  # type: ignore[arg-type]
    first = link.transmit(0.0, 100)  # lost once: 0.2 + 0.01
    second = link.transmit(0.0, 100)  # departs after the retransmission
    assert first == pytest.approx(0.21)
    assert second == pytest.approx(0.21)


# ---------------------------------------------------------------- properties

link_parameters = st.builds(
    LinkParameters,
    rate_bps=st.one_of(st.none(), st.floats(1_000, 1e8)),
    delay_s=st.floats(0, 1),
    jitter_s=st.floats(0, 0.2),
    loss=st.floats(0, 0.5),
    overhead_bytes=st.integers(0, 80),
    mss_bytes=st.integers(100, 9000),
    max_backoffs=st.integers(0, 8),
)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[LinkParameters, int, list[tuple[float, int]]]:
    params = draw(link_parameters)
    seed = draw(st.integers(0, 2**32 - 1))
    gaps = draw(st.lists(st.floats(0, 0.5), min_size=1, max_size=60))
    sizes = draw(st.lists(st.integers(1, params.mss_bytes), min_size=len(gaps), max_size=len(gaps)))
    return params, seed, list(zip(np.cumsum(gaps).tolist(), sizes))


@settings(max_examples=200, deadline=None)
@given(workloads())
def test_delivery_is_ordered_and_never_too_early(
    case: tuple[LinkParameters, int, list[tuple[float, int]]],
) -> None:
    params, seed, sends = case
    link = model(params, seed)
    previous = -math.inf
    wire_bytes_sent = 0
    first_send = sends[0][0]
    for now, size in sends:
        delivered = link.transmit(now, size)
        assert delivered >= previous
        wire_bytes_sent += size + params.overhead_bytes
        floor = now + params.delay_s - params.jitter_s
        if params.rate_bps is not None:
            # token bucket: at most depth + rate * t bytes leave in any interval from the first send
            serialisation = (wire_bytes_sent - params.bucket_depth_bytes) / (params.rate_bps / 8)
            floor = max(floor, first_send + serialisation + params.delay_s - params.jitter_s)
        assert delivered >= floor - 1e-9
        previous = delivered


@settings(max_examples=100, deadline=None)
@given(workloads())
def test_long_run_throughput_never_exceeds_rate(
    case: tuple[LinkParameters, int, list[tuple[float, int]]],
) -> None:
    params, seed, sends = case
    if params.rate_bps is None:
        return
    link = model(params, seed)
    start = sends[0][0]
    for now, size in sends:
        link.transmit(now, size)
    # every departure happens at least max(0, delay - jitter) before its delivery
    elapsed = link.last_delivery_s - max(0.0, params.delay_s - params.jitter_s) - start
    allowance = params.bucket_depth_bytes
    assert link.counters.wire_bytes <= params.rate_bps / 8 * max(elapsed, 0) + allowance + 1e-6


@settings(max_examples=50, deadline=None)
@given(workloads())
def test_same_seed_same_sequence(case: tuple[LinkParameters, int, list[tuple[float, int]]]) -> None:
    params, seed, sends = case
    first, second = model(params, seed), model(params, seed)
    assert [first.transmit(t, s) for t, s in sends] == [second.transmit(t, s) for t, s in sends]
    assert first.counters == second.counters


# A statistical bound over drawn seeds: 20 fresh draws per run at 99.9 % would fail 2 % of runs by chance
# (seed 3143 at loss 0.113 lands at 3.5 sigma; 210 seeds gave mean z 0.11, sd 1.00), so the draws are fixed.
@settings(max_examples=20, deadline=None, derandomize=True)
@given(loss=st.floats(0.001, 0.5), seed=st.integers(0, 2**32 - 1))
def test_loss_fraction_within_binomial_interval(loss: float, seed: int) -> None:
    # max_backoffs is high enough that every attempt is a Bernoulli(loss) draw
    params = LinkParameters(rate_bps=None, loss=loss, max_backoffs=60)
    link = model(params, seed)
    for i in range(20_000):
        link.transmit(float(i), 100)
    attempts = link.counters.segments + link.counters.retransmissions
    expected = attempts * loss
    half_width = 3.29 * math.sqrt(attempts * loss * (1 - loss))  # two-sided 99.9 %
    assert abs(link.counters.lost_segments - expected) <= half_width + 1


def test_saturated_goodput_matches_formula() -> None:
    params = LinkParameters(rate_bps=200_000)
    link = model(params)
    n = 5000
    for _ in range(n):
        link.transmit(0.0, 1460)
    goodput_bps = link.counters.payload_bytes * 8 / link.last_delivery_s
    assert goodput_bps == pytest.approx(params.goodput_bps, rel=1.5 / n)


def test_a_bare_delay_is_echoed_in_seconds_not_a_huge_millisecond_figure() -> None:
    """`delay: 100` is 100 s (a bare number is seconds): the run's header must make that visible."""
    assert LinkParameters(rate_bps=50e3, delay_s=100.0).description == "50 kbit/s, 100 s, 0.00% loss"
    assert LinkParameters(rate_bps=50e3, delay_s=0.0005).description == "50 kbit/s, 500 us, 0.00% loss"
