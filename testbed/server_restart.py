"""The `server_restart` event: the update server is rebuilt from the run's last checkpoint and the run's MQTT session
is reconnected, at the runner's next safe point; the round in progress is then repeated.

The event only asks (`request`, from the events' action worker); the runner performs it (`perform`) after the
training or the wait for reports in progress ends, so nothing is half-done. The session is reconnected
make-before-break: a bridge session subscribes to the devices' messages before the run's own one closes and is
closed once the run's own session is back (subscribed, retained messages republished), so no report or nack a
device sends meanwhile is lost (one that arrives twice is still one report: the run keeps one per device and round).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from server.update_server import UpdateServer
from testbed.control_connection import ControlConnection
from testbed.core.scenario import Scenario
from testbed.events import FiredEvent
from testbed.report_collector import DeviceMessages
from testbed.run_checkpoint import read_server_state
from testbed.run_summary import RunError

ProgressCallback = Callable[[str, dict[str, Any]], None]


class ServerRestarts:
    """Restarts of the run's update server: requested by the event, performed by the runner between steps."""

    def __init__(self, scenario: Scenario, out_dir: Path, control: ControlConnection, pump: asyncio.Task[None],
                 messages: DeviceMessages, progress: ProgressCallback,
                 interrupt: asyncio.Event) -> None:
        self.scenario = scenario
        self.out_dir = Path(out_dir)
        self.control = control
        self.pump = pump
        """The task of the run's own MQTT session (a new one after each restart)."""
        self.messages = messages
        self.progress = progress
        self.interrupt = interrupt
        """Set when a restart is requested: the wait for reports in progress ends within a second."""
        self.requested = False
        self.performed = 0

    def __call__(self, fired: FiredEvent) -> Callable[[], Awaitable[None]] | None:
        """The event's action (testbed.event_actions): ask for a restart when it fires (it has no end)."""
        if fired.kind != "fire":
            return None

        async def request() -> None:
            self.requested = True
            self.interrupt.set()
        return request

    async def perform(self, round_index: int) -> UpdateServer:
        """A new update server restored from the last checkpoint (a fresh one before the first), which must be at
        `round_index`, and the run's session reconnected; RunError if the checkpoint is at another round."""
        server = await asyncio.to_thread(UpdateServer, self.scenario)
        state = await asyncio.to_thread(read_server_state, self.out_dir)
        if state is not None:
            server.restore(state)
        if server.next_round != round_index:
            raise RunError(f"server_restart: the checkpoint is at round {server.next_round}, the run at round "
                           f"{round_index}")
        await self._reconnect()
        self.requested = False
        self.performed += 1
        self.progress("server-restarted", {"round": round_index, "restarts": self.performed})
        return server

    async def close(self) -> None:
        """End the session a restart opened (the run's first one is ended by testbed.run_assembly)."""
        if self.performed:
            await _cancel(self.pump)

    async def _reconnect(self) -> None:
        """The run's session closed and opened again, a bridge session covering the gap."""
        bridge = ControlConnection(self.control.endpoint, f"{self.control.identifier}-bridge",
                                   self.messages.subscriptions, self.messages.take)
        bridge_task = await bridge.start()
        try:
            await _cancel(self.pump)
            self.pump = await self.control.start()
        finally:
            await _cancel(bridge_task)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
