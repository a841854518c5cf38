"""Host facts from psutil, procfs/sysfs files, DMI and libvirt (no shell pipelines).

What the ZStack MN reads from ``/host/fact`` (HostFactResponse, ZS KVMAgentCommands.java) and
where the reference agent (ZU host_plugin.py ``fact``) got it with dmidecode/lscpu/ipmitool:
here the same facts come from the files those tools read. A fact this host does not have
(no DMI table in a VM, no BMC) is None, which the MN skips (``createTagWithoutNonValue``).
"""
from __future__ import annotations

import os
import platform
import re
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import psutil

_GHZ_IN_MODEL = re.compile(r"([0-9.]+)\s*GHz")
# libvirt capability features that ZStack's patched libvirt advertises (ZU host_plugin.py).
ZSTACK_LIBVIRT_FEATURES = ("incrementaldrivemirror", "blockcopynetworktarget")


@dataclass
class CpuInfo:
    model: str = ""
    flags: set[str] = field(default_factory=set)
    mhz: float = 0.0

    @property
    def hvm_flag(self) -> str:
        """"vmx"/"svm", or "" on a CPU without hardware virtualisation (see the README)."""
        return "vmx" if "vmx" in self.flags else "svm" if "svm" in self.flags else ""

    @property
    def ept_flag(self) -> str | None:
        return "ept" if "ept" in self.flags else None

    @property
    def ghz(self) -> str | None:
        """From "@ 2.40GHz" in the model name, else the current clock (as ZU does)."""
        match = _GHZ_IN_MODEL.search(self.model)
        if match:
            return f"{float(match.group(1)):.2f}"
        return f"{self.mhz / 1000:.2f}" if self.mhz else None


def cpuinfo(procfs_root: Path) -> CpuInfo:
    """Model name, flags and clock of the first processor in /proc/cpuinfo."""
    info = CpuInfo()
    try:
        text = (procfs_root / "cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not info.model:
            info.model = value.strip()
        elif key == "flags" and not info.flags:
            info.flags = set(value.split())
        elif key == "cpu MHz" and not info.mhz:
            try:
                info.mhz = float(value)
            except ValueError:
                pass
        elif not line.strip() and info.model:
            break  # the end of the first processor
    return info


def cpu_speed_mhz() -> int:
    freq = psutil.cpu_freq()
    return int(freq.max or freq.current) if freq else 0


def cpu_sockets(sysfs_root: Path) -> int:
    ids = set()
    for cpu in (sysfs_root / "devices/system/cpu").glob("cpu[0-9]*"):
        try:
            ids.add((cpu / "topology/physical_package_id").read_text().strip())
        except OSError:
            continue
    return max(len(ids), 1)


def cpu_cache_kib(sysfs_root: Path) -> str | None:
    """"L1,L2,L3" in KiB, each summed over the distinct caches of the host (L1 = data +
    instruction), the totals ``lscpu`` shows; the reference agent's format ("64.0,512.0,...")."""
    totals = {1: 0.0, 2: 0.0, 3: 0.0}
    seen: set[tuple[str, str, str]] = set()
    for index in (sysfs_root / "devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
        except OSError:
            continue
        if (level, kind, shared) in seen or not level.isdigit() or int(level) not in totals:
            continue
        seen.add((level, kind, shared))
        match = re.match(r"^(\d+)([KMG]?)$", size)
        if match:
            totals[int(level)] += int(match.group(1)) * {"": 1 / 1024, "K": 1, "M": 1024,
                                                          "G": 1024 ** 2}[match.group(2)]
    if not any(totals.values()):
        return None
    return ",".join(f"{totals[level]:.1f}" for level in (1, 2, 3))


def os_release() -> tuple[str, str, str]:
    """(ID, VERSION_ID, VERSION_CODENAME) from os-release, e.g. ("debian", "12", "bookworm")."""
    try:
        info = platform.freedesktop_os_release()
    except OSError:
        return platform.system(), "", ""
    return info.get("ID", ""), info.get("VERSION_ID", ""), info.get("VERSION_CODENAME", "")


def memory() -> tuple[int, int]:
    """(total, used) bytes; used excludes reclaimable cache."""
    vm = psutil.virtual_memory()
    return vm.total, vm.total - vm.available


def kernel_version() -> str:
    return os.uname().release


def uptime_since() -> str:
    """Boot time in local time, as ``uptime -s`` prints it."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(psutil.boot_time()))


def ipv4_addresses() -> list[str]:
    """Every IPv4 address but loopback (ZU also skips links whose name ends in "zs")."""
    found = []
    for name, addrs in psutil.net_if_addrs().items():
        if name.endswith("zs"):
            continue
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                found.append(addr.address)
    return found


def iscsi_initiator_name(path: Path = Path("/etc/iscsi/initiatorname.iscsi")) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("InitiatorName="):
            return line.partition("=")[2].strip() or None
    return None


# -- DMI ----------------------------------------------------------------------------------------
_DMI_FIELDS = {  # HostFactResponse field -> /sys/class/dmi/id file (what dmidecode -s reads)
    "system_product_name": "product_name",
    "system_serial_number": "product_serial",
    "system_manufacturer": "sys_vendor",
    "system_uuid": "product_uuid",
    "bios_vendor": "bios_vendor",
    "bios_version": "bios_version",
    "bios_release_date": "bios_date",
}


def dmi_facts(sysfs_root: Path) -> dict[str, str | None]:
    base = sysfs_root / "class/dmi/id"

    def read(name: str) -> str | None:
        try:
            return (base / name).read_text().strip() or None
        except OSError:
            return None

    facts = {key: read(name) for key, name in _DMI_FIELDS.items()}
    if facts["system_product_name"] is None:
        facts["system_product_name"] = read("board_name")
    facts.update(smbios_facts(sysfs_root / "firmware/dmi/entries"))
    return facts


def _smbios_strings(raw: bytes) -> tuple[bytes, list[str]]:
    """(formatted area, strings) of one raw SMBIOS structure."""
    length = raw[1] if len(raw) > 1 else 0
    strings = raw[length:].split(b"\0")
    return raw[:length], [s.decode("ascii", "replace").strip() for s in strings if s]


def _smbios_string(area: bytes, strings: list[str], offset: int) -> str | None:
    if offset >= len(area) or area[offset] == 0 or area[offset] > len(strings):
        return None
    value = strings[area[offset] - 1]
    return None if not value or value.lower() in ("not specified", "unknown") else value


def smbios_facts(entries: Path) -> dict[str, str | None]:
    """Memory slots (type 17 count) and the first power supply (type 39) from the raw SMBIOS
    structures in /sys/firmware/dmi/entries (DMTF DSP0134)."""
    facts: dict[str, str | None] = {"memory_slots_maximum": None, "power_supply_model_name": None,
                                    "power_supply_manufacturer": None,
                                    "power_supply_max_power_capacity": None}
    slots = len(list(entries.glob("17-*"))) if entries.is_dir() else 0
    if slots:
        facts["memory_slots_maximum"] = str(slots)
    for entry in sorted(entries.glob("39-*")) if entries.is_dir() else []:
        try:
            area, strings = _smbios_strings((entry / "raw").read_bytes())
        except OSError:
            continue
        facts["power_supply_model_name"] = _smbios_string(area, strings, 0x06)
        facts["power_supply_manufacturer"] = _smbios_string(area, strings, 0x07)
        if len(area) >= 0x0E:
            watts = int.from_bytes(area[0x0C:0x0E], "little")
            if watts != 0x8000:  # 0x8000: unknown
                facts["power_supply_max_power_capacity"] = str(watts)
        if facts["power_supply_model_name"] or facts["power_supply_manufacturer"]:
            break
    return facts


# -- libvirt ------------------------------------------------------------------------------------
def capabilities_facts(caps_xml: str) -> tuple[str | None, list[str]]:
    """(host CPU model libvirt reports, ZStack libvirt features present) from getCapabilities."""
    root = ET.fromstring(caps_xml)
    model = root.findtext("host/cpu/model")
    features = set()
    for guest in root.findall("guest"):
        feats = guest.find("features")
        if feats is not None:
            features |= {child.tag for child in feats}
    return model, [name for name in ZSTACK_LIBVIRT_FEATURES if name in features]


def vm_usage(conn: libvirt.virConnect) -> tuple[int, int]:
    """(vCPUs, current memory bytes) summed over active domains (running or paused)."""
    vcpus = memory = 0
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            _, _, mem_kib, nr_vcpu, _ = dom.info()
        except libvirt.libvirtError:
            continue  # stopped meanwhile
        vcpus += nr_vcpu
        memory += mem_kib * 1024
    return vcpus, memory
