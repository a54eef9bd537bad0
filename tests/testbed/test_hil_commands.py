"""`testbed attach` finds its run through the retained, typed run config on a real Mosquitto broker."""

from __future__ import annotations

import time

import pytest

from devices.serial_bridge import BridgeError
from testbed.core.messages import RunConfig
from testbed.core.mqtt import MqttEndpoint
from testbed.hil_commands import find_run_config

KEY = "ed25519:" + "A" * 43 + "="


async def test_attach_takes_the_newest_valid_config_listing_its_device(mosquitto: tuple[str, int]) -> None:
    endpoint = MqttEndpoint(*mosquitto)
    stamp = time.monotonic_ns()
    device = f"board-{stamp}"
    older = RunConfig(run=f"old-{stamp}", started_at=1.0, init_seed=1, public_key=KEY, scenario={"name": "a"}, devices={device: 0})
    newer = RunConfig(run=f"new-{stamp}", started_at=2.0, init_seed=2, public_key=KEY, scenario={"name": "b"}, devices={device: 3})
    other = RunConfig(run=f"other-{stamp}", started_at=3.0, init_seed=3, public_key=KEY, scenario={}, devices={"someone-else": 0})
    async with endpoint.client(f"publisher-{stamp}") as client:
        for config in (older, newer, other):
            await client.publish(f"testbed/{config.run}/config", config.encode(), qos=1, retain=True)
        await client.publish(f"testbed/broken-{stamp}/config", b'{"run": "x", "devices": {"%s": 0}}' % device.encode(),
                             qos=1, retain=True)
        try:
            found = await find_run_config(endpoint, device, None, wait_s=5.0)
            assert found == newer
            assert found.board_config(device).device_index == 3
            assert await find_run_config(endpoint, device, older.run, wait_s=5.0) == older
            with pytest.raises(BridgeError, match="no config of any run listing device 'nobody'"):
                await find_run_config(endpoint, "nobody", None, wait_s=1.0)
        finally:
            for run in (older.run, newer.run, other.run, f"broken-{stamp}"):
                await client.publish(f"testbed/{run}/config", b"", qos=1, retain=True)
