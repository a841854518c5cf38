"""Foundation: echo/ping throughput against a bare aiohttp handler, ping under blocked load,
idle RSS and start-up time."""
from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import aiohttp
from aiohttp import web

from .common import free_port, load, percentiles, rss_mb, server_process

REQUESTS = 1500
ROUNDS = 5
CONCURRENCY = 16
BLOCKED = 200


def interleaved(targets: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Median figures per target over ROUNDS rounds that alternate the targets, so a burst of
    background load hits every target alike instead of one measurement phase."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for _ in range(ROUNDS):
        for name, (url, path) in targets.items():
            samples[name].append(asyncio.run(load(url, path, REQUESTS, CONCURRENCY)))
    return {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
            for name, runs in samples.items()}


def run() -> dict[str, object]:
    figures: dict[str, object] = {}
    with server_process("--bare") as (bare_url, _, _), server_process() as (url, proc, ready):
        time.sleep(1.0)
        figures["startup_to_first_ping_s"] = ready
        figures["idle_rss_mb"] = rss_mb(proc)
        for target in (bare_url, url):
            asyncio.run(load(target, "/host/echo", 500, CONCURRENCY))  # warm-up
        medians = interleaved({"bare": (bare_url, "/host/echo"), "echo": (url, "/host/echo"),
                               "ping": (url, "/host/ping")})
    bare, echo, ping = medians["bare"], medians["echo"], medians["ping"]
    figures["rounds x requests (interleaved, medians)"] = f"{ROUNDS} x {REQUESTS}"
    figures["bare_aiohttp_rps"] = bare["rps"]
    figures["bare_aiohttp_p50_ms / p99_ms"] = f"{bare['p50_ms']:.2f} / {bare['p99_ms']:.2f}"
    for name, result in (("echo", echo), ("ping", ping)):
        figures[f"{name}_rps"] = result["rps"]
        figures[f"{name}_p50_ms / p99_ms"] = f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f}"
        figures[f"{name}_vs_bare_ratio (target >= 0.8)"] = result["rps"] / bare["rps"]
    figures.update(asyncio.run(ping_while_blocked()))
    figures.update(asyncio.run(async_acknowledgements()))
    return figures


async def async_acknowledgements() -> dict[str, object]:
    """Acknowledgements of async /host/ping (each a new taskuuid: journaled with an fsync, then
    run and called back) vs sync /host/ping, same agent, interleaved rounds."""
    async def callback(request: web.Request) -> web.Response:
        return web.json_response({})

    mn = web.Application()
    mn.router.add_post("/callback", callback)
    runner = web.AppRunner(mn, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rates: dict[str, list[float]] = {"sync": [], "async": []}
    try:
        with server_process() as (url, _, _):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
                async def one(headers: dict[str, str]) -> None:
                    async with session.post(f"{url}/host/ping", data=b"{}", headers=headers) as r:
                        await r.read()
                        assert r.status == 200

                for _ in range(ROUNDS):
                    for mode in ("sync", "async"):
                        t0 = time.perf_counter()
                        for _ in range(REQUESTS // 100):  # 16 in flight, in batches
                            await asyncio.gather(*(one({} if mode == "sync" else {
                                "taskuuid": uuid.uuid4().hex,
                                "callbackurl": f"http://127.0.0.1:{port}/callback"})
                                for _ in range(16)))
                        rates[mode].append(REQUESTS // 100 * 16 / (time.perf_counter() - t0))
    finally:
        await runner.cleanup()
    sync_rps, async_rps = statistics.median(rates["sync"]), statistics.median(rates["async"])
    return {"ping_sync_rps / async_ack_rps (new taskuuid each)": f"{sync_rps:.0f} / {async_rps:.0f}",
            "async_ack_vs_sync_ratio": async_rps / sync_rps}


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
