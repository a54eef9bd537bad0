"""Three dozen emulated devices come online through their own proxy links and a real Mosquitto, taking turns on one
connect ramp, with every link listening on a loopback address of its own and one port."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

from devices.agent import DeviceAgent, DeviceConfig
from devices.fleet import EmulatedFleet
from devices.profiles import get_device_profile
from server.update_server import UpdateServer
from testbed.core.connect_ramp import ConnectRamp
from testbed.core.mqtt import MqttEndpoint
from testbed.core.scenario import parse_scenario
from testbed.core.signing import SigningKey
from testbed.core.topics import Topics
from testbed.inference import SharedModel
from testbed.links import DeviceLinks
from testbed.loopback_listeners import SPREAD_SUPPORTED, LoopbackListeners, link_listen_address

DEVICES = 36
IN_FLIGHT = 4
ONLINE_WITHIN_S = 120.0  # generous on a busy host: each connect crosses two 20 ms links several times
SCENARIO = parse_scenario({
    "name": "ramp-fleet", "seed": 4, "rounds": 1, "model": {"hidden": [8]},
    "devices": [{"profile": "rpi4", "count": DEVICES}],
    "channel": {"downlink": {"rate": "1Mbit", "delay": "20ms"}, "uplink": {"rate": "1Mbit", "delay": "20ms"}},
})


async def test_a_fleet_comes_online_in_turns_through_spread_listeners(mosquitto: tuple[str, int]) -> None:
    server = UpdateServer(SCENARIO)
    model = SharedModel(server.build_device_model())
    topics = Topics(f"ramp-fleet-{time.monotonic_ns()}")
    endpoint = MqttEndpoint(*mosquitto)
    key = SigningKey.generate()
    ramp = ConnectRamp(IN_FLIGHT)
    links = DeviceLinks(SCENARIO.channel, SCENARIO.seed)
    async with AsyncExitStack() as stack:
        listeners = stack.enter_context(LoopbackListeners())
        agents, addresses = [], []
        for index, device_id in enumerate(SCENARIO.device_ids()):
            host, port = link_listen_address(listeners, SCENARIO.channel.backend, in_cell=False)
            link = await stack.enter_async_context(links.open(device_id, mosquitto, seed=index, listen_host=host,
                                                              listen_port=port))
            addresses.append(link.address)
            downlink, uplink = links.parameters(device_id)
            config = DeviceConfig(device_id, get_device_profile("rpi4"), downlink.rate_bps, uplink.rate_bps,
                                  init_seed=server.seed)
            agents.append(DeviceAgent(config, topics, endpoint.via(*link.address),
                                      model.for_device(server.device_test_split(index)), key.trusted_key,
                                      connect_ramp=ramp))
        fleet = await stack.enter_async_context(EmulatedFleet(agents))
        await fleet.wait_online(ONLINE_WITHIN_S)
        assert ramp.peak_in_flight == IN_FLIGHT  # 36 arrived at once; never more than 4 connecting
        assert ramp.in_flight == 0 and ramp.waiting == 0  # each online device gave its slot back
    if SPREAD_SUPPORTED:
        assert len({port for _, port in addresses}) == 1 and len(set(addresses)) == DEVICES
