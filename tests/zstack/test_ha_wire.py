"""Compatibility fixtures for every HA path, each body as the MN's Java class serializes it
(Gson: null objects left out, primitives always present) and each assertion on the fields the
MN reads. Sources (premium classes are published without a repository name; see
../shared/ZSTACK-WIRE.md section 4 and /tmp/research/ha.md):
- SetupSelfFencerCmd, CancelSelfFencerCmd: premium ``org.zstack.ha.SelfFencerKvmBackend``;
- Add/RemoveVmFencerRuleToHostCmd, VmRuleAttachFencer: premium ``org.zstack.ha.HaManagerImpl``,
  ``org.zstack.ha.VmRuleAttachFencer``; get: ZU ``ha_plugin.get_fencer_rule``;
- CheckFileSystemVmStateCmd/Rsp: premium ``AbstractFileSystemHostHeartbeatChecker``
  (``doFileSystemVmStatusCheck`` reads ``result.values()`` and ``vmUuids``);
- ScanCmd/ScanRsp: premium ``org.zstack.ha.HaKvmHostSiblingChecker`` (reads ``result``);
- ReportSelfFencerCmd, ReportPsStatusCmd: ZS plugin/kvm/src/main/java/org/zstack/kvm/
  KVMAgentCommands.java (the MN's handlers in ``HaManagerImpl.start``);
- UpdateVmEnableHaLiveCmd, ReconcileVmEnableHaOnHostCmd: seed 000 (classes only).
"""
from __future__ import annotations

import subprocess
import uuid as uuidlib

import pytest

from ..scale import TEST_URI, clear, populate
from .wire import mn_async

HOST = "9a1c0e7e2f5e4c1a8d7b6c5a4f3e2d1c"
PS = "2b7e5a0c1d9f4e8a9c3b6d2e1f0a7b4c"
VM = "d0c8a1f2e3b44c5d9e6f7a8b9c0d1e2f"


@pytest.fixture
def empty_netns():
    """The hostBusinessNic fencer these bodies ask for watches links here, never the host's
    (whose real VMs it could otherwise kill)."""
    name = f"kvtest-hawire-{uuidlib.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    yield name
    subprocess.run(["ip", "netns", "del", name], timeout=10)


@pytest.fixture
async def connected(make_agent, mn, empty_netns):
    agent = await make_agent(ha_netns=empty_netns)
    await agent.call("/host/connect", {"hostUuid": HOST, "sendCommandUrl": mn.send_command_url})
    yield agent
    await agent.call_async(mn, "/ha/selffencer/cancel", {"hostUuid": HOST, "psUuids": [PS]})


@pytest.fixture
def nfs_like(workdir):
    """A mounted file system where the MN's NFS mount path would be."""
    path = workdir / f"prim-{PS}"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "kvmagent-wire", str(path)],
                   check=True, timeout=30)
    yield path
    subprocess.run(["umount", "-l", str(path)], timeout=30)


def setup_cmd(mount: str) -> dict:
    """SetupSelfFencerCmd from SelfFencerKvmBackend.setupForFileSystemPrimaryStorage, with
    the UI defaults of ha.host.selfFencer.interval / maxAttempts / storageChecker.timeout."""
    return {"hostUuid": HOST, "interval": 5, "maxAttempts": 6, "mountPaths": [mount],
            "uuids": [PS], "urls": ["10.0.0.5:/nfs_root"], "mountedByZStack": [True],
            "mountOptions": [""], "storageCheckerTimeout": 5, "strategy": "Permissive",
            "fencers": ["hostStorageState", "hostBusinessNic"], "kvmHostAddons": {}}


async def test_selffencer_setup_and_cancel(connected, mn, nfs_like):
    reply = await mn_async(connected, mn, "/ha/selffencer/setup", setup_cmd(f"{nfs_like}/"), HOST)
    assert reply["success"] is True  # the MN's SetupSelfFencerRsp reads success/error only
    state = (await connected.call("/ha/selffencer/state"))["fencers"][0]
    assert state["fencers"] == ["hostStorageState", "hostBusinessNic"] and state["mountedByZStack"]
    cancel = {"hostUuid": HOST, "mountPoints": [f"{nfs_like}/"], "psUuids": []}
    assert (await mn_async(connected, mn, "/ha/selffencer/cancel", cancel, HOST))["success"] is True
    assert (await connected.call("/ha/selffencer/state"))["fencers"] == []


async def test_selffencer_setup_with_empty_lists_sets_up_nothing(connected, mn):
    """The lists are initialised ``new ArrayList`` in the MN: present, possibly empty."""
    body = {**setup_cmd("/x"), "mountPaths": [], "uuids": [], "urls": [], "mountedByZStack": [],
            "mountOptions": []}
    assert (await mn_async(connected, mn, "/ha/selffencer/setup", body, HOST))["success"] is True
    assert (await connected.call("/ha/selffencer/state"))["fencers"] == []


async def test_selffencer_setup_on_a_missing_path_fails_like_zstack(connected, mn):
    reply = await mn_async(connected, mn, "/ha/selffencer/setup", setup_cmd("/opt/zstack/nowhere"))
    assert reply["success"] is False
    assert "the mount path[/opt/zstack/nowhere] is not a directory" in reply["error"]


async def test_fencer_rules_add_get_remove(connected, mn):
    """The body the VPC router manager's generateAddVmFencerRuleToHostMsg builds."""
    rules = {"hostUuid": HOST,
             "allowRules": [{"fencerName": "hostStorageState", "vmUuids": [VM]}],
             "blockRules": [{"fencerName": "hostBusinessNic", "vmUuids": [VM]}]}
    assert (await mn_async(connected, mn, "/add/vm/fencer/rule/to/host", rules, HOST))["success"]
    got = await mn_async(connected, mn, "/get/vm/fencer/rule/", {})
    assert (got["success"], got["allowRules"], got["blockRules"]) == \
        (True, {"hostStorageState": [VM]}, {"hostBusinessNic": [VM]})
    assert (await mn_async(connected, mn, "/remove/vm/fencer/rule/from/host", rules, HOST))["success"]
    got = await mn_async(connected, mn, "/get/vm/fencer/rule", {})  # with or without the slash
    assert got["allowRules"] == {"hostStorageState": []} and got["blockRules"] == {"hostBusinessNic": []}


async def test_check_vmstate_reads_a_zstack_heartbeat(connected, mn, nfs_like):
    hb = nfs_like / "zs-heartbeat" / f"heartbeat-file-kvm-host-{HOST}.hb"
    hb.parent.mkdir()
    hb.write_text('{"heartbeat_time": 1727247115.2071, "vm_uuids": null}')  # a stopped host
    cmd = {"interval": 1, "times": 1, "primaryStorageUuid": PS, "targetHostUuid": HOST,
           "storageCheckerTimeout": 1, "mountPath": str(nfs_like)}
    reply = await mn_async(connected, mn, "/filesystem/check/vmstate", cmd, HOST)
    assert reply["success"] is True and reply["result"] == {PS: False} and reply["vmUuids"] == []
    missing = await mn_async(connected, mn, "/filesystem/check/vmstate",
                             {**cmd, "targetHostUuid": VM}, HOST)
    assert missing["result"] == {PS: False}  # no file: ZStack answers false at once


async def test_scanhost(connected, mn):
    cmd = {"hostUuid": VM, "slibingHostUuid": HOST, "ip": "127.0.0.1", "startPort": 1,
           "endPort": 65535, "interval": 1, "times": 5, "successInterval": 1, "successTimes": 1}
    reply = await mn_async(connected, mn, "/ha/scanhost", cmd, HOST)
    assert reply["success"] is True and reply["result"] == "success"


async def test_reports_have_zstacks_shape(connected, mn, workdir):
    """A fence on a storage that is not mounted (the NFS mount path is a bare directory):
    ReportSelfFencerCmd and ReportPsStatusCmd. No url, so the test mounts nothing after it."""
    await mn_async(connected, mn, "/ha/selffencer/setup", {
        **setup_cmd(str(workdir)), "interval": 1, "maxAttempts": 1, "storageCheckerTimeout": 1,
        "urls": [""], "fencers": ["hostStorageState"]})
    fencer = await mn.wait_report("/kvm/reportselffencer")
    assert set(fencer) == {"hostUuid", "psUuids", "vmUuidsString", "reason", "fencerFailure"}
    assert (fencer["hostUuid"], fencer["psUuids"], fencer["vmUuidsString"], fencer["fencerFailure"]) \
        == (HOST, [PS], "Disconnected", True)
    status = await mn.wait_report("/kvm/reportstoragestatus")
    assert set(status) == {"hostUuid", "psUuids", "psStatus", "reason"}
    assert (status["psUuids"], status["psStatus"]) == ([PS], "Disconnected")  # valueOf() parses it


@pytest.fixture
def test_vms():
    conn, uuids = populate(2)
    yield uuids
    clear(conn, uuids)


async def test_enable_ha_commands_refuse_another_hosts_uuid(make_agent, mn, test_vms):
    agent = await make_agent(libvirt_uri=TEST_URI)
    await agent.call("/host/connect", {"hostUuid": HOST, "sendCommandUrl": mn.send_command_url})
    misrouted = {"hostUuid": VM, "haEnabledVmUuids": []}
    refused = await mn_async(agent, mn, "/host/vm/reconcileEnableHa/live", misrouted, VM)
    assert refused["success"] is False and "is not this host" in refused["error"]
    update = {"hostUuid": VM, "vmInstanceUuid": test_vms[0], "enableHa": True}
    refused = await mn_async(agent, mn, "/host/vm/updateEnableHa/live", update, VM)
    assert refused["success"] is False and "is not this host" in refused["error"]
    listed = await agent.call("/host/vm/enableHa/list", {"vmUuids": test_vms})
    assert listed["enableHa"] == dict.fromkeys(test_vms, False), "nothing may have changed"

    ours = await mn_async(agent, mn, "/host/vm/reconcileEnableHa/live",
                          {"hostUuid": HOST, "haEnabledVmUuids": [test_vms[1]]}, HOST)
    assert ours["success"] is True and ours["enabled"] == [test_vms[1]]


async def test_commands_for_another_host_change_nothing(connected, mn, nfs_like):
    other = {**setup_cmd(str(nfs_like)), "hostUuid": VM}
    reply = await mn_async(connected, mn, "/ha/selffencer/setup", other, VM)
    assert reply["success"] is False and "is not this host" in reply["error"]
    assert (await connected.call("/ha/selffencer/state"))["fencers"] == []
    await mn_async(connected, mn, "/ha/selffencer/setup", setup_cmd(str(nfs_like)), HOST)
    cancel = {"hostUuid": VM, "mountPoints": [], "psUuids": [PS]}
    refused = await mn_async(connected, mn, "/ha/selffencer/cancel", cancel, VM)
    assert refused["success"] is False
    assert [f["psUuid"] for f in (await connected.call("/ha/selffencer/state"))["fencers"]] == [PS]
    await mn_async(connected, mn, "/ha/selffencer/cancel",
                   {"hostUuid": HOST, "mountPoints": [], "psUuids": [PS]}, HOST)
    assert (await connected.call("/ha/selffencer/state"))["fencers"] == []


@pytest.mark.parametrize("strategy, runs", [
    ("Permissive", "Permissive"), ("Force", "Force"), ("force", "Force"), (None, "Force"),
    ("absent", "Force")])
async def test_strategy_is_read_as_zstacks_agent_reads_it(connected, mn, nfs_like, strategy, runs):
    """ZU's agent: anything but "Permissive" is Force, a null (Gson leaves it out) too."""
    body = {**setup_cmd(str(nfs_like)), "strategy": strategy, "fencers": ["hostStorageState"]}
    if strategy == "absent":
        del body["strategy"]
    reply = await mn_async(connected, mn, "/ha/selffencer/setup", body, HOST)
    assert reply["success"] is True, reply
    assert (await connected.call("/ha/selffencer/state"))["fencers"][0]["strategy"] == runs


async def test_check_vmstate_with_the_timeout_the_mn_fills_from_success_times(connected, mn, nfs_like):
    """The MN puts successTimes (an int, may be 0) in storageCheckerTimeout: not a 400, which the
    MN would read as "not stable" for ever; and a large times is accepted too."""
    cmd = {"interval": 0.2, "times": 1, "primaryStorageUuid": PS, "targetHostUuid": VM,
           "storageCheckerTimeout": 0, "mountPath": str(nfs_like)}
    reply = await mn_async(connected, mn, "/filesystem/check/vmstate", cmd, HOST)
    assert reply["success"] is True and reply["result"] == {PS: False}, reply
    status, reply = await connected.post("/filesystem/check/vmstate", {**cmd, "times": 1000})
    assert status == 200, reply
