"""Self-fencing on a real JuiceFS mount hung with SIGSTOP, with real guests; peer checks."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import libvirt
import pytest

from kvmagent.ha.killer import exiting, qemu_process
from kvmagent.ha.probe import heartbeat_path

from .juicefs_kit import MountedVolume
from .vmkit import boot_vm

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


@pytest.mark.guest
@pytest.mark.juicefs
@pytest.mark.parametrize("strategy", ["Permissive", "Force"])
async def test_hung_storage_fences_the_right_vms_and_recovers(
        ha_agent, mn, lv, guest_image, workdir, jfs, storages, strategy):
    ha_vm = await boot_vm(ha_agent, mn, lv, guest_image, workdir, enable_ha=True, disk_dir=jfs.mountpoint)
    plain_vm = await boot_vm(ha_agent, mn, lv, guest_image, workdir, enable_ha=False,
                             disk_dir=jfs.mountpoint)
    elsewhere = await boot_vm(ha_agent, mn, lv, guest_image, workdir, enable_ha=True)  # local disk
    second = storages("ps2")
    reply = await ha_agent.call_async(mn, "/ha/selffencer/setup",
                                      setup_body({"ps-jfs": jfs.mountpoint, "ps-local": second}, strategy))
    assert reply["success"] is True and reply["outcome"] == {"ps-jfs": "started", "ps-local": "started"}
    await wait_beats(ha_agent, "ps-jfs")
    beat = json.loads(Path(heartbeat_path(str(jfs.mountpoint), HOST)).read_text())
    assert sorted(beat["vm_uuids"]) == sorted([ha_vm.uuid, plain_vm.uuid])

    stop_pinging = asyncio.Event()
    pinger = asyncio.ensure_future(ping_during(ha_agent, stop_pinging))
    jfs.hang()
    try:
        disconnected = await mn.wait_report("/kvm/reportstoragestatus",
                                            lambda b: b["psStatus"] == "Disconnected", timeout=30)
        fenced = await mn.wait_report("/kvm/reportselffencer", timeout=30)
        # The other storage keeps beating while this one hangs.
        local = await wait_beats(ha_agent, "ps-local", count=2)
        assert local["state"] == "Healthy"
        hung = (await fencer_states(ha_agent))["ps-jfs"]
        # While the storage still hangs: which QEMUs can still run guest code?
        still_running = {vm.uuid for vm in (ha_vm, plain_vm, elsewhere)
                         if (p := qemu_process(vm.uuid)) is not None and not exiting(p.pid)}
    finally:
        jfs.resume()
    stop_pinging.set()
    latencies = await pinger

    expected = sorted([ha_vm.uuid] if strategy == "Permissive" else [ha_vm.uuid, plain_vm.uuid])
    assert disconnected == {"hostUuid": HOST, "psUuids": ["ps-jfs"], "psStatus": "Disconnected",
                            "reason": disconnected["reason"]}
    assert "3 consecutive heartbeat failures" in disconnected["reason"]
    assert fenced["psUuids"] == ["ps-jfs"] and fenced["fencerFailure"] is False, fenced
    assert sorted(fenced["vmUuidsString"].split(",")) == expected
    assert not set(expected) & still_running
    assert elsewhere.uuid in still_running, "a VM on another storage must never be killed"
    if strategy == "Permissive":
        assert plain_vm.uuid in still_running, "Permissive must spare VMs without HA"
    # Once the storage answers, QEMU finishes exiting and libvirt agrees.
    conn = lv[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        if not set(expected) & running:
            break
        await asyncio.sleep(0.5)
    assert running & {vm.uuid for vm in (ha_vm, plain_vm, elsewhere)} == \
        {vm.uuid for vm in (ha_vm, plain_vm, elsewhere)} - set(expected)
    assert hung["state"] == "Fenced" and hung["fencedVmUuids"] == expected
    assert len(latencies) > 20, "ping must keep answering while the storage hangs"

    connected = await mn.wait_report("/kvm/reportstoragestatus",
                                     lambda b: b["psStatus"] == "Connected", timeout=30)
    assert connected["psUuids"] == ["ps-jfs"]
    assert (await fencer_states(ha_agent))["ps-jfs"]["state"] == "Healthy"
    assert len(mn.reports_for("/kvm/reportselffencer")) == 1, "one fence per outage"


async def test_setup_replay_keeps_the_loop_and_changes_replace_it(make_agent, mn):
    agent = await connected_agent(make_agent, mn)
    broken = "/proc/kvmagent-no-such-storage"  # every write fails at once
    body = setup_body({"ps-a": Path(broken)}, maxAttempts=1000, interval=0.2)
    assert (await agent.call_async(mn, "/ha/selffencer/setup", body))["outcome"] == {"ps-a": "started"}
    fencer = agent.ctx.services["ha.fencers"].fencers["ps-a"]
    await asyncio.sleep(1.0)
    before = (await fencer_states(agent))["ps-a"]["consecutiveFailures"]
    assert before >= 2
    assert (await agent.call_async(mn, "/ha/selffencer/setup", body))["outcome"] == {"ps-a": "unchanged"}
    assert agent.ctx.services["ha.fencers"].fencers["ps-a"] is fencer
    assert (await fencer_states(agent))["ps-a"]["consecutiveFailures"] >= before, "counters were reset"

    changed = {**body, "interval": 0.3}
    assert (await agent.call_async(mn, "/ha/selffencer/setup", changed))["outcome"] == {"ps-a": "replaced"}
    replacement = agent.ctx.services["ha.fencers"].fencers["ps-a"]
    assert replacement is not fencer and fencer._task.done()
    assert (await fencer_states(agent))["ps-a"]["interval"] == 0.3

    assert (await agent.call_async(mn, "/ha/selffencer/cancel", {"psUuids": ["ps-a", "ps-x"]}))["success"]
    assert (await agent.call("/ha/selffencer/state"))["fencers"] == [] and replacement._task.done()


async def test_fencers_survive_an_agent_restart(make_agent, mn, storages):
    storage = storages("ps")
    first = await beating_agent(make_agent, mn, storage, "ps-r")
    await first.client.close()
    hb = Path(heartbeat_path(str(storage), HOST))
    stopped_at = json.loads(hb.read_text())["heartbeat_time"]

    second = await make_agent()
    state = await wait_beats(second, "ps-r", count=1)
    assert state["mountPath"] == str(storage) and state["strategy"] == "Permissive"
    assert json.loads(hb.read_text())["heartbeat_time"] > stopped_at


async def test_peer_heartbeat_check(make_agent, mn, storages):
    storage = storages("ps")
    agent = await beating_agent(make_agent, mn, storage, "ps-p")
    check = {"primaryStorageUuid": "ps-p", "targetHostUuid": HOST, "mountPath": str(storage),
             "interval": 1.2, "times": 3, "storageCheckerTimeout": 2}
    alive = await agent.call_async(mn, "/filesystem/check/vmstate", check)
    assert alive["result"] == {"ps-p": True} and alive["vmUuids"] == []

    await agent.call_async(mn, "/ha/selffencer/cancel", {"psUuids": ["ps-p"]})
    dead = await agent.call_async(mn, "/filesystem/check/vmstate", check)
    assert dead["result"] == {"ps-p": False} and "did not change" in dead["reason"]

    missing = await agent.call_async(mn, "/filesystem/check/vmstate", {**check, "targetHostUuid": "nobody"})
    assert missing["result"] == {"ps-p": False} and "could not be read" in missing["reason"]


@pytest.mark.juicefs
async def test_peer_check_on_hung_storage_is_bounded(make_agent, mn, jfs):
    agent = await make_agent()
    jfs.hang()
    try:
        t0 = time.monotonic()
        reply = await agent.call_async(mn, "/filesystem/check/vmstate", {
            "primaryStorageUuid": "ps", "targetHostUuid": HOST, "mountPath": str(jfs.mountpoint),
            "interval": 0.5, "times": 3, "storageCheckerTimeout": 1})
        elapsed = time.monotonic() - t0
    finally:
        jfs.resume()
    assert reply["result"] == {"ps": False} and "did not finish within 1s" in reply["reason"]
    assert elapsed < 10, "the check must be bounded by times x (interval + timeout)"


async def test_permissive_kills_nothing_when_it_cannot_tell_which_vms_have_ha(make_agent, mn):
    agent = await connected_agent(make_agent, mn, libvirt_uri="qemu:///system?socket=/nonexistent/sock")
    await agent.call_async(mn, "/ha/selffencer/setup",
                           setup_body({"ps-u": Path("/proc/kvmagent-nothing")}, interval=0.2))
    report = await mn.wait_report("/kvm/reportselffencer", timeout=20)
    assert report["vmUuidsString"] == "" and report["fencerFailure"] is True
    assert "cannot tell which VMs use the storage" in report["reason"]


async def test_an_unmounted_storage_fails_its_heartbeat_instead_of_writing_to_the_root_fs(
        make_agent, mn, storages):
    storage = storages("ps")
    agent = await beating_agent(make_agent, mn, storage, "ps-gone")
    subprocess.run(["umount", "-l", str(storage)], check=True, timeout=30)  # the NFS went away
    report = await mn.wait_report("/kvm/reportstoragestatus",
                                  lambda b: b["psStatus"] == "Disconnected", timeout=20)
    assert "is on the root file system: the storage is not mounted" in report["reason"]
    assert not (storage / "zs-heartbeat").exists(), "nothing may be written to the bare mount point"
    state = (await fencer_states(agent))["ps-gone"]
    assert state["state"] == "Fenced" and "not mounted" in state["lastError"]


async def test_connected_is_reported_even_when_the_agent_restarted_during_the_outage(
        make_agent, mn, storages):
    storage = storages("ps")
    first = await beating_agent(make_agent, mn, storage, "ps-o")
    subprocess.run(["umount", "-l", str(storage)], check=True, timeout=30)
    await mn.wait_report("/kvm/reportstoragestatus", lambda b: b["psStatus"] == "Disconnected",
                         timeout=20)
    await first.client.close()
    subprocess.run(["mount", "-t", "tmpfs", "kvmagent-test", str(storage)], check=True, timeout=30)
    await make_agent()  # restores the fencer, which must remember the MN was told Disconnected
    connected = await mn.wait_report("/kvm/reportstoragestatus",
                                     lambda b: b["psStatus"] == "Connected", timeout=20)
    assert connected["psUuids"] == ["ps-o"]


def test_a_stale_pid_file_never_kills_another_process(tmp_path):
    """The fencer's libvirt-less kill only hits a QEMU whose command line names the domain."""
    name = uuidlib.uuid4().hex
    (tmp_path / f"{name}.pid").write_text(str(os.getpid()))
    assert qemu_process(name, pid_dir=tmp_path) is None


@pytest.mark.parametrize("mutate, fragment", [
    (lambda b: b.update(mountPaths=[]), "field 'mountPaths'"),
    (lambda b: b.update(uuids=["a", "b"]), "must have the same length"),
    (lambda b: b.update(strategy="Kill"), "field 'strategy'"),
    (lambda b: b.update(mountPaths=["relative"]), "field 'mountPaths.0'"),
    (lambda b: b.update(interval=0), "field 'interval'"),
    (lambda b: b.update(uuids=["x/../y"]), "not a storage uuid"),
])
async def test_bad_setup_is_refused_and_starts_nothing(agent, mutate, fragment):
    body = setup_body({"ps": Path("/mnt/ps")})
    mutate(body)
    status, reply = await agent.post("/ha/selffencer/setup", body)
    assert status == 400 and fragment in reply["error"], reply
    assert agent.ctx.services["ha.fencers"].fencers == {}
