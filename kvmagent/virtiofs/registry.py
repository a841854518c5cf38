"""Which shares the agent made: per-VM records in the state store, and the live shares of
running domains as libvirt shows them (joined with those records)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt

from ..core.context import AgentContext
from ..core.errors import AgentError
from ..core.libvirt_conn import libvirt_message
from .domain_xml import shares_in_xml, vm_key

FOLDER = "virtiofs"


@dataclass
class Share:
    vm_uuid: str  # as the MN names it (the domain name for agent-made VMs)
    tag: str
    source_path: str  # what was asked for (resolved)
    export_dir: str  # what virtiofsd exports (the agent's bind mount of source_path)
    readonly: bool
    cache_mode: str
    alias: str | None = None
    queue: int = 1024
    problem: str | None = None  # why it does not export its model center's current mount

    def wire(self) -> dict[str, Any]:
        return {"vmInstanceUuid": self.vm_uuid, "tag": self.tag, "sourcePath": self.source_path,
                "readonly": self.readonly, "cacheMode": self.cache_mode, "queue": self.queue,
                "deviceAlias": self.alias, "problem": self.problem}


class ShareRegistry:
    """tag -> {vmInstanceUuid, sourcePath, exportDir, readonly, cacheMode, mountPath} per VM."""

    def __init__(self, ctx: AgentContext):
        self.state = ctx.state
        self.ctx = ctx

    def _name(self, vm: str) -> str:
        return f"{FOLDER}/{vm_key(vm)}"

    def load(self, vm: str) -> dict[str, dict]:
        return self.state.load(self._name(vm), {}) or {}

    def _put(self, vm: str, tag: str, entry: dict) -> None:
        doc = self.load(vm)
        doc[tag] = entry
        self.state.save(self._name(vm), doc)

    def _drop(self, vm: str, tag: str) -> None:
        doc = self.load(vm)
        if doc.pop(tag, None) is not None:
            if doc:
                self.state.save(self._name(vm), doc)
            else:
                self.state.delete(self._name(vm))

    # Writes fsync: off the event loop (callers hold the VM's lock, so one at a time per VM).
    async def put(self, vm: str, tag: str, entry: dict) -> None:
        await self.ctx.runner.run(self._put, vm, tag, entry,
                                  timeout=self.ctx.config.virtiofs_path_timeout,
                                  what="saving virtiofs shares")

    async def drop(self, vm: str, tag: str) -> None:
        await self.ctx.runner.run(self._drop, vm, tag,
                                  timeout=self.ctx.config.virtiofs_path_timeout,
                                  what="saving virtiofs shares")

    def all(self) -> dict[str, dict[str, dict]]:
        out = {}
        for name in self.state.names(FOLDER):
            out[name.split("/", 1)[1]] = self.state.load(name, {}) or {}
        return out


async def list_shares(ctx: AgentContext, vm: str | None = None) -> list[Share]:
    """Virtiofs shares of running domains (all, or ``vm``), from their live XML."""
    def read(conn: libvirt.virConnect) -> list[tuple[str, str, str]]:
        if vm is not None:
            try:
                doms = [conn.lookupByUUIDString(vm)]
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return []
                raise
        else:
            doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        out = []
        for dom in doms:
            try:
                if dom.isActive():
                    out.append((dom.name(), dom.UUIDString(), dom.XMLDesc(0)))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return out

    try:
        domains = await ctx.libvirt.call(read, what="listing virtiofs shares")
    except libvirt.libvirtError as exc:
        raise AgentError(f"libvirt: {libvirt_message(exc)}") from None
    registry = ShareRegistry(ctx).all()
    shares = []
    seen = set()
    for name, uuid, xml in domains:
        records = registry.get(vm_key(uuid), {})
        for fs in shares_in_xml(xml):
            seen.add((vm_key(uuid), fs.tag))
            rec = records.get(fs.tag)
            if rec and rec.get("exportDir") == fs.source_dir:
                shares.append(Share(rec.get("vmInstanceUuid") or name, fs.tag, rec["sourcePath"],
                                    fs.source_dir, bool(rec.get("readonly")),
                                    rec.get("cacheMode", fs.cache), fs.alias, queue=fs.queue))
            else:
                shares.append(Share(name, fs.tag, fs.source_dir, fs.source_dir, fs.readonly,
                                    fs.cache, fs.alias, queue=fs.queue))
    # A share being exported again after a remount is unplugged for a moment: still a share
    # (an umount must not slip into that gap).
    service = ctx.services.get("virtiofs")
    for key in sorted(service.reexporting() if service is not None else ()):
        rec = registry.get(key[0], {}).get(key[1])
        if key in seen or rec is None or (vm is not None and vm_key(vm) != key[0]):
            continue
        shares.append(Share(rec.get("vmInstanceUuid") or key[0], key[1], rec["sourcePath"],
                            rec.get("exportDir") or "", bool(rec.get("readonly")),
                            rec.get("cacheMode") or "auto", None,
                            queue=rec.get("queue") or 1024,
                            problem="being exported again after a remount"))
    return shares
