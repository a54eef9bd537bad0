"""Loss recovery of the link model's TCP stream (LinkModel.send/decide): fast retransmit, an RTO for tail losses."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.link import LinkModel, LinkParameters
from channel.recovery import DUPLICATE_ACK_THRESHOLD, Recovery
from testbed.core.scenario import ScenarioError, parse_scenario
from testbed.links import resolve_links


class ScriptedDraws:
    """Stands in for the model's generator: ``random()`` (the loss draws, one per attempt) follows a script."""

    def __init__(self, lost: list[bool]) -> None:
        self._lost = list(lost)

    def random(self) -> float:
        return 0.0 if self._lost and self._lost.pop(0) else 0.99

    def integers(self, high: int) -> int:  # pragma: no cover - only random outages draw it
        raise AssertionError("no random outages here")


def scripted_model(params: LinkParameters, lost: list[bool]) -> LinkModel:
    model = LinkModel(params, ScriptedDraws(lost))  # type: ignore[arg-type]
    model.recovery.recoveries = []
    return model


def carry(model: LinkModel, handovers: list[tuple[float, int]]) -> list[float]:
    """Send every (time, size), then let time run until every segment is decided; the delivery times in order."""
    deliveries: list[float] = []
    for now, size in handovers:
        deliveries += model.send(now, size)
    while model.next_decision_s is not None:
        deliveries += model.decide(model.next_decision_s)
    return deliveries


def test_a_loss_with_three_later_segments_is_resent_one_round_trip_after() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.05, loss=0.5)  # rto 0.2 s
    model = scripted_model(params, [True, False, False, False, False])
    assert model.send(0.0, 100) == []  # lost: undecided
    assert model.send(0.01, 100) == [] and model.send(0.02, 100) == []  # behind the hole
    deliveries = model.send(0.03, 100)  # the third later arrival (0.08) decides it: resent at 0.08 + 0.05
    assert deliveries == pytest.approx([0.18, 0.18, 0.18, 0.18])
    assert model.recovery.recoveries == [Recovery(0, 0.0, pytest.approx(0.13), "fast", 3)]
    assert (model.recovery.fast_retransmits, model.recovery.timeout_retransmits) == (1, 0)
    assert model.next_decision_s is None


@pytest.mark.parametrize("later", [0, 1, 2])
def test_a_tail_loss_waits_for_its_rto(later: int) -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.05, loss=0.5)
    model = scripted_model(params, [True] + [False] * (later + 1))
    assert model.send(0.0, 100) == []
    for index in range(later):
        assert model.send(0.01 * (index + 1), 100) == []
    assert model.next_decision_s == pytest.approx(0.2)
    assert model.decide(0.19) == []
    assert model.decide(0.2) == pytest.approx([0.25] * (later + 1))  # resent at the RTO, arrives 0.05 later
    assert model.recovery.recoveries == [Recovery(0, 0.0, pytest.approx(0.2), "timeout", later)]


def test_segments_handed_over_after_the_rto_fired_do_not_make_it_fast() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.05, loss=0.5)
    model = scripted_model(params, [True] + [False] * 5)
    model.send(0.0, 100)
    assert model.send(0.3, 100) == pytest.approx([0.25, 0.35])  # the RTO fired at 0.2, before this one came
    assert model.recovery.recoveries[0].kind == "timeout"


def test_a_later_lost_segment_sends_no_duplicate_ack() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.0, loss=0.5)
    # segment 0 lost, 1 lost, 2-4 arrive: both holes get their third later arrival at segment 4
    model = scripted_model(params, [True, True, False, False, False, False, False])
    for index in range(4):
        assert model.send(0.01 * index, 100) == []
    assert model.send(0.04, 100) == pytest.approx([0.04] * 5)
    assert [(r.segment, r.kind) for r in model.recovery.recoveries] == [(0, "fast"), (1, "fast")]


def test_a_lost_fast_retransmission_is_a_hole_again_with_the_next_backoff() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.0, loss=0.5)
    model = scripted_model(params, [True, False, False, False, True, False])
    for index in range(4):
        model.send(0.01 * index, 100)  # the fourth (0.03) resends segment 0 at 0.03: lost again
    assert model.next_decision_s == pytest.approx(0.03 + 0.4)  # second loss: rto · 2
    assert model.decide(0.42) == []
    assert model.decide(0.431) == pytest.approx([0.43] * 4)
    assert [r.kind for r in model.recovery.recoveries] == ["fast", "timeout"]


def test_fast_recovery_keeps_the_link_busy_where_rto_idles_it() -> None:
    """10 Mbit/s, 1% loss, a bulk handed over at once: fast recovery ends near the airtime, RTO recovery far later."""
    params = LinkParameters(rate_bps=10e6, delay_s=0.02, loss=0.01)
    bulk = [(0.0, 1460)] * 5000
    airtime_s = 5000 * params.packet_bytes * 8 / 10e6
    fast = carry(LinkModel(params, np.random.default_rng(4)), bulk)
    rto = carry(LinkModel(dataclasses.replace(params, recovery="rto"), np.random.default_rng(4)), bulk)
    assert len(fast) == len(rto) == 5000
    assert fast[-1] < airtime_s * 1.05 + 0.2 < rto[-1] / 2  # every loss idles the rto link for 200 ms


def test_rto_recovery_through_send_is_transmit() -> None:
    params = LinkParameters(rate_bps=100e3, delay_s=0.05, jitter_s=0.01, loss=0.1, recovery="rto")
    handovers = [(0.01 * i, 1000) for i in range(300)]
    by_send = carry(LinkModel(params, np.random.default_rng(9)), handovers)
    by_transmit_model = LinkModel(params, np.random.default_rng(9))
    assert by_send == [by_transmit_model.transmit(now, size) for now, size in handovers]


def test_loss_free_fast_equals_rto() -> None:
    params = LinkParameters(rate_bps=1e6, delay_s=0.03, jitter_s=0.01)
    handovers = [(0.001 * i, 1460) for i in range(500)]
    assert carry(LinkModel(params, np.random.default_rng(2)), handovers) == carry(
        LinkModel(dataclasses.replace(params, recovery="rto"), np.random.default_rng(2)), handovers)


def test_transmit_refuses_while_send_left_segments_undecided() -> None:
    model = scripted_model(LinkParameters(rate_bps=None, loss=0.5), [True])
    model.send(0.0, 100)
    with pytest.raises(ChannelError, match="undecided"):
        model.transmit(0.1, 100)


def test_bad_recovery_mode_is_one_line_error() -> None:
    with pytest.raises(ChannelError, match=r"^LinkParameters.recovery='sack' is invalid: expected one of fast, rto$"):
        LinkParameters(rate_bps=None, recovery="sack")


def test_a_new_stream_drops_the_old_streams_undecided_segments() -> None:
    model = scripted_model(LinkParameters(rate_bps=None, loss=0.5), [True, False])
    model.send(0.0, 100)
    model.new_stream(0.1)
    assert model.next_decision_s is None and model.send(0.1, 100) == [0.1]


streams = st.lists(st.tuples(st.floats(0.0, 0.05), st.integers(1, 1460)), min_size=1, max_size=200)


@settings(max_examples=150, deadline=None)
@given(rate=st.sampled_from([None, 20e3, 1e6, 10e6]), delay=st.floats(0.0, 0.2), jitter_share=st.floats(0.0, 1.0),
       loss=st.floats(0.0, 0.4), gaps_and_sizes=streams, seed=st.integers(0, 2**32 - 1))
def test_schedule_invariants(rate: float | None, delay: float, jitter_share: float, loss: float,
                             gaps_and_sizes: list[tuple[float, int]], seed: int) -> None:
    params = LinkParameters(rate_bps=rate, delay_s=delay, jitter_s=delay * jitter_share, loss=loss)
    handovers, now = [], 0.0
    for gap, size in gaps_and_sizes:
        now += gap
        handovers.append((now, size))
    model = LinkModel(params, np.random.default_rng(seed))
    model.recovery.recoveries = []
    deliveries = carry(model, handovers)
    # every segment delivered once, in order, never before it was handed over
    assert len(deliveries) == len(handovers)
    assert all(later >= earlier for earlier, later in zip(deliveries, deliveries[1:]))
    assert all(delivery >= handed for delivery, (handed, _) in zip(deliveries, handovers))
    # the same seed gives the same schedule
    assert carry(LinkModel(params, np.random.default_rng(seed)), handovers) == deliveries
    recoveries = model.recovery.recoveries
    assert len(recoveries) == model.counters.lost_segments
    for recovery in recoveries:
        waited = recovery.resend_s - recovery.lost_departure_s
        if recovery.kind == "fast":
            # three duplicate ACKs: a later segment's flight and the ACK's way back, about one round trip
            assert recovery.later_arrivals == DUPLICATE_ACK_THRESHOLD
            assert waited >= 2 * params.delay_s - params.jitter_s - 1e-9
            if rate is None:  # no queue: the later segments left before the RTO fired
                assert waited <= params.rto_s * 2**params.max_backoffs + 2 * params.delay_s + params.jitter_s + 1e-9
        else:
            # an RTO only for a tail loss: fewer than three later segments arrived before it fired
            assert recovery.later_arrivals < DUPLICATE_ACK_THRESHOLD
            backoff = math.log2(waited / params.rto_s)
            assert backoff == pytest.approx(round(backoff), abs=1e-6) and 0 <= round(backoff) <= params.max_backoffs
            handed_within = [handed for handed, _ in handovers
                             if recovery.lost_departure_s < handed < recovery.resend_s]
            if not handed_within:
                continue  # nothing after it: a tail loss indeed
            assert len(handed_within) < DUPLICATE_ACK_THRESHOLD + model.counters.lost_segments


def test_the_scenario_chooses_the_recovery_per_direction() -> None:
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "scenarios" / "lowband.yaml").read_text())
    raw.setdefault("channel", {}).setdefault("downlink", {})["recovery"] = "rto"
    downlink, uplink = resolve_links(parse_scenario(raw).channel)
    assert (downlink.recovery, uplink.recovery) == ("rto", "fast")
    raw["channel"]["downlink"]["recovery"] = "sack"
    with pytest.raises(ScenarioError,
                       match=r"channel.downlink.recovery: Input should be 'fast' or 'rto' \(got 'sack'\)"):
        parse_scenario(raw)
