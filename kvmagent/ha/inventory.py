"""Which VMs use which storage, and which have HA enabled, without trusting libvirtd to answer.

A snapshot (disk paths and HA flag per VM, from the domains' XML) is refreshed in the
background while fencers run; at fencing time a fresh one is tried with a short timeout and
the last snapshot is used when libvirtd does not answer. Paths are compared as strings
(never resolved): resolving a path on a hung mount would hang.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from ..core.context import AgentContext
from ..core.errors import AgentError
from ..vm.config import HA_NAMESPACE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmRecord:
    uuid: str
    paths: tuple[str, ...]
    enable_ha: bool
    active: bool
    bridges: tuple[str, ...] = ()


def storage_paths(root: ET.Element) -> tuple[str, ...]:
    """Files and block devices behind a domain's disks."""
    paths = []
    for source in root.iterfind("./devices/disk/source"):
        value = source.get("file") or source.get("dev") or source.get("dir")
        if value:
            paths.append(value)
    return tuple(paths)


def bridges(root: ET.Element) -> tuple[str, ...]:
    """The bridges the domain's NICs are plugged into."""
    return tuple(s.get("bridge") for s in root.iterfind("./devices/interface/source")
                 if s.get("bridge"))


def under(path: str, mount: str) -> bool:
    path, mount = os.path.normpath(path), os.path.normpath(mount)
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def ha_flag(root: ET.Element) -> bool:
    """The enableHa flag from the domain's own metadata (see kvmagent.vm.config)."""
    element = root.find(f"./metadata/{{{HA_NAMESPACE}}}vm")
    return element is not None and element.get("enableHa") == "true"


def read_inventory(conn: libvirt.virConnect) -> dict[str, VmRecord]:
    """Running domains with their disks and HA flag, all from one XML read per domain."""
    result = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            root = ET.fromstring(dom.XMLDesc(0))
            name = dom.name()
            result[name] = VmRecord(name, storage_paths(root), ha_flag(root), bool(dom.isActive()),
                                    bridges(root))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    return result


class VmInventory:
    def __init__(self, ctx: AgentContext, refresh_timeout: float = 10.0):
        self.ctx = ctx
        self.refresh_timeout = refresh_timeout
        self.snapshot: dict[str, VmRecord] | None = None
        self.taken_at: float | None = None

    async def refresh(self) -> dict[str, VmRecord]:
        self.snapshot = await self.ctx.libvirt.call(read_inventory, timeout=self.refresh_timeout,
                                                    what="reading VM disks")
        self.taken_at = time.time()
        return self.snapshot

    async def current(self) -> tuple[dict[str, VmRecord] | None, str]:
        """(records, source): fresh if libvirtd answers, else the last snapshot (or None)."""
        try:
            return await asyncio.wait_for(self.refresh(), self.refresh_timeout), "libvirt"
        except (TimeoutError, AgentError, libvirt.libvirtError) as exc:
            if self.snapshot is None:
                return None, f"libvirt did not answer ({exc}) and no earlier snapshot exists"
            age = time.time() - (self.taken_at or 0)
            log.warning("libvirt did not answer (%s); using the VM snapshot from %.0fs ago", exc, age)
            return self.snapshot, f"snapshot from {age:.0f}s ago (libvirt did not answer)"

    def vms_on(self, mount: str) -> list[VmRecord]:
        return [vm for vm in (self.snapshot or {}).values()
                if vm.active and any(under(p, mount) for p in vm.paths)]
