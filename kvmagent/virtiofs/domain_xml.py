"""What a domain's XML says about virtiofs: its shares, one share's element, shared memory."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from ..vm.config import VirtiofsShare


def vm_key(uuid: str) -> str:
    """A domain uuid in one spelling (the MN may send it with or without dashes)."""
    return uuid.replace("-", "").lower()


def shares_in_xml(xml: str) -> list[VirtiofsShare]:
    root = ET.fromstring(xml)
    found = []
    for fs in root.findall("./devices/filesystem"):
        share = VirtiofsShare.from_element(fs)
        if share is not None:
            found.append(share)
    return found


def filesystem_element(xml: str, tag: str) -> ET.Element | None:
    for fs in ET.fromstring(xml).findall("./devices/filesystem"):
        share = VirtiofsShare.from_element(fs)
        if share is not None and share.tag == tag:
            return fs
    return None


def has_shared_memory(xml: str) -> bool:
    root = ET.fromstring(xml)
    access = root.find("./memoryBacking/access")
    if access is not None and access.get("mode") == "shared":
        return True
    cells = root.findall("./cpu/numa/cell")
    return bool(cells) and all(c.get("memAccess") == "shared" for c in cells)
