"""The real ``kvmagent serve`` process, run as systemd runs it (its own process group, the
service's signal handlers installed), must never stop by itself: not during hundreds of EIP
applies and deletes (pyroute2 forks a helper per namespace socket and SIGTERMs it), network
group set-ups and hugepage work. Issue 14 item 0."""
from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from .eip_world import World
from .test_daemon import free_port
from .test_networkgroup import netns_with_group_links, setup_body

pytestmark = pytest.mark.netns

# The production entry point, with the EIP plugin given this test world's name prefix (so the
# agent only ever touches the world's namespaces): everything else is `kvmagent serve`.
LAUNCHER = """
import sys
from kvmagent import cli
from kvmagent.core import server
from kvmagent.plugins import eip
prefix = sys.argv.pop(1)
discover = server.discover_plugins
server.discover_plugins = lambda names=None: [
    eip.make_plugin(prefix=prefix) if p.name == "eip" else p for p in discover(names)]
sys.exit(cli.main())
"""
ROUNDS = 120  # x (apply, apply again, delete) = 360 EIP commands
HUGEPAGES_LOCK = "/tmp/kvmagent-hugepages.lock"


@pytest.fixture
def group_netns():
    with netns_with_group_links("kvmtest-sv") as name:
        yield name


@pytest.fixture
def service(tmp_path: Path, world: World, group_netns: str):
    port = free_port()
    (tmp_path / "kvmagent.toml").write_text(
        f'ha_netns = "{group_netns}"\nmodels_root = "{tmp_path / "models"}"\n')
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, world.prefix, "serve",
             "--config", str(tmp_path / "kvmagent.toml"), "--listen", f"127.0.0.1:{port}",
             "--state-dir", str(tmp_path / "state"), "--libvirt-uri", "test:///default"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


async def _post(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, (url, resp.status, await resp.text())
        return await resp.json()


async def _wait_listening(session: aiohttp.ClientSession, base: str, proc) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the agent exited during start-up"
        try:
            await _post(session, f"{base}/host/echo", {})
            return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise AssertionError("the agent never answered")


async def test_serve_never_stops_itself_under_eip_networkgroup_and_hugepage_work(service, world):
    proc, base, log_path = service
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _wait_listening(session, base, proc)
        for n in range(ROUNDS):
            # ApplyEipCmd/DeleteEipCmd {"eip": EipTO} as FlatEipBackend sends them (World.eip).
            body = world.eip(0)
            for _ in range(2):  # a repeated apply converges, reusing the namespace
                reply = await _post(session, f"{base}/flatnetworkprovider/eip/apply", {"eip": body})
                assert reply["success"], (n, reply)
            reply = await _post(session, f"{base}/flatnetworkprovider/eip/delete", {"eip": body})
            assert reply["success"], (n, reply)
            if n % 20 == 0:
                # NetworkGroupSetupCmd as in tests/test_networkgroup.py (KVMHostHaNetwork...)
                vms = [uuid.uuid4().hex for _ in range(3)]
                await _post(session, f"{base}/ha/networkgroup/setup", setup_body(vms))
                await _post(session, f"{base}/ha/networkgroup/cancel",
                            {"networkGroupUuids": ["storage-net", "mgmt-net"]})
                with open(HUGEPAGES_LOCK, "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    for op in ("ensure", "release"):
                        reply = await _post(session, f"{base}/host/hugepages/{op}",
                                            {"pageSize": "2M", "count": 0})
                        assert reply["success"], reply
            assert proc.poll() is None, f"the agent stopped after round {n}"
        # Still serving, and it never decided to stop.
        assert (await _post(session, f"{base}/host/echo", {}))["success"]
    assert proc.poll() is None
    log = log_path.read_text(errors="replace")
    assert "stopping" not in log, log[-3000:]
    assert "signal wakeup fd" not in log, log[-3000:]
