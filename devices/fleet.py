"""The fleet: every device of a run (emulated agents, serial bridges, attached boards) in one asyncio process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol
from devices.errors import DeviceError

logger = logging.getLogger("devices.fleet")


class FleetMember(Protocol):
    """A device the run waits for: an emulated DeviceAgent, a SerialBridge, or an ExternalDevice."""

    connected: asyncio.Event

    @property
    def device_id(self) -> str: ...

    async def run(self) -> None: ...


class ExternalDevice:
    """A board whose bridge runs outside this process (`testbed attach`): online when its status says so."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.connected = asyncio.Event()

    def set_online(self, online: bool) -> None:
        if online:
            self.connected.set()
        else:
            self.connected.clear()

    async def run(self) -> None:
        await asyncio.Event().wait()  # nothing to run here; its bridge is another process


class FleetError(DeviceError):
    """A device agent of the fleet failed, or did not come online in time."""


class EmulatedFleet:
    """Owns one task per fleet member; `async with` starts them, leaving the block cancels them all."""

    def __init__(self, agents: Sequence[FleetMember]) -> None:
        self.agents = list(agents)
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> EmulatedFleet:
        self._tasks = [
            asyncio.create_task(agent.run(), name=f"device-{agent.device_id}") for agent in self.agents
        ]
        return self

    async def wait_online(self, timeout_s: float) -> None:
        """Wait until every agent has connected and subscribed; FleetError names the stragglers."""
        waits = [asyncio.create_task(agent.connected.wait()) for agent in self.agents]
        done, pending = await asyncio.wait(waits, timeout=timeout_s)
        for task in pending:
            task.cancel()
        self.raise_if_failed()
        if pending:
            missing = [agent.device_id for agent in self.agents if not agent.connected.is_set()]
            raise FleetError(f"devices not online after {timeout_s:.0f} s: {', '.join(missing)}")

    def raise_if_failed(self) -> None:
        """Surface the first agent that died with an error (agents never end on their own)."""
        for agent, task in zip(self.agents, self._tasks):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise FleetError(f"device {agent.device_id} failed: {task.exception()!r}") from task.exception()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for agent, result in zip(self.agents, results):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                logger.error("device %s ended with %r", agent.device_id, result)
        self._tasks = []
