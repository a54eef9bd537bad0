"""Devices' synchronous work takes turns: one device per event-loop pass, so timers due meanwhile run in between."""

from __future__ import annotations

import asyncio
import time

from devices.compute_turns import ComputeTurns, compute_turns

WORK_S = 0.02  # each device's blocking work: longer than the timer's delay, so the timer is due after the first


async def _devices_working(turns: ComputeTurns | None, count: int) -> list[str]:
    """`count` devices that block the loop for WORK_S each (in turns, or all at once) and a 1 ms timer: the order."""
    order: list[str] = []

    async def device(name: str) -> None:
        if turns is not None:
            await turns.turn()
        order.append(name)
        time.sleep(WORK_S)  # the synchronous work: verify, apply, evaluate

    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(device(f"device-{index}")) for index in range(count)]
    loop.call_later(0.001, order.append, "timer")
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    await asyncio.sleep(0.01)  # let the timer run if it has not (without turns it runs after every device)
    return order


async def test_a_timer_due_during_the_work_runs_between_two_devices_not_after_all() -> None:
    turns = ComputeTurns()
    order = await _devices_working(turns, 5)
    assert [name for name in order if name != "timer"] == [f"device-{index}" for index in range(5)]  # in order
    assert order.index("timer") < 5  # before the last device's work
    assert turns.turns == 5 and turns.waiting == 0


async def test_without_turns_the_timer_waits_for_every_device() -> None:
    order = await _devices_working(None, 5)  # the contrast: why the devices take turns
    assert order[-1] == "timer"


async def test_a_cancelled_waiter_gives_up_its_turn_and_the_others_still_get_theirs() -> None:
    turns = ComputeTurns()
    done: list[int] = []

    async def device(index: int) -> None:
        await turns.turn()
        done.append(index)

    tasks = [asyncio.create_task(device(index)) for index in range(4)]
    await asyncio.sleep(0)  # every device is waiting for its turn
    tasks[1].cancel()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
    assert done == [0, 2, 3]
    assert turns.waiting == 0


def test_each_event_loop_has_its_own_turns() -> None:
    first, second = asyncio.run(_turns_twice()), asyncio.run(_turns_twice())
    assert first[0] is first[1]  # one queue per loop
    assert first[0] is not second[0]


async def _turns_twice() -> tuple[ComputeTurns, ComputeTurns]:
    return compute_turns(), compute_turns()
