"""Which asyncio event loop a run and its fleet processes run on: asyncio's or uvloop, as asked for, installed and measured."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from testbed.errors import OrchestrationError

EVENT_LOOP_VARIABLE = "TESTBED_EVENT_LOOP"
"""`uvloop` runs the run and its workers (which inherit the environment) on uvloop, `default` on asyncio's; unset, the
run is on asyncio's and a fleet process on uvloop where it is installed (``fleet_loop_default``)."""
EVENT_LOOPS = ("default", "uvloop")

T = TypeVar("T")


class EventLoopError(OrchestrationError):
    """The event loop asked for is unknown or not installed."""


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of event loop `name` (None: asyncio's default); EventLoopError if unknown or not installed."""
    if name == "default":
        return None
    if name != "uvloop":
        raise EventLoopError(f"{EVENT_LOOP_VARIABLE}={name!r} is not an event loop: expected one of "
                             f"{', '.join(EVENT_LOOPS)}")
    try:
        import uvloop
    except ImportError as error:
        raise EventLoopError(f"{EVENT_LOOP_VARIABLE}=uvloop but uvloop is not installed: pip install "
                             f"'edge-testbed[fast]' (or unset {EVENT_LOOP_VARIABLE})") from error
    return uvloop.new_event_loop


def running_loop_name() -> str:
    """`uvloop` or `default`: the loop the caller runs on (summary.json's `host.event_loop`)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "default"


def chosen_loop(environment: dict[str, str] | None = None, unset: str = "default") -> str:
    """The event loop the environment asks for (``unset`` when it does not say)."""
    return (environment if environment is not None else os.environ).get(EVENT_LOOP_VARIABLE, "") or unset


def fleet_loop_default() -> str:
    """A fleet's loop when `TESTBED_EVENT_LOOP` does not say: uvloop where it is installed, else asyncio's.

    A fleet process (a run's worker, or `testbed fleet` on another host) runs devices and their links and never
    the broker; with two workers on Mosquitto, uvloop's median release lateness p99 was 0.12-0.76 of the default
    loop's in three measurements (README, "uvloop"). The run's own process keeps asyncio's loop unless told: with
    the embedded broker in it, uvloop made the p99 worse (× 2.05).
    """
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "default"


def run(coroutine: Coroutine[Any, Any, T], unset: str = "default") -> T:
    """``asyncio.run(coroutine)`` on the event loop `TESTBED_EVENT_LOOP` names (``unset`` when it names none)."""
    try:
        factory = loop_factory(chosen_loop(unset=unset))
    except EventLoopError:
        coroutine.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)
