"""A run's scenario events at run time: fire them on time and at round phases, record them, and act on them.

``RunEvents`` owns the run's ``EventSchedule`` (testbed.events), its ``events.jsonl`` (``EventRecorder``), the
task that fires timed events and the task that performs their actions one after another, in the order
they fired. The runner tells it each round phase it reaches. An action is performed by the handler
registered for it (``on``); an action without one, or a target its handler cannot act on, is still
recorded, with a one-time warning that it is not emulated yet. The clock starts when the block is
entered (the run's devices are online and its first round begins). A resumed run (``resumed_round``) does
not fire again what events.jsonl says fired before its checkpoint's round, records the end of what was in
force then (nothing is undone: it did not outlive the killed process), and counts ``at:`` times from its own
start, which it says in the console.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from testbed.core.events import Phase
from testbed.core.scenario import Scenario
from testbed.events import EventRecorder, EventSchedule, FiredEvent, keep_events_before
from testbed.metrics import RunMetrics
from testbed.run_summary import RunError

logger = logging.getLogger("testbed.events")

TICK_S = 0.25  # the longest the timer sleeps: round events scheduled meanwhile are seen this late at most
ACTION_TIMEOUT_S = 60.0  # one action (a broker stopping, a device's task ending) takes at most this long
DRAIN_TIMEOUT_S = 90.0  # at the end of the run, the actions still queued (the ends of every event) finish within this

ProgressCallback = Callable[[str, dict[str, Any]], None]
ActionHandler = Callable[[FiredEvent], "Callable[[], Awaitable[None]] | str | None"]
"""Given a fire or end: what to do (a coroutine function, run in order with the other actions), why not (text), or
nothing (None)."""


class RunEvents:
    """The events of one run: `async with` starts its timer and its action worker, leaving ends what is in force."""

    def __init__(self, scenario: Scenario, out_dir: Any, metrics: RunMetrics, progress: ProgressCallback,
                 resumed_round: int | None = None) -> None:
        self.schedule = EventSchedule(scenario.events)
        self.out_dir = out_dir
        self.resumed_round = resumed_round
        """The round a resumed run continues at (its checkpoint's next round), None for a new run."""
        self.metrics = metrics
        self.progress = progress
        self.recorder = EventRecorder(out_dir, [self._count])
        self.handlers: dict[str, ActionHandler] = {}
        self.failures: list[str] = []
        """Actions that raised (each logged and shown when it happened); the run fails with them at the end."""
        self.not_emulated: dict[str, str] = {}
        """"action: why" for each action the run did not perform (warned once each)."""
        self._started = time.monotonic()
        self._actions: asyncio.Queue[tuple[FiredEvent, Callable[[], Awaitable[None]]]] = asyncio.Queue()
        self._timer: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None

    def on(self, action: str, handler: ActionHandler) -> None:
        """Perform `action` with `handler` (called with each fire and end of an event of that action)."""
        self.handlers[action] = handler

    def now_s(self) -> float:
        return time.monotonic() - self._started

    async def __aenter__(self) -> RunEvents:
        ended_at_resume = self._resume() if self.resumed_round is not None else []
        self.recorder.__enter__()
        self._started = time.monotonic()
        for end in ended_at_resume:  # recorded, not performed: what it changed is gone with the killed process
            self.recorder.record(end)
            self.progress("event", {"description": end.describe() + " (with the killed run)", "record": end.record()})
        if self.schedule.finished:  # no events: no tasks
            return self
        self._timer = asyncio.create_task(self._fire_on_time(), name="events-timer")
        self._worker = asyncio.create_task(self._perform(), name="events-actions")
        return self

    def _resume(self) -> list[FiredEvent]:
        """Cut events.jsonl back to the resumed round, mark what fired before it, say so; the ends to record."""
        assert self.resumed_round is not None
        before = keep_events_before(self.out_dir, self.resumed_round)
        ends = self.schedule.resume(self.resumed_round, before, 0.0)
        timed = [f"{index} ({event.action} at {event.at_s:g} s)" for index, event in enumerate(self.schedule.events)
                 if event.at_s is not None and index not in before.fired]
        if before.fired or timed:
            self.progress("warning", {"message": (
                f"resumed at round {self.resumed_round}: {len(before.fired)} scenario event(s) that fired before it "
                "(events.jsonl) do not fire again" + (f"; timed events not fired yet count their 'at' from this "
                                                       f"resumed start: {', '.join(timed)}" if timed else ""))})
        return ends

    def phase_reached(self, round_index: int, phase: Phase) -> None:
        """The run reached `phase` of `round_index`: fire what is due now."""
        if self._timer is None:
            return
        self._handle(self.schedule.phase_reached(round_index, phase, self.now_s()))

    async def _fire_on_time(self) -> None:
        while True:
            now_s = self.now_s()
            next_s = self.schedule.next_due_s()
            if next_s is not None and next_s <= now_s:
                self._handle(self.schedule.due(now_s))
                continue
            await asyncio.sleep(TICK_S if next_s is None else min(TICK_S, next_s - now_s))

    def _handle(self, fired: list[FiredEvent]) -> None:
        for one in fired:
            self.recorder.record(one)
            self.progress("event", {"description": one.describe(), "record": one.record()})
            handler = self.handlers.get(one.action)
            plan = handler(one) if handler is not None else "not emulated yet"
            if isinstance(plan, str):
                self.warn_not_emulated(one, plan)
            elif plan is not None:
                self._actions.put_nowait((one, plan))

    def warn_not_emulated(self, fired: FiredEvent, why: str) -> None:
        """Say once (per action, and per reason) that the run does not perform `fired`, and why."""
        key = f"{fired.action}: {why}"
        if key in self.not_emulated:
            return
        self.not_emulated[key] = why
        message = f"event {fired.action}: {why}; recorded in events.jsonl, the run goes on without it"
        logger.info("%s", message)  # the console shows the progress warning; the log keeps it too
        self.progress("warning", {"message": message})

    async def _perform(self) -> None:
        while True:
            fired, action = await self._actions.get()
            try:
                await asyncio.wait_for(action(), ACTION_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 — surfaced: logged, shown, and the run fails at its end
                message = f"event {fired.action} ({fired.kind} at {fired.t_s:.1f} s) failed: {error!r}"
                logger.error("%s", message)
                self.failures.append(message)
                self.progress("warning", {"message": message})
            finally:
                self._actions.task_done()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._timer is not None:
                self._timer.cancel()
                await asyncio.gather(self._timer, return_exceptions=True)
                self._handle(self.schedule.end_all(self.now_s()))  # undo what is still in force
            if self._worker is not None:
                drained = asyncio.ensure_future(self._actions.join())
                await asyncio.wait([drained, self._worker], timeout=DRAIN_TIMEOUT_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                drained.cancel()
                self._worker.cancel()
                await asyncio.gather(self._worker, drained, return_exceptions=True)
        finally:
            self.recorder.__exit__(exc_type, exc, tb)
        if self.failures and exc_type is None:
            raise RunError("scenario events failed: " + "; ".join(self.failures))

    def _count(self, fired: FiredEvent) -> None:
        if fired.kind == "fire":
            self.metrics.record_event(fired.action)
