"""Domain XML as small typed config objects rendered with ElementTree.

Values only ever become attribute values or element text through the XML library, so a
name like ``"><script`` is escaped, never interpreted (the nova libvirt config approach).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Literal

HA_NAMESPACE = "http://kvmagent.io/xmlns/vm/1.0"
HA_PREFIX = "kvmagent"


def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items() if v is not None})
    if text is not None:
        element.text = text
    return element


@dataclass
class Disk:
    path: str
    target: str  # vda, sdb, hdc...
    format: Literal["qcow2", "raw"] = "qcow2"
    readonly: bool = False
    bus: Literal["virtio", "scsi", "sata", "ide"] = "virtio"
    device: Literal["disk", "cdrom"] = "disk"
    cache: str | None = None  # the MN's cacheMode ("none")
    io_native: bool = False
    shareable: bool = False
    serial: str | None = None  # the volume uuid: how the guest (and the MN) tells disks apart
    wwn: str | None = None
    block: bool = False  # a block device (deviceType block), else a file

    def render(self, devices: ET.Element) -> None:
        disk = sub(devices, "disk", type="block" if self.block else "file", device=self.device)
        io = "native" if self.io_native and self.cache in ("none", "directsync") else None
        sub(disk, "driver", name="qemu", type=self.format, cache=self.cache, io=io)
        if self.path and self.block:
            sub(disk, "source", dev=self.path)
        elif self.path:  # an empty CD-ROM drive has no source
            sub(disk, "source", file=self.path)
        sub(disk, "target", dev=self.target, bus=self.bus)
        if self.serial:
            sub(disk, "serial", self.serial)
        if self.wwn and self.bus in ("scsi", "ide", "sata"):  # libvirt: no wwn on virtio-blk
            sub(disk, "wwn", self.wwn)
        if self.readonly or self.device == "cdrom":
            sub(disk, "readonly")
        if self.shareable:
            sub(disk, "shareable")


@dataclass
class BridgeNic:
    mac: str
    bridge: str
    model: str = "virtio"
    tap: str | None = None  # the MN's nicInternalName (vnic<vmInternalId>.<deviceId>)
    mtu: int | None = None
    queues: int | None = None
    link_up: bool = True

    def render(self, devices: ET.Element) -> None:
        nic = sub(devices, "interface", type="bridge")
        sub(nic, "mac", address=self.mac)
        sub(nic, "source", bridge=self.bridge)
        if self.tap:
            sub(nic, "target", dev=self.tap)
        sub(nic, "model", type=self.model)
        if self.queues and self.queues > 1 and self.model == "virtio":
            sub(nic, "driver", name="vhost", queues=str(self.queues))
        if self.mtu:
            sub(nic, "mtu", size=str(self.mtu))
        if not self.link_up:
            sub(nic, "link", state="down")


@dataclass
class VirtiofsShare:
    """A virtiofs filesystem device (shared by the VM and virtiofs plugins).

    ``cache="auto"`` is virtiofsd's own default and renders no ``<cache>`` element (libvirt
    9 accepts only none/always there). libvirt before 10.x refuses ``<readonly/>`` for
    virtiofs: a caller that enforces read-only another way (``export_dir`` being a read-only
    bind mount of ``source_dir``) sets ``readonly_in_xml=False``.
    """

    source_dir: str
    tag: str
    binary: str = "/usr/lib/qemu/virtiofsd"
    readonly: bool = True
    cache: Literal["none", "auto", "always"] = "auto"
    export_dir: str | None = None  # the directory virtiofsd exports; default source_dir
    readonly_in_xml: bool = True
    alias: str | None = None  # libvirt's device alias, when parsed from a live domain
    queue: int = 1024  # virtqueue size (QEMU: a power of two, at most 1024)

    def element(self) -> ET.Element:
        fs = ET.Element("filesystem", {"type": "mount", "accessmode": "passthrough"})
        sub(fs, "driver", type="virtiofs", queue=str(self.queue))
        binary = sub(fs, "binary", path=self.binary)
        if self.cache != "auto":
            sub(binary, "cache", mode=self.cache)
        sub(fs, "source", dir=self.export_dir or self.source_dir)
        sub(fs, "target", dir=self.tag)
        if self.readonly and self.readonly_in_xml:
            sub(fs, "readonly")
        return fs

    def to_xml(self) -> str:
        return ET.tostring(self.element(), encoding="unicode")

    @classmethod
    def from_element(cls, fs: ET.Element) -> VirtiofsShare | None:
        """The share a ``<filesystem>`` element of a domain describes; None if not virtiofs."""
        driver = fs.find("driver")
        if driver is None or driver.get("type") != "virtiofs":
            return None
        source, target = fs.find("source"), fs.find("target")
        if source is None or target is None or not target.get("dir"):
            return None
        binary = fs.find("binary")
        cache = binary.find("cache") if binary is not None else None
        mode = cache.get("mode") if cache is not None else None
        alias = fs.find("alias")
        source_dir = source.get("dir") or source.get("socket") or ""
        queue = driver.get("queue") or ""
        return cls(source_dir=source_dir, tag=target.get("dir"),
                   queue=int(queue) if queue.isdigit() else 1024,
                   binary=(binary.get("path") if binary is not None else None) or "",
                   readonly=fs.find("readonly") is not None,
                   cache=mode if mode in ("none", "always") else "auto",
                   export_dir=source_dir, alias=alias.get("name") if alias is not None else None)


@dataclass
class DirectKernel:
    kernel: str
    initrd: str | None = None
    cmdline: str | None = None


@dataclass
class Topology:
    sockets: int
    cores: int
    threads: int = 1


@dataclass
class GuestAgentChannel:
    """The QGA virtio-serial channel; ``path`` None lets libvirt choose the socket."""
    path: str | None = None
    name: str = "org.qemu.guest_agent.0"


@dataclass
class Vnc:
    listen: str = "0.0.0.0"
    password: str | None = None


@dataclass
class Domain:
    uuid: str
    name: str
    title: str
    vcpus: int
    memory_kib: int
    domain_type: Literal["kvm", "qemu"] = "kvm"
    memory_backing: Literal["default", "memfd-shared", "hugepages", "hugepages-private"] = "default"
    enable_ha: bool = False
    disks: list[Disk] = field(default_factory=list)
    nics: list[BridgeNic] = field(default_factory=list)
    kernel: DirectKernel | None = None
    console_log: str | None = None  # serial console written to this file (extension)
    console_pty_log: str | None = None  # pty serial console also logged here (consoleLogToFile)
    filesystems: list[VirtiofsShare] = field(default_factory=list)
    max_vcpus: int | None = None  # more than vcpus: CPU hot-plug room (the MN's useNuma)
    topology: Topology | None = None
    machine: str = "pc"
    clock: Literal["utc", "localtime"] = "utc"
    boot: list[str] = field(default_factory=lambda: ["hd"])  # libvirt boot devs, in order
    boot_menu_timeout_ms: int | None = None
    cpu_mode: str | None = None  # host-model, host-passthrough, custom; None: hypervisor default
    cpu_model: str | None = None
    guest_agent: GuestAgentChannel = field(default_factory=GuestAgentChannel)
    vnc: Vnc | None = None
    video: str | None = None
    cpu_shares: int | None = None
    smbios_serial: str | None = None
    smbios_asset_tag: str | None = None
    uefi: bool = False  # libvirt picks the firmware (OVMF) from its descriptors
    secure_boot: bool = False

    def render(self) -> ET.Element:
        dom = ET.Element("domain", {"type": self.domain_type})
        sub(dom, "name", self.name)
        sub(dom, "uuid", self.uuid)
        sub(dom, "title", self.title)
        metadata = sub(dom, "metadata")
        metadata.append(ha_metadata_element(self.enable_ha, qualified=True))
        sub(dom, "memory", str(self.memory_kib), unit="KiB")
        sub(dom, "currentMemory", str(self.memory_kib), unit="KiB")
        if self.max_vcpus and self.max_vcpus > self.vcpus:
            sub(dom, "vcpu", str(self.max_vcpus), placement="static", current=str(self.vcpus))
        else:
            sub(dom, "vcpu", str(self.vcpus), placement="static")
        if self.cpu_shares:
            sub(sub(dom, "cputune"), "shares", str(self.cpu_shares))
        self._render_memory_backing(dom)
        self._render_sysinfo(dom)
        os_ = sub(dom, "os", firmware="efi" if self.uefi else None)
        if self.uefi:
            firmware = sub(os_, "firmware")
            sub(firmware, "feature", enabled="yes" if self.secure_boot else "no", name="secure-boot")
            if self.secure_boot:
                sub(firmware, "feature", enabled="yes", name="enrolled-keys")
        sub(os_, "type", "hvm", arch="x86_64", machine=self.machine)
        if self.kernel:
            sub(os_, "kernel", self.kernel.kernel)
            if self.kernel.initrd:
                sub(os_, "initrd", self.kernel.initrd)
            if self.kernel.cmdline:
                sub(os_, "cmdline", self.kernel.cmdline)
        else:
            for dev in self.boot:
                sub(os_, "boot", dev=dev)
            if self.boot_menu_timeout_ms is not None:
                sub(os_, "bootmenu", enable="yes", timeout=str(self.boot_menu_timeout_ms))
        if self.smbios_serial or self.smbios_asset_tag:
            sub(os_, "smbios", mode="sysinfo")
        features = sub(dom, "features")
        sub(features, "acpi")  # without ACPI nothing can be hot-plugged
        sub(features, "apic")
        if self.secure_boot:
            sub(features, "smm", state="on")  # secure boot firmware runs in SMM
        self._render_cpu(dom)
        sub(dom, "clock", offset=self.clock)
        sub(dom, "on_poweroff", "destroy")
        sub(dom, "on_reboot", "restart")
        sub(dom, "on_crash", "destroy")
        devices = sub(dom, "devices")
        for disk in self.disks:
            disk.render(devices)
        if any(d.bus == "scsi" for d in self.disks):
            sub(devices, "controller", type="scsi", model="virtio-scsi")
        for nic in self.nics:
            nic.render(devices)
        for fs in self.filesystems:
            devices.append(fs.element())
        if self.console_log:
            serial = sub(devices, "serial", type="file")
            sub(serial, "source", path=self.console_log)
            sub(serial, "target", port="0")
        else:
            serial = sub(devices, "serial", type="pty")
            if self.console_pty_log:
                sub(serial, "log", file=self.console_pty_log, append="on")
            sub(serial, "target", port="0")
        channel = sub(devices, "channel", type="unix")
        if self.guest_agent.path:
            sub(channel, "source", mode="bind", path=self.guest_agent.path)
        sub(channel, "target", type="virtio", name=self.guest_agent.name)
        if self.vnc:
            sub(devices, "graphics", type="vnc", port="-1", autoport="yes", listen=self.vnc.listen,
                passwd=self.vnc.password)
        if self.video:
            sub(sub(devices, "video"), "model", type=self.video)
        return dom

    def _render_cpu(self, dom: ET.Element) -> None:
        mode = self.cpu_mode
        if mode and self.domain_type != "kvm":
            mode = None  # TCG cannot pass the host CPU through
        if mode is None and self.topology is None:
            return
        cpu = sub(dom, "cpu", mode=mode, check="none" if mode else None)
        if mode == "custom" and self.cpu_model:
            sub(cpu, "model", self.cpu_model, fallback="allow")
        if self.topology:
            sub(cpu, "topology", sockets=str(self.topology.sockets), cores=str(self.topology.cores),
                threads=str(self.topology.threads))

    def _render_memory_backing(self, dom: ET.Element) -> None:
        if self.memory_backing == "default":
            return
        backing = sub(dom, "memoryBacking")
        if self.memory_backing.startswith("hugepages"):
            sub(backing, "hugepages")
            sub(backing, "nosharepages")  # KSM cannot merge hugepages anyway
        else:
            sub(backing, "source", type="memfd")
        if self.memory_backing != "hugepages-private":
            sub(backing, "access", mode="shared")  # what lets virtiofs be hot-plugged later

    def _render_sysinfo(self, dom: ET.Element) -> None:
        if not (self.smbios_serial or self.smbios_asset_tag):
            return
        info = sub(dom, "sysinfo", type="smbios")
        if self.smbios_serial:
            sub(sub(info, "system"), "entry", self.smbios_serial, name="serial")
        if self.smbios_asset_tag:
            sub(sub(info, "chassis"), "entry", self.smbios_asset_tag, name="asset")

    def to_xml(self) -> str:
        return ET.tostring(self.render(), encoding="unicode")


def ha_metadata_element(enable_ha: bool, qualified: bool = False) -> ET.Element:
    """``<vm enableHa="true"/>`` in the kvmagent namespace (domain metadata)."""
    tag = f"{{{HA_NAMESPACE}}}vm" if qualified else "vm"
    return ET.Element(tag, {"enableHa": "true" if enable_ha else "false"})


def ha_metadata_xml(enable_ha: bool) -> str:
    return ET.tostring(ha_metadata_element(enable_ha), encoding="unicode")


def parse_ha_metadata(xml: str | None) -> bool:
    if not xml:
        return False
    try:
        return ET.fromstring(xml).get("enableHa") == "true"
    except ET.ParseError:
        return False


ET.register_namespace(HA_PREFIX, HA_NAMESPACE)
