"""Interoperability with hosts running ZStack's own agent: the heartbeat file both ways, and
/ha/scanhost as ZStack defines it.

The ZStack side here is written from the format description in ZStack's agent (ZU
``kvmagent/plugins/ha_plugin.py``, ``FileSystemHeartbeatController`` and
``read_fencer_heartbeat``), not from our code: the writer dumps
``{"heartbeat_time": time.time(), "vm_uuids": None | ",".join(uuids)}`` with Python's default
``json.dumps`` into ``<mount>/zs-heartbeat/heartbeat-file-kvm-host-<hostUuid>.hb``; the reader
strips the content, ``json.loads`` it, truncates ``heartbeat_time`` to whole seconds, and splits
``vm_uuids`` on commas (null -> no VMs)."""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from . import ha_kit
from .ha_kit import HOST, beating_agent

storages = ha_kit.storages  # fixture
PEER = "5c1e9d0a2b3c4d5e6f708192a3b4c5d6"


def zstack_read(mount: Path, host_uuid: str) -> tuple[int, list[str]] | None:
    """ZStack's reader (read_fencer_heartbeat), as described."""
    path = os.path.join(str(mount), "zs-heartbeat", f"heartbeat-file-kvm-host-{host_uuid}.hb")
    with open(path) as fh:
        content = fh.read().strip()
    if not content:
        return None
    doc = json.loads(content)
    uuids = doc["vm_uuids"]
    return int(doc["heartbeat_time"]), ([] if uuids is None else uuids.split(","))


def zstack_write(mount: Path, host_uuid: str, vm_uuids: list[str]) -> bytes:
    """ZStack's writer (FileSystemHeartbeatController.write_vm_uuid), as described."""
    directory = Path(mount) / "zs-heartbeat"
    directory.mkdir(exist_ok=True)
    content = json.dumps({"heartbeat_time": time.time(),
                          "vm_uuids": ",".join(vm_uuids) if vm_uuids else None})
    with open(directory / f"heartbeat-file-kvm-host-{host_uuid}.hb", "w") as fh:
        fh.write(content)
    return content.encode()


async def test_zstack_reads_our_heartbeat(make_agent, mn, storages):
    storage = storages("ps")
    await beating_agent(make_agent, mn, storage, "ps-z")
    raw = (storage / "zs-heartbeat" / f"heartbeat-file-kvm-host-{HOST}.hb").read_bytes()
    assert raw.startswith(b'{"heartbeat_time": ') and raw.endswith(b', "vm_uuids": null}'), raw
    first = zstack_read(storage, HOST)
    assert first is not None and first[1] == [] and abs(first[0] - time.time()) < 60
    deadline = time.monotonic() + 10
    while zstack_read(storage, HOST)[0] == first[0]:  # the whole second advances
        assert time.monotonic() < deadline, "ZStack's reader sees no progress"
        await asyncio.sleep(0.2)


async def test_we_read_a_zstack_hosts_heartbeat(make_agent, mn, storages):
    storage = storages("ps")
    agent = await make_agent()
    vms = ["0b42630f37d8417480eced62ad89719f", "5c1e9d0a2b3c4d5e6f708192a3b4c5d6"]
    stop = asyncio.Event()

    async def zstack_host():  # beats every 0.5 s, as a ZStack host with a short interval
        while not stop.is_set():
            zstack_write(storage, PEER, vms)
            await asyncio.sleep(0.5)

    beating = asyncio.ensure_future(zstack_host())
    check = {"primaryStorageUuid": "ps-z", "targetHostUuid": PEER, "mountPath": str(storage),
             "interval": 0.5, "times": 1, "storageCheckerTimeout": 0.5}
    try:
        alive = await agent.call_async(mn, "/filesystem/check/vmstate", check)
    finally:
        stop.set()
        await beating
    assert alive["success"] is True and alive["result"] == {"ps-z": True}
    assert alive["vmUuids"] == vms
    zstack_write(storage, PEER, [])  # a stopped ZStack host with no VMs: "vm_uuids": null
    dead = await agent.call_async(mn, "/filesystem/check/vmstate", check)
    assert dead["result"] == {"ps-z": False} and dead["vmUuids"] == []


async def test_scanhost_up_and_down(agent, mn):
    """ScanCmd (premium HaKvmHostSiblingChecker); the reply's result is what the MN reads."""
    body = {"hostUuid": PEER, "slibingHostUuid": HOST, "ip": "127.0.0.1", "startPort": 1,
            "endPort": 65535, "interval": 0, "times": 3, "successInterval": 0, "successTimes": 2}
    up = await agent.call_async(mn, "/ha/scanhost", body)
    assert up == {"success": True, "error": None, "result": "success"}
    # 203.0.113.0/24 is TEST-NET-3: documentation only, nothing answers an echo there.
    down = await agent.call_async(mn, "/ha/scanhost", {**body, "ip": "203.0.113.7", "times": 1})
    assert down["success"] is True and down["result"] == "failure"
    status, bad = await agent.post("/ha/scanhost", {**body, "ip": "127.0.0.1; reboot"})
    assert status == 400 and "field 'ip'" in bad["error"]
