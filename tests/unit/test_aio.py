"""Stage loop helpers: a wake-up that races with shutdown never hangs it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sidecar._aio import cancel_and_wait, spawn, wait_event


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


class _Boom(RuntimeError):
    pass


async def _fail_after_a_step() -> None:
    await asyncio.sleep(0)
    raise _Boom("the stage broke")


async def _collect_unretrieved(run: Callable[[], Awaitable[None]]) -> list[dict[str, Any]]:
    """Runs ``run`` and a garbage collection; returns what asyncio reported as lost."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        await run()
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    return reported


async def test_spawn_logs_a_failed_background_task_once_with_its_stage_and_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        task = spawn(_fail_after_a_step(), stage="retention", name="trim")
        assert task.get_name() == "retention/trim"
        with contextlib.suppress(_Boom):
            await asyncio.wait_for(asyncio.shield(task), 5)
        # The stage's shutdown does not raise (or log) it a second time.
        await cancel_and_wait(task)

    with caplog.at_level(logging.DEBUG, logger="sidecar._aio"):
        lost = await _collect_unretrieved(run)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "trim" in errors[0].getMessage() and "retention" in errors[0].getMessage()
    assert "the stage broke" in errors[0].getMessage()
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is _Boom
    assert lost == []


async def test_spawn_retrieves_a_failure_nobody_awaited(caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        spawn(_fail_after_a_step(), stage="telemetry", name="history")
        for _ in range(5):
            await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR, logger="sidecar._aio"):
        lost = await _collect_unretrieved(run)
    assert lost == []  # no "Task exception was never retrieved"
    assert [r.getMessage() for r in caplog.records if "history" in r.getMessage()]


async def test_a_plain_task_would_have_been_lost() -> None:
    """The check above can see a lost exception: a bare task's is reported."""

    async def run() -> None:
        asyncio.get_running_loop().create_task(_fail_after_a_step())
        for _ in range(5):
            await asyncio.sleep(0)

    lost = await _collect_unretrieved(run)
    assert any("never retrieved" in str(ctx.get("message")) for ctx in lost), lost


async def test_spawn_awaited_task_leaves_its_outcome_to_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def run() -> None:
        task = spawn(_fail_after_a_step(), stage="ingest", name="read", awaited=True)
        with pytest.raises(_Boom):
            await task
        cancelled = spawn(asyncio.sleep(10), stage="ingest", name="drain", awaited=True)
        await asyncio.sleep(0)
        await cancel_and_wait(cancelled)
        background = spawn(asyncio.sleep(10), stage="control", name="retry")
        await asyncio.sleep(0)
        await cancel_and_wait(background)  # a cancellation is not a failure

    with caplog.at_level(logging.INFO, logger="sidecar._aio"):
        lost = await _collect_unretrieved(run)
    assert lost == []
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


async def test_cancel_and_wait_still_raises_a_plain_task_failure() -> None:
    task = asyncio.get_running_loop().create_task(_fail_after_a_step())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    with pytest.raises(_Boom):
        await cancel_and_wait(task)
