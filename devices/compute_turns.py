"""Turns for the emulated devices' synchronous work: one device verifies, applies or evaluates per event-loop pass.

Devices behind equal links finish an update at the same modelled instant; each then verifies, applies and
evaluates without awaiting. Run back to back in one pass of the event loop, that work (milliseconds per device,
hundreds of devices) holds back every timer that came due meanwhile, and the links release their segments late.
Taking turns, each device's work runs in a pass of its own, and the timers due by then run between two of them.
The work, its results and their order per device stay the same; only when the host does it moves.
"""

from __future__ import annotations

import asyncio
import collections
import weakref


class ComputeTurns:
    """A queue of devices waiting to compute; ``turn()`` returns when it is the caller's, one caller per loop pass.

    One queue serves one event loop (``compute_turns``)."""

    def __init__(self) -> None:
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._wake_scheduled = False
        self.turns = 0
        """Turns given so far."""

    async def turn(self) -> None:
        """Wait for this caller's turn (the work after it runs in a loop pass with no other device's work)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append(future)
        if not self._wake_scheduled:
            self._wake_scheduled = True
            loop.call_soon(self._wake_next, loop)
        await future

    @property
    def waiting(self) -> int:
        """Callers waiting for a turn (cancelled ones included until their turn is skipped)."""
        return len(self._waiting)

    def _wake_next(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():  # a cancelled waiter (its device crashed) gives up its turn
                future.set_result(None)
                self.turns += 1
                break
        if self._waiting:
            loop.call_soon(self._wake_next, loop)  # the woken device runs in the next pass; the one after it, after
        else:
            self._wake_scheduled = False


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ComputeTurns] = weakref.WeakKeyDictionary()


def compute_turns() -> ComputeTurns:
    """The turns of the running event loop's devices (one queue per loop)."""
    loop = asyncio.get_running_loop()
    turns = _TURNS.get(loop)
    if turns is None:
        turns = _TURNS[loop] = ComputeTurns()  # not holding the loop: the entry goes with it
    return turns
