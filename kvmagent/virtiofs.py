"""Live virtiofs shares of model directories into running VMs.

Attach and detach run under the per-VM lock, live and on the persistent definition. The
device is a :class:`~kvmagent.vm.config.VirtiofsShare` rendered with ElementTree.

Sources: a share's source must resolve to a directory inside ``<models_root>/<uuid>/`` of a
model center that is recorded and mounted right now (checked again under the model center's
lock, which its umount takes too). virtiofsd never exports the requested path itself: the
agent makes a bind mount (``<virtiofs_readonly_root>/<vm>/tag-<tag>``, read-only or
read-write) of the directory a child process opened component by component with
``O_PATH|O_NOFOLLOW|O_DIRECTORY`` from the model-center mount, binding ``/proc/self/fd/N``.
A symlink swapped in after the checks fails the walk instead of redirecting the export, and
the mount table is checked afterwards (the export's root and device must be the model
center's directory). libvirt 9 refuses ``<readonly/>`` for virtiofs and virtiofsd 7.2 has no
read-only switch, so for a read-only share the read-only bind is what makes the host kernel
refuse every write. The mapping (tag -> source, exported dir) is kept under
``virtiofs/<vm>`` in the state store; bind mounts are removed on detach, and when the domain
stops or is undefined.

Detach waits for libvirt's device-removed event (the guest must answer the ACPI unplug); a
guest that never releases the device gives a clear error after ``virtiofs_detach_timeout``.

If the guest agent answers, the share is also mounted inside the guest (guest-exec of
``mkdir -p`` and ``mount -t virtiofs``; argument lists, no shell).
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import libvirt

from .blocking import run_process
from .context import AgentContext
from .errors import AgentError, BlockingTimeout, ConflictError, NotFoundError
from .modelcenter import mounttable
from .modelcenter.service import LOCK as MODELCENTER_LOCK
from .modelcenter.service import SERVICE as MODELCENTER_SERVICE
from .vm.config import VirtiofsShare

log = logging.getLogger(__name__)

FOLDER = "virtiofs"
SERVICE = "virtiofs"
MIN_LIBVIRT = (6, 2, 0)  # virtiofs in libvirt; live attach/detach since 7.9 (checked by libvirt)
MIN_QEMU = (5, 0, 0)  # vhost-user-fs-pci
QGA_CHANNEL = "org.qemu.guest_agent.0"


def vm_key(uuid: str) -> str:
    """A domain uuid in one spelling (the MN may send it with or without dashes)."""
    return uuid.replace("-", "").lower()


def libvirt_message(exc: libvirt.libvirtError) -> str:
    return " ".join((exc.get_error_message() or str(exc)).split())


@dataclass
class Share:
    vm_uuid: str  # as the MN names it (the domain name for agent-made VMs)
    tag: str
    source_path: str  # what was asked for (resolved)
    export_dir: str  # what virtiofsd exports (the agent's bind mount of source_path)
    readonly: bool
    cache_mode: str
    alias: str | None = None
    problem: str | None = None  # why it does not export its model center's current mount

    def wire(self) -> dict[str, Any]:
        return {"vmInstanceUuid": self.vm_uuid, "tag": self.tag, "sourcePath": self.source_path,
                "readonly": self.readonly, "cacheMode": self.cache_mode,
                "deviceAlias": self.alias, "problem": self.problem}


# -- domain XML helpers --------------------------------------------------------------------
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


def has_guest_agent_channel(xml: str) -> bool:
    return any(t.get("name") == QGA_CHANNEL for t in ET.fromstring(xml).findall(
        "./devices/channel/target"))


# -- registry ------------------------------------------------------------------------------
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
                                    rec.get("cacheMode", fs.cache), fs.alias))
            else:
                shares.append(Share(name, fs.tag, fs.source_dir, fs.source_dir, fs.readonly,
                                    fs.cache, fs.alias))
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
                            "being exported again after a remount"))
    return shares


# -- the export bind mount -----------------------------------------------------------------
# argv: model-center mount point, path below it ("" for the mount itself), export dir, "1"
# for read-only. Opens each component with O_PATH|O_NOFOLLOW|O_DIRECTORY (a symlink or a
# non-directory fails), refuses to cross into another mount, then binds /proc/self/fd/N:
# the directory that was opened, whatever happens to the path meanwhile.
_BIND_FD = r"""
import ctypes, errno, os, stat, sys
base, rel, export, ro = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
F = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
def fail(msg):
    sys.stderr.write(msg + "\n")
    sys.exit(3)
try:
    fd = os.open(base, F)
    dev = os.fstat(fd).st_dev
    done = base
    for part in [p for p in rel.split("/") if p]:
        if part in (".", ".."):
            fail(f"{done}/{part}: '.' and '..' are not allowed")
        try:
            nfd = os.open(part, F, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                fail(f"{done}/{part} is a symbolic link or not a directory (refused)")
            raise
        os.close(fd)
        fd, done = nfd, f"{done}/{part}"
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            fail(f"{done} is not a directory")
        if st.st_dev != dev:
            fail(f"{done} is on another file system than the model center (refused)")
except OSError as exc:
    fail(f"{exc.filename or done}: {exc.strerror}")
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
if libc.mount(f"/proc/self/fd/{fd}".encode(), export.encode(), None, MS_BIND, None) != 0:
    fail(f"mount: {os.strerror(ctypes.get_errno())}")
flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if ro else 0)
if libc.mount(None, export.encode(), None, flags, None) != 0:
    err = ctypes.get_errno()
    libc.umount2(export.encode(), 2)  # MNT_DETACH
    fail(f"remount {'read-only' if ro else 'read-write'}: {os.strerror(err)}")
"""


@dataclass
class ReexportRetry:
    """A share whose re-export after a remount failed (or that was not live to re-export)."""
    failures: int = 0
    after: float = 0.0  # monotonic time before which it is not tried again
    error: str | None = None  # what /virtiofs/status reports as its problem


# -- guest agent ---------------------------------------------------------------------------
GUEST_MOUNT_RETRY = 0.5  # seconds between in-guest mount attempts
REEXPORT_PARALLEL = 4  # shares unplugged and plugged again at once, host-wide
REEXPORT_BACKOFF_CAP = 300.0  # seconds, between attempts to re-export one share
GUEST_UMOUNT_MAX = 16  # in-guest mounts of one tag undone before an unplug (the guest lists them)


class GuestAgentError(Exception):
    pass


Send = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass
class GuestMount:
    attempted: bool
    success: bool
    error: str | None


async def guest_exec(send: Send, path: str, args: list[str], timeout: float) -> tuple[int, str]:
    """Run ``path args`` in the guest (no shell); (exit code, stdout+stderr)."""
    started = await send({"execute": "guest-exec", "arguments": {
        "path": path, "arg": args, "capture-output": True}})
    pid = started["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = await send({"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if status.get("exited"):
            out = b"".join(base64.b64decode(status.get(k) or "") for k in ("out-data", "err-data"))
            code = status.get("exitcode")
            if code is None:
                code = 128 + int(status.get("signal") or 0)
            return code, out.decode(errors="replace").strip()
        if time.monotonic() > deadline:
            raise GuestAgentError(f"{path} did not finish in the guest within {timeout:g}s")
        await asyncio.sleep(0.1)


async def guest_virtiofs_mounts(send: Send, tag: str, timeout: float) -> list[str]:
    """Where the guest has virtiofs ``tag`` mounted, from its /proc/mounts."""
    code, mounts = await guest_exec(send, "cat", ["/proc/mounts"], timeout)
    if code != 0:
        raise GuestAgentError(f"cat /proc/mounts in the guest failed: {mounts or f'exit {code}'}")
    found = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == tag and fields[2] == "virtiofs":
            found.append(mounttable.unescape(fields[1]))
    return found


@dataclass
class GuestUnmount:
    paths: list[str]  # where the tag was unmounted
    outcome: str  # what happened, for the log


async def guest_umount(send: Send, tag: str, timeout: float) -> GuestUnmount:
    """Lazily unmount the mounts of ``tag`` in the guest (at most GUEST_UMOUNT_MAX of them).

    Done before an unplug so the guest keeps no dead mount at the path (a later attach there
    would otherwise find it "already mounted"); lazy so a process holding a file open cannot
    hold up the unplug. Never raises, and the whole takes at most ``2 * timeout`` plus one
    command: the unplug goes ahead either way.
    """
    done: list[str] = []
    deadline = time.monotonic() + 2 * timeout
    try:
        paths = (await guest_virtiofs_mounts(send, tag, timeout))[:GUEST_UMOUNT_MAX]
        failed = []
        for path in paths:
            if time.monotonic() > deadline:
                failed.append(f"{path}: no time left")
                continue
            code, out = await guest_exec(send, "umount", ["-l", "--", path], timeout)
            if code == 0:
                done.append(path)
            else:
                failed.append(f"{path}: {out or f'exit {code}'}")
    except GuestAgentError as exc:
        return GuestUnmount(done, f"in-guest unmount not done: {exc}")
    except (KeyError, TypeError, ValueError) as exc:
        return GuestUnmount(done, f"in-guest unmount not done: unexpected guest agent answer: "
                                  f"{exc}")
    if failed:
        return GuestUnmount(done, f"in-guest unmount failed at {'; '.join(failed)}")
    return GuestUnmount(done, f"unmounted in the guest at {', '.join(done)}" if done
                        else "not mounted in the guest")


async def guest_mount(send: Send, tag: str, mount_path: str, readonly: bool,
                      timeout: float, wait: float, fresh: bool = False) -> GuestMount:
    """Mount virtiofs ``tag`` at ``mount_path`` inside the guest through its agent.

    The attach returns once QEMU has the device; the guest learns of it through an ACPI
    hot-plug moments later, and until then mounting the tag fails (EINVAL on Linux 6.1,
    "tag not found"). So a failed mount is retried for up to ``wait`` seconds.
    ``fresh``: a mount of the tag already at ``mount_path`` is of an older device (a re-export):
    unmount it rather than take it for this one.
    """
    try:
        await send({"execute": "guest-ping"})
    except GuestAgentError as exc:
        return GuestMount(False, False, f"in-guest mount not attempted: guest agent not "
                                        f"available ({exc})")
    try:
        if mount_path in await guest_virtiofs_mounts(send, tag, timeout):
            if not fresh:
                return GuestMount(True, True, None)  # already mounted there
            await guest_exec(send, "umount", ["-l", "--", mount_path], timeout)
        code, out = await guest_exec(send, "mkdir", ["-p", "--", mount_path], timeout)
        if code != 0:
            return GuestMount(True, False, f"mkdir -p {mount_path} in the guest failed: "
                                           f"{out or f'exit {code}'}")
        args = ["-t", "virtiofs"] + (["-o", "ro"] if readonly else []) + ["--", tag, mount_path]
        deadline = time.monotonic() + wait
        while True:
            code, out = await guest_exec(send, "mount", args, timeout)
            if code == 0:
                return GuestMount(True, True, None)
            if time.monotonic() >= deadline:
                return GuestMount(True, False, f"mount in the guest failed (tried for "
                                               f"{wait:g}s): {out or f'exit {code}'}")
            await asyncio.sleep(GUEST_MOUNT_RETRY)
    except GuestAgentError as exc:
        return GuestMount(True, False, f"guest agent: {exc}")
    except (KeyError, TypeError, ValueError) as exc:
        return GuestMount(True, False, f"guest agent gave an unexpected answer: {exc}")


# -- the service ---------------------------------------------------------------------------
class VirtiofsService:
    def __init__(self, ctx: AgentContext):
        self.ctx = ctx
        self.config = ctx.config
        self.registry = ShareRegistry(ctx)
        # (domain uuid key, device alias) -> future: True removed, False removal failed
        self._waiters: dict[tuple[str, str], asyncio.Future] = {}
        # re-exports after a remount, per (domain uuid key, tag)
        self._reexporting: set[tuple[str, str]] = set()
        self._reexport_retry: dict[tuple[str, str], ReexportRetry] = {}
        self._reexport_slots = asyncio.Semaphore(REEXPORT_PARALLEL)

    async def start(self) -> None:
        lv = self.ctx.libvirt
        await lv.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed)
        await lv.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, self._on_failed)
        await lv.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle)
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

    def readonly_root(self) -> Path:
        return Path(self.config.virtiofs_readonly_root or self.config.state_dir / "virtiofs-ro")

    def bind_path(self, vm: str, tag: str) -> Path:
        # "tag-" keeps tags like "." or ".." ordinary file names.
        return self.readonly_root() / vm_key(vm) / f"tag-{tag}"

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

        Only a check of what was asked for: the export itself is made by :meth:`_bind`, which
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

    async def _bind(self, vm: str, tag: str, mc_entry: mounttable.MountEntry, rel: str,
                    readonly: bool) -> str:
        """Bind-mount ``<model-center mount>/<rel>`` at this share's export dir.

        A killable child walks ``rel`` from the model-center mount one component at a time
        (``O_PATH|O_NOFOLLOW|O_DIRECTORY``; a symlink anywhere fails the walk) and binds the
        directory it opened (``/proc/self/fd/N``), so a symlink swapped in after the checks
        cannot redirect the export. The result is then checked in the mount table: the
        export's root must be exactly ``rel`` on the model center's device.
        """
        bind = self.bind_path(vm, tag)
        timeout = self.config.virtiofs_path_timeout
        await self.ctx.runner.run(bind.mkdir, parents=True, exist_ok=True, mode=0o755,
                                  timeout=timeout, what=f"mkdir {bind}")
        for _ in range(8):  # a stale bind mount, e.g. from a crash between bind and record
            if mounttable.mount_at(bind, self.config.procfs_root) is None:
                break
            if not await mounttable.lazy_umount(bind):
                raise AgentError(f"cannot clear the stale bind mount {bind}")
        kind = "read-only" if readonly else "read-write"
        source = os.path.join(mc_entry.mount_point, rel) if rel else mc_entry.mount_point
        try:
            result = await run_process(
                [sys.executable, "-I", "-S", "-c", _BIND_FD, mc_entry.mount_point, rel,
                 str(bind), "1" if readonly else "0"], timeout=timeout)
        except BlockingTimeout:
            await self._unbind(str(bind))
            raise AgentError(f"{kind} bind mount of {source} did not finish within "
                             f"{timeout:g}s (is the storage hung?)") from None
        if not result.ok:
            await self._unbind(str(bind))
            err = result.stderr.decode(errors="replace").strip().splitlines()
            raise AgentError(f"{kind} bind mount of {source} failed: "
                             f"{err[-1] if err else result.describe()}")
        entry = mounttable.mount_at(bind, self.config.procfs_root)
        # rel comes from a realpath: no '.', '..' or '//' to normalise
        want_root = f"{mc_entry.root.rstrip('/')}/{rel}" if rel else mc_entry.root
        if entry is None or entry.dev != mc_entry.dev or entry.root != want_root \
                or entry.readonly != readonly:
            await self._unbind(str(bind))
            raise AgentError(f"{bind} did not become a {kind} bind mount of {source} "
                             f"(it changed while it was being shared?)")
        return str(bind)

    async def _unbind(self, path: str | None) -> None:
        if not path or not path.startswith(str(self.readonly_root()) + "/"):
            return
        for _ in range(8):
            if mounttable.mount_at(path, self.config.procfs_root) is None:
                break
            if not await mounttable.lazy_umount(path):
                log.warning("cannot unmount %s", path)
                return

        def rmdir() -> None:
            for p in (Path(path), Path(path).parent):
                try:
                    p.rmdir()
                except OSError:
                    return
        try:
            await self.ctx.runner.run(rmdir, timeout=self.config.virtiofs_path_timeout)
        except AgentError as exc:
            log.warning("rmdir %s: %s", path, exc)

    # -- attach -----------------------------------------------------------------------------
    async def attach(self, vm: str, tag: str, source: str, mount_path: str | None,
                     readonly: bool, cache: str) -> GuestMount:
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
                                       readonly, cache)
                log.info("VM %s already shares %s as %s", vm, real, tag)
            else:
                # Hold the model center's lock too: its umount checks for shares under it,
                # and must not run between that check and this attach.
                async with self.ctx.locks.hold(MODELCENTER_LOCK, mc):
                    mc_entry = self._check_model_center(source, mc)
                    self._check_writable(source, mc, mc_entry, readonly)
                    await self._attach_new(dom, vm, tag, real, mc_entry, rel, persistent,
                                           readonly, cache, binary, mount_path)
            # Under the VM's lock: a detach right behind must find the in-guest mount to undo.
            return await self._mount_in_guest(dom, live, tag, mount_path, readonly)

    async def _mount_in_guest(self, dom: libvirt.virDomain, live: str, tag: str,
                              mount_path: str | None, readonly: bool,
                              fresh: bool = False) -> GuestMount:
        if not mount_path:
            return GuestMount(False, False, "in-guest mount not attempted: no mountPath given")
        if not has_guest_agent_channel(live):
            return GuestMount(False, False, "in-guest mount not attempted: the VM has no "
                                            "guest agent channel")
        return await guest_mount(self._qga_sender(dom), tag, mount_path, readonly,
                                 self.config.virtiofs_qga_timeout * 2,
                                 self.config.virtiofs_guest_mount_wait, fresh)

    # -- re-export after a remount -----------------------------------------------------------
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
        :meth:`_bind` without following symlinks, so a symlink planted since cannot
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
            await self._unbind(rec.get("exportDir"))
            if not (await self._domain(vm))[1]:
                return None  # it stopped meanwhile
            try:
                async with self.ctx.locks.hold(MODELCENTER_LOCK, mc):
                    mc_entry = self._check_model_center(real, mc)
                    self._check_writable(real, mc, mc_entry, readonly)
                    await self._attach_new(dom, vm, tag, real, mc_entry, rel, False, readonly,
                                           cache, binary, rec.get("mountPath"))
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

    def _same_or_conflict(self, vm: str, tag: str, share: VirtiofsShare | None, real: str,
                          readonly: bool, cache: str) -> None:
        rec = self.registry.load(vm).get(tag)
        if rec and share is not None and rec.get("exportDir") == share.source_dir:
            have = (rec["sourcePath"], bool(rec.get("readonly")), rec.get("cacheMode"))
        else:
            have = (share.source_dir if share else "?", bool(share and share.readonly),
                    share.cache if share else "?")
        if have[0] != real:
            raise ConflictError(f"VM {vm} already shares tag {tag} from {have[0]}; detach it "
                                f"before sharing {real} under that tag")
        if have[1:] != (readonly, cache):
            raise ConflictError(f"VM {vm} already shares {real} as tag {tag} with readonly="
                                f"{str(have[1]).lower()} cacheMode={have[2]}; detach it first "
                                f"to change that")

    async def _attach_new(self, dom: libvirt.virDomain, vm: str, tag: str, real: str,
                          mc_entry: mounttable.MountEntry, rel: str, persistent: bool,
                          readonly: bool, cache: str, binary: str,
                          mount_path: str | None) -> None:
        # virtiofsd always exports a bind mount the agent made from a no-follow walk, never
        # the requested path itself (which a symlink could redirect).
        export = await self._bind(vm, tag, mc_entry, rel, readonly)
        share = VirtiofsShare(source_dir=real, tag=tag, binary=binary, readonly=readonly,
                              cache=cache, export_dir=export, readonly_in_xml=False)
        xml = share.to_xml()
        await self.registry.put(vm, tag, {"vmInstanceUuid": vm, "sourcePath": real,
                                    "exportDir": export, "readonly": readonly,
                                    "cacheMode": cache, "mountPath": mount_path})
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if persistent:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            await self.call(lambda conn: dom.attachDeviceFlags(xml, flags))
        except BaseException:
            await self.registry.drop(vm, tag)
            await self._unbind(export)
            raise
        log.info("VM %s: virtiofs %s attached as tag %s (%s)", vm, real, tag,
                 "read-only" if readonly else "read-write")

    def _qga_sender(self, dom: libvirt.virDomain) -> Send:
        import libvirt_qemu

        timeout = self.config.virtiofs_qga_timeout

        async def send(cmd: dict[str, Any]) -> Any:
            def run(conn: libvirt.virConnect) -> str:
                return libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), timeout, 0)
            try:
                out = await self.ctx.libvirt.call(run, timeout=timeout + 5, what="guest agent")
            except libvirt.libvirtError as exc:
                raise GuestAgentError(libvirt_message(exc)) from None
            except AgentError as exc:
                raise GuestAgentError(str(exc)) from None
            try:
                return json.loads(out).get("return")
            except (ValueError, AttributeError) as exc:
                raise GuestAgentError(f"unreadable answer: {exc}") from None

        return send

    # -- detach -----------------------------------------------------------------------------
    async def detach(self, vm: str, tag: str) -> None:
        async with self.vm_lock(vm):
            try:
                dom, active, persistent, live, inactive = await self._domain(vm)
            except NotFoundError:
                await self._forget(vm, tag)
                return
            live_fs = filesystem_element(live, tag) if active else None
            config_fs = filesystem_element(inactive, tag) if inactive else None
            error = None
            if live_fs is not None:
                await self._guest_umount(dom, vm, tag, live)
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

    async def _guest_umount(self, dom: libvirt.virDomain, vm: str, tag: str,
                            live: str) -> list[str]:
        """Unmount ``tag`` in the guest before an unplug; where it was mounted."""
        if not has_guest_agent_channel(live):
            return []
        if await self._paused(dom):  # its agent cannot answer: do not wait for it
            result = GuestUnmount([], "in-guest unmount not done: the VM is paused")
        else:
            result = await guest_umount(self._qga_sender(dom), tag,
                                        self.config.virtiofs_qga_timeout)
        log.info("VM %s: virtiofs tag %s: %s", vm, tag, result.outcome)
        return result.paths

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
            await self._unbind(rec.get("exportDir"))  # only ever a bind under our root
            await self.registry.drop(vm, tag)
        else:
            await self._unbind(str(self.bind_path(vm, tag)))

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
        return {"supported": not reasons, "reason": "; ".join(reasons) or None,
                "libvirtVersion": libvirt_version, "qemuVersion": qemu_version,
                "virtiofsdPath": str(self.config.virtiofsd_binary),
                "virtiofsdFound": binary is not None,
                "shares": [s.wire() for s in shares]}
