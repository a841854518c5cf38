"""Foundation: echo/ping throughput against a bare aiohttp handler, ping under blocked load,
idle RSS and start-up time."""
from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
from aiohttp import web

from .common import free_port, load, percentiles, rss_mb, server_process

REQUESTS = 4000
CONCURRENCY = 16
BLOCKED = 200


def run() -> dict[str, object]:
    figures: dict[str, object] = {}
    with server_process("--bare") as (bare_url, _, _):
        asyncio.run(load(bare_url, "/host/echo", 500, CONCURRENCY))  # warm-up
        bare = asyncio.run(load(bare_url, "/host/echo", REQUESTS, CONCURRENCY))
    with server_process() as (url, proc, ready):
        time.sleep(1.0)
        figures["startup_to_first_ping_s"] = ready
        figures["idle_rss_mb"] = rss_mb(proc)
        asyncio.run(load(url, "/host/echo", 500, CONCURRENCY))
        echo = asyncio.run(load(url, "/host/echo", REQUESTS, CONCURRENCY))
        ping = asyncio.run(load(url, "/host/ping", REQUESTS, CONCURRENCY))
    figures["bare_aiohttp_rps"] = bare["rps"]
    figures["bare_aiohttp_p50_ms / p99_ms"] = f"{bare['p50_ms']:.2f} / {bare['p99_ms']:.2f}"
    for name, result in (("echo", echo), ("ping", ping)):
        figures[f"{name}_rps"] = result["rps"]
        figures[f"{name}_p50_ms / p99_ms"] = f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f}"
        figures[f"{name}_vs_bare_ratio (target >= 0.8)"] = result["rps"] / bare["rps"]
    figures.update(asyncio.run(ping_while_blocked()))
    return figures


async def ping_while_blocked() -> dict[str, object]:
    """p99 of /host/ping while 200 async commands sit blocked in the executor."""
    received: list[str] = []

    async def callback(request: web.Request) -> web.Response:
        received.append(request.headers["taskuuid"])
        return web.json_response({})

    mn = web.Application()
    mn.router.add_post("/callback", callback)
    runner = web.AppRunner(mn, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        with server_process("--blocker") as (url, _, _):
            async with aiohttp.ClientSession() as session:
                for _ in range(BLOCKED):
                    headers = {"taskuuid": uuid.uuid4().hex,
                               "callbackurl": f"http://127.0.0.1:{port}/callback"}
                    async with session.post(f"{url}/bench/block", json={"seconds": 8},
                                            headers=headers) as resp:
                        assert resp.status == 200
                latencies = []
                for _ in range(300):
                    t0 = time.perf_counter()
                    async with session.post(f"{url}/host/ping", data=b"{}") as resp:
                        await resp.read()
                    latencies.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.01)
                in_flight_at_end = BLOCKED - len(received)
            result = percentiles(latencies)
    finally:
        await runner.cleanup()
    return {
        "ping_p50_ms_with_200_blocked": result["p50_ms"],
        "ping_p99_ms_with_200_blocked (target < 50)": result["p99_ms"],
        "blocked_tasks_still_in_flight_after_pings": in_flight_at_end,
    }
