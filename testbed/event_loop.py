"""Which asyncio event loop a run and its fleet workers run on: the default, or uvloop when asked for and installed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from testbed.errors import OrchestrationError

EVENT_LOOP_VARIABLE = "TESTBED_EVENT_LOOP"
"""`uvloop` runs the run and its workers (which inherit the environment) on uvloop; unset or `default`: asyncio's."""
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


def chosen_loop(environment: dict[str, str] | None = None) -> str:
    """The event loop the environment asks for (`default` when unset or empty)."""
    return (environment if environment is not None else os.environ).get(EVENT_LOOP_VARIABLE, "") or "default"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coroutine)`` on the event loop `TESTBED_EVENT_LOOP` names."""
    try:
        factory = loop_factory(chosen_loop())
    except EventLoopError:
        coroutine.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)
