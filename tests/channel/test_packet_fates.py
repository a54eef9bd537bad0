"""Tests of the packet-level API LinkModel.packet_fates: netem duplication, reordering, loss, no ordering."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.link import LinkModel, LinkParameters
from channel.loss import GilbertElliottLoss


class ScriptedRng:
    """``random()`` returns scripted values (1.0 when exhausted); delays never draw here (no jitter)."""

    def __init__(self, randoms: list[float]) -> None:
        self.randoms = list(randoms)

    def random(self) -> float:
        return self.randoms.pop(0) if self.randoms else 1.0


def model(params: LinkParameters, seed: int = 0) -> LinkModel:
    return LinkModel(params, np.random.default_rng(seed))


def binomial_ok(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1


def test_plain_packet_is_delivered_once_after_rate_and_delay() -> None:
    link = model(LinkParameters(rate_bps=100_000, delay_s=0.05))
    assert link.packet_fates(0.0, 1500) == [pytest.approx(0.05)]
    assert link.packet_fates(0.0, 1500) == [pytest.approx(0.17)]  # 1500 B at 12.5 kB/s, no overhead added
    assert link.counters.wire_bytes == 3000


def test_duplicate_loss_and_reorder_follow_netem_order() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.1, loss=0.5, duplicate=0.5, reorder=0.5)
    # dup draw 0.1 → two copies; loss draw 0.2 → one copy removed; reorder draw 0.9 → delayed
    link = LinkModel(params, ScriptedRng([0.1, 0.2, 0.9]))  # type: ignore[arg-type]
    assert link.packet_fates(1.0, 100) == [pytest.approx(1.1)]
    # dup 0.1; original kept 0.9; the clone's own loss draw 0.9 keeps it; clone reorder 0.1 → now;
    # original reorder 0.9 → delayed
    link = LinkModel(params, ScriptedRng([0.1, 0.9, 0.9, 0.1, 0.9]))  # type: ignore[arg-type]
    assert link.packet_fates(1.0, 100) == [pytest.approx(1.0), pytest.approx(1.1)]
    assert link.counters.duplicates == 1 and link.counters.reordered == 1
    # no duplicate (0.9), lost (0.1): dropped
    link = LinkModel(params, ScriptedRng([0.9, 0.1]))  # type: ignore[arg-type]
    assert link.packet_fates(1.0, 100) == []
    assert link.counters.lost_segments == 1


def test_duplicate_and_reorder_fractions() -> None:
    n = 20_000
    link = model(LinkParameters(rate_bps=None, delay_s=0.1, duplicate=0.05, reorder=0.25), seed=7)
    fates = [link.packet_fates(i * 0.01, 100) for i in range(n)]
    duplicated = sum(1 for f in fates if len(f) == 2)
    assert binomial_ok(duplicated, n, 0.05)
    copies = [(i * 0.01, t) for i, f in enumerate(fates) for t in f]
    immediate = sum(1 for sent, t in copies if t == sent)
    assert binomial_ok(immediate, len(copies), 0.25)
    arrivals = [t for _, t in copies]
    assert arrivals != sorted(arrivals)  # reordering really happens at packet level


def test_jitter_reorders_packets_without_in_order_delivery() -> None:
    link = model(LinkParameters(rate_bps=None, delay_s=0.1, jitter_s=0.05), seed=1)
    arrivals = [link.packet_fates(i * 0.001, 100)[0] for i in range(1000)]
    assert arrivals != sorted(arrivals)


def test_packet_loss_fraction_with_gilbert_elliott() -> None:
    ge = GilbertElliottLoss(p=0.01, r=0.2)
    link = model(LinkParameters(rate_bps=None, loss_model=ge), seed=2)
    n = 50_000
    dropped = sum(1 for i in range(n) if not link.packet_fates(float(i), 100))
    assert dropped / n == pytest.approx(ge.stationary_loss_rate, rel=0.15)


def test_transmit_ignores_duplication_and_reordering() -> None:
    base = LinkParameters(rate_bps=500_000, delay_s=0.05, jitter_s=0.01, loss=0.02)
    noisy = LinkParameters(rate_bps=500_000, delay_s=0.05, jitter_s=0.01, loss=0.02, duplicate=0.3, reorder=0.4)
    a, b = model(base, 3), model(noisy, 3)
    sends = [(i * 0.002, 1000) for i in range(3000)]
    assert [a.transmit(t, s) for t, s in sends] == [b.transmit(t, s) for t, s in sends]
    assert b.counters.duplicates == 0 and b.counters.reordered == 0


all_features = st.builds(
    LinkParameters,
    rate_bps=st.one_of(st.none(), st.floats(1e4, 1e8)),
    delay_s=st.floats(0, 0.5),
    jitter_s=st.floats(0, 0.2),
    delay_distribution=st.sampled_from(["uniform", "normal", "pareto"]),
    loss_model=st.one_of(st.none(), st.builds(GilbertElliottLoss, p=st.floats(0, 0.2), r=st.floats(0.1, 1),
                                              one_minus_h=st.floats(0, 1), one_minus_k=st.floats(0, 0.1))),
    duplicate=st.floats(0, 0.5),
    reorder=st.floats(0, 0.5),
    outages=st.lists(st.fixed_dictionaries({"at_s": st.floats(0, 5), "duration_s": st.floats(0.01, 2)}), max_size=3),
    random_outages=st.one_of(st.none(), st.fixed_dictionaries({"mean_up_s": st.floats(0.1, 5),
                                                               "mean_down_s": st.floats(0.01, 1)})),
)


@settings(max_examples=60, deadline=None)
@given(params=all_features, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_same_seed_same_fates_and_deliveries(params: LinkParameters, seed: int, data: st.DataObject) -> None:
    sends = data.draw(st.lists(st.tuples(st.floats(0, 0.05), st.integers(1, 1460)), min_size=1, max_size=80))
    times = np.cumsum([gap for gap, _ in sends]).tolist()
    first, second = model(params, seed), model(params, seed)
    fates = [first.packet_fates(t, s) for t, (_, s) in zip(times, sends)]
    assert fates == [second.packet_fates(t, s) for t, (_, s) in zip(times, sends)]
    for t, fate in zip(times, fates):
        assert len(fate) <= 2 and fate == sorted(fate)
        assert all(arrival >= t for arrival in fate)
        assert all(first.outage_at(arrival) is None for arrival in fate)
    third, fourth = model(params, seed), model(params, seed)
    streams = [third.transmit(t, s) for t, (_, s) in zip(times, sends)]
    assert streams == [fourth.transmit(t, s) for t, (_, s) in zip(times, sends)]
    assert streams == sorted(streams)
    assert third.counters == fourth.counters


def test_bad_packet_sizes_and_probabilities() -> None:
    link = model(LinkParameters(rate_bps=None))
    with pytest.raises(ChannelError, match="packet size 0"):
        link.packet_fates(0.0, 0)
    with pytest.raises(ChannelError, match="packet size 65536"):
        link.packet_fates(0.0, 65536)
    with pytest.raises(ChannelError, match="now_s=nan"):
        link.packet_fates(math.nan, 10)
    with pytest.raises(ChannelError, match=r"LinkParameters.duplicate=1.0"):
        LinkParameters(rate_bps=None, duplicate=1.0)
    with pytest.raises(ChannelError, match=r"LinkParameters.reorder=-0.1"):
        LinkParameters(rate_bps=None, reorder=-0.1)
