"""HA: time from a storage hang (SIGSTOP of the JuiceFS daemon) to the Disconnected report,
against the documented bound, /host/ping latency while the storage hangs, and how long 8
concurrent replacements of one fencer take to answer with the storage hung vs healthy. The baseline for
ping is the same agent with every storage healthy, measured in the same run."""
from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from kvmagent.core.config import AgentConfig
from kvmagent.core.plugin import discover_plugins
from kvmagent.core.server import create_app
from kvmagent.ha.fencer import FencerConfig, detection_bounds
from tests.juicefs_kit import MountedVolume
from tests.mnstub import MNStub, make_mn_app

from .common import percentiles

TIMINGS = [(1.0, 3, 1.0), (2.0, 3, 1.0), (1.0, 5, 2.0)]  # interval, maxAttempts, timeout
HOST = "bench-host"


def run() -> dict[str, object]:
    return asyncio.run(measure())


async def ping_latencies(client: TestClient, seconds: float) -> list[float]:
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        resp = await client.post("/host/ping", data=b"{}")
        await resp.read()
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(0.02)
    return latencies


async def replace_latencies(client: TestClient, path: str, rounds: int = 10) -> list[float]:
    """Seconds each of 8 concurrent setups takes to answer, each replacing the fencer of one
    storage with another interval (issue 14: this hung for ever on a stalled loop)."""
    ps = f"ps-{uuid.uuid4().hex[:8]}"
    base = {"hostUuid": HOST, "maxAttempts": 1000, "storageCheckerTimeout": 0.5,
            "strategy": "Permissive", "uuids": [ps], "mountPaths": [path]}
    latencies: list[float] = []

    async def one(interval: float) -> None:
        t0 = time.perf_counter()
        resp = await client.post("/ha/selffencer/setup", json={**base, "interval": interval})
        await resp.read()
        latencies.append(time.perf_counter() - t0)

    for r in range(rounds):
        await asyncio.gather(*(one(round(0.2 + 0.05 * i + 0.001 * r, 3)) for i in range(8)))
    await client.post("/ha/selffencer/cancel", json={"psUuids": [ps]})
    return latencies


async def measure() -> dict[str, object]:
    stub = MNStub()
    mn = TestServer(make_mn_app(stub))
    await mn.start_server()
    stub.base_url = str(mn.make_url("")).rstrip("/")
    config = AgentConfig(listen="127.0.0.1:0", state_dir=Path(tempfile.mkdtemp()),
                         delivery_initial_backoff=0.05)
    plugins = [p for p in discover_plugins() if p.name in ("host", "vm", "ha")]
    client = TestClient(TestServer(create_app(config, plugins)))
    await client.start_server()
    figures: dict[str, object] = {}
    hung_pings: list[float] = []
    try:
        await client.post("/host/connect", json={"hostUuid": HOST, "sendCommandUrl": stub.send_command_url})
        healthy = await ping_latencies(client, 3)
        for interval, attempts, timeout in TIMINGS:
            volume = MountedVolume().mount()
            ps = f"ps-{uuid.uuid4().hex[:8]}"
            try:
                body = {"hostUuid": HOST, "interval": interval, "maxAttempts": attempts,
                        "storageCheckerTimeout": timeout, "strategy": "Permissive",
                        "uuids": [ps], "mountPaths": [str(volume.mountpoint)]}
                await client.post("/ha/selffencer/setup", json=body)
                await asyncio.sleep(interval * 2.5)  # a few good beats first
                volume.hang()
                hung_at = time.monotonic()
                pinger = asyncio.ensure_future(ping_latencies(client, attempts * max(interval, timeout)))
                await stub.wait_report(
                    "/kvm/reportstoragestatus",
                    lambda b, ps=ps: b["psUuids"] == [ps] and b["psStatus"] == "Disconnected",
                    timeout=120)
                detected = time.monotonic() - hung_at
                hung_pings += await pinger
                await client.post("/ha/selffencer/cancel", json={"psUuids": [ps]})
            finally:
                volume.cleanup()
            best, worst = detection_bounds(
                FencerConfig(ps, "", HOST, interval, attempts, timeout, "Permissive"))
            label = f"interval={interval:g}s attempts={attempts} timeout={timeout:g}s"
            figures[f"detect {label}: measured s"] = detected
            figures[f"detect {label}: documented bound s"] = f"{best:.1f}-{worst:.1f}"
            figures[f"detect {label}: within bound"] = best - 0.5 <= detected <= worst + 0.5
        volume = MountedVolume().mount()
        try:
            calm = await replace_latencies(client, str(volume.mountpoint))
            volume.hang()
            stalled = await replace_latencies(client, str(volume.mountpoint))
        finally:
            volume.cleanup()
        calm_p, stalled_p = percentiles(calm), percentiles(stalled)
        figures["replace p99 ms, healthy storage (baseline)"] = calm_p["p99_ms"]
        figures["replace p99 ms, hung storage"] = stalled_p["p99_ms"]
        figures["replace p99 hung/healthy ratio"] = stalled_p["p99_ms"] / calm_p["p99_ms"]
    finally:
        await client.close()
        await mn.close()
    ok, hung = percentiles(healthy), percentiles(hung_pings)
    figures["ping p50/p99 ms, storages healthy (baseline)"] = f"{ok['p50_ms']:.2f} / {ok['p99_ms']:.2f}"
    figures["ping p50/p99 ms, a storage hung"] = f"{hung['p50_ms']:.2f} / {hung['p99_ms']:.2f}"
    figures["ping p99 hung/healthy ratio"] = hung["p99_ms"] / ok["p99_ms"]
    figures["pings while hung"] = len(hung_pings)
    return figures


