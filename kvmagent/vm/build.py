"""StartVmCmd (as the ZStack MN sends it) -> :class:`~kvmagent.vm.config.Domain`, and the
device addresses of a started domain for the StartVmResponse.

The request is duck-typed (the plugin's pydantic model), so this module does not import
the plugin. Everything that touches storage paths (realpath, exists) blocks: callers run
:func:`build_domain` in an executor with a timeout.

Sources: ZS plugin/kvm/.../KVMAgentCommands.java (StartVmCmd, VolumeTO, NicTO, CdRomTO),
KVMHost.java (startVm); ZU kvmagent/plugins/vm_plugin.py (start_vm) for the XML choices.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..core.errors import AgentError
from ..core.validate import AbsPath
from .config import (
    BridgeNic,
    DirectKernel,
    Disk,
    Domain,
    GuestAgentChannel,
    Topology,
    Vnc,
)

# Volume types this agent can attach (VolumeTO.deviceType); the MN also sends iscsi, ceph,
# sharedblock, scsilun, block, mini, quorum, vhost, cbd for other primary storages.
SUPPORTED_VOLUME_TYPES = ("file", "block")
BLOCK_BY_WWN = "/dev/disk/by-id/wwn-0x"  # ZU: block://<wwn> names this link
_WWN = re.compile(r"^[0-9a-fA-F]{1,64}$")
MAX_VCPUS_WITH_NUMA = 128  # ZU's default when useNuma comes without maxVcpuNum
MAX_IDE_DRIVES = 4  # two IDE buses, master and slave


_ABS_PATH = TypeAdapter(AbsPath)


class _Letters:
    """Device names per prefix, in order: vda, vdb...; sda, sdb..."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}

    def next(self, prefix: str) -> str:
        n = self.used.get(prefix, 0)
        self.used[prefix] = n + 1
        name = ""
        n += 1
        while n:  # a..z, aa..
            n, rem = divmod(n - 1, 26)
            name = chr(ord("a") + rem) + name
        return prefix + name


def memory_backing(cmd: Any) -> str:
    """useHugePage + MemAccess (ZU: shared when MemAccess is "shared"), or our extension."""
    if cmd.memory_backing != "default":
        return cmd.memory_backing
    shared = (cmd.mem_access or "").lower() == "shared"
    if cmd.use_huge_page:
        return "hugepages" if shared else "hugepages-private"
    return "memfd-shared" if shared else "default"


def topology(cmd: Any) -> tuple[Topology | None, int | None]:
    """(CPU topology, max vCPUs): MN tags/defaults, or useNuma hot-plug room."""
    max_vcpus = None
    if cmd.use_numa:
        max_vcpus = max(cmd.max_vcpu_num or MAX_VCPUS_WITH_NUMA, cmd.cpu_num)
    if cmd.socket_num is None and cmd.cpu_on_socket is None:
        return None, max_vcpus
    sockets, cores = cmd.socket_num or 1, cmd.cpu_on_socket or 1
    threads = cmd.threads_per_core or 1
    wanted = max_vcpus or cmd.cpu_num
    if sockets * cores * threads != wanted:
        raise AgentError(f"fields 'socketNum' x 'cpuOnSocket' x 'threadsPerCore' ({sockets} x "
                         f"{cores} x {threads}) must equal {'maxVcpuNum' if max_vcpus else 'cpuNum'} "
                         f"({wanted})")
    return Topology(sockets, cores, threads), max_vcpus


def _volume(svc: Any, vol: Any, what: str, letters: _Letters) -> Disk:
    if vol.device_type not in SUPPORTED_VOLUME_TYPES:
        raise AgentError(f"{what}: volume type {vol.device_type!r} is not supported by this agent "
                         f"(supported: {', '.join(SUPPORTED_VOLUME_TYPES)})")
    if vol.device_type == "block":
        path = svc.check_block(block_path(vol.install_path, f"{what}.installPath"),
                               f"{what}.installPath")
    else:
        path = svc.check_path(vol.install_path, f"{what}.installPath")
    if vol.use_virtio_scsi:
        bus, prefix = "scsi", "sd"
    elif vol.use_virtio:
        bus, prefix = "virtio", "vd"
    else:
        bus, prefix = "sata", "sd"
    default_format = "raw" if vol.device_type == "block" else "qcow2"
    return Disk(path, letters.next(prefix), vol.format or default_format, bus=bus,
                cache=vol.cache_mode, io_native=vol.aio_native, shareable=vol.shareable,
                serial=vol.volume_uuid or vol.resource_uuid, wwn=vol.wwn,
                block=vol.device_type == "block")


def block_path(install_path: str, what: str) -> str:
    """``block://<wwn>`` (ZU's form) -> its /dev/disk/by-id link; an absolute path as it is."""
    if install_path.startswith("block://"):
        wwn = install_path[len("block://"):]
        if wwn.lower().startswith("0x"):
            wwn = wwn[2:]
        if not _WWN.match(wwn):
            raise AgentError(f"{what}: {install_path!r} is not block://<wwn in hex>")
        return BLOCK_BY_WWN + wwn.lower()
    try:
        return _ABS_PATH.validate_python(install_path)
    except ValidationError:
        raise AgentError(f"{what}: {install_path!r} is neither block://<wwn> nor an absolute, "
                         "normalized device path") from None


def _cdrom(svc: Any, cd: Any, what: str, bus: str, letters: _Letters) -> Disk:
    path = ""
    if not cd.is_empty and cd.path:
        try:
            clean = _ABS_PATH.validate_python(cd.path)
        except ValidationError:  # e.g. an ISO on Ceph: ceph://...
            raise AgentError(f"{what}.path: {cd.path!r} is not an absolute, normalized file path; "
                             "only ISO files on a file system are supported by this agent") from None
        path = svc.check_path(clean, f"{what}.path")
    target = letters.next("sd" if bus == "sata" else "hd")
    return Disk(path, target, "raw", bus=bus, device="cdrom")


def _nic(svc: Any, nic: Any, what: str) -> BridgeNic:
    if (nic.type or "VNIC") != "VNIC":
        raise AgentError(f"{what}: NIC type {nic.type!r} is not supported by this agent "
                         "(only VNIC: a tap on a Linux bridge)")
    if not nic.bridge_name:
        raise AgentError(f"{what}.bridgeName: missing; a VNIC needs the bridge of its L2 network")
    svc.check_bridge(nic.bridge_name)
    model = nic.driver_type or ("virtio" if nic.use_virtio in (True, None) else "e1000")
    queues = nic.v_host_add_on.queue_num if nic.v_host_add_on else None
    return BridgeNic(nic.mac.lower(), nic.bridge_name, model=model, tap=nic.nic_internal_name,
                     mtu=nic.mtu, queues=queues, link_up=(nic.state or "enable") != "disable")


def build_domain(svc: Any, cmd: Any, domain_type: str, vnc_listen: str,
                 console_dir: str) -> Domain:
    machine = cmd.machine_type or "pc"
    boot_mode = cmd.boot_mode or "Legacy"
    if boot_mode not in ("Legacy", "UEFI"):
        raise AgentError(f"bootMode {boot_mode!r} is not supported by this agent (Legacy, UEFI; "
                         "the OVMF firmware here has no CSM)")
    secure_boot = boot_mode == "UEFI" and cmd.secure_boot
    if secure_boot and "q35" not in machine:
        raise AgentError(f"secureBoot: UEFI secure boot needs machineType q35, not {machine!r}")
    letters = _Letters()
    disks = [_volume(svc, cmd.root_volume, "rootVolume", letters)]
    for i, vol in enumerate(sorted(cmd.data_volumes, key=lambda v: v.device_id)):
        disks.append(_volume(svc, vol, f"dataVolumes.{i}", letters))
    cd_bus = "ide" if machine == "pc" or machine.startswith("pc-i440fx") else "sata"
    cdroms = sorted(cmd.cd_roms, key=lambda c: c.device_id)
    if cd_bus == "ide" and len(cdroms) > MAX_IDE_DRIVES:
        raise AgentError(f"cdRoms: at most {MAX_IDE_DRIVES} CD-ROM drives on machine type {machine}")
    disks += [_cdrom(svc, cd, f"cdRoms.{i}", cd_bus, letters) for i, cd in enumerate(cdroms)]
    kernel = None
    if cmd.boot_kernel:
        bk = cmd.boot_kernel
        kernel = DirectKernel(svc.check_path(bk.kernel, "bootKernel.kernel"),
                              svc.check_path(bk.initrd, "bootKernel.initrd") if bk.initrd else None,
                              bk.cmdline)
    console = pty_log = None
    if cmd.console_log_path:
        console = svc.check_path(cmd.console_log_path, "consoleLogPath", must_exist=False)
    elif cmd.console_log_to_file:
        os.makedirs(console_dir, mode=0o755, exist_ok=True)
        pty_log = os.path.join(console_dir, f"{cmd.vm_instance_uuid}-vm-kernel.log")
    nics = [_nic(svc, n, f"nics.{i}")
            for i, n in enumerate(sorted(cmd.nics, key=lambda n: n.device_id))]
    channel = GuestAgentChannel()
    if cmd.addons and cmd.addons.channel:
        ch = cmd.addons.channel
        channel = GuestAgentChannel(svc.check_path(ch.socket_path, "addons.channel.socketPath",
                                                   must_exist=False), ch.target_name)
    topo, max_vcpus = topology(cmd)
    nested = cmd.nested_virtualization
    return Domain(
        uuid=cmd.vm_instance_uuid, name=cmd.vm_instance_uuid, title=cmd.vm_name,
        vcpus=cmd.cpu_num, memory_kib=cmd.memory // 1024, domain_type=domain_type,
        memory_backing=memory_backing(cmd), enable_ha=cmd.enable_ha, disks=disks, nics=nics,
        kernel=kernel, console_log=console, console_pty_log=pty_log, max_vcpus=max_vcpus,
        topology=topo, machine=machine, clock=cmd.clock or "utc",
        boot=list(dict.fromkeys(cmd.boot_dev or ["hd"])),
        boot_menu_timeout_ms=(cmd.boot_menu_splash_timeout or 0) if cmd.use_boot_menu else None,
        cpu_mode=None if nested in (None, "none") else nested, cpu_model=cmd.vm_cpu_model,
        guest_agent=channel,
        vnc=Vnc(vnc_listen, cmd.console_password) if cmd.console_mode == "vnc" else None,
        video=cmd.video_type if cmd.console_mode == "vnc" else None,
        cpu_shares=cmd.priority_config_struct.cpu_shares if cmd.priority_config_struct else None,
        smbios_serial=cmd.system_serial_number, smbios_asset_tag=cmd.chassis_asset_tag,
        uefi=boot_mode == "UEFI", secure_boot=secure_boot)


# -- what the MN reads back: device addresses of the running domain ----------------------------
ADDRESS_KEYS = ("type", "bus", "domain", "slot", "function", "controller", "target", "unit")


def _address(device: ET.Element) -> dict[str, str | None] | None:
    addr = device.find("address")
    if addr is None:
        return None
    return {key: addr.get(key) for key in ADDRESS_KEYS}


def device_info(xml: str) -> dict[str, Any]:
    """nicInfos, virtualDeviceInfoList (disks by serial) and memBalloonInfo of a live domain."""
    devices = ET.fromstring(xml).find("devices")
    if devices is None:
        return {"nic_infos": [], "virtual_device_info_list": [], "mem_balloon_info": None}
    nics = []
    for iface in devices.findall("interface"):
        mac, addr = iface.find("mac"), _address(iface)
        if mac is not None and addr is not None:  # the MN calls deviceAddress.toString()
            nics.append({"macAddress": mac.get("address"), "deviceAddress": addr})
    disks = []
    for disk in devices.findall("disk"):
        serial, addr = disk.find("serial"), _address(disk)
        if serial is not None and addr is not None:
            disks.append({"resourceUuid": serial.text, "deviceAddress": addr})
    balloon = devices.find("memballoon")
    balloon_addr = _address(balloon) if balloon is not None else None
    return {"nic_infos": nics, "virtual_device_info_list": disks,
            "mem_balloon_info": {"deviceAddress": balloon_addr} if balloon_addr else None}
