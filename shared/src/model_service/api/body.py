"""Routes whose large JSON bodies are parsed in a thread, off the event loop
(`APIRouter(route_class=OffLoopJsonRoute)`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from model_service.offloop import off_loop


class OffLoopJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await off_loop(len(body), json.loads, body)
        return self._json


class OffLoopJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(OffLoopJsonRequest(request.scope, request.receive))

        return route
