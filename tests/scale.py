"""Hundreds of domains in libvirt's in-process test:///default driver (bookkeeping at scale)."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt

from kvmagent.core.libvirt_conn import ensure_event_impl

TEST_URI = "test:///default"


def domain_xml(uuid: str, domain_type: str = "test") -> str:
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = uuid
    ET.SubElement(dom, "uuid").text = uuid
    ET.SubElement(dom, "memory").text = "8192"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type").text = "hvm"
    return ET.tostring(dom, encoding="unicode")


def populate(count: int, uri: str = TEST_URI) -> tuple[libvirt.virConnect, list[str]]:
    """``count`` domains: started on test:///, only defined (inactive) on a real libvirtd.

    The returned connection keeps the test driver's state alive.
    """
    ensure_event_impl()
    conn = libvirt.open(uri)
    real = uri != TEST_URI
    uuids = [f"{i:08x}{'0' * 16}{'b' * 8 if real else '0' * 8}" for i in range(1, count + 1)]
    for uuid in uuids:
        dom = conn.defineXML(domain_xml(uuid, "qemu" if real else "test"))
        if not real:
            dom.create()
    return conn, uuids


def clear(conn: libvirt.virConnect, uuids: list[str]) -> None:
    for uuid in uuids:
        try:
            dom = conn.lookupByName(uuid)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
    conn.close()
