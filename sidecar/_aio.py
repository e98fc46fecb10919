"""Small asyncio helpers shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["cancel_and_wait", "set_threadsafe", "spawn", "wait_event"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Tasks from :func:`spawn` whose failure its done-callback has logged already.
_REPORTED: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def spawn(
    coro: Coroutine[Any, Any, _T], *, stage: str, name: str, awaited: bool = False
) -> asyncio.Task[_T]:
    """Starts ``coro`` as a task named ``stage/name`` whose failure is never lost.

    A done-callback retrieves the task's exception, so asyncio never prints
    "Task exception was never retrieved" at some later garbage collection,
    far from the cause and without saying which stage it was. A background
    task (``awaited=False``) that fails is logged once, at ERROR, naming its
    stage and task; :func:`cancel_and_wait` then does not raise it a second
    time. A task whose creator awaits it and handles its outcome
    (``awaited=True``: a per-call helper task) is only logged at DEBUG, in
    case the creator left without awaiting it. Cancellation is not a failure.
    """
    task = asyncio.get_running_loop().create_task(coro, name=f"{stage}/{name}")
    task.add_done_callback(lambda t: _retrieve(t, stage, name, awaited))
    return task


def _retrieve(task: asyncio.Task[Any], stage: str, name: str, awaited: bool) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        return
    if awaited:
        log.debug("task %s of stage %s ended with %r", name, stage, exc)
        return
    _REPORTED.add(task)
    log.error(
        "background task %s of stage %s failed: %s",
        name,
        stage,
        exc,
        exc_info=exc,
        extra={"stage": stage, "task": name},
    )


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancels a stage's background task and waits until it has stopped.

    None (never started) is fine; so is a task that already finished. A
    task from :func:`spawn` that failed was logged when it failed, so its
    exception is not raised again here; any other task's is.
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        if task not in _REPORTED:
            raise


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
