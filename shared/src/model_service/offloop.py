"""CPU work on large request data (JSON bodies, data URIs, request hashes) runs in a
worker thread, so one large request does not stall every other request and /health."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

OFF_LOOP_BYTES = 256 * 1024  # smaller data is handled in place: a thread hop costs more


async def off_loop(size: int, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`func(*args, **kwargs)`, in a thread when `size` (of the data it works on) is
    large."""
    if size < OFF_LOOP_BYTES:
        return func(*args, **kwargs)
    return await asyncio.to_thread(func, *args, **kwargs)
