"""Exporting shares again after their model center was remounted.

virtiofsd holds the export it was started with, so after a remount its guest would go on
reading a dead file system. The model center's health watcher calls :meth:`reexport_stale`
(through its ``healthy`` hook) for every healthy mount; shares still bound to an older mount
are unplugged, bound again from the new mount and plugged back in, each in its own task, a
few at a time, with a growing pause after a failure.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..core import mounttable
from ..core.errors import AgentError, NotFoundError
from ..modelcenter.service import LOCK as MODELCENTER_LOCK
from ..vm.config import VirtiofsShare
from .domain_xml import filesystem_element, vm_key
from .guest import GuestMount

log = logging.getLogger(__name__)

REEXPORT_PARALLEL = 4  # shares unplugged and plugged again at once, host-wide
REEXPORT_BACKOFF_CAP = 300.0  # seconds, between attempts to re-export one share


@dataclass
class ReexportRetry:
    """A share whose re-export after a remount failed (or that was not live to re-export)."""
    failures: int = 0
    after: float = 0.0  # monotonic time before which it is not tried again
    error: str | None = None  # what /virtiofs/status reports as its problem



class ReexportMixin:
    """The re-export half of :class:`~kvmagent.virtiofs.service.VirtiofsService`."""

    def _init_reexport(self) -> None:
        # re-exports after a remount, per (domain uuid key, tag)
        self._reexporting: set[tuple[str, str]] = set()
        self._reexport_retry: dict[tuple[str, str], ReexportRetry] = {}
        self._reexport_slots = asyncio.Semaphore(REEXPORT_PARALLEL)

    def reexport_stale(self, mc_entry: mounttable.MountEntry) -> None:
        """Export the model center mounted at ``mc_entry`` again to every share still bound
        to an older mount of it (remounted by the watcher, at start-up or by the MN).

        virtiofsd holds the export it was started with, so after a remount its guest would
        go on reading a dead file system. A share is stale when its bind mount is gone or
        lies on another device than the model center's mount now. Each runs as its own task,
        a few at a time, with a growing pause after a failure; called every health round.
        """
        prefix = mc_entry.mount_point.rstrip("/") + "/"
        binds = {e.mount_point: e for e in mounttable.read_mounts(self.config.procfs_root)}
        now = time.monotonic()
        for records in self.registry.all().values():
            for tag, rec in records.items():
                vm, source = rec.get("vmInstanceUuid"), rec.get("sourcePath") or ""
                bind = binds.get(rec.get("exportDir") or "")
                if not vm or not (source + "/").startswith(prefix) or \
                        (bind is not None and bind.dev == mc_entry.dev):
                    continue
                key = (vm_key(vm), tag)
                retry = self._reexport_retry.get(key)
                if key in self._reexporting or (retry is not None and retry.after > now):
                    continue
                self._reexporting.add(key)
                self.ctx.spawn(self._reexport(vm, tag, key), name=f"virtiofs re-export {vm} {tag}")

    def reexporting(self) -> set[tuple[str, str]]:
        """(domain uuid key, tag) of the shares being exported again right now."""
        return set(self._reexporting)

    async def _reexport(self, vm: str, tag: str, key: tuple[str, str]) -> None:
        try:
            async with self._reexport_slots:
                mounted = await self.reshare(vm, tag)
        except Exception as exc:  # noqa: BLE001 - a background task must report, not die
            retry = self._reexport_retry.setdefault(key, ReexportRetry())
            retry.failures += 1
            delay = min(self.config.modelcenter_health_interval * 2 ** (retry.failures - 1),
                        REEXPORT_BACKOFF_CAP)
            retry.after = time.monotonic() + delay
            retry.error = f"not exported again after a remount: {exc}"
            log.error("VM %s: virtiofs tag %s was not exported again after its model center "
                      "was remounted: %s (next attempt in %.3gs)", vm, tag, exc, delay)
            return
        finally:
            self._reexporting.discard(key)
        self._reexport_retry.pop(key, None)
        if mounted is None:  # not a live share of a running VM (now): look again much later
            self._reexport_retry[key] = ReexportRetry(after=time.monotonic() + REEXPORT_BACKOFF_CAP)
            await self.cleanup_vm(vm)
        elif mounted.attempted and not mounted.success:
            log.error("VM %s: virtiofs tag %s exported again, but not mounted in the guest: "
                      "%s", vm, tag, mounted.error)

    async def reshare(self, vm: str, tag: str) -> GuestMount | None:
        """Unplug share ``tag`` of ``vm``, bind its source from the model center's current
        mount, plug it in again and mount it in the guest where it was mounted (and at the
        recorded mountPath). None if it is not a live share of a running VM.

        Everything that can be checked is checked before the unplug. The source is not
        resolved again (it was at attach): its path below the model center is walked by
        :meth:`Exports.bind` without following symlinks, so a symlink planted since cannot
        redirect the share. Live only: the persistent definition names the same export path.
        """
        binary = self.required_virtiofsd()
        async with self.vm_lock(vm):
            rec = self.registry.load(vm).get(tag)
            try:
                dom, active, _, live, _ = await self._domain(vm)
            except NotFoundError:
                return None
            fs = filesystem_element(live, tag) if active else None
            if rec is None or fs is None or \
                    VirtiofsShare.from_element(fs).source_dir != rec.get("exportDir"):
                return None
            real, readonly = rec["sourcePath"], bool(rec.get("readonly"))
            cache = rec.get("cacheMode") or "auto"
            root = str(self._modelcenter().root).rstrip("/")
            if not real.startswith(root + "/"):
                raise AgentError(f"recorded source {real} is outside the models root {root}")
            mc, _, rel = real[len(root) + 1:].partition("/")
            async with self.ctx.locks.hold(MODELCENTER_LOCK, mc):
                self._check_writable(real, mc, self._check_model_center(real, mc), readonly)
            now, exists, is_dir = await mounttable.resolve_path(
                real, self.config.virtiofs_path_timeout)
            if now != real or not is_dir:
                raise AgentError(f"its source {real} " + (
                    f"now resolves to {now} (a symbolic link was put in its path)"
                    if now != real else "is no longer a directory" if exists
                    else "no longer exists") + "; the share keeps its old export")
            if await self._paused(dom):
                raise AgentError(f"VM {vm} is paused: it cannot release the device now")
            mounted_at = await self._guest_umount(dom, vm, tag, live)
            error = await self._detach_live(dom, vm, tag, fs)
            if error:
                raise AgentError(error)
            await self.exports.unbind(rec.get("exportDir"))
            if not (await self._domain(vm))[1]:
                return None  # it stopped meanwhile
            try:
                async with self.ctx.locks.hold(MODELCENTER_LOCK, mc):
                    mc_entry = self._check_model_center(real, mc)
                    self._check_writable(real, mc, mc_entry, readonly)
                    await self._attach_new(dom, vm, tag, real, mc_entry, rel, False, readonly,
                                           cache, binary, rec.get("mountPath"),
                                           rec.get("queue") or 1024)
            except Exception:
                await self.registry.put(vm, tag, rec)  # it is still in the persistent definition
                raise
            log.info("VM %s: virtiofs tag %s exports the remounted %s again", vm, tag, real)
            paths = list(dict.fromkeys(mounted_at + ([rec["mountPath"]] if rec.get("mountPath")
                                                     else [])))
            if not paths:
                return GuestMount(False, False, "in-guest mount not attempted: it was not "
                                                "mounted in the guest")
            results = [await self._mount_in_guest(dom, live, tag, p, readonly, fresh=True)
                       for p in paths]
        failed = [f"{p}: {r.error}" for p, r in zip(paths, results, strict=True) if not r.success]
        return GuestMount(any(r.attempted for r in results), not failed,
                          "; ".join(failed) or None)
