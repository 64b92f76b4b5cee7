"""Wait for an outcome, not for a time: poll a condition until a deadline.

A test that sleeps a fixed time and then asserts is a race that CPU load loses; these helpers give the
condition the whole deadline and fail with what was last seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

# A condition that reads a file or a socket another process is still writing may fail half-way.
TRANSIENT = (OSError, ValueError, KeyError)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, message: str = ""
) -> Any:
    """The first truthy value of ``predicate`` within ``timeout`` seconds, else AssertionError."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except TRANSIENT as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout} s (last: {last!r})")
        time.sleep(interval)


async def until(
    predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, what: str = ""
) -> float:
    """Seconds it took ``predicate`` (plain or async) to hold, polled on the running loop; AssertionError
    past ``timeout``."""
    began = time.monotonic()
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            break
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not reached within {timeout} s: {what or 'condition'}")
        await asyncio.sleep(0.05)
    return time.monotonic() - began
