"""Run a coroutine right away; only if it really suspends does the rest become a task.

Python 3.12's `asyncio.eager_task_factory` does this for every task; the broker supports 3.11,
and only its hot path needs it. A read-only tool call never awaits anything that is not already
done, so starting it inline saves a task, a callback and an event-loop turn per call (the
loop's bookkeeping cost about as much as the tool itself).

Rules:
- The coroutine runs inside the caller's stack until its first suspension: it must not rely
  on running in a task of its own (contextvars are the caller's).
- What the coroutine raises before it suspends propagates to the caller; what it raises later
  ends its task (keep a reference and let a done-callback collect it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` up to its first suspension. None if it finished; else the task finishing it."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_resume(coro, yielded))


async def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Drive a started coroutine as its task would: wait for what it yielded, then resume it
    (an asyncio future's own `__await__` hands the coroutine the result or the exception)."""
    while True:
        try:
            if yielded is None:  # a bare yield (asyncio.sleep(0)): give the loop one turn
                await asyncio.sleep(0)
            elif asyncio.isfuture(yielded):
                # as a task does with what its coroutine yields (else awaiting it again fails)
                yielded._asyncio_future_blocking = False
                try:
                    await yielded
                except BaseException:
                    if not yielded.done():  # we were cancelled, not it: pass that on
                        raise
            else:
                raise RuntimeError(f"a coroutine yielded {yielded!r}; asyncio cannot wait on it")
        except BaseException as exc:  # handed to the coroutine, as a task would
            if asyncio.isfuture(yielded) and not yielded.done():
                yielded.cancel()
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
