"""A cell's shared link changed while it runs (SharedLink.reconfigure, add_outage, add_flow_outage): scenario events."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.link import LinkParameters
from channel.shared import SharedLink
from tests.channel.test_shared_recovery import carry

SLOW = LinkParameters(rate_bps=100_000, delay_s=0.02)


def test_reconfigure_changes_the_link_for_every_flow_from_then_on() -> None:
    link = SharedLink(SLOW, np.random.default_rng(1))
    a, b = link.flow("a"), link.flow("b")
    before = a.send(0.0, 1460) + b.send(0.0, 1460)  # a full bucket of one packet, then 0.12 s of airtime for b
    assert before == pytest.approx([0.02, 0.14])
    fast = dataclasses.replace(SLOW, rate_bps=10_000_000, delay_s=0.1)
    link.reconfigure(fast, 1.0)
    assert a.params is fast and b.params is fast and link.params is fast
    assert a.send(1.0, 1460) == pytest.approx([1.1])  # a full bucket at the new rate, the new delay
    assert b.send(1.0, 1460) == pytest.approx([1.0012 + 0.1])
    assert link.counters.segments == 4 and link.flow_counters("a").segments == 2


def test_reconfigure_back_restores_the_parameters_exactly() -> None:
    link = SharedLink(SLOW, np.random.default_rng(1))
    link.send("a", 0.0, 1460)
    link.reconfigure(dataclasses.replace(SLOW, loss=0.2, recovery="rto"), 1.0)
    link.reconfigure(SLOW, 2.0)
    assert link.params is SLOW and link.send("a", 3.0, 1460) == pytest.approx([3.02])  # full bucket, no loss
    assert link.send("a", 3.0, 1460) == pytest.approx([3.14])  # then the old rate: 0.12 s a packet


def test_an_outage_of_the_shared_link_holds_every_flow() -> None:
    link = SharedLink(dataclasses.replace(SLOW, rate_bps=None), np.random.default_rng(2))
    link.send("a", 0.0, 100)
    link.add_outage(1.0, 3.0)
    assert link.outage_at(2.0) == link.flow("b").outage_at(2.0) == (1.0, 3.0)
    delivered = carry(link, [(1.5, "a", 100), (1.5, "b", 100)])
    assert all(delivery >= 3.0 for flow in ("a", "b") for delivery in delivered[flow])


def test_a_flows_own_outage_cuts_it_while_the_others_go_on() -> None:
    link = SharedLink(dataclasses.replace(SLOW, rate_bps=None), np.random.default_rng(3))
    a, b = link.flow("a"), link.flow("b")
    a.send(0.0, 100)
    a.add_outage(1.0, 3.0)
    assert a.outage_at(2.0) == (1.0, 3.0) and b.outage_at(2.0) is None and link.outage_at(2.0) is None
    assert b.send(1.5, 100) == pytest.approx([1.52])
    delivered = carry(link, [(1.5, "a", 100)])
    assert delivered["a"][0] >= 3.0  # resent on its RTO backoff until the cut ended
    assert link.flow_counters("a").outage_losses >= 1 and link.flow_counters("b").outage_losses == 0


def test_a_cut_flow_costs_the_cell_its_first_attempts_and_those_that_get_through_not_its_probes() -> None:
    link = SharedLink(SLOW, np.random.default_rng(1))  # 100 kbit/s: 0.12 s a packet
    link.send("a", 0.0, 1460)
    link.add_flow_outage("a", 1.0, 6.0)
    delivered = carry(link, [(1.0, "a", 1460)] * 10)["a"]
    counters = link.flow_counters("a")
    assert counters.outage_losses >= 3 * 10  # each probed on its RTO backoff through the 5 s cut
    assert counters.wire_bytes == (1 + 2 * 10) * SLOW.packet_bytes  # a first attempt and a resend each
    assert min(delivered) >= 6.0 and all(later >= earlier for earlier, later in zip(delivered, delivered[1:]))
    whole = SharedLink(SLOW, np.random.default_rng(1))  # the same cut on the whole link: every attempt is airtime
    whole.send("a", 0.0, 1460)
    whole.add_outage(1.0, 6.0)
    carry(whole, [(1.0, "a", 1460)] * 10)
    assert whole.counters.wire_bytes == (1 + 10 + whole.counters.outage_losses) * SLOW.packet_bytes


def test_a_flows_outage_merges_with_the_links_where_they_meet() -> None:
    link = SharedLink(SLOW, np.random.default_rng(0))
    link.send("a", 0.0, 100)
    link.add_outage(1.0, 2.0)
    link.add_flow_outage("a", 1.5, 4.0)
    assert link.flow_outage_at("a", 1.8) == (1.0, 4.0) and link.flow_outage_at("b", 1.8) == (1.0, 2.0)
    assert link.flow_outage_at("a", 3.0) == (1.5, 4.0) and link.flow_outage_at("b", 3.0) is None


def test_a_bad_flow_outage_is_one_line_error() -> None:
    link = SharedLink(SLOW, np.random.default_rng(0))
    with pytest.raises(ChannelError, match=r"^add_flow_outage\('a', 2.0, 1.0\) is invalid: expected finite start < end$"):
        link.add_flow_outage("a", 2.0, 1.0)


changes = st.lists(st.tuples(st.floats(0.0, 0.05), st.sampled_from("abc"), st.integers(1, 1460),
                             st.sampled_from([None, "outage", "cut", "rate", "loss"])), min_size=1, max_size=120)


@settings(max_examples=120, deadline=None)
@given(recovery=st.sampled_from(["fast", "rto"]), steps=changes, seed=st.integers(0, 2**32 - 1))
def test_run_time_changes_keep_every_flow_whole_and_are_seeded(recovery: str,
                                                               steps: list[tuple[float, str, int, str | None]],
                                                               seed: int) -> None:
    base = LinkParameters(rate_bps=1e6, delay_s=0.03, jitter_s=0.01, loss=0.05, recovery=recovery)

    def run() -> tuple[dict[Hashable, list[float]], SharedLink, list[tuple[str, int, float, float]]]:
        link = SharedLink(base, np.random.default_rng(seed))
        deliveries: dict[Hashable, list[float]] = {}
        cuts: list[tuple[str, int, float, float]] = []  # (flow or "*", step, start, end)
        now = 0.0
        for step, (gap, flow, size, change) in enumerate(steps):
            now += gap
            if change == "outage":
                link.add_outage(now, now + 0.3)
                cuts.append(("*", step, now, now + 0.3))
            elif change == "cut":
                link.add_flow_outage(flow, now, now + 0.5)
                cuts.append((flow, step, now, now + 0.5))
            elif change in ("rate", "loss"):
                link.reconfigure(dataclasses.replace(base, **({"rate_bps": 50e3} if change == "rate"
                                                               else {"loss": 0.3})), now)
            deliveries.setdefault(flow, []).extend(link.send(flow, now, size))
        for flow, delivered in carry(link, []).items():
            deliveries.setdefault(flow, []).extend(delivered)
        return deliveries, link, cuts

    deliveries, link, cuts = run()
    handed: dict[Hashable, list[int]] = {}  # each flow's segments: the step that handed each over
    for step, (_, flow, _, _) in enumerate(steps):
        handed.setdefault(flow, []).append(step)
    for flow in link.flows:
        delivered = deliveries.get(flow, [])
        assert len(delivered) == len(handed[flow])  # every segment once
        assert all(later >= earlier for earlier, later in zip(delivered, delivered[1:]))  # in order
        for cut_flow, step, start, end in cuts:  # nothing handed over once a cut began arrives while it lasts
            if cut_flow in ("*", flow):
                assert not any(start <= delivery < end for delivery, handed_at in zip(delivered, handed[flow])
                               if handed_at >= step), (flow, start, end)
    assert run()[0] == deliveries  # the same seed and calls, the same schedule
