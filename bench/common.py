"""Shared benchmark helpers: start a server process, drive HTTP load, summarise latencies."""
from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

import aiohttp
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(*flags: str) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """(base url, process, seconds from spawn to the first answered ping)."""
    port = free_port()
    state = tempfile.mkdtemp(prefix="kvmagent-bench-")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "bench.serve_agent", f"127.0.0.1:{port}", state,
                             *flags], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(url, started)
        yield url, proc, ready
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(url: str, started: float, timeout: float = 30) -> float:
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(urllib.request.Request(
                    f"{url}/host/ping", data=b"{}", method="POST"), timeout=1) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"server at {url} did not answer within {timeout}s")


async def load(url: str, path: str, total: int, concurrency: int,
               headers: dict[str, str] | None = None) -> dict[str, float]:
    """Send ``total`` POSTs with ``concurrency`` clients; throughput and latency percentiles."""
    latencies: list[float] = []
    remaining = total
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                async with session.post(url + path, data=b"{}", headers=headers or {}) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"rps": total / elapsed, **percentiles(latencies)}


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"p50_ms": statistics.median(ordered) * 1000,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000}


def rss_mb(proc: subprocess.Popen) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20
