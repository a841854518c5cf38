"""Vhost target: health-check latency against a real container, and /host/echo latency while
health checks hang on a docker engine that accepts connections and never answers (the event
loop must stay free). Needs a running dockerd; changes no hugepages."""
from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import docker
from aiohttp.test_utils import TestClient, TestServer

from kvmagent.core.config import AgentConfig
from kvmagent.core.plugin import discover_plugins
from kvmagent.core.server import create_app
from kvmagent.host.docker_engine import DEFAULT_URL

from .common import percentiles

HEALTH = "/zbs/primarystorage/vhost/target/health"
IMAGE = "local/busybox:test"
CHECKS = 400
CONCURRENCY = 16
HUNG = 32


def run() -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="kvh-bench-", dir="/tmp"))
    try:
        return asyncio.run(_run(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _run(workdir: Path) -> dict[str, object]:
    figures: dict[str, object] = {}
    client = docker.DockerClient(base_url=DEFAULT_URL, timeout=30)
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        raise RuntimeError(f"{IMAGE} missing: run tests/test_vhost.py once to import it") from None
    name = f"kvmagent-vhost-bench-{uuid.uuid4().hex[:8]}"
    container = client.containers.run(
        IMAGE, ["/bin/sh", "-c", "ln -sf /vhost/vhost.sock /dev/log && exec syslogd -n -O /dev/null"],
        name=name, detach=True, volumes={str(workdir): {"bind": "/vhost", "mode": "rw"}})
    try:
        sock = workdir / "vhost.sock"
        deadline = time.monotonic() + 15
        while not sock.is_socket() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # The target's control socket: a unix stream socket that accepts connections (as
        # SPDK's JSON-RPC socket does); health connects to it.
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.bind(str(workdir / "admin.sock"))
        control.listen(256)

        def serve() -> None:  # accept and drop, as a target answers its control socket
            while True:
                try:
                    conn, _ = control.accept()
                except OSError:
                    return
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        async with agent(workdir / "a", DEFAULT_URL, 10) as http:
            body = {"containerName": name, "controlSock": str(workdir / "admin.sock")}
            latencies: list[float] = []

            async def worker(n: int) -> None:
                for _ in range(n):
                    t0 = time.perf_counter()
                    resp = await http.post(HEALTH, json=body)
                    reply = await resp.json()
                    assert reply["targetRunning"], reply
                    latencies.append(time.perf_counter() - t0)

            await worker(20)  # warm-up
            latencies.clear()
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(CHECKS // CONCURRENCY) for _ in range(CONCURRENCY)))
            elapsed = time.perf_counter() - t0
            p = percentiles(latencies)
            figures["health_checks_per_s (real container)"] = len(latencies) / elapsed
            figures["health_p50_ms / p99_ms"] = f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f}"
        control.shutdown(socket.SHUT_RDWR)
        control.close()
    finally:
        container.remove(force=True)
        client.close()

    silent, stop = silent_socket(workdir / "silent.sock")
    try:
        async with agent(workdir / "b", f"unix://{silent}", 2) as http:
            hung = [asyncio.ensure_future(http.post(HEALTH, json={
                "containerName": "target", "socketPath": "/run/x.sock"})) for _ in range(HUNG)]
            await asyncio.sleep(0.2)
            echo: list[float] = []
            for _ in range(200):
                t0 = time.perf_counter()
                resp = await http.post("/host/echo", json={})
                await resp.read()
                echo.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            replies = [await (await r).json() for r in hung]
            assert all(r["targetRunning"] is False for r in replies)
            p = percentiles(echo)
            figures[f"echo_p50_ms / p99_ms while {HUNG} health checks hang"] = \
                f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f}"
            figures["hung_health_checks_all_answered_after_s (timeout 2s)"] = \
                time.perf_counter() - t0 + 0.2
    finally:
        stop()
    return figures


class agent:
    """An in-process agent with the host and vhost plugins, served on a real TCP port."""

    def __init__(self, state_dir: Path, docker_url: str, docker_timeout: float):
        self.config = AgentConfig(listen="127.0.0.1:0", state_dir=state_dir, docker_url=docker_url,
                                  docker_timeout=docker_timeout, libvirt_uri="test:///default")
        self.client: TestClient | None = None

    async def __aenter__(self) -> TestClient:
        app = create_app(self.config, discover_plugins(["host", "vhost"]))
        self.client = TestClient(TestServer(app))
        await self.client.start_server()
        return self.client

    async def __aexit__(self, *exc) -> None:
        assert self.client is not None
        await self.client.close()


def silent_socket(path: Path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(128)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()

    return path, stop
