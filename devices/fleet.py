"""The fleet: every device of a run (emulated agents, serial bridges, attached boards) in one asyncio process."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol
from devices.errors import DeviceError

logger = logging.getLogger("devices.fleet")

CRASH_WAIT_S = 10.0  # how long a crashed member's task may take to end


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
        if waits:
            all_online = asyncio.ensure_future(asyncio.wait(waits))
            first_failure = asyncio.ensure_future(asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED))
            await asyncio.wait([all_online, first_failure], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            all_online.cancel()  # a member that failed (members never end on their own) ends the wait at once
            first_failure.cancel()
        pending = [task for task in waits if not task.done()]
        for task in pending:
            task.cancel()
        self.raise_if_failed()
        if pending:
            missing = [agent.device_id for agent in self.agents if not agent.connected.is_set()]
            raise FleetError(f"devices not online after {timeout_s:.0f} s: {', '.join(missing)}")
        settle_heap()

    def member(self, device_id: str) -> FleetMember:
        """The member standing for `device_id` (FleetError if the fleet has none)."""
        return self.agents[self._index(device_id)]

    def _index(self, device_id: str) -> int:
        for index, agent in enumerate(self.agents):
            if agent.device_id == device_id:
                return index
        raise FleetError(f"no device {device_id!r} in the fleet")

    async def crash(self, device_id: str, timeout_s: float = CRASH_WAIT_S) -> None:
        """Cancel the member's task, as a crash: what it held in memory is gone with it (bounded wait)."""
        task = self._tasks[self._index(device_id)]
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not task.done():  # a cancelled client may wait for its DISCONNECT to be acknowledged: cancel again
            task.cancel()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise FleetError(f"device {device_id} did not stop within {timeout_s:.0f} s of its crash")
            await asyncio.wait([task], timeout=min(remaining, 1.0))
        self.agents[self._index(device_id)].connected.clear()

    def restart(self, device_id: str, member: FleetMember) -> None:
        """Run `member` (e.g. the device rebooted) in place of the crashed member of `device_id`."""
        index = self._index(device_id)
        if not self._tasks[index].done():
            raise FleetError(f"device {device_id} is still running; crash it first")
        self.agents[index] = member
        self._tasks[index] = asyncio.create_task(member.run(), name=f"device-{device_id}")

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
        ended: dict[str, list[str]] = {}  # one line per distinct error (a dead worker ends its whole share alike)
        for agent, result in zip(self.agents, results):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                ended.setdefault(repr(result), []).append(agent.device_id)
        for error, device_ids in ended.items():
            more = f" and {len(device_ids) - 1} more" if len(device_ids) > 1 else ""
            logger.error("device %s%s ended with %s", device_ids[0], more, error)
        self._tasks = []


def settle_heap() -> None:
    """Collect once, then take every object alive now out of the garbage collector's scans (``gc.freeze``).

    What exists once the fleet is online (models, data, clients, links, the broker) lives for the whole run; a full
    collection walked all of it again and again: pauses of 100-400 ms with 200 devices, during which no link released
    a segment. After this, a collection walks only what the rounds allocate.
    """
    gc.collect()
    gc.freeze()
