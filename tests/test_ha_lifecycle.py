"""Issue 14 item 1: a fencer's setup/replace/cancel cannot hang, even with many concurrent
replacements while the loop or the event loop is stalled; exactly one loop remains."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import psutil
import pytest

from kvmagent.ha.probe import heartbeat_path

from . import ha_kit
from .ha_kit import HOST, connected_agent, setup_body

storages, jfs = ha_kit.storages, ha_kit.jfs  # fixtures


def loops_of(ps_uuid: str) -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == f"selffencer {ps_uuid}" and not t.done()]


def io_children(mount: Path) -> list[psutil.Process]:
    """The agent's heartbeat/read children for ``mount`` (stuck ones included)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if str(mount) in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def stall_event_loop(stop: asyncio.Event, every: float, for_: float) -> None:
    """Block the event loop for ``for_`` seconds every ``every`` seconds (as a busy agent does)."""
    loop = asyncio.get_running_loop()

    def stall():
        if stop.is_set():
            return
        time.sleep(for_)
        loop.call_later(every, stall)
    loop.call_soon(stall)


@pytest.mark.parametrize("storage_kind", ["healthy", pytest.param("hung", marks=pytest.mark.juicefs)])
async def test_concurrent_replacements_of_a_stalled_fencer_all_answer_and_leave_one_loop(
        make_agent, mn, storages, request, storage_kind):
    agent = await connected_agent(make_agent, mn)
    if storage_kind == "hung":
        volume = request.getfixturevalue("jfs")
        path = volume.mountpoint
    else:
        path = storages("ps")
    body = setup_body({"ps-x": path}, interval=0.2, maxAttempts=1000, storageCheckerTimeout=0.5)
    await agent.call_async(mn, "/ha/selffencer/setup", body)
    if storage_kind == "hung":
        volume.hang()  # the loop's heartbeat child is now stuck in the kernel
    stop = asyncio.Event()
    stall_event_loop(stop, every=0.01, for_=0.02)
    try:
        # 25 rounds of 8 concurrent replacements, each with other intervals: on the agent
        # before issue 14 a cancellation lost in wait_for left a loop that never stopped, and
        # every later setup/cancel waited for it for ever (it failed within a few rounds).
        intervals = [round(0.2 + 0.05 * i + 0.001 * r, 3) for r in range(25) for i in range(8)]
        for r in range(25):
            replies = await asyncio.gather(*(
                agent.call_async(mn, "/ha/selffencer/setup", {**body, "interval": iv}, timeout=60)
                for iv in intervals[r * 8:(r + 1) * 8]))
            assert all(r["success"] for r in replies), replies
        assert len(loops_of("ps-x")) == 1, "exactly one loop must remain"
        assert len(io_children(path)) <= 1, "a hung storage keeps at most one stuck I/O child"
        state = (await agent.call("/ha/selffencer/state"))["fencers"][0]
        assert state["interval"] in intervals
        fencer = agent.ctx.services["ha.fencers"].fencers["ps-x"]
        assert fencer.cfg.interval == state["interval"] and fencer.running
        cancelled = await agent.call_async(mn, "/ha/selffencer/cancel", {"psUuids": ["ps-x"]},
                                           timeout=60)
        assert cancelled["success"] is True
        assert loops_of("ps-x") == []
    finally:
        stop.set()
        if storage_kind == "hung":
            volume.resume()
    if storage_kind == "healthy":  # and nothing beats any more
        hb = Path(heartbeat_path(str(path), HOST))
        before = json.loads(hb.read_text())["heartbeat_time"]
        await asyncio.sleep(1.0)
        assert json.loads(hb.read_text())["heartbeat_time"] == before
    assert (await agent.call("/ha/selffencer/state"))["fencers"] == []


async def test_agent_shutdown_with_a_hung_fencer_is_bounded(make_agent, mn, jfs):
    agent = await connected_agent(make_agent, mn)
    await agent.call_async(mn, "/ha/selffencer/setup",
                           setup_body({"ps-h": jfs.mountpoint}, interval=0.2, maxAttempts=1000))
    jfs.hang()
    try:
        await asyncio.sleep(1.0)  # a heartbeat child is stuck on the storage
        manager = agent.ctx.services["ha.fencers"]
        await asyncio.wait_for(manager.close(), 30)  # raises if close hangs
        assert loops_of("ps-h") == []
    finally:
        jfs.resume()


@pytest.mark.parametrize("field, value", [
    ("interval", 5e-324), ("interval", 0.1), ("storageCheckerTimeout", 0.01), ("maxAttempts", 0)])
async def test_intervals_and_timeouts_below_their_lower_bound_are_refused(agent, field, value):
    body = setup_body({"ps": Path("/mnt/ps")}, **{field: value})
    status, reply = await agent.post("/ha/selffencer/setup", body)
    assert status == 400 and f"field '{field}'" in reply["error"], reply
    assert agent.ctx.services["ha.fencers"].configs == {}
