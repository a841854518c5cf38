"""VM commands as the ZStack MN sends them (ZSTACK-WIRE.md §3), on real libvirtd with the tiny
guest. Bodies from ZS plugin/kvm/src/main/java/org/zstack/kvm/KVMAgentCommands.java
(StartVmCmd, StopVmCmd, DestroyVmCmd, RebootVmCmd, PauseVmCmd, ResumeVmCmd, VmSyncCmd,
CheckVmStateCmd), VolumeTO.java, as KVMHost.java (startVm, stopVm, ...) fills them; the
example values are the public MN's defaults (/tmp/research/host_vm.md).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from ..guest.build import BOOT_MARKER
from ..vmkit import Console, TinyVm, guest_run, wait_guest_agent
from .wire import mn_async

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

HOST = "6b5f8e2f0c6a4e1f9d3a2b7c8e9f0a1b"
ACCOUNT = "36c27e8ff05c4780bf6d2fa65700f22e"  # admin (AccountConstant.java)
NFS_BASE = Path("/opt/zstack/nfsprimarystorage")  # nfsPrimaryStorage.mount.base default


@pytest.fixture
def nfs_ps():
    """A primary storage mount dir as the MN's NFS backend names it: <base>/prim-<psUuid>,
    inside the agent's default vm_path_roots; QEMU must be able to traverse it."""
    NFS_BASE.mkdir(parents=True, exist_ok=True)
    for p in (Path("/opt/zstack"), NFS_BASE):
        os.chmod(p, 0o755)
    ps = Path(tempfile.mkdtemp(prefix="prim-", dir=NFS_BASE))
    os.chmod(ps, 0o755)
    yield ps
    shutil.rmtree(ps, ignore_errors=True)


@pytest.fixture
def bridge():
    """A Linux bridge like the MN's br_<physicalInterface> for an L2 NoVlan network."""
    name = f"br_zs{random.randrange(16**4):04x}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
    yield name
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])


@pytest.fixture
async def zs_agent(make_agent, mn, tmp_path):
    """Default vm_path_roots (the point: ZStack's own paths must be accepted as they are)."""
    console_dir = Path(tempfile.mkdtemp(prefix="kvmagent-console-"))
    agent = await make_agent(vm_console_log_dir=console_dir, vm_state_report_debounce=1.0)
    await agent.call("/host/connect", {"hostUuid": HOST, "sendCommandUrl": mn.send_command_url,
                                       "version": "5.2.1"})
    yield agent
    shutil.rmtree(console_dir, ignore_errors=True)


def ps_volume(ps: Path, kind: str = "rootVolumes") -> tuple[str, Path]:
    """PrimaryStoragePathMaker: <ps>/rootVolumes/acct-<acct>/vol-<uuid>/<uuid>.qcow2."""
    vol = uuidlib.uuid4().hex
    path = ps / kind / f"acct-{ACCOUNT}" / f"vol-{vol}" / f"{vol}.qcow2"
    path.parent.mkdir(parents=True)
    for p in [path.parent, *path.parent.parents]:
        if p == ps:
            break
        os.chmod(p, 0o755)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"], check=True)
    return vol, path


def start_vm_cmd(vm: str, internal_id: int, root: tuple[str, Path], bridge: str | None,
                 mac: str) -> dict:
    """StartVmCmd as KVMHost.startVm serializes it for a Linux VM with all global configs at
    their defaults (Gson: null objects left out, primitives always present)."""
    vol, path = root
    nics = []
    if bridge:
        nics.append({
            "mac": mac, "bridgeName": bridge, "physicalInterface": "eth0",
            "uuid": "8f9ef2e5061a4b28b5f79ff24ab0c0ce", "nicInternalName": f"vnic{internal_id}.0",
            "deviceId": 0, "useVirtio": True, "bootOrder": 0, "mtu": 1450, "driverType": "virtio",
            "vHostAddOn": {"queueNum": 1}, "type": "VNIC", "state": "enable",
            "l2NetworkUuid": "a1b2c3d4e5f60718293a4b5c6d7e8f90", "cleanTraffic": False,
            "isolated": False, "resourceUuid": "8f9ef2e5061a4b28b5f79ff24ab0c0ce"})
    return {
        "accountUuid": ACCOUNT, "vmInstanceUuid": vm, "vmInternalId": internal_id,
        "vmName": "vm-1", "imagePlatform": "Linux", "imageArchitecture": "x86_64",
        "memory": 256 * 2**20, "maxMemory": 16496934912, "reservedMemory": 0, "cpuNum": 1,
        "maxVcpuNum": 0, "cpuSpeed": 0, "socketNum": 1, "cpuOnSocket": 1, "threadsPerCore": 1,
        "bootDev": ["hd"],
        "rootVolume": {
            "installPath": str(path), "deviceId": 0, "deviceType": "file", "volumeUuid": vol,
            "useVirtio": True, "useVirtioSCSI": False, "shareable": False, "cacheMode": "none",
            "aioNative": False, "wwn": "0x000fb964dbc7a10a", "bootOrder": 1,
            "physicalBlockSize": 0, "format": "qcow2", "ioThreadId": 0, "controllerIndex": 0,
            "resourceUuid": vol},
        "memBalloon": {"resourceUuid": "4780bf6d2fa65700f22e36c27e8ff05c"},
        "cdRoms": [{"isEmpty": True, "bootOrder": 0, "deviceId": 0,
                    "resourceUuid": "5e4b2f0b9f1a4c7d8e6f3a2b1c0d9e8f"}],
        "dataVolumes": [], "cacheVolumes": [], "nics": nics, "timeout": 300,
        "addons": {"channel": {"socketPath": f"/var/lib/libvirt/qemu/{vm}",
                               "targetName": "org.qemu.guest_agent.0"}},
        "instanceOfferingOnlineChange": False, "nestedVirtualization": "none",
        "hostManagementIp": "10.0.0.21", "clock": "utc", "useNuma": False, "usbRedirect": False,
        "enableSecurityElement": False, "useBootMenu": True, "bootMenuSplashTimeout": 3000,
        "createPaused": False, "kvmHiddenState": False, "vmPortOff": False,
        "emulateHyperV": False, "hypervClock": True, "vendorId": "Microsoft Hv",
        "suspendToRam": False, "suspendToDisk": False, "additionalQmp": True,
        "isApplianceVm": False, "systemSerialNumber": "4f3e9046-776d-4095-8edd-909523ede46d",
        "bootMode": "Legacy", "secureBoot": False, "fromForeignHypervisor": False,
        "machineType": "pc", "useHugePage": False, "chassisAssetTag": "www.zstack.io",
        "priorityConfigStruct": {"vmUuid": vm, "cpuShares": 512, "oomScoreAdj": 0},
        "coloPrimary": False, "coloSecondary": False, "consoleLogToFile": True, "acpi": True,
        "x2apic": True, "cpuHypervisorFeature": True, "oemStrings": [], "useColoBinary": False,
        "consoleMode": "vnc", "videoType": "virtio", "soundType": "ich6",
        "spiceStreamingMode": "off", "VDIMonitorNumber": 1, "enableHa": False,
        "kvmHostAddons": {}}


def vm_nics(vm: str, mac: str) -> list[dict]:
    """VmInstanceInventory.getVmNics() as stop/destroy carry it (Java 8 Gson dates)."""
    return [{"uuid": "8f9ef2e5061a4b28b5f79ff24ab0c0ce", "vmInstanceUuid": vm, "ip": "10.0.0.100",
             "mac": mac, "hypervisorType": "KVM", "netmask": "255.255.255.0",
             "gateway": "10.0.0.1", "driverType": "virtio", "usedIps": [],
             "internalName": "vnic1.0", "deviceId": 0, "type": "VNIC", "state": "enable",
             "createDate": "Oct 17, 2024 5:43:35 AM", "lastOpDate": "Oct 17, 2024 5:43:35 AM"}]


async def test_a_zstack_vm_on_nfs_storage_through_its_life(zs_agent, mn, lv, guest_image, nfs_ps,
                                                           bridge):
    """Boot, sync, checkstate, capacity, pause/resume, reboot, grace stop, destroy.

    The MN sends no kernel and this test has no bootable disk image, so this one body keeps
    our ``bootKernel`` extension (kernel and initrd copied next to the volume, as a person
    would put them on the primary storage); everything else is the MN's body as it is."""
    vm, mac = uuidlib.uuid4().hex, f"fa:62:4a:61:6c:{random.randrange(256):02x}"
    internal_id = random.randrange(100000, 999999)
    body = start_vm_cmd(vm, internal_id, ps_volume(nfs_ps), bridge, mac)
    for name in ("kernel", "initrd"):
        shutil.copy(getattr(guest_image, name), nfs_ps / name)
    body["bootKernel"] = {"kernel": str(nfs_ps / "kernel"), "initrd": str(nfs_ps / "initrd"),
                          "cmdline": "console=ttyS0"}
    lv[1].append(vm)

    started = await mn_async(zs_agent, mn, "/vm/start", body, resource=vm, timeout=120)
    assert started["success"] is True, started
    console = Console(zs_agent.config.vm_console_log_dir / f"{vm}-vm-kernel.log")
    await console.wait_for(BOOT_MARKER)  # consoleLogToFile: the pty console's log
    # StartVmResponse: PCI address per MAC (saved as a tag; deviceAddress must not be null).
    [nic] = started["nicInfos"]
    assert nic["macAddress"] == mac and nic["deviceAddress"]["type"] == "pci"
    assert nic["deviceAddress"]["slot"].startswith("0x")
    assert started["virtualizerInfo"] == {"uuid": vm, "virtualizer": "qemu-kvm",
                                          "version": started["virtualizerInfo"]["version"]}
    disks = [d["resourceUuid"] for d in started["virtualDeviceInfoList"]]
    assert body["rootVolume"]["volumeUuid"] in disks

    # What the domain became, seen from libvirt: the MN's fields, each one.
    root = ET.fromstring(lv[0].lookupByUUIDString(vm).XMLDesc(0))
    tap = f"vnic{internal_id}.0"
    assert root.find("devices/interface/target").get("dev") == tap
    assert root.find("devices/interface/source").get("bridge") == bridge
    assert root.find("devices/interface/mtu").get("size") == "1450"
    assert Path(f"/sys/class/net/{tap}/master").resolve().name == bridge
    assert root.find("devices/disk[@device='cdrom']/target").get("bus") == "ide"
    assert root.find("devices/disk[@device='cdrom']/source") is None  # empty drive
    assert root.find("devices/disk[@device='disk']/driver").get("type") == "qcow2"
    assert root.find("devices/channel/source").get("path") == f"/var/lib/libvirt/qemu/{vm}"
    topology = root.find("cpu/topology")
    assert [topology.get(k) for k in ("sockets", "cores", "threads")] == ["1", "1", "1"]
    assert root.find("os/type").get("machine").startswith("pc")
    assert root.find("clock").get("offset") == "utc"
    assert root.find("devices/graphics").get("type") == "vnc"

    # vmsync (KvmVmSyncPingTask, async, noStatusCheck) and checkstate (KVMHost, async).
    sync = await mn_async(zs_agent, mn, "/vm/vmsync", {"kvmHostAddons": {}}, resource=HOST)
    assert sync["states"][vm] == "Running" and isinstance(sync["vmInShutdowns"], list)
    ghost = uuidlib.uuid4().hex
    check = await mn_async(zs_agent, mn, "/vm/checkstate",
                           {"vmUuids": [vm, ghost], "hostUuid": HOST, "kvmHostAddons": {}})
    assert check["states"] == {vm: "Running", ghost: "Shutdown"}
    cap = await mn_async(zs_agent, mn, "/host/capacity", {"kvmHostAddons": {}}, resource=HOST)
    assert cap["usedCpu"] >= 1 and cap["usedMemory"] >= 256 * 2**20

    pause = {"uuid": vm, "timeout": 120, "kvmHostAddons": {}}
    assert (await mn_async(zs_agent, mn, "/vm/pause", pause, resource=vm))["success"]
    sync = await mn_async(zs_agent, mn, "/vm/vmsync", {"kvmHostAddons": {}})
    assert sync["states"][vm] == "Paused"
    assert (await mn_async(zs_agent, mn, "/vm/resume", pause, resource=vm))["success"]
    reboot = {"uuid": vm, "timeout": 1799, "bootDev": ["hd"], "kvmHostAddons": {}}
    rebooted = await mn_async(zs_agent, mn, "/vm/reboot", reboot, resource=vm)
    assert rebooted["success"] is True and rebooted["virtualizerInfo"]["virtualizer"] == "qemu-kvm"
    await console.wait_for(BOOT_MARKER, occurrences=2)

    stop = {"uuid": vm, "type": "grace", "timeout": 120, "vmNics": vm_nics(vm, mac),
            "kvmHostAddons": {}}
    assert await mn_async(zs_agent, mn, "/vm/stop", stop, resource=vm, timeout=150) == \
        {"success": True, "error": None}
    assert "KVMAGENT-GUEST-POWEROFF" in console.text()
    check = await mn_async(zs_agent, mn, "/vm/checkstate", {"vmUuids": [vm], "hostUuid": HOST})
    assert check["states"] == {vm: "Shutdown"}
    sync = await mn_async(zs_agent, mn, "/vm/vmsync", {"kvmHostAddons": {}})
    assert vm not in sync["states"]  # absent = stopped on this host, for the MN
    destroy = {"uuid": vm, "vmNics": vm_nics(vm, mac), "kvmHostAddons": {}}
    assert (await mn_async(zs_agent, mn, "/vm/destroy", destroy, resource=vm))["success"]
    assert not Path(f"/sys/class/net/{tap}").exists()
    # Reports use KvmVmState names only (KvmVmState.valueOf on the MN).
    states = {b["vmState"] for b in mn.reports_for("/kvm/reportvmstate")}
    assert states <= {"NoState", "Running", "Paused", "Shutdown", "Crashed", "Suspended"}


async def test_use_huge_page_and_shared_mem_access_back_the_guest_with_hugepages(
        zs_agent, mn, lv, guest_image, nfs_ps, hugepage_lock):
    """useHugePage + MemAccess "shared" (what the MN sets for vhost volumes): the guest's
    memory comes from the 2M pool, shared (virtiofs and vhost need that)."""
    pool = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
    free_before = int((pool / "free_hugepages").read_text())
    (pool / "nr_hugepages").write_text(f"{int((pool / 'nr_hugepages').read_text()) + 128}\n")
    vm = uuidlib.uuid4().hex
    body = start_vm_cmd(vm, 8, ps_volume(nfs_ps), None, "fa:62:4a:61:6c:02")
    for name in ("kernel", "initrd"):
        shutil.copy(getattr(guest_image, name), nfs_ps / name)
    body.update(useHugePage=True, MemAccess="shared",
                bootKernel={"kernel": str(nfs_ps / "kernel"), "initrd": str(nfs_ps / "initrd"),
                            "cmdline": "console=ttyS0"})
    lv[1].append(vm)
    # libvirtd learns hugetlbfs mounts when it starts: systemd mounts /dev/hugepages at boot,
    # and scripts/setup-host.sh does the same on these machines before starting libvirtd.
    started = await mn_async(zs_agent, mn, "/vm/start", body, timeout=120)
    assert started["success"], started
    await Console(zs_agent.config.vm_console_log_dir / f"{vm}-vm-kernel.log").wait_for(BOOT_MARKER)
    backing = ET.fromstring(lv[0].lookupByUUIDString(vm).XMLDesc(0)).find("memoryBacking")
    assert backing.find("hugepages") is not None
    assert backing.find("access").get("mode") == "shared"
    assert int((pool / "free_hugepages").read_text()) < free_before + 128  # the guest took pages
    assert (await mn_async(zs_agent, mn, "/vm/destroy", {"uuid": vm}))["success"]


@pytest.mark.parametrize("machine, secure", [("pc", False), ("q35", True)])
async def test_uefi_boot_mode(zs_agent, mn, lv, guest_image, nfs_ps, machine, secure):
    """bootMode UEFI (the BOOT_MODE tag) + secureBoot (vm.enable.uefi.secure.boot, set only
    for UEFI): libvirt picks OVMF from its firmware descriptors; the VM's NVRAM goes with it."""
    vm = uuidlib.uuid4().hex
    body = start_vm_cmd(vm, 9, ps_volume(nfs_ps), None, "fa:62:4a:61:6c:03")
    for name in ("kernel", "initrd"):
        shutil.copy(getattr(guest_image, name), nfs_ps / name)
    body.update(bootMode="UEFI", secureBoot=secure, machineType=machine,
                bootKernel={"kernel": str(nfs_ps / "kernel"), "initrd": str(nfs_ps / "initrd"),
                            "cmdline": "console=ttyS0"})
    lv[1].append(vm)
    started = await mn_async(zs_agent, mn, "/vm/start", body, timeout=120)
    assert started["success"] is True, started
    await Console(zs_agent.config.vm_console_log_dir / f"{vm}-vm-kernel.log").wait_for(BOOT_MARKER)
    os_ = ET.fromstring(lv[0].lookupByUUIDString(vm).XMLDesc(0)).find("os")
    loader, nvram = os_.find("loader"), os_.find("nvram")
    assert "OVMF" in loader.text and loader.get("secure", "no") == ("yes" if secure else "no")
    assert Path(nvram.text).exists()
    assert (await mn_async(zs_agent, mn, "/vm/destroy", {"uuid": vm}))["success"]
    assert not Path(nvram.text).exists(), "the VM's NVRAM must not outlive it"


async def test_the_mns_body_alone_starts_a_vm(zs_agent, mn, lv, nfs_ps):
    """No extension at all: the firmware boots from the (empty) root disk per bootDev with
    the boot menu; QEMU runs, so the MN sees Running, then stops it."""
    vm = uuidlib.uuid4().hex
    body = start_vm_cmd(vm, 10, ps_volume(nfs_ps), None, "fa:62:4a:61:6c:04")
    lv[1].append(vm)
    started = await mn_async(zs_agent, mn, "/vm/start", body, timeout=120)
    assert started["success"] is True, started
    os_ = ET.fromstring(lv[0].lookupByUUIDString(vm).XMLDesc(0)).find("os")
    assert [b.get("dev") for b in os_.findall("boot")] == ["hd"]
    assert os_.find("bootmenu").attrib == {"enable": "yes", "timeout": "3000"}
    check = await mn_async(zs_agent, mn, "/vm/checkstate", {"vmUuids": [vm], "hostUuid": HOST})
    assert check["states"] == {vm: "Running"}
    stop = {"uuid": vm, "type": "cold", "timeout": 120, "vmNics": [], "kvmHostAddons": {}}
    assert (await mn_async(zs_agent, mn, "/vm/stop", stop))["success"]
    check = await mn_async(zs_agent, mn, "/vm/checkstate", {"vmUuids": [vm], "hostUuid": HOST})
    assert check["states"] == {vm: "Shutdown"}


@pytest.fixture
def loop_device(tmp_path):
    """A real block device (a loop device over an 8 MiB file) and a stable name for it in a
    directory of its own, as /dev/disk/by-id links are on a real host (udev makes those)."""
    backing = tmp_path / "lun.img"
    with open(backing, "wb") as fh:
        fh.truncate(8 * 2**20)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    links = Path(tempfile.mkdtemp(prefix="kvmagent-by-id-"))
    os.chmod(links, 0o755)  # QEMU (user libvirt-qemu) follows the link
    (links / "wwn-0x5000c500a1b2c3d4").symlink_to(dev)
    yield links, links / "wwn-0x5000c500a1b2c3d4"
    subprocess.run(["losetup", "-d", dev], check=False)
    shutil.rmtree(links, ignore_errors=True)


async def test_a_block_data_volume_reaches_the_guest(make_agent, mn, lv, guest_image, nfs_ps,
                                                     loop_device, tmp_path):
    """VolumeTO deviceType "block": the LUN is given to QEMU as a block device; the guest
    sees it as its second virtio disk, 8 MiB (16384 sectors), read through the guest agent."""
    links, link = loop_device
    agent = await make_agent(vm_block_roots=[links], vm_console_log_dir=tmp_path / "console")
    vm = uuidlib.uuid4().hex
    body = start_vm_cmd(vm, 11, ps_volume(nfs_ps), None, "fa:62:4a:61:6c:05")
    for name in ("kernel", "initrd"):
        shutil.copy(getattr(guest_image, name), nfs_ps / name)
    body["bootKernel"] = {"kernel": str(nfs_ps / "kernel"), "initrd": str(nfs_ps / "initrd"),
                          "cmdline": "console=ttyS0"}
    data = uuidlib.uuid4().hex
    body["dataVolumes"] = [{"installPath": str(link), "deviceId": 1, "deviceType": "block",
                            "volumeUuid": data, "useVirtio": True, "useVirtioSCSI": False,
                            "shareable": False, "cacheMode": "none", "aioNative": True,
                            "bootOrder": 0, "physicalBlockSize": 0, "type": "Data",
                            "format": "raw", "ioThreadId": 0, "controllerIndex": 0,
                            "resourceUuid": data}]
    lv[1].append(vm)
    started = await mn_async(agent, mn, "/vm/start", body, timeout=120)
    assert started["success"] is True, started
    console = Console(tmp_path / "console" / f"{vm}-vm-kernel.log")
    dom = lv[0].lookupByUUIDString(vm)
    disk = ET.fromstring(dom.XMLDesc(0)).find("devices/disk[@type='block']")
    assert disk.find("source").get("dev") == str(link) and disk.find("serial").text == data
    await wait_guest_agent(TinyVm(vm, console, link, started), dom)
    assert await guest_run(dom, "cat", "/sys/block/vdb/size") == (0, "16384\n")
    assert (await mn_async(agent, mn, "/vm/destroy", {"uuid": vm}))["success"]


async def test_a_block_volume_that_is_not_a_block_device_is_refused(make_agent, mn, lv, nfs_ps,
                                                                    tmp_path):
    links = tmp_path / "by-id"
    links.mkdir()
    (links / "wwn-0x1").symlink_to("/etc/hostname")
    agent = await make_agent(vm_block_roots=[links])
    vm = uuidlib.uuid4().hex
    body = start_vm_cmd(vm, 12, ps_volume(nfs_ps), None, "fa:62:4a:61:6c:06")
    body["dataVolumes"] = [{"installPath": str(links / "wwn-0x1"), "deviceType": "block",
                            "deviceId": 1}]
    reply = await mn_async(agent, mn, "/vm/start", body)
    assert reply["success"] is False and "is not a block device" in reply["error"], reply
    body["dataVolumes"][0]["installPath"] = "block://5000c500a1b2c3d4"  # default by-id dir
    reply = await mn_async(agent, mn, "/vm/start", body)
    assert reply["success"] is False and "vm_block_roots" in reply["error"], reply
    assert vm not in [d.name() for d in lv[0].listAllDomains()]


async def test_destroy_as_gc_sends_it_for_a_vm_that_is_gone(zs_agent, mn):
    """KVMHost.directlyDestroy: only {uuid, kvmHostAddons}; a missing VM is destroyed."""
    body = {"uuid": uuidlib.uuid4().hex, "kvmHostAddons": {}}
    assert await mn_async(zs_agent, mn, "/vm/destroy", body) == {"success": True, "error": None}


@pytest.mark.parametrize("device_type, install_path", [
    ("ceph", "ceph://pool/d387b4534faf4553a50a8a632cf12e35"),
    ("iscsi", "iscsi://10.0.0.5:3260/iqn.2016-01.io.zstack:vol/1"),
    ("sharedblock", "sharedblock://4f3e9046776d40958edd909523ede46d/d387b4534faf4553a50a8a632cf12e35"),
    ("vhost", "/var/run/vhost/zbs-bdev-1.sock"),
])
async def test_a_volume_type_we_do_not_serve_fails_clearly(zs_agent, mn, lv, nfs_ps, device_type,
                                                           install_path):
    vm = uuidlib.uuid4().hex
    body = start_vm_cmd(vm, 7, ps_volume(nfs_ps), None, "fa:62:4a:61:6c:01")
    body["rootVolume"].update(deviceType=device_type, installPath=install_path)
    reply = await mn_async(zs_agent, mn, "/vm/start", body)
    assert reply == {"success": False,
                     "error": f"rootVolume: volume type '{device_type}' is not supported by this "
                              "agent (supported: file, block)"}
    assert vm not in [d.name() for d in lv[0].listAllDomains()]


async def test_a_path_outside_the_roots_names_the_setting(zs_agent, mn, lv, nfs_ps):
    vm = uuidlib.uuid4().hex
    body = start_vm_cmd(vm, 7, ps_volume(nfs_ps), None, "fa:62:4a:61:6c:01")
    body["rootVolume"]["installPath"] = "/var/tmp/rootVolumes/x.qcow2"
    reply = await mn_async(zs_agent, mn, "/vm/start", body)
    assert reply["success"] is False
    assert "outside the allowed roots" in reply["error"] and "vm_path_roots" in reply["error"]
    assert vm not in [d.name() for d in lv[0].listAllDomains()]


async def test_bad_mn_body_fails_by_callback_naming_the_field(zs_agent, mn, lv, nfs_ps):
    vm = uuidlib.uuid4().hex
    body = start_vm_cmd(vm, 7, ps_volume(nfs_ps), None, "fa:62:4a:61:6c:01")
    body["bootDev"] = ["floppy"]
    reply = await mn_async(zs_agent, mn, "/vm/start", body)
    assert reply["success"] is False and "field 'bootDev.0'" in reply["error"]
    body = start_vm_cmd(vm, 7, ps_volume(nfs_ps), None, "fa:62:4a:61:6c:01")
    body.update(socketNum=2, cpuOnSocket=1)  # 2 x 1 x 1 != cpuNum 1
    reply = await mn_async(zs_agent, mn, "/vm/start", body)
    assert reply["success"] is False and "'socketNum'" in reply["error"]
    assert vm not in [d.name() for d in lv[0].listAllDomains()]
