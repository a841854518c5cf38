"""VM lifecycle through the agent on real libvirtd with a real tiny guest (TCG)."""
from __future__ import annotations

import uuid as uuidlib

import libvirt
import pytest

from kvmagent.vm.config import HA_NAMESPACE
from kvmagent.vm.service import read_ha_flag

from .guest.build import BOOT_MARKER
from .vmkit import boot_vm, start_body

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]


@pytest.fixture
async def vm_agent(make_agent, mn, workdir, guest_image):
    agent = await make_agent(vm_path_roots=[workdir, guest_image.kernel.parent],
                             vm_state_report_debounce=1.0)
    await agent.call("/host/connect", {"hostUuid": "host-1", "sendCommandUrl": mn.send_command_url})
    return agent


def domain(conn, uuid):
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError:
        return None


async def test_start_boots_the_guest_and_a_second_start_makes_no_second_domain(
        vm_agent, mn, lv, guest_image, workdir):
    vm = await boot_vm(vm_agent, mn, lv, guest_image, workdir, enable_ha=True)
    assert vm.reply["state"] == "Running" and vm.reply["vmInstanceUuid"] == vm.uuid
    conn = lv[0]
    dom = domain(conn, vm.uuid)
    assert dom.isActive() and dom.name() == vm.uuid
    xml = dom.XMLDesc()
    assert "<acpi/>" in xml and "type='qemu'" in xml
    assert read_ha_flag(dom) is True

    again = await vm_agent.call_async(mn, "/vm/start", start_body(guest_image, workdir, uuid=vm.uuid))
    assert again["success"] is True and again["state"] == "Running"
    assert [d.name() for d in conn.listAllDomains() if d.name() == vm.uuid] == [vm.uuid]
    assert vm.console.count(BOOT_MARKER) == 1, "the running guest must not have been restarted"


async def test_graceful_stop_shuts_the_guest_down_through_acpi(vm_agent, mn, lv, guest_image, workdir):
    vm = await boot_vm(vm_agent, mn, lv, guest_image, workdir)
    reply = await vm_agent.call_async(mn, "/vm/stop", {"uuid": vm.uuid, "type": "grace", "timeout": 60})
    assert reply == {"success": True, "error": None}
    assert "KVMAGENT-GUEST-POWEROFF" in vm.console.text(), "guest did not see the ACPI power button"
    assert domain(lv[0], vm.uuid) is None
    states = await vm_agent.call("/vm/vmstate", {"vmUuids": [vm.uuid]})
    assert states["states"] == {vm.uuid: "Shutdown"}


async def test_force_stop_destroy_and_idempotence(vm_agent, mn, lv, guest_image, workdir):
    vm = await boot_vm(vm_agent, mn, lv, guest_image, workdir)
    assert (await vm_agent.call_async(mn, "/vm/stop", {"uuid": vm.uuid, "type": "force"}))["success"]
    assert "KVMAGENT-GUEST-POWEROFF" not in vm.console.text()
    assert domain(lv[0], vm.uuid) is None
    # Stop and destroy of a VM that is not there succeed: the MN retries.
    assert (await vm_agent.call_async(mn, "/vm/stop", {"uuid": vm.uuid, "type": "cold"}))["success"]
    assert (await vm_agent.call_async(mn, "/vm/destroy", {"uuid": vm.uuid}))["success"]


async def test_reboot_restarts_the_guest(vm_agent, mn, lv, guest_image, workdir):
    vm = await boot_vm(vm_agent, mn, lv, guest_image, workdir)
    reply = await vm_agent.call_async(mn, "/vm/reboot", {"uuid": vm.uuid})
    assert reply["success"] is True
    await vm.console.wait_for(BOOT_MARKER, occurrences=2)
    assert domain(lv[0], vm.uuid).isActive()


async def test_pause_resume_and_state_sync(vm_agent, mn, lv, guest_image, workdir):
    vm = await boot_vm(vm_agent, mn, lv, guest_image, workdir)
    assert (await vm_agent.call_async(mn, "/vm/pause", {"uuid": vm.uuid}))["state"] == "Paused"
    assert domain(lv[0], vm.uuid).state()[0] == libvirt.VIR_DOMAIN_PAUSED
    sync = await vm_agent.call_async(mn, "/vm/vmsync", {})
    assert sync["states"][vm.uuid] == "Paused" and vm.uuid not in sync["vmInShutdowns"]
    assert (await vm_agent.call_async(mn, "/vm/resume", {"uuid": vm.uuid}))["state"] == "Running"
    beats = vm.console.count("KVMAGENT-GUEST-ALIVE")
    await vm.console.wait_for("KVMAGENT-GUEST-ALIVE", occurrences=beats + 1, timeout=30)
    missing = uuidlib.uuid4().hex
    states = await vm_agent.call("/vm/vmstate", {"vmUuids": [vm.uuid, missing]})
    assert states["states"] == {vm.uuid: "Running", missing: "Shutdown"}


async def test_changes_made_outside_the_agent_are_reported_and_reboots_are_not(
        vm_agent, mn, lv, guest_image, workdir):
    vm = await boot_vm(vm_agent, mn, lv, guest_image, workdir)
    dom = domain(lv[0], vm.uuid)
    dom.suspend()
    await mn.wait_report("/kvm/reportvmstate", lambda b: b["vmUuid"] == vm.uuid and b["vmState"] == "Paused")
    dom.resume()
    await mn.wait_report("/kvm/reportvmstate", lambda b: b["vmUuid"] == vm.uuid and b["vmState"] == "Running")
    dom.reboot(0)
    await vm.console.wait_for(BOOT_MARKER, occurrences=2)
    dom.destroy()  # e.g. the qemu process was killed
    stopped = await mn.wait_report("/kvm/reportvmstate",
                                   lambda b: b["vmUuid"] == vm.uuid and b["vmState"] == "Shutdown")
    assert stopped == {"hostUuid": "host-1", "vmUuid": vm.uuid, "vmState": "Shutdown"}
    states = [b["vmState"] for b in mn.reports_for("/kvm/reportvmstate") if b["vmUuid"] == vm.uuid]
    assert states == ["Paused", "Running", "Shutdown"], "the reboot must not be reported as a stop"


async def test_enable_ha_update_reconcile_and_restart(make_agent, vm_agent, mn, lv, guest_image, workdir):
    a = await boot_vm(vm_agent, mn, lv, guest_image, workdir, enable_ha=True)
    b = await boot_vm(vm_agent, mn, lv, guest_image, workdir, enable_ha=False)
    reply = await vm_agent.call_async(mn, "/host/vm/updateEnableHa/live",
                                      {"vmInstanceUuid": b.uuid, "enableHa": True})
    assert reply == {"success": True, "error": None, "vmInstanceUuid": b.uuid, "enableHa": True}
    ghost = uuidlib.uuid4().hex
    reply = await vm_agent.call_async(mn, "/host/vm/reconcileEnableHa/live",
                                      {"hostUuid": "host-1", "haEnabledVmUuids": [b.uuid, ghost]})
    ours = {a.uuid, b.uuid}  # other tests' VMs may share this libvirtd
    assert (set(reply["enabled"]) & ours, set(reply["disabled"]) & ours, reply["missing"]) == \
        (set(), {a.uuid}, [ghost])

    # A new agent process on the same host reads the flags back from libvirt.
    await vm_agent.client.close()
    restarted = await make_agent(vm_path_roots=[workdir, guest_image.kernel.parent])
    listed = await restarted.call("/host/vm/enableHa/list", {"vmUuids": [a.uuid, b.uuid, ghost]})
    assert listed["enableHa"] == {a.uuid: False, b.uuid: True}
    conn = lv[0]
    assert read_ha_flag(domain(conn, b.uuid)) is True
    inactive = domain(conn, b.uuid).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, HA_NAMESPACE,
                                             libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert 'enableHa="true"' in inactive, "the flag must be in the persistent definition too"


async def test_ha_and_ops_on_missing_vm_give_clear_errors(vm_agent, mn):
    ghost = uuidlib.uuid4().hex
    reply = await vm_agent.call_async(mn, "/host/vm/updateEnableHa/live",
                                      {"vmInstanceUuid": ghost, "enableHa": True})
    assert reply == {"success": False, "error": f"VM {ghost} does not exist on this host"}
    for path in ("/vm/pause", "/vm/resume", "/vm/reboot"):
        reply = await vm_agent.call(path, {"uuid": ghost})
        assert reply["error"] == f"VM {ghost} does not exist on this host"


@pytest.mark.parametrize("mutate, status, fragment", [
    (lambda b: b.update(vmInstanceUuid="not-a-uuid"), 400, "field 'vmInstanceUuid'"),
    (lambda b: b.update(cpuNum=0), 400, "field 'cpuNum'"),
    (lambda b: b["rootVolume"].update(installPath="relative/disk"), 400, "field 'rootVolume.installPath'"),
    (lambda b: b["rootVolume"].update(installPath="/tmp/../etc/passwd"), 400, "normalized"),
    (lambda b: b.update(nics=[{"mac": "zz", "bridgeName": "br0"}]), 400, "field 'nics.0.mac'"),
    (lambda b: b.update(nics=[{"mac": "52:54:00:12:34:56", "bridgeName": "br0'/><x"}]), 400,
     "field 'nics.0.bridgeName'"),
    (lambda b: b.update(memoryBacking="shared"), 400, "field 'memoryBacking'"),
    (lambda b: b["rootVolume"].update(installPath="/etc/passwd"), 200, "outside the allowed roots"),
    (lambda b: b["bootKernel"].update(kernel=b["bootKernel"]["kernel"] + ".missing"), 200, "does not exist"),
    (lambda b: b.update(nics=[{"mac": "52:54:00:12:34:56", "bridgeName": "nosuchbr0"}]), 200,
     "bridge nosuchbr0 does not exist"),
])
async def test_bad_start_requests_change_nothing(vm_agent, lv, guest_image, workdir,
                                                mutate, status, fragment):
    body = start_body(guest_image, workdir)
    mutate(body)
    got_status, reply = await vm_agent.post("/vm/start", body)
    assert (got_status, reply["success"]) == (status, False), reply
    assert fragment in reply["error"]
    assert body["vmInstanceUuid"] not in [d.name() for d in lv[0].listAllDomains()]


async def test_symlink_out_of_the_roots_is_refused(vm_agent, lv, guest_image, workdir):
    body = start_body(guest_image, workdir)
    link = workdir / "escape.raw"
    link.symlink_to("/etc/shadow")
    body["rootVolume"]["installPath"] = str(link)
    reply = await vm_agent.call("/vm/start", body)
    assert reply["success"] is False
    assert "resolves to /etc/shadow, outside the allowed roots" in reply["error"]


# -- StartVmCmd -> domain XML, field by field (unit tests: a stand-in for the path checks) ---
class PathsAsGiven:
    """VmService's path and bridge checks, accepting everything (the real ones are tested
    above and in tests/zstack/test_vm_wire.py)."""

    def check_path(self, path, what, must_exist=True):
        return path

    def check_block(self, path, what):
        return path

    def check_bridge(self, bridge):
        pass


def rendered(**fields):
    import xml.etree.ElementTree as ET

    from kvmagent.vm.build import build_domain
    from plugins.vm import StartVmCmd

    body = {"vmInstanceUuid": "0b42630f37d8417480eced62ad89719f", "cpuNum": 2,
            "memory": 2**30, "rootVolume": {"installPath": "/zstack_ps/r.qcow2"}, **fields}
    cmd = StartVmCmd.model_validate(body)
    return ET.fromstring(build_domain(PathsAsGiven(), cmd, "kvm", "0.0.0.0", "/tmp/c").to_xml())


@pytest.mark.parametrize("fields, hugepages, access", [
    ({}, False, None),
    ({"MemAccess": "shared"}, False, "shared"),
    ({"useHugePage": True, "MemAccess": "private"}, True, None),
    ({"useHugePage": True, "MemAccess": "shared"}, True, "shared"),
])
def test_use_huge_page_and_mem_access(fields, hugepages, access):
    backing = rendered(**fields).find("memoryBacking")
    if not hugepages and access is None:
        assert backing is None
        return
    assert (backing.find("hugepages") is not None) == hugepages
    assert (backing.find("access").get("mode") if backing.find("access") is not None else None) == access


def test_use_numa_leaves_room_for_cpu_hotplug():
    root = rendered(useNuma=True, maxVcpuNum=8)
    assert (root.find("vcpu").text, root.find("vcpu").get("current")) == ("8", "2")


def test_q35_cdroms_sata_and_volume_buses():
    root = rendered(machineType="q35", cdRoms=[{"isEmpty": True, "deviceId": 0}],
                    dataVolumes=[{"installPath": "/zstack_ps/d1.qcow2", "useVirtio": False,
                                  "deviceId": 1, "wwn": "0x000fb964dbc7a10a"},
                                 {"installPath": "/zstack_ps/d2.qcow2", "useVirtioSCSI": True,
                                  "deviceId": 2}],
                    bootDev=["cdrom", "hd"], nestedVirtualization="host-passthrough")
    targets = [(d.get("device"), d.find("target").get("dev"), d.find("target").get("bus"))
               for d in root.findall("devices/disk")]
    assert targets == [("disk", "vda", "virtio"), ("disk", "sda", "sata"), ("disk", "sdb", "scsi"),
                       ("cdrom", "sdc", "sata")]
    assert root.find("devices/disk[2]/wwn").text == "0x000fb964dbc7a10a"
    assert root.find("devices/controller[@type='scsi']").get("model") == "virtio-scsi"
    assert [b.get("dev") for b in root.findall("os/boot")] == ["cdrom", "hd"]
    assert root.find("cpu").get("mode") == "host-passthrough"


def test_a_disabled_nic_has_its_link_down_and_queues():
    root = rendered(nics=[{"mac": "fa:62:4a:61:6c:00", "bridgeName": "br_eth0", "state": "disable",
                           "nicInternalName": "vnic1.0", "vHostAddOn": {"queueNum": 4}}])
    assert root.find("devices/interface/link").get("state") == "down"
    assert root.find("devices/interface/driver").get("queues") == "4"


@pytest.mark.parametrize("fields, message", [
    ({"bootMode": "UEFI_WITH_CSM"}, "bootMode 'UEFI_WITH_CSM' is not supported"),
    ({"bootMode": "UEFI", "secureBoot": True}, "secure boot needs machineType q35"),
    ({"nics": [{"mac": "fa:62:4a:61:6c:00", "type": "VF"}]}, "NIC type 'VF' is not supported"),
    ({"socketNum": 1, "cpuOnSocket": 1}, "must equal cpuNum (2)"),
    ({"cdRoms": [{"path": "ceph://pool/iso"}]}, "only ISO files on a file system"),
])
def test_what_this_agent_cannot_build_fails_clearly(fields, message):
    from kvmagent.core.errors import AgentError

    with pytest.raises(AgentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rendered(**fields)


def test_block_volumes_by_wwn_as_zu_names_them():
    root = rendered(dataVolumes=[{"deviceType": "block", "installPath": "block://0x5000C500A1B2C3D4",
                                  "deviceId": 1}])
    disk = root.find("devices/disk[@type='block']")
    assert disk.find("source").get("dev") == "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"
    assert disk.find("driver").get("type") == "raw"
    assert root.find("devices/disk[@type='file']/driver").get("type") == "qcow2"
