"""Domain XML for the tiny test guest (smoke tests only; the agent builds its own)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from .build import GuestImage

__all__ = ["guest_cmdline", "tiny_domain_xml"]


def guest_cmdline(virtiofs_tags: Iterable[str] = (), extra: str = "") -> str:
    """Kernel command line for the test guest.

    The guest finds virtiofs tags by itself (it reads them from the device's
    PCI config space); ``virtiofs_tags`` adds ``kvmagent.vfstags=a,b`` as a
    fallback list of tags it should try to mount.
    """
    parts = ["console=ttyS0"]
    tags = [t for t in virtiofs_tags]
    if tags:
        parts.append("kvmagent.vfstags=" + ",".join(tags))
    if extra:
        parts.append(extra)
    return " ".join(parts)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def tiny_domain_xml(
    name: str,
    uuid: str,
    image: GuestImage,
    console_log: str,
    disk_path: str | None = None,
    memfd_shared: bool = True,
    memory_mib: int = 256,
    *,
    cmdline: str | None = None,
    vcpus: int = 1,
) -> str:
    """XML for a TCG (type='qemu') domain booting ``image`` directly.

    - machine 'pc' with ACPI (needed for PCI hot-plug and the power button);
    - serial console written to the file ``console_log`` (must be in a
      directory qemu's user can traverse);
    - memfd shared memory when ``memfd_shared`` (needed for virtiofs);
    - an optional raw virtio disk at ``disk_path`` (vda);
    - no network, no graphics, no USB, no balloon.
    """
    dom = ET.Element("domain", type="qemu")
    _sub(dom, "name", name)
    _sub(dom, "uuid", str(uuid))
    _sub(dom, "memory", str(int(memory_mib)), unit="MiB")
    _sub(dom, "vcpu", str(int(vcpus)))
    if memfd_shared:
        mb = _sub(dom, "memoryBacking")
        _sub(mb, "source", type="memfd")
        _sub(mb, "access", mode="shared")
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_, "kernel", str(image.kernel))
    _sub(os_, "initrd", str(image.initrd))
    _sub(os_, "cmdline", cmdline if cmdline is not None else guest_cmdline())
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    if disk_path is not None:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="raw")
        _sub(disk, "source", file=str(disk_path))
        _sub(disk, "target", dev="vda", bus="virtio")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(console_log))
    _sub(serial, "target", port="0")
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")
