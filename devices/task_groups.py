"""Run coroutines together until the first one fails, then cancel the rest and raise that failure as itself."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def run_together(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run all until one ends (normally or by an error); cancel the others; re-raise an error unwrapped.

    A structured-concurrency group like asyncio.TaskGroup (Python 3.11+), but its failure is the first
    error itself, so callers catch `SerialLinkError` rather than an ExceptionGroup.
    """
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task in done and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
