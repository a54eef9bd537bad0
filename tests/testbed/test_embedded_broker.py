"""The embedded broker queues connections for a large fleet and still serves MQTT."""

from __future__ import annotations

import asyncio
import subprocess

import aiomqtt
from testbed.broker import LISTEN_BACKLOG, EmbeddedBroker


def _listen_backlog(port: int) -> int:
    """The backlog the kernel holds for a listening socket: `ss -ltn` shows it as Send-Q."""
    output = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10,
                            check=True).stdout
    lines = output.splitlines()
    assert len(lines) == 1, f"expected one listener on port {port}, ss said: {output!r}"
    return int(lines[0].split()[2])


def test_the_listener_queues_a_thousand_connects_and_serves_mqtt() -> None:
    async def scenario() -> None:
        async with EmbeddedBroker() as broker:
            with open("/proc/sys/net/core/somaxconn") as cap:
                assert _listen_backlog(broker.port) == min(LISTEN_BACKLOG, int(cap.read()))
            async with aiomqtt.Client(broker.host, broker.port, identifier="backlog-check", timeout=10) as client:
                await client.subscribe("check/#", qos=1)
                await client.publish("check/1", b"ok", qos=1)
                message = await asyncio.wait_for(anext(client.messages), 10)
                assert message.payload == b"ok"

    asyncio.run(asyncio.wait_for(scenario(), 60))
