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

from kvmagent.core import mounttable
from kvmagent.ha.fencer import FencerConfig, detection_bounds, storage_kill_set
from kvmagent.ha.inventory import VmRecord
from kvmagent.ha.killer import exiting, qemu_process
from kvmagent.ha.probe import heartbeat_path
from kvmagent.ha.rules import FencerRules

from . import ha_kit
from .ha_kit import (HOST, beating_agent, connected_agent, fencer_states, not_mounted_body,
                     ping_during, setup_body, wait_beats, wait_remount)
from .vmkit import boot_vm

storages, jfs, ha_agent = ha_kit.storages, ha_kit.jfs, ha_kit.ha_agent  # fixtures
FENCER = "/kvm/reportselffencer"
STORAGE = "/kvm/reportstoragestatus"


def running_guest_code(vms) -> set[str]:
    """The VMs whose QEMU can still run guest code (a killed one may hang exiting)."""
    return {vm.uuid for vm in vms if (p := qemu_process(vm.uuid)) is not None and not exiting(p.pid)}


async def libvirt_settles(done, timeout: float = 60) -> set[str]:
    """The active domains once ``done(names)`` holds (a fresh connection each look: libvirtd
    may have dropped an idle client while it was blocked on the hung storage)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = libvirt.open("qemu:///system")
        try:
            names = {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        finally:
            conn.close()
        if done(names) or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.5)


async def add_rules(agent, mn, allow=(), block=()):
    """/add/vm/fencer/rule/to/host as the MN sends it (premium HaManagerImpl)."""
    reply = await agent.call_async(mn, "/add/vm/fencer/rule/to/host", {
        "hostUuid": HOST,
        "allowRules": [{"fencerName": "hostStorageState", "vmUuids": list(allow)}],
        "blockRules": [{"fencerName": "hostStorageState", "vmUuids": list(block)}]})
    assert reply["success"] is True, reply


@pytest.mark.guest
@pytest.mark.juicefs
@pytest.mark.parametrize("strategy", ["Permissive", "Force"])
async def test_hung_storage_fences_the_right_vms_and_recovers(
        ha_agent, mn, lv, guest_image, workdir, jfs, storages, strategy):
    boot = lambda **kw: boot_vm(ha_agent, mn, lv, guest_image, workdir, **kw)  # noqa: E731
    allowed = await boot(disk_dir=jfs.mountpoint)  # allow-listed by the MN, enableHa not set
    blocked = await boot(enable_ha=True, disk_dir=jfs.mountpoint)  # block-listed
    plain = await boot(disk_dir=jfs.mountpoint)  # neither
    elsewhere = await boot(enable_ha=True)  # allow-listed, but its disk is on another storage
    vms = (allowed, blocked, plain, elsewhere)
    await add_rules(ha_agent, mn, allow=[allowed.uuid, elsewhere.uuid], block=[blocked.uuid])
    second = storages("ps2")
    body = setup_body({"ps-jfs": jfs.mountpoint, "ps-local": second}, strategy)
    if strategy == "Permissive":  # as for NFS: ZStack mounted it, and may remount it after a fence
        body.update(urls=["10.0.0.5:/nfs", "10.0.0.5:/other"], mountedByZStack=[True, True],
                    mountOptions=["", ""])
    reply = await ha_agent.call_async(mn, "/ha/selffencer/setup", body)
    assert reply["success"] is True and reply["outcome"] == {"ps-jfs": "started", "ps-local": "started"}
    await wait_beats(ha_agent, "ps-jfs")
    on_storage = sorted([allowed.uuid, blocked.uuid, plain.uuid])
    hb = Path(heartbeat_path(str(jfs.mountpoint), HOST))
    deadline = time.monotonic() + 60  # the VM snapshot is refreshed every second; libvirtd may lag
    while sorted((json.loads(hb.read_text())["vm_uuids"] or "").split(",")) != on_storage:
        assert time.monotonic() < deadline, hb.read_text()
        await asyncio.sleep(0.5)

    stop_pinging = asyncio.Event()
    pinger = asyncio.ensure_future(ping_during(ha_agent, stop_pinging))
    jfs.hang()
    hung_at = time.time()
    expected = sorted([allowed.uuid] if strategy == "Permissive" else [allowed.uuid, plain.uuid])
    try:
        await mn.wait_report(FENCER, lambda b: b["vmUuidsString"] != "Disconnected", timeout=40)
        disconnected = await mn.wait_report(STORAGE, lambda b: b["psStatus"] == "Disconnected")
        # The other storage keeps beating while this one hangs.
        local = await wait_beats(ha_agent, "ps-local", count=2)
        assert local["state"] == "Healthy"
        hung = (await fencer_states(ha_agent))["ps-jfs"]
        still_running = running_guest_code(vms)
    finally:
        jfs.resume()
    stop_pinging.set()
    latencies = await pinger

    first, second_report = mn.reports_for(FENCER)[:2]
    assert first == {"hostUuid": HOST, "psUuids": ["ps-jfs"], "vmUuidsString": "Disconnected",
                     "fencerFailure": True, "reason": first["reason"]}, "ZStack: Disconnected first"
    assert "heartbeat fail, self fencer has been triggered" in first["reason"]
    assert second_report["psUuids"] == ["ps-jfs"] and second_report["hostUuid"] == HOST
    assert sorted(second_report["vmUuidsString"].split(",")) == expected
    assert disconnected["psUuids"] == ["ps-jfs"] and "3 consecutive" in disconnected["reason"]
    assert not set(expected) & still_running
    assert {blocked.uuid, elsewhere.uuid} <= still_running, "block rules and other storages exempt"
    if strategy == "Permissive":
        assert plain.uuid in still_running, "Permissive spares VMs not on the allow list"
        # ... and keeps the storage mounted for the VMs it spared.
        assert hung["remount"].startswith("keeping the mount"), hung["remount"]
        assert plain.uuid in hung["remount"] and os.path.ismount(jfs.mountpoint)
    # The fence started within the documented bound of the hang.
    best, worst = detection_bounds(FencerConfig("ps-jfs", "", HOST, 1, 3, 1, strategy))
    assert hung["fencedAt"] - hung_at <= worst + 1.0, (hung["fencedAt"] - hung_at, worst)
    # Once the storage answers, QEMU finishes exiting and libvirt agrees.
    running = await libvirt_settles(lambda names: not set(expected) & names)
    assert running & {vm.uuid for vm in vms} == {vm.uuid for vm in vms} - set(expected)
    assert hung["state"] == "Fenced" and hung["fencedVmUuids"] == expected
    assert len(latencies) > 20, "ping must keep answering while the storage hangs"

    connected = await mn.wait_report(STORAGE, lambda b: b["psStatus"] == "Connected", timeout=30)
    assert connected["psUuids"] == ["ps-jfs"]
    assert (await fencer_states(ha_agent))["ps-jfs"]["state"] == "Healthy"
    assert len(mn.reports_for(FENCER)) == 2, "one fence per outage"


@pytest.mark.guest
@pytest.mark.juicefs
async def test_rules_survive_an_agent_restart_and_still_decide_the_fence(
        make_agent, mn, lv, guest_image, workdir, jfs):
    config = {"ha_inventory_refresh": 1.0,
              "vm_path_roots": [workdir, guest_image.kernel.parent, jfs.base]}
    first = await connected_agent(make_agent, mn, **config)
    allowed = await boot_vm(first, mn, lv, guest_image, workdir, disk_dir=jfs.mountpoint)
    other = await boot_vm(first, mn, lv, guest_image, workdir, disk_dir=jfs.mountpoint)
    await add_rules(first, mn, allow=[allowed.uuid])
    await first.call_async(mn, "/ha/selffencer/setup", setup_body({"ps-r": jfs.mountpoint}))
    await first.client.close()  # the agent restarts; ZStack's agent would forget the rules here

    second = await make_agent(**config)
    rules = await second.call_async(mn, "/get/vm/fencer/rule/", {})
    assert rules["allowRules"] == {"hostStorageState": [allowed.uuid]}
    await wait_beats(second, "ps-r", count=1)
    jfs.hang()
    try:
        killed = await mn.wait_report(FENCER, lambda b: b["vmUuidsString"] != "Disconnected",
                                      timeout=40)
        still_running = running_guest_code([allowed, other])
    finally:
        jfs.resume()
    assert killed["vmUuidsString"] == allowed.uuid
    assert still_running == {other.uuid}


async def test_setup_replay_keeps_the_loop_and_changes_replace_it(make_agent, mn, workdir):
    agent = await connected_agent(make_agent, mn)
    # An NFS mount path that is a bare directory: every heartbeat fails ("not mounted").
    body = not_mounted_body("ps-a", workdir, maxAttempts=1000, interval=0.2)
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

    # ZStack's CancelSelfFencerCmd: hostUuid, mountPoints, psUuids.
    cancel = {"hostUuid": HOST, "psUuids": ["ps-x"], "mountPoints": [str(workdir)]}
    assert (await agent.call_async(mn, "/ha/selffencer/cancel", cancel))["success"]
    assert (await agent.call("/ha/selffencer/state"))["fencers"] == [] and replacement._task.done()


async def test_setup_of_a_path_that_is_not_a_directory_fails_and_starts_nothing(make_agent, mn, storages):
    agent = await connected_agent(make_agent, mn)
    good = storages("ps")
    reply = await agent.call_async(mn, "/ha/selffencer/setup",
                                   setup_body({"ps-1": good, "ps-2": Path("/proc/kvmagent-none")}))
    assert reply["success"] is False
    assert "mountPaths.1: the mount path[/proc/kvmagent-none] is not a directory" in reply["error"]
    assert (await agent.call("/ha/selffencer/state"))["fencers"] == []


async def test_empty_fencers_write_no_heartbeat(make_agent, mn, storages):
    """ZStack runs only the fencers named: with ``fencers: []`` nothing beats (ZU test_ha_nfs)."""
    agent = await connected_agent(make_agent, mn)
    storage = storages("ps")
    reply = await agent.call_async(mn, "/ha/selffencer/setup",
                                   {**setup_body({"ps-e": storage}), "fencers": []})
    assert reply["success"] is True
    await asyncio.sleep(2.5)
    assert not Path(heartbeat_path(str(storage), HOST)).exists()
    state = (await fencer_states(agent))["ps-e"]
    assert state["state"] == "Idle" and state["fencers"] == []


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
             "interval": 0.5, "times": 1, "storageCheckerTimeout": 0.5}  # ZStack's tests send times 1
    alive = await agent.call_async(mn, "/filesystem/check/vmstate", check)
    assert alive["result"] == {"ps-p": True} and alive["vmUuids"] == []

    await agent.call_async(mn, "/ha/selffencer/cancel", {"psUuids": ["ps-p"]})
    dead = await agent.call_async(mn, "/filesystem/check/vmstate", check)
    assert dead["result"] == {"ps-p": False} and "did not change" in dead["reason"]

    missing = await agent.call_async(mn, "/filesystem/check/vmstate", {**check, "targetHostUuid": "nobody"})
    assert missing == {"success": True, "error": None, "result": {"ps-p": False}, "vmUuids": [],
                       "reason": missing["reason"]} and "no heartbeat file" in missing["reason"]


@pytest.mark.juicefs
async def test_peer_check_on_hung_storage_is_bounded(make_agent, mn, jfs):
    agent = await make_agent()
    hb = Path(heartbeat_path(str(jfs.mountpoint), HOST))
    hb.parent.mkdir()
    hb.write_text('{"heartbeat_time": 1727247115.2071, "vm_uuids": null}')
    jfs.hang()
    try:
        t0 = time.monotonic()
        reply = await agent.call_async(mn, "/filesystem/check/vmstate", {
            "primaryStorageUuid": "ps", "targetHostUuid": HOST, "mountPath": str(jfs.mountpoint),
            "interval": 0.5, "times": 3, "storageCheckerTimeout": 1})
        elapsed = time.monotonic() - t0
    finally:
        jfs.resume()
    assert reply["result"] == {"ps": False} and "could not be read" in reply["reason"], reply
    assert elapsed < 10, "the check must be bounded by times x (interval + timeout)"


async def test_permissive_kills_nothing_when_it_cannot_tell_which_vms_have_ha(make_agent, mn, workdir):
    agent = await connected_agent(make_agent, mn, libvirt_uri="qemu:///system?socket=/nonexistent/sock")
    await agent.call_async(mn, "/ha/selffencer/setup", not_mounted_body("ps-u", workdir, interval=0.2))
    report = await mn.wait_report(FENCER, timeout=20)
    assert report["vmUuidsString"] == "Disconnected"
    deadline = time.monotonic() + 20
    while "cannot tell" not in ((await fencer_states(agent))["ps-u"]["fenceError"] or ""):
        assert time.monotonic() < deadline, await fencer_states(agent)
        await asyncio.sleep(0.2)
    await agent.ctx.outbox.drain(5)
    assert len(mn.reports_for(FENCER)) == 1, "ZStack sends no second report when nothing was killed"


async def test_an_unmounted_storage_fails_its_heartbeat_instead_of_writing_to_the_root_fs(
        make_agent, mn, storages):
    storage = storages("ps")
    agent = await beating_agent(make_agent, mn, storage, "ps-gone")
    subprocess.run(["umount", "-l", str(storage)], check=True, timeout=30)  # the NFS went away
    report = await mn.wait_report(STORAGE, lambda b: b["psStatus"] == "Disconnected", timeout=20)
    assert "than at its first heartbeat" in report["reason"]
    assert "the storage is not mounted" in report["reason"]
    assert not (storage / "zs-heartbeat").exists(), "nothing may be written to the bare mount point"
    state = (await fencer_states(agent))["ps-gone"]
    assert state["state"] == "Fenced" and "not mounted" in state["lastError"]


async def test_a_plain_directory_on_the_root_fs_beats_when_zstack_did_not_mount_it(make_agent, mn, workdir):
    """Local storage or a shared mount point whose directory sits on /: healthy, not fenced."""
    agent = await connected_agent(make_agent, mn)
    reply = await agent.call_async(mn, "/ha/selffencer/setup", setup_body({"ps-local": workdir}))
    assert reply["success"] is True
    state = await wait_beats(agent, "ps-local", count=3)
    assert state["state"] == "Healthy" and state["consecutiveFailures"] == 0
    assert (workdir / "zs-heartbeat" / f"heartbeat-file-kvm-host-{HOST}.hb").exists()
    assert mn.reports_for(FENCER) == [] and mn.reports_for(STORAGE) == []


async def test_an_unmounted_zstack_mount_on_a_separate_partition_fails_its_heartbeat(
        make_agent, mn, storages):
    """mountedByZStack (NFS) whose mount path's parent is a file system of its own (/opt on
    its own disk): once the storage is unmounted the path is a bare directory on that other
    file system, and must fail the heartbeat, not take it. Here the storage is a bind mount of
    a directory of the same file system as the parent, as only the mount table tells it is one."""
    partition = storages("opt")  # the separate partition
    export, mount_path = partition / "export", partition / "ps"
    export.mkdir()
    mount_path.mkdir()
    subprocess.run(["mount", "--bind", str(export), str(mount_path)], check=True, timeout=30)
    try:
        agent = await connected_agent(make_agent, mn)
        await agent.call_async(mn, "/ha/selffencer/setup", not_mounted_body("ps-nfs", mount_path))
        await wait_beats(agent, "ps-nfs", count=2)  # a bind mount of the same fs is a mount
        assert (export / "zs-heartbeat").is_dir()
        subprocess.run(["umount", "-l", str(mount_path)], check=True, timeout=30)  # NFS gone
        report = await mn.wait_report(STORAGE, lambda b: b["psStatus"] == "Disconnected", timeout=20)
        assert "is not a mount point: the storage is not mounted" in report["reason"]
        assert (await mn.wait_report(FENCER))["vmUuidsString"] == "Disconnected"
        assert not (mount_path / "zs-heartbeat").exists(), "nothing written to the bare directory"
        assert (await fencer_states(agent))["ps-nfs"]["state"] == "Fenced"
    finally:
        subprocess.run(["umount", "-l", str(mount_path)], capture_output=True, timeout=30)


async def test_the_device_of_a_storage_is_remembered_across_an_agent_restart(make_agent, mn, storages):
    """Unmounted while the agent was down: the restarted fencer still knows the device."""
    storage = storages("ps")
    first = await beating_agent(make_agent, mn, storage, "ps-r")
    await first.client.close()
    subprocess.run(["umount", "-l", str(storage)], check=True, timeout=30)
    await make_agent()
    report = await mn.wait_report(STORAGE, lambda b: b["psStatus"] == "Disconnected", timeout=20)
    assert "than at its first heartbeat" in report["reason"]


async def test_connected_is_reported_even_when_the_agent_restarted_during_the_outage(
        make_agent, mn, storages):
    storage = storages("ps")
    first = await beating_agent(make_agent, mn, storage, "ps-o")
    subprocess.run(["umount", "-l", str(storage)], check=True, timeout=30)
    await mn.wait_report("/kvm/reportstoragestatus", lambda b: b["psStatus"] == "Disconnected",
                         timeout=20)
    await first.client.close()
    decoy = storage.parent / "decoy"  # holds the device number the old mount had
    decoy.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "kvmagent-test", str(decoy)], check=True, timeout=30)
    try:
        # Mounted again, on another device: taken, as the fence is over and it is a mount point.
        subprocess.run(["mount", "-t", "tmpfs", "kvmagent-test", str(storage)], check=True, timeout=30)
        await make_agent()  # restores the fencer, which must remember the MN was told Disconnected
    finally:
        subprocess.run(["umount", "-l", str(decoy)], timeout=30)
    connected = await mn.wait_report("/kvm/reportstoragestatus",
                                     lambda b: b["psStatus"] == "Connected", timeout=20)
    assert connected["psUuids"] == ["ps-o"]
    assert len(mn.reports_for("/kvm/reportselffencer")) == 1, "fenced again after the restart"


def test_a_stale_pid_file_never_kills_another_process(tmp_path):
    """The fencer's libvirt-less kill only hits a QEMU whose command line names the domain."""
    name = uuidlib.uuid4().hex
    (tmp_path / f"{name}.pid").write_text(str(os.getpid()))
    assert qemu_process(name, pid_dir=tmp_path) is None


@pytest.mark.parametrize("mutate, fragment", [
    (lambda b: b.update(mountPaths=[]), "uuids (1) and mountPaths (0) must have the same length"),
    (lambda b: b.pop("mountPaths"), "field 'mountPaths'"),
    (lambda b: b.update(uuids=["a", "b"]), "must have the same length"),
    (lambda b: b.update(strategy=["Force"]), "field 'strategy'"),
    (lambda b: b.update(mountPaths=["relative"]), "field 'mountPaths.0'"),
    (lambda b: b.update(mountPaths=["/"]), "mountPaths.0: / is a system directory"),
    (lambda b: b.update(mountPaths=["/var/"]), "mountPaths.0: /var is a system directory"),
    (lambda b: b.update(interval=0), "field 'interval'"),
    (lambda b: b.update(urls=["a", "b"]), "urls (2) must be empty or as long as uuids"),
    (lambda b: b.update(urls=["-o exec"]), "urls.0"),
    (lambda b: b.update(mountOptions=["a b"]), "mountOptions.0"),
    (lambda b: b.update(fencers=["no such; fencer"]), "is not a fencer name"),
    (lambda b: b.update(uuids=["x/../y"]), "not a storage uuid"),
])
async def test_bad_setup_is_refused_and_starts_nothing(agent, mutate, fragment):
    body = setup_body({"ps": Path("/mnt/ps")})
    mutate(body)
    status, reply = await agent.post("/ha/selffencer/setup", body)
    assert status == 400 and fragment in reply["error"], reply
    assert agent.ctx.services["ha.fencers"].fencers == {}


async def test_a_storage_zstack_mounted_is_remounted_after_a_fence(make_agent, mn, workdir):
    """mountedByZStack: after the fence the agent mounts ``urls[i]`` with ``mountOptions[i]``
    on the mount path again (here a bind mount of a tmpfs stands in for the NFS export)."""
    export, mount_path = workdir / "export", workdir / "ps"
    export.mkdir()
    mount_path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "kvmagent-test", str(export)],
                   check=True, timeout=30)
    subprocess.run(["mount", "--bind", str(export), str(mount_path)], check=True, timeout=30)
    try:
        agent = await connected_agent(make_agent, mn)
        body = {**setup_body({"ps-m": mount_path}, "Force"), "urls": [str(export)],
                "mountedByZStack": [True], "mountOptions": ["bind"]}
        await agent.call_async(mn, "/ha/selffencer/setup", body)
        await wait_beats(agent, "ps-m", count=1)
        subprocess.run(["umount", "-l", str(mount_path)], check=True, timeout=30)  # NFS gone
        await mn.wait_report(FENCER, timeout=20)
        connected = await mn.wait_report(STORAGE, lambda b: b["psStatus"] == "Connected", timeout=30)
        assert connected["psUuids"] == ["ps-m"]
        assert os.path.ismount(mount_path)
        state = (await fencer_states(agent))["ps-m"]
        assert state["state"] == "Healthy" and state["remount"].startswith("remounted")
    finally:
        for path in (mount_path, mount_path, export):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


async def test_a_storage_whose_users_are_unknown_is_not_unmounted_after_a_fence(make_agent, mn, workdir):
    """libvirt unreachable: nobody knows which VMs still run on the storage, so the fence must
    not ``umount -f``/``-l`` it under them (it stays mounted, read-only as it went)."""
    export, mount_path = workdir / "export", workdir / "ps"
    export.mkdir()
    mount_path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "kvmagent-test", str(export)],
                   check=True, timeout=30)
    subprocess.run(["mount", "--bind", str(export), str(mount_path)], check=True, timeout=30)
    try:
        agent = await connected_agent(make_agent, mn,
                                      libvirt_uri="qemu:///system?socket=/nonexistent/sock")
        body = {**setup_body({"ps-k": mount_path}, "Force", interval=0.2), "urls": [str(export)],
                "mountedByZStack": [True], "mountOptions": ["bind"]}
        await agent.call_async(mn, "/ha/selffencer/setup", body)
        # Still mounted but failing (read-only): the mount must stay for the VMs using it.
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount_path)], check=True, timeout=30)
        await mn.wait_report(FENCER, timeout=20)
        state = await wait_remount(agent, "ps-k")
        assert "which VMs use it is unknown" in state["remount"], state
        assert "cannot tell" in state["fenceError"]
        await asyncio.sleep(1)
        mount = mounttable.mount_at(mount_path)
        assert mount is not None and mount.readonly, "the storage was unmounted under its VMs"
    finally:
        for path in (mount_path, mount_path, export):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


async def test_a_fence_unmounts_only_what_was_mounted_from_the_url(make_agent, mn, storages):
    """Force, mountedByZStack, but another file system is mounted at the path (not from
    ``urls[0]``): it is not unmounted after the fence."""
    storage = storages("ps")  # tmpfs "kvmagent-test", not 10.0.0.5:/nfs
    agent = await connected_agent(make_agent, mn)
    body = {**setup_body({"ps-o": storage}, "Force", interval=0.2), "urls": ["10.0.0.5:/nfs"],
            "mountedByZStack": [True], "mountOptions": [""]}
    await agent.call_async(mn, "/ha/selffencer/setup", body)
    subprocess.run(["mount", "-o", "remount,ro", str(storage)], check=True, timeout=30)
    await mn.wait_report(FENCER, timeout=20)
    state = await wait_remount(agent, "ps-o")
    assert state["remount"].startswith(f"not unmounting {storage}: kvmagent-test is mounted"), state
    mount = mounttable.mount_at(storage)
    assert mount is not None and mount.source == "kvmagent-test"


async def test_a_fence_before_any_mn_is_known_is_reported_once_one_is(make_agent, mn, workdir):
    agent = await make_agent()  # never connected: no sendCommandUrl yet
    await agent.call_async(mn, "/ha/selffencer/setup", not_mounted_body("ps-q", workdir, interval=0.2))
    deadline = time.monotonic() + 20
    while (await fencer_states(agent))["ps-q"]["state"] != "Fenced":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    assert mn.reports_for(FENCER) == []
    await agent.call("/host/connect", {"hostUuid": HOST, "sendCommandUrl": mn.send_command_url})
    report = await mn.wait_report(FENCER)
    assert report["vmUuidsString"] == "Disconnected" and report["hostUuid"] == HOST
    assert report["psUuids"] == ["ps-q"]


async def test_fencer_rules_persist_and_follow_zstacks_own_test(make_agent, mn):
    """ZU kvmagent/test/nfs_testsuit/test_without_ha_for_businessnic.py, plus a restart."""
    agent = await connected_agent(make_agent, mn)
    rules = {"hostUuid": HOST,
             "allowRules": [{"fencerName": "hostStorageState", "vmUuids": ["v1", "v2"]}],
             "blockRules": [{"fencerName": "hostBusinessNic", "vmUuids": ["v3", "v4"]}]}
    assert (await agent.call_async(mn, "/add/vm/fencer/rule/to/host", rules))["success"]
    got = await agent.call_async(mn, "/get/vm/fencer/rule/", {})
    assert got["allowRules"] == {"hostStorageState": ["v1", "v2"]}
    assert got["blockRules"] == {"hostBusinessNic": ["v3", "v4"]}
    await agent.call_async(mn, "/remove/vm/fencer/rule/from/host", {
        "hostUuid": HOST, "allowRules": [{"fencerName": "hostStorageState", "vmUuids": ["v1"]}],
        "blockRules": [{"fencerName": "hostBusinessNic", "vmUuids": ["v4"]}]})
    await agent.client.close()
    restarted = await make_agent()
    got = await restarted.call_async(mn, "/get/vm/fencer/rule/", {})
    assert got["allowRules"] == {"hostStorageState": ["v2"]}
    assert got["blockRules"] == {"hostBusinessNic": ["v3"]}
    other = await restarted.call_async(mn, "/add/vm/fencer/rule/to/host", {**rules, "hostUuid": "elsewhere"})
    assert other["success"] is False and "not this host" in other["error"]
    assert (await restarted.call_async(mn, "/get/vm/fencer/rule/", {}))["allowRules"] == \
        {"hostStorageState": ["v2"]}


def test_kill_set_table():
    """The README's kill-set table, row by row."""
    class Memory:
        def save(self, *_):
            pass

    rules = FencerRules(Memory())
    rules.add({"hostStorageState": ["allowed", "allowed-blocked"]},
              {"hostStorageState": ["allowed-blocked", "ha-blocked"], "hostBusinessNic": ["ha"]})
    vms = [VmRecord(u, ("/ps/d",), u.startswith("ha"), True)
           for u in ("allowed", "allowed-blocked", "ha", "ha-blocked", "plain")]
    kill = {s: sorted(v.uuid for v in storage_kill_set(s, vms, rules)) for s in ("Permissive", "Force")}
    assert kill == {"Permissive": ["allowed", "ha"], "Force": ["allowed", "ha", "plain"]}


async def test_a_fence_report_waiting_for_an_mn_survives_an_agent_restart(make_agent, mn, workdir):
    first = await make_agent()  # never connected
    await first.call_async(mn, "/ha/selffencer/setup", not_mounted_body("ps-w", workdir, interval=0.2))
    deadline = time.monotonic() + 20
    while (await fencer_states(first))["ps-w"]["state"] != "Fenced":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    await first.call_async(mn, "/ha/selffencer/cancel", {"psUuids": ["ps-w"]})
    await first.client.close()

    second = await make_agent()
    await second.call("/host/connect", {"hostUuid": HOST, "sendCommandUrl": mn.send_command_url})
    report = await mn.wait_report(FENCER)
    assert (report["vmUuidsString"], report["psUuids"], report["hostUuid"]) == \
        ("Disconnected", ["ps-w"], HOST)
    await second.ctx.outbox.drain(5)
    assert len(mn.reports_for(FENCER)) == 1
