"""The virtiofs service: attach and detach shares under the VM's lock, clean up after stopped
VMs, and report status. See the package docstring for how a share is made."""
from __future__ import annotations

import asyncio
import logging
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import libvirt

from ..core import mounttable
from ..core.context import AgentContext
from ..core.errors import AgentError, ConflictError, NotFoundError
from ..core.libvirt_conn import libvirt_message
from ..modelcenter.service import LOCK as MODELCENTER_LOCK
from ..modelcenter.service import SERVICE as MODELCENTER_SERVICE
from ..vm.config import VirtiofsShare
from ..vm.guest_agent import has_guest_agent_channel, libvirt_sender
from .domain_xml import filesystem_element, has_shared_memory, shares_in_xml, vm_key
from .export import Exports
from .guest import GuestMount, GuestUnmount, guest_mount, guest_umount
from .reexport import ReexportMixin
from .registry import ShareRegistry, list_shares

log = logging.getLogger(__name__)

SERVICE = "virtiofs"
MIN_LIBVIRT = (6, 2, 0)  # virtiofs in libvirt; live attach/detach since 7.9 (checked by libvirt)
MIN_QEMU = (5, 0, 0)  # vhost-user-fs-pci
HOTPLUG_LIBVIRT = (7, 9, 0)  # live attach/detach of virtiofs; ZStack's virtiofsHotplugSupported
QGA_NOT_CONNECTED = "QGA not connected for VM, unable to mount virtiofs source inside VM"


class VirtiofsService(ReexportMixin):
    def __init__(self, ctx: AgentContext):
        self.ctx = ctx
        self.config = ctx.config
        self.registry = ShareRegistry(ctx)
        # (domain uuid key, device alias) -> future: True removed, False removal failed
        self._waiters: dict[tuple[str, str], asyncio.Future] = {}
        self.exports = Exports(ctx)
        self._init_reexport()

    async def start(self) -> None:
        lv = self.ctx.libvirt
        await lv.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed)
        await lv.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, self._on_failed)
        await lv.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle)
        models = self.ctx.services.get(MODELCENTER_SERVICE)
        if models is not None:  # the model center asks us who shares its mounts, and tells
            models.share_listers.append(lambda: list_shares(self.ctx))  # us when one is healthy
            models.healthy_listeners.append(self.reexport_stale)
        if self.registry.all():
            self.ctx.spawn(self.reconcile(), name="virtiofs reconcile")

    # -- plumbing ---------------------------------------------------------------------------
    def vm_lock(self, uuid: str):
        vm = self.ctx.services.get("vm")
        return vm.lock(uuid) if vm is not None else self.ctx.locks.hold("vm", uuid)

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        try:
            return await self.ctx.libvirt.call(fn, *args, timeout=timeout)
        except libvirt.libvirtError as exc:
            raise AgentError(f"libvirt: {libvirt_message(exc)}") from None

    def bind_path(self, vm: str, tag: str) -> Path:
        return self.exports.bind_path(vm, tag)

    def _guest_agent(self, dom: libvirt.virDomain):
        return libvirt_sender(self.ctx, dom, self.config.virtiofs_qga_timeout)

    def virtiofsd(self) -> str | None:
        binary = str(self.config.virtiofsd_binary)
        return binary if os.access(binary, os.X_OK) else None

    def required_virtiofsd(self) -> str:
        binary = self.virtiofsd()
        if binary is None:
            raise AgentError(f"virtiofsd not found at {self.config.virtiofsd_binary} "
                             f"(config virtiofsd_binary; Debian package qemu-system-common)")
        return binary

    async def _domain(self, uuid: str) -> tuple[libvirt.virDomain, bool, bool, str, str | None]:
        """(domain, active, persistent, live XML, inactive XML or None); NotFoundError."""
        def read(conn: libvirt.virConnect):
            try:
                dom = conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            persistent = bool(dom.isPersistent())
            inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if persistent else None
            return dom, bool(dom.isActive()), persistent, dom.XMLDesc(0), inactive

        found = await self.call(read)
        if found is None:
            raise NotFoundError(f"VM {uuid} does not exist on this host")
        return found

    def _modelcenter(self):
        svc = self.ctx.services.get(MODELCENTER_SERVICE)
        if svc is None:
            raise AgentError("virtiofs shares export model-center directories, but the "
                             "modelcenter plugin is not loaded")
        return svc

    async def _resolve_source(self, source: str) -> tuple[str, str, str]:
        """(real path, model-center uuid, path below its mount point) of ``source``.

        Only a check of what was asked for: the export itself is made by :meth:`Exports.bind`, which
        walks ``rel`` again without following any symlink, under the model center's lock.
        """
        real, exists, is_dir = await mounttable.resolve_path(source,
                                                             self.config.virtiofs_path_timeout)
        root = str(self._modelcenter().root).rstrip("/") or "/"
        if not real.startswith(root + "/"):
            if real == root:
                raise AgentError(f"sourcePath: {source} is the models root itself; share a "
                                 f"directory of a mounted model center ({root}/<uuid>/...)")
            raise AgentError(f"sourcePath: {source} resolves to {real}, outside the models "
                             f"root {root}")
        mc, _, rel = real[len(root) + 1:].partition("/")
        if not exists:
            raise AgentError(f"sourcePath: {source} does not exist")
        if not is_dir:
            raise AgentError(f"sourcePath: {source} is not a directory")
        return real, mc, rel

    def _check_model_center(self, source: str, mc: str) -> mounttable.MountEntry:
        """The mount of model center ``mc``, which must be recorded and mounted now (the
        caller holds its lock, so an umount cannot slip in before the share exists)."""
        svc = self._modelcenter()
        entry = svc.mounted(mc)
        if entry is None:
            raise AgentError(f"sourcePath: {source} is not inside a mounted model center "
                             f"({svc.root}/<uuid>/...); mount it with /modelcenter/mount first")
        return entry

    @staticmethod
    def _check_writable(source: str, mc: str, mc_entry: mounttable.MountEntry,
                        readonly: bool) -> None:
        # A bind mount of a directory below a read-only (bind) mount is writable unless made
        # read-only itself: never hand out write access the model center's mount does not give.
        if not readonly and mc_entry.readonly:
            raise AgentError(f"sourcePath: {source} lies in model center {mc}, which is mounted "
                             f"read-only; share it with readonly=true")

    # -- attach -----------------------------------------------------------------------------
    async def attach(self, vm: str, tag: str, source: str, mount_path: str | None,
                     readonly: bool, cache: str, queue: int = 1024) -> GuestMount:
        binary = self.required_virtiofsd()
        async with self.vm_lock(vm):
            dom, active, persistent, live, _ = await self._domain(vm)
            if not active:
                raise AgentError(f"VM {vm} is not running; virtiofs shares are attached to "
                                 f"running VMs")
            if not has_shared_memory(live):
                raise AgentError(f"VM {vm} has no shared memory backing (start it with "
                                 f"memoryBacking memfd-shared or hugepages)")
            real, mc, rel = await self._resolve_source(source)
            existing = filesystem_element(live, tag)
            if existing is not None:
                self._same_or_conflict(vm, tag, VirtiofsShare.from_element(existing), real,
                                       readonly, cache, queue)
                log.info("VM %s already shares %s as %s", vm, real, tag)
            else:
                # Hold the model center's lock too: its umount checks for shares under it,
                # and must not run between that check and this attach.
                async with self.ctx.locks.hold(MODELCENTER_LOCK, mc):
                    mc_entry = self._check_model_center(source, mc)
                    self._check_writable(source, mc, mc_entry, readonly)
                    await self._attach_new(dom, vm, tag, real, mc_entry, rel, persistent,
                                           readonly, cache, binary, mount_path, queue)
            # Under the VM's lock: a detach right behind must find the in-guest mount to undo.
            return await self._mount_in_guest(dom, live, tag, mount_path, readonly)

    async def _mount_in_guest(self, dom: libvirt.virDomain, live: str, tag: str,
                              mount_path: str | None, readonly: bool,
                              fresh: bool = False) -> GuestMount:
        if not mount_path:
            return GuestMount(False, False, None)  # ZStack: nothing asked, nothing reported
        if not has_guest_agent_channel(live):
            return GuestMount(True, False, f"{QGA_NOT_CONNECTED}: the VM has no guest agent "
                                           f"channel")
        return await guest_mount(self._guest_agent(dom), tag, mount_path, readonly,
                                 self.config.virtiofs_qga_timeout * 2,
                                 self.config.virtiofs_guest_mount_wait, fresh)

    def _same_or_conflict(self, vm: str, tag: str, share: VirtiofsShare | None, real: str,
                          readonly: bool, cache: str, queue: int) -> None:
        rec = self.registry.load(vm).get(tag)
        if rec and share is not None and rec.get("exportDir") == share.source_dir:
            have = (rec["sourcePath"], bool(rec.get("readonly")), rec.get("cacheMode"),
                    share.queue)
        else:
            have = (share.source_dir if share else "?", bool(share and share.readonly),
                    share.cache if share else "?", share.queue if share else "?")
        if have[0] != real:
            raise ConflictError(f"VM {vm} already shares tag {tag} from {have[0]}; detach it "
                                f"before sharing {real} under that tag")
        if have[1:] != (readonly, cache, queue):
            raise ConflictError(f"VM {vm} already shares {real} as tag {tag} with readonly="
                                f"{str(have[1]).lower()} cacheMode={have[2]} queue={have[3]}; "
                                f"detach it first to change that")

    async def _attach_new(self, dom: libvirt.virDomain, vm: str, tag: str, real: str,
                          mc_entry: mounttable.MountEntry, rel: str, persistent: bool,
                          readonly: bool, cache: str, binary: str,
                          mount_path: str | None, queue: int = 1024) -> None:
        # virtiofsd always exports a bind mount the agent made from a no-follow walk, never
        # the requested path itself (which a symlink could redirect).
        export = await self.exports.bind(vm, tag, mc_entry, rel, readonly)
        share = VirtiofsShare(source_dir=real, tag=tag, binary=binary, readonly=readonly,
                              cache=cache, export_dir=export, readonly_in_xml=False,
                              queue=queue)
        xml = share.to_xml()
        await self.registry.put(vm, tag, {"vmInstanceUuid": vm, "sourcePath": real,
                                    "exportDir": export, "readonly": readonly,
                                    "cacheMode": cache, "queue": queue,
                                    "mountPath": mount_path})
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if persistent:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            await self.call(lambda conn: dom.attachDeviceFlags(xml, flags))
        except BaseException:
            await self.registry.drop(vm, tag)
            await self.exports.unbind(export)
            raise
        log.info("VM %s: virtiofs %s attached as tag %s (%s)", vm, real, tag,
                 "read-only" if readonly else "read-write")

    # -- detach -----------------------------------------------------------------------------
    async def detach(self, vm: str, tag: str) -> GuestMount:
        """Unplug ``tag``; the in-guest unmount's outcome (never a reason to fail)."""
        umounted = GuestMount(False, False, None)
        async with self.vm_lock(vm):
            try:
                dom, active, persistent, live, inactive = await self._domain(vm)
            except NotFoundError:
                await self._forget(vm, tag)
                return umounted
            live_fs = filesystem_element(live, tag) if active else None
            config_fs = filesystem_element(inactive, tag) if inactive else None
            error = None
            if live_fs is not None:
                result = await self._guest_umount_result(dom, vm, tag, live)
                if result is not None and result.attempted:
                    umounted = GuestMount(True, result.ok, None if result.ok else result.outcome)
                error = await self._detach_live(dom, vm, tag, live_fs)
                if error and config_fs is not None:
                    error += " (it was removed from the persistent definition)"
            if config_fs is not None:
                xml = ET.tostring(config_fs, encoding="unicode")
                await self.call(lambda conn: dom.detachDeviceFlags(
                    xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG))
            if error:
                raise AgentError(error)
            await self._forget(vm, tag)
            if live_fs is not None or config_fs is not None:
                log.info("VM %s: virtiofs tag %s detached", vm, tag)
        return umounted

    async def _guest_umount(self, dom: libvirt.virDomain, vm: str, tag: str,
                            live: str) -> list[str]:
        """Unmount ``tag`` in the guest before an unplug; where it was mounted."""
        result = await self._guest_umount_result(dom, vm, tag, live)
        return result.paths if result is not None else []

    async def _guest_umount_result(self, dom: libvirt.virDomain, vm: str, tag: str,
                                   live: str) -> GuestUnmount | None:
        """The in-guest unmount of ``tag`` before an unplug; None without a guest agent."""
        if not has_guest_agent_channel(live):
            return None
        if await self._paused(dom):  # its agent cannot answer: do not wait for it
            result = GuestUnmount([], "in-guest unmount not done: the VM is paused", ok=False,
                                  attempted=False)
        else:
            result = await guest_umount(self._guest_agent(dom), tag,
                                        self.config.virtiofs_qga_timeout)
        log.info("VM %s: virtiofs tag %s: %s", vm, tag, result.outcome)
        return result

    async def _paused(self, dom: libvirt.virDomain) -> bool:
        state, _ = await self.call(lambda conn: dom.state())
        return state == libvirt.VIR_DOMAIN_PAUSED

    async def _detach_live(self, dom: libvirt.virDomain, vm: str, tag: str,
                           fs: ET.Element) -> str | None:
        """Unplug ``fs`` and wait for the guest to release it; an error text, or None."""
        alias = (fs.find("alias").get("name") if fs.find("alias") is not None else None) or ""
        key = (vm_key(dom.UUIDString()), alias)
        future = asyncio.get_running_loop().create_future()
        self._waiters[key] = future
        timeout = self.config.virtiofs_detach_timeout
        xml = ET.tostring(fs, encoding="unicode")
        try:
            await self.call(lambda conn: dom.detachDeviceFlags(xml,
                                                               libvirt.VIR_DOMAIN_AFFECT_LIVE))
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                try:
                    removed = await asyncio.wait_for(asyncio.shield(future),
                                                     max(0.05, min(0.5, remaining)))
                    if removed:
                        return None
                    return (f"VM {vm}: the guest refused to release virtiofs tag {tag} "
                            f"(device {alias}); it is still attached")
                except TimeoutError:
                    pass
                # An event lost to a reconnect must not make us wait forever: look.
                _, active, _, live, _ = await self._domain(vm)
                if not active or filesystem_element(live, tag) is None:
                    return None
                if time.monotonic() >= deadline:
                    return (f"VM {vm} did not release virtiofs tag {tag} (device {alias}) "
                            f"within {timeout:g}s: the guest did not answer the unplug request "
                            f"(is its OS running, with ACPI hot-plug?); the device is still "
                            f"attached")
        except NotFoundError:
            return None  # the domain went away: nothing left to release
        finally:
            self._waiters.pop(key, None)

    async def _forget(self, vm: str, tag: str) -> None:
        self._reexport_retry.pop((vm_key(vm), tag), None)
        rec = self.registry.load(vm).get(tag)
        if rec is not None:
            await self.exports.unbind(rec.get("exportDir"))  # only ever a bind under our root
            await self.registry.drop(vm, tag)
        else:
            await self.exports.unbind(str(self.exports.bind_path(vm, tag)))

    def _on_removed(self, uuid: str, name: str, args: tuple) -> None:
        future = self._waiters.get((vm_key(uuid), args[0] if args else ""))
        if future is not None and not future.done():
            future.set_result(True)

    def _on_failed(self, uuid: str, name: str, args: tuple) -> None:
        future = self._waiters.get((vm_key(uuid), args[0] if args else ""))
        if future is not None and not future.done():
            future.set_result(False)

    def _on_lifecycle(self, uuid: str, name: str, args: tuple) -> None:
        event = args[0] if args else None
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED) \
                and self.registry.load(uuid):
            self.ctx.spawn(self.cleanup_vm(uuid), name=f"virtiofs cleanup {name}")

    # -- cleanup ----------------------------------------------------------------------------
    async def cleanup_vm(self, uuid: str) -> None:
        """Drop records and bind mounts no domain uses any more (stopped/undefined VM)."""
        records = self.registry.load(uuid)
        if not records:
            return
        vm = next(iter(records.values())).get("vmInstanceUuid") or uuid
        async with self.vm_lock(vm):
            try:
                _, active, _, live, inactive = await self._domain(uuid)
                used = {fs.source_dir for xml in (live if active else None, inactive) if xml
                        for fs in shares_in_xml(xml)}
            except NotFoundError:
                used = set()
            except AgentError as exc:
                log.warning("virtiofs cleanup of %s postponed: %s", uuid, exc)
                return
            for tag, rec in list(self.registry.load(uuid).items()):
                if rec.get("exportDir") not in used:
                    await self._forget(uuid, tag)
                    log.info("VM %s: dropped virtiofs share %s (no longer in the domain)", vm, tag)

    async def reconcile(self) -> None:
        for uuid in list(self.registry.all()):
            await self.cleanup_vm(uuid)

    # -- status -----------------------------------------------------------------------------
    async def status(self, vm: str | None) -> dict[str, Any]:
        try:
            libvirt_version, qemu_version = await self.ctx.libvirt.versions()
        except (AgentError, libvirt.libvirtError):
            libvirt_version = qemu_version = None
        binary = self.virtiofsd()
        reasons = []
        if binary is None:
            reasons.append(f"virtiofsd not found at {self.config.virtiofsd_binary}")
        if libvirt_version is None:
            reasons.append("libvirt unavailable")
        elif tuple(int(x) for x in libvirt_version.split(".")) < MIN_LIBVIRT:
            reasons.append(f"libvirt {libvirt_version} is older than 6.2.0")
        if qemu_version and tuple(int(x) for x in qemu_version.split(".")) < MIN_QEMU:
            reasons.append(f"QEMU {qemu_version} is older than 5.0 (no vhost-user-fs)")
        shares = await list_shares(self.ctx, vm) if libvirt_version else []
        for share in shares:
            retry = self._reexport_retry.get((vm_key(share.vm_uuid), share.tag))
            if retry is not None and retry.error:
                share.problem = retry.error
        hotplug = libvirt_version is not None and \
            tuple(int(x) for x in libvirt_version.split(".")) >= HOTPLUG_LIBVIRT
        return {"supported": not reasons, "reason": "; ".join(reasons) or None,
                "libvirtVersion": libvirt_version or "unknown",
                "virtiofsHotplugSupported": hotplug, "qemuVersion": qemu_version,
                "virtiofsdPath": str(self.config.virtiofsd_binary),
                "virtiofsdFound": binary is not None,
                "shares": [s.wire() for s in shares]}
