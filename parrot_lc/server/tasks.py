"""Tasks that start in their creator's turn of the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def start_now(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task of `coro` that runs at once up to its first wait (an eager task, on Python 3.12 and later), so that
    what it hands on, such as a command to an engine, leaves in this turn of the event loop. An ordinary task
    first waits for every callback already ready: when a hundred requests arrive at once, a call's first engine
    command (its prefix's fill) waited behind all of their handlers, once for the call's task and once more for
    the fill's. On older Pythons, an ordinary task."""
    loop = asyncio.get_running_loop()
    eager = getattr(asyncio, "eager_task_factory", None)
    return eager(loop, coro) if eager is not None else loop.create_task(coro)
