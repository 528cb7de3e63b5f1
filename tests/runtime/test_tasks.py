"""cancel_and_wait stops even a task that swallows a cancellation."""

from __future__ import annotations

import asyncio

from services.runtime.tasks import cancel_and_wait


async def test_cancel_and_wait_survives_a_swallowed_cancellation():
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed == 0:  # like a library call that turns the first cancel into a result
                    swallowed += 1
                    continue
                raise

    async def fails() -> None:
        raise RuntimeError("boom")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(fails())]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(tasks, None), 5)
    assert all(t.done() for t in tasks) and swallowed == 1
