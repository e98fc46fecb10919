"""Small asyncio helpers shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel_and_wait", "set_threadsafe", "wait_event"]


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancels a stage's background task and waits until it has stopped.

    None (never started) is fine; so is a task that already finished.
    """
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Waits until ``event`` is set or ``timeout`` seconds pass; True when set.

    ``asyncio.timeout``, not ``wait_for``: on Python 3.11, when the event is
    set in the same loop iteration as the task is cancelled, ``wait_for``
    returns instead of raising ``CancelledError``, and a ``while True`` stage
    loop then never stops (its shutdown hangs).
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


def set_threadsafe(loop: asyncio.AbstractEventLoop | None, event: asyncio.Event) -> None:
    """From another thread (the store writer's commit listeners): sets a stage's
    wake-up ``event`` on ``loop``.

    Skipped while the event is still set: the stage has not cleared it yet,
    so the run that follows the clear sees what the caller wrote too, and the
    cross-thread call (a write to the loop's wake-up pipe) is saved.
    """
    if loop is not None and not event.is_set() and not loop.is_closed():
        loop.call_soon_threadsafe(event.set)
