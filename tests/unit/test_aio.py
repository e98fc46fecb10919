"""Stage loop helpers: a wake-up that races with shutdown never hangs it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from sidecar._aio import cancel_and_wait, wait_event


async def _swallowing_wait(event: asyncio.Event, timeout: float) -> bool:
    """A waiter that loses a cancellation arriving with its wake-up, as
    ``asyncio.wait_for`` does on Python 3.11 (kept here to show the test
    catches it, on any Python)."""
    try:
        await event.wait()
    except asyncio.CancelledError:
        if not event.is_set():
            raise
    return event.is_set()


async def _stops_when_cancelled_as_woken(
    wait: Callable[[asyncio.Event, float], Awaitable[bool]], steps: int
) -> bool:
    """A stage loop that is woken, and cancelled ``steps`` loop iterations later
    (before it has run again)."""
    event = asyncio.Event()

    async def stage() -> None:
        while True:
            await wait(event, 10.0)
            event.clear()

    task = asyncio.create_task(stage())
    await asyncio.sleep(0)  # the stage now waits for its event
    event.set()
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()  # once, as a stage's shutdown does
    try:
        async with asyncio.timeout(0.5):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
    except TimeoutError:
        await cancel_and_wait(task)  # stop it for good: it swallowed the cancellation
        return False
    return task.cancelled()


async def test_wait_event_keeps_a_cancellation_that_races_with_the_wakeup() -> None:
    for steps in range(4):
        assert await _stops_when_cancelled_as_woken(wait_event, steps), steps


async def test_the_check_catches_a_waiter_that_swallows_the_cancellation() -> None:
    stopped = [await _stops_when_cancelled_as_woken(_swallowing_wait, k) for k in range(4)]
    assert not all(stopped), stopped


async def test_wait_event_reports_set_or_timed_out() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 10.0) is True
