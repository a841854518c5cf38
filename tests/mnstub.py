"""A real local HTTP server playing the management node: records callbacks and reports."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class MNStub:
    base_url: str = ""
    callbacks: list[Received] = field(default_factory=list)
    reports: list[Received] = field(default_factory=list)
    fail_next: int = 0  # answer 503 to this many more requests
    fail_status: int = 503
    refuse_commandpath: str | None = None  # answer 503 to every report with this commandpath
    attempts: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def callback_url(self) -> str:
        return f"{self.base_url}/callback"

    @property
    def send_command_url(self) -> str:
        return f"{self.base_url}/report"

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=self.fail_status, text="failing on purpose")
        if self.refuse_commandpath and request.headers.get("commandpath") == self.refuse_commandpath:
            return web.Response(status=503, text="refusing this report on purpose")
        entry = Received(request.path, dict(request.headers), json.loads(await request.read()))
        (self.callbacks if request.path == "/callback" else self.reports).append(entry)
        async with self._changed:
            self._changed.notify_all()
        return web.json_response({"success": True})

    async def _wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        async def wait() -> Any:
            async with self._changed:
                while not (found := predicate()):
                    await self._changed.wait()
                return found
        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"MN stub: no {what} within {timeout}s; callbacks={[c.body for c in self.callbacks]} "
                f"reports={[(r.headers.get('commandpath'), r.body) for r in self.reports]}") from None

    async def wait_callback(self, taskuuid: str, timeout: float = 30) -> dict[str, Any]:
        def find():
            for c in self.callbacks:
                if c.headers.get("taskuuid") == taskuuid:
                    return c.body
        return await self._wait(find, timeout, f"callback for task {taskuuid}")

    def callbacks_for(self, taskuuid: str) -> list[dict[str, Any]]:
        return [c.body for c in self.callbacks if c.headers.get("taskuuid") == taskuuid]

    def reports_for(self, commandpath: str) -> list[dict[str, Any]]:
        return [r.body for r in self.reports if r.headers.get("commandpath") == commandpath]

    async def wait_report(self, commandpath: str, match: Callable[[dict], bool] = lambda b: True,
                          timeout: float = 30) -> dict[str, Any]:
        def find():
            for body in self.reports_for(commandpath):
                if match(body):
                    return body
        return await self._wait(find, timeout, f"report {commandpath} matching")


def make_mn_app(stub: MNStub) -> web.Application:
    app = web.Application()
    app.router.add_post("/callback", stub.handle)
    app.router.add_post("/report", stub.handle)
    return app
