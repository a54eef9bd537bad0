"""A worker's link report crosses a real broker in parts of LINKS_PER_MESSAGE links; the run has every link's totals
when it sees the part that answers its refresh request."""

from __future__ import annotations

import asyncio
import time

from channel.link import LinkCounters
from channel.timing import LatenessSketch
from testbed.core.mqtt import MqttEndpoint
from testbed.core.topics import Topics
from hypothesis import given, strategies as st

from testbed.fleet_worker import (LINK_REPORT_PERIOD_S, LINK_STATES_PER_S, LINKS_PER_MESSAGE, LinkReports,
                                  TimedRemoteLink, encode_link_report, link_report_period_s, link_state,
                                  publish_link_reports)


def _worker_links(count: int) -> dict[str, TimedRemoteLink]:
    """Links as a worker holds them (what the report reads of them: counters both ways and a lateness sketch)."""
    links = {}
    for index in range(count):
        link = TimedRemoteLink()
        link.downlink_counters = LinkCounters(segments=index + 1, wire_bytes=1500 * (index + 1), queueing_delay_s=0.5)
        link.uplink_counters = LinkCounters(segments=2 * index, lost_segments=index % 3)
        sketch = LatenessSketch()
        for late_s in (0.0, 0.001 * index, 0.02):
            sketch.add(late_s)
        link.lateness = sketch
        links[f"rpi4-{index}"] = link
    return links


def test_a_link_state_is_every_counter_both_ways_and_the_sketch() -> None:
    link = _worker_links(3)["rpi4-2"]
    state = link_state(link)
    assert LinkCounters(**state["downlink"]) == link.downlink_counters
    assert LinkCounters(**state["uplink"]) == link.uplink_counters
    assert state["lateness"]["count"] == 3


async def test_a_report_of_more_links_than_a_message_reaches_the_run_whole(mosquitto: tuple[str, int]) -> None:
    endpoint = MqttEndpoint(*mosquitto)
    topics = Topics(f"link-reports-{time.monotonic_ns()}")
    worker_links = _worker_links(2 * LINKS_PER_MESSAGE + 5)  # three messages
    run_links = {device_id: TimedRemoteLink() for device_id in worker_links}
    reports = LinkReports(endpoint, topics, run_links)
    reading = asyncio.create_task(reports.run())
    publishing = asyncio.create_task(publish_link_reports(endpoint, topics, "worker-0", worker_links))
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while "worker-0" not in reports.answered:  # its periodic report came: both sides are connected
            assert asyncio.get_running_loop().time() < deadline, "no report from the worker"
            await asyncio.sleep(0.05)
        for link in worker_links.values():  # what the refresh's answer must bring, not an earlier report
            link.downlink_counters.segments += 1000
        while not await reports.refresh(timeout_s=2.0):
            assert asyncio.get_running_loop().time() < deadline, "the worker never answered a refresh"
        assert reports.answered == {"worker-0": reports.requests}
        for device_id, link in worker_links.items():
            assert run_links[device_id].downlink_counters == link.downlink_counters
            assert run_links[device_id].uplink_counters == link.uplink_counters
            assert run_links[device_id].timing_stats() == link.lateness
    finally:
        for task in (reading, publishing):
            task.cancel()
        await asyncio.gather(reading, publishing, return_exceptions=True)


def test_a_message_answers_only_when_asked() -> None:
    assert b'"answers": null' in encode_link_report("worker-0", {}, None)
    assert b'"answers": 7' in encode_link_report("worker-0", {}, 7)


def test_a_run_of_ten_thousand_devices_hears_from_each_link_every_5_s_and_a_small_run_every_half_second() -> None:
    assert link_report_period_s(200) == link_report_period_s(1000) == LINK_REPORT_PERIOD_S == 0.5
    assert link_report_period_s(10_000) == 5.0


@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_the_run_never_receives_more_than_its_budget_of_link_states(devices: int, more: int) -> None:
    period = link_report_period_s(devices)
    assert period >= LINK_REPORT_PERIOD_S
    assert devices / period <= LINK_STATES_PER_S * (1 + 1e-12)  # (a float division may round up)
    assert link_report_period_s(devices + more) >= period
