"""Link listeners spread over 127.0.0.0/8 on one reserved port: the address plan, and real proxies carrying bytes there."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from contextlib import AsyncExitStack

import pytest
from hypothesis import given, strategies as st

from testbed.links import DeviceLinks
from testbed.core.scenario import parse_scenario
from testbed.loopback_listeners import (ADDRESSES, SPREAD_SUPPORTED, LoopbackListeners, link_listen_address,
                                        loopback_address)

WAIT_S = 20.0

linux_only = pytest.mark.skipif(not SPREAD_SUPPORTED, reason="only Linux answers on all of 127.0.0.0/8")


@given(st.integers(0, ADDRESSES - 1), st.integers(0, ADDRESSES - 1))
def test_each_index_is_its_own_loopback_address_outside_127_0(first: int, second: int) -> None:
    address = ipaddress.IPv4Address(loopback_address(first))
    assert address.is_loopback
    assert address not in ipaddress.IPv4Network("127.0.0.0/16")  # 127.0.0.1 and its neighbours stay free
    assert str(address).split(".")[-1] not in ("0", "255")
    assert (loopback_address(first) == loopback_address(second)) == (first == second)


def test_the_plan_starts_at_127_1_0_1_and_skips_0_and_255() -> None:
    assert [loopback_address(index) for index in (0, 253, 254)] == ["127.1.0.1", "127.1.0.254", "127.1.1.1"]
    assert loopback_address(ADDRESSES - 1) == "127.254.255.254"


@pytest.mark.parametrize("index", [-1, ADDRESSES])
def test_an_index_outside_the_plan_is_one_clear_error(index: int) -> None:
    with pytest.raises(ValueError, match=f"listener address index {index} is outside 0..{ADDRESSES - 1}"):
        loopback_address(index)


def test_without_the_spread_each_listener_takes_a_port_of_its_own_as_before() -> None:
    with LoopbackListeners(spread=False) as listeners:
        assert [listeners.next_address() for _ in range(3)] == [("127.0.0.1", 0)] * 3


def test_addresses_are_given_only_while_the_port_is_held() -> None:
    with pytest.raises(RuntimeError, match="inside 'with'"):
        LoopbackListeners(spread=True).next_address()


def test_only_proxied_links_take_a_spread_address() -> None:
    with LoopbackListeners(spread=False) as listeners:
        assert link_listen_address(listeners, "proxy", in_cell=False) == ("127.0.0.1", 0)
        assert link_listen_address(listeners, "tun", in_cell=True) == ("127.0.0.1", 0)
        assert link_listen_address(listeners, "netem", in_cell=False) == (None, 0)


@linux_only
def test_the_reserved_port_is_held_from_other_binds_on_127_0_0_1_and_on_every_address() -> None:
    with LoopbackListeners() as listeners:
        for host in ("127.0.0.1", "0.0.0.0"):
            with socket.socket() as other:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                with pytest.raises(OSError):
                    other.bind((host, listeners.port))


@linux_only
def test_sixty_links_of_a_run_listen_on_one_port_and_each_carries_its_own_device_bytes() -> None:
    """Real proxies (DeviceLinks, the proxy backend) to a real TCP echo server, each on its own loopback address and
    the same port: every connection through each link gets back exactly what it sent."""
    scenario = parse_scenario({"name": "spread", "rounds": 1, "devices": [{"profile": "rpi4", "count": 60}],
                               "channel": {"downlink": {"rate": "10Mbit", "delay": "5ms"},
                                           "uplink": {"rate": "10Mbit", "delay": "5ms"}}})

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main() -> list[tuple[str, int]]:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        upstream = server.sockets[0].getsockname()[:2]
        links = DeviceLinks(scenario.channel, scenario.seed)
        addresses = []
        async with server, AsyncExitStack() as stack:
            listeners = stack.enter_context(LoopbackListeners())
            opened = []
            for index, device_id in enumerate(scenario.device_ids()):
                host, port = link_listen_address(listeners, "proxy", in_cell=False)
                opened.append(await stack.enter_async_context(
                    links.open(device_id, upstream, seed=index, listen_host=host, listen_port=port)))
            addresses = [link.address for link in opened]

            async def round_trip(number: int, address: tuple[str, int]) -> bytes:
                reader, writer = await asyncio.open_connection(*address)
                message = f"device {number}".encode()
                writer.write(message)
                await writer.drain()
                received = await reader.readexactly(len(message))
                writer.close()
                return received

            received = await asyncio.wait_for(
                asyncio.gather(*(round_trip(n, address) for n, address in enumerate(addresses))), WAIT_S)
            assert received == [f"device {n}".encode() for n in range(len(addresses))]
            assert [(link.uplink_counters.payload_bytes, link.downlink_counters.payload_bytes) for link in opened] == [
                (len(message), len(message)) for message in received]  # each link carried its own device's bytes
        return addresses

    addresses = asyncio.run(main())
    assert len({port for _, port in addresses}) == 1
    assert len({host for host, _ in addresses}) == 60
    assert addresses[0][0] == "127.1.0.1"

