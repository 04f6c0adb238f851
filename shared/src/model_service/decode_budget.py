"""A memory budget for decoding input images: width x height x channels bytes.

A 5 KB PNG can decode to 108 MB. One request's images together may take at most the
budget (MAX_DECODED_MB) decoded, or the request is refused (413 `decoded_too_large`);
all requests being accepted at once share the same budget: an image waits for its turn
while others are decoded, so the API process's memory stays bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from model_service.errors import DecodedTooLarge


@dataclass
class RequestImages:
    """What one request's images take decoded, so far."""

    decoded_bytes: int = 0


class DecodeBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._used = 0
        self._room = asyncio.Condition()

    @asynccontextmanager
    async def hold(
        self, size: tuple[int, int], channels: int, field: str, request: RequestImages | None
    ) -> AsyncIterator[None]:
        """While an image of `size` is decoded (waits for room; raises DecodedTooLarge
        when the image, with the request's others, is over the budget)."""
        needed = size[0] * size[1] * channels
        total = needed + (request.decoded_bytes if request else 0)
        if total > self.limit:
            raise DecodedTooLarge(
                f"{field}: the request's images would take {_mb(total)} MB decoded "
                f"(width x height x channels), over MAX_DECODED_MB={_mb(self.limit)}; send "
                "smaller images, or fewer in one request",
                field=field,
                decoded_mb=_mb(total),
                limit_mb=_mb(self.limit),
            )
        if request is not None:
            request.decoded_bytes = total
        async with self._room:
            await self._room.wait_for(lambda: self._used + needed <= self.limit)
            self._used += needed
        try:
            yield
        finally:
            async with self._room:
                self._used -= needed
                self._room.notify_all()


def _mb(n: int) -> int:
    return round(n / 2**20)
