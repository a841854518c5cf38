"""Shared pieces of the HA tests: storages, agents, fencer states."""
from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from .juicefs_kit import MountedVolume

HOST = "0c3f9a6e5b7d4e2f9a1b2c3d4e5f6a7b"
FAST = {"interval": 1, "maxAttempts": 3, "storageCheckerTimeout": 1}


@pytest.fixture
def storages(workdir):
    """``storages(name)``: a real file system (tmpfs) mounted in the work dir, unmounted after."""
    made = []

    def mount(name: str) -> Path:
        path = workdir / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "kvmagent-test", str(path)],
                       check=True, timeout=30)
        made.append(path)
        return path

    yield mount
    for path in made:
        subprocess.run(["umount", "-l", str(path)], timeout=30)


@pytest.fixture
def jfs():
    volume = MountedVolume().mount()
    yield volume
    volume.cleanup()


@pytest.fixture
async def ha_agent(make_agent, mn, workdir, guest_image, jfs):
    return await connected_agent(make_agent, mn, ha_inventory_refresh=1.0,
                                 vm_path_roots=[workdir, guest_image.kernel.parent, jfs.base])


def setup_body(storages: dict[str, Path], strategy: str = "Permissive", **timing) -> dict:
    return {"hostUuid": HOST, **FAST, **timing, "strategy": strategy,
            "uuids": list(storages), "mountPaths": [str(p) for p in storages.values()]}


def not_mounted_body(ps_uuid: str, path: Path, **timing) -> dict:
    """Setup of a storage ZStack mounted (NFS), whose mount path is a bare directory: every
    heartbeat fails ("not a mount point"). No url: nothing is remounted after the fence."""
    return {**setup_body({ps_uuid: path}, **timing), "mountedByZStack": [True]}


async def connected_agent(make_agent, mn, **config):
    agent = await make_agent(**config)
    await agent.call("/host/connect", {"hostUuid": HOST, "sendCommandUrl": mn.send_command_url})
    return agent


async def beating_agent(make_agent, mn, storage: Path, ps_uuid: str):
    """An agent whose fencer on ``storage`` has written at least one heartbeat."""
    agent = await connected_agent(make_agent, mn)
    await agent.call_async(mn, "/ha/selffencer/setup", setup_body({ps_uuid: storage}))
    await wait_beats(agent, ps_uuid, count=1)
    return agent


async def fencer_states(agent) -> dict[str, dict]:
    reply = await agent.call("/ha/selffencer/state")
    return {f["psUuid"]: f for f in reply["fencers"]}


async def wait_remount(agent, ps_uuid: str, timeout: float = 20) -> dict:
    """The fencer state of ``ps_uuid`` once it holds a remount outcome (after a fence)."""
    deadline = time.monotonic() + timeout
    while not (state := (await fencer_states(agent))[ps_uuid])["remount"]:
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.2)
    return state


async def wait_beats(agent, ps_uuid: str, count: int = 2, timeout: float = 20) -> dict:
    """Wait until ``count`` more heartbeats of ``ps_uuid`` were written."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = (await fencer_states(agent))[ps_uuid]
        if state["lastHeartbeatAt"] and (not seen or state["lastHeartbeatAt"] != seen[-1]):
            seen.append(state["lastHeartbeatAt"])
            if len(seen) > count:
                return state
        await asyncio.sleep(0.2)
    raise AssertionError(f"{ps_uuid}: only {len(seen) - 1} heartbeats in {timeout}s")


async def ping_during(agent, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        t0 = time.perf_counter()
        reply = await asyncio.wait_for(agent.call("/host/ping"), 5)
        assert reply["success"] is True
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    return latencies
