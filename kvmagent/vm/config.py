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
    target: str  # vda, vdb...
    format: Literal["qcow2", "raw"] = "qcow2"
    readonly: bool = False

    def render(self, devices: ET.Element) -> None:
        disk = sub(devices, "disk", type="file", device="disk")
        sub(disk, "driver", name="qemu", type=self.format)
        sub(disk, "source", file=self.path)
        sub(disk, "target", dev=self.target, bus="virtio")
        if self.readonly:
            sub(disk, "readonly")


@dataclass
class BridgeNic:
    mac: str
    bridge: str

    def render(self, devices: ET.Element) -> None:
        nic = sub(devices, "interface", type="bridge")
        sub(nic, "mac", address=self.mac)
        sub(nic, "source", bridge=self.bridge)
        sub(nic, "model", type="virtio")


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
class Domain:
    uuid: str
    name: str
    title: str
    vcpus: int
    memory_kib: int
    domain_type: Literal["kvm", "qemu"] = "kvm"
    memory_backing: Literal["default", "memfd-shared", "hugepages"] = "default"
    enable_ha: bool = False
    disks: list[Disk] = field(default_factory=list)
    nics: list[BridgeNic] = field(default_factory=list)
    kernel: DirectKernel | None = None
    console_log: str | None = None
    filesystems: list[VirtiofsShare] = field(default_factory=list)

    def render(self) -> ET.Element:
        dom = ET.Element("domain", {"type": self.domain_type})
        sub(dom, "name", self.name)
        sub(dom, "uuid", self.uuid)
        sub(dom, "title", self.title)
        metadata = sub(dom, "metadata")
        metadata.append(ha_metadata_element(self.enable_ha, qualified=True))
        sub(dom, "memory", str(self.memory_kib), unit="KiB")
        sub(dom, "currentMemory", str(self.memory_kib), unit="KiB")
        sub(dom, "vcpu", str(self.vcpus), placement="static")
        self._render_memory_backing(dom)
        os_ = sub(dom, "os")
        sub(os_, "type", "hvm", arch="x86_64", machine="pc")
        if self.kernel:
            sub(os_, "kernel", self.kernel.kernel)
            if self.kernel.initrd:
                sub(os_, "initrd", self.kernel.initrd)
            if self.kernel.cmdline:
                sub(os_, "cmdline", self.kernel.cmdline)
        else:
            sub(os_, "boot", dev="hd")
        features = sub(dom, "features")
        sub(features, "acpi")  # without ACPI nothing can be hot-plugged
        sub(features, "apic")
        if self.domain_type == "kvm":
            sub(dom, "cpu", mode="host-passthrough", check="none")
        sub(dom, "clock", offset="utc")
        sub(dom, "on_poweroff", "destroy")
        sub(dom, "on_reboot", "restart")
        sub(dom, "on_crash", "destroy")
        devices = sub(dom, "devices")
        for disk in self.disks:
            disk.render(devices)
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
            sub(serial, "target", port="0")
        channel = sub(devices, "channel", type="unix")
        sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
        return dom

    def _render_memory_backing(self, dom: ET.Element) -> None:
        if self.memory_backing == "default":
            return
        backing = sub(dom, "memoryBacking")
        if self.memory_backing == "hugepages":
            sub(backing, "hugepages")
        else:
            sub(backing, "source", type="memfd")
        sub(backing, "access", mode="shared")  # what lets virtiofs be hot-plugged later

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
