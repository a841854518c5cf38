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

from ..context import AgentContext
from ..errors import AgentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmRecord:
    uuid: str
    paths: tuple[str, ...]
    enable_ha: bool
    active: bool


def storage_paths(domain_xml: str) -> tuple[str, ...]:
    """Files and block devices behind a domain's disks."""
    root = ET.fromstring(domain_xml)
    paths = []
    for source in root.iterfind("./devices/disk/source"):
        value = source.get("file") or source.get("dev") or source.get("dir")
        if value:
            paths.append(value)
    return tuple(paths)


def under(path: str, mount: str) -> bool:
    path, mount = os.path.normpath(path), os.path.normpath(mount)
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def read_inventory(conn: libvirt.virConnect) -> dict[str, tuple[tuple[str, ...], bool]]:
    result = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            result[dom.name()] = (storage_paths(dom.XMLDesc(0)), bool(dom.isActive()))
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
        vm_service = self.ctx.services.get("vm")
        domains = await self.ctx.libvirt.call(read_inventory, timeout=self.refresh_timeout,
                                              what="reading VM disks")
        flags = await vm_service.ha_flags() if vm_service else {}
        self.snapshot = {uuid: VmRecord(uuid, paths, flags.get(uuid, False), active)
                         for uuid, (paths, active) in domains.items()}
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
