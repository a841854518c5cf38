"""Serve an agent for benchmarks: ``python -m bench.serve_agent LISTEN STATE_DIR [--blocker|--bare]``.

``--blocker`` adds ``/bench/block``, an async command that sleeps in the executor, to load
the agent with blocked work. ``--bare`` serves a plain aiohttp handler on the same paths, the
baseline every ratio is measured against.
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from aiohttp import web

from kvmagent.cli import serve
from kvmagent.core.config import AgentConfig
from kvmagent.core.logs import setup_logging
from kvmagent.core.models import AgentRequest, AgentResponse
from kvmagent.core.plugin import ASYNC, Plugin


class BlockCmd(AgentRequest):
    seconds: float = 1.0


def blocker_plugin() -> Plugin:
    plugin = Plugin("bench")

    @plugin.command("/bench/block", mode=ASYNC)
    async def block(ctx, req: BlockCmd) -> AgentResponse:
        await ctx.runner.run(time.sleep, req.seconds, timeout=req.seconds + 60)
        return AgentResponse()

    return plugin


def bare_app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"success": True, "error": None})

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    return app


def main() -> None:
    listen, state_dir, *flags = sys.argv[1:]
    host, _, port = listen.rpartition(":")
    if "--bare" in flags:
        web.run_app(bare_app(), host=host, port=int(port), access_log=None, print=None)
        return
    setup_logging("WARNING")
    config = AgentConfig(listen=listen, state_dir=Path(state_dir), domain_type="qemu",
                         models_root=Path(state_dir) / "models")
    if "--blocker" in flags:
        import kvmagent.core.server as server

        original = server.discover_plugins
        server.discover_plugins = lambda names=None: original(names) + [blocker_plugin()]
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
