"""Model-center mounts: one storage per model center at ``<models_root>/<uuid>``.

Records live under ``modelcenter/<uuid>`` in the state store (atomic JSON, mode 0600: the
storage URL may carry a password, needed to remount after a restart). The agent restores
them at start-up in the background, and the watcher (:mod:`.watcher`) probes them and
remounts a dead or hung one. All work on one mount holds the keyed lock
``("modelcenter", uuid)``, so a remount never races a mount or an umount of the same mount.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..core import mounttable
from ..core.context import AgentContext
from ..core.errors import AgentError, ConflictError
from .backends import Backend, backend_for
from .urls import MountOptions, StorageUrl, parse_storage_url

log = logging.getLogger(__name__)

FOLDER = "modelcenter"
LOCK = "modelcenter"
SERVICE = "modelcenter"
REPAIR_BACKOFF_CAP = 300.0  # seconds: longest pause between failed remount attempts


@dataclass
class Health:
    healthy: bool | None = None
    reason: str | None = None
    checked_at: float | None = None  # time.time()
    failures: int = 0  # consecutive failed probes (watcher)
    noticed_at: float | None = None  # time.monotonic() the watcher first saw the problem
    remounts: int = 0
    last_remount_at: float | None = None
    last_problem: str | None = None
    repair_failures: int = 0  # consecutive repairs that did not make it healthy
    next_repair_at: float | None = None  # time.monotonic(): no repair before (backoff)

    def repaired(self) -> None:
        self.repair_failures, self.next_repair_at = 0, None

    def repair_failed(self, base: float, cap: float) -> float:
        """Count a failed repair; the delay before the next attempt (doubling, capped)."""
        self.repair_failures += 1
        delay = min(cap, base * 2 ** (self.repair_failures - 1))
        self.next_repair_at = time.monotonic() + delay
        return delay


@dataclass
class Record:
    uuid: str
    storage_url: str
    options: dict[str, Any]
    kind: str
    daemon: dict | None = None  # ids of the FUSE daemon serving the mount (juicefs)

    @classmethod
    def load(cls, data: dict) -> Record:
        return cls(data["modelCenterUuid"], data["storageUrl"], data.get("mountOptions") or {},
                   data["kind"], data.get("daemon"))

    def dump(self, mount_point: Path) -> dict:
        return {"modelCenterUuid": self.uuid, "storageUrl": self.storage_url,
                "mountOptions": self.options, "kind": self.kind, "mountPoint": str(mount_point),
                "daemon": self.daemon}

    @property
    def url(self) -> StorageUrl:
        return parse_storage_url(self.storage_url)

    @property
    def mount_options(self) -> MountOptions:
        return MountOptions.model_validate(self.options)


class ModelCenterService:
    def __init__(self, ctx: AgentContext):
        self.ctx = ctx
        self.config = ctx.config
        self.health: dict[str, Health] = {}
        # Extension points the layers above register into (virtiofs does): who exports
        # directories of a mount (async fn() -> shares with source_path and export_dir), and
        # who must hear that a mount is healthy (fn(MountEntry), e.g. to export it again).
        self.share_listers: list[Callable[[], Awaitable[list]]] = []
        self.healthy_listeners: list[Callable[[mounttable.MountEntry], None]] = []
        self._repairing: set[str] = set()
        # The models root with symlinks resolved (set by start()): the mount table, and the
        # resolved source paths of virtiofs shares, name mounts by their real paths.
        self.root = Path(self.config.models_root)

    async def start(self) -> None:
        """Create the models root and resolve it, off the event loop and bounded."""
        def prepare() -> str:
            ensure_models_root(self.config)
            return os.path.realpath(self.config.models_root)

        self.root = Path(await self.ctx.runner.run(
            prepare, timeout=self.config.virtiofs_path_timeout, what="preparing the models root"))

    # -- plumbing ---------------------------------------------------------------------------
    def mount_point(self, uuid: str) -> Path:
        return self.root / uuid

    def mounted(self, uuid: str) -> mounttable.MountEntry | None:
        """The mount of a model center that is recorded and mounted now (its own kind), or
        None. Virtiofs shares may only export directories of such mounts."""
        record = self.record(uuid)
        entry = self._mount_entry(uuid) if record is not None else None
        if entry is None or not self.backend(record.kind).fstype_matches(entry):
            return None
        return entry

    def reexport_stale_shares(self, uuid: str) -> None:
        """``uuid`` is healthy: shares still bound to an older mount of it get the new one."""
        entry = self.mounted(uuid)
        if entry is not None:
            for listener in self.healthy_listeners:
                listener(entry)

    def lock(self, uuid: str):
        return self.ctx.locks.hold(LOCK, uuid)

    def busy(self, uuid: str) -> bool:
        return self.ctx.locks.locked(LOCK, uuid)

    def backend(self, kind: str) -> Backend:
        return backend_for(kind, self.config, self.ctx.runner)

    def record(self, uuid: str) -> Record | None:
        data = self.ctx.state.load(f"{FOLDER}/{uuid}")
        if not data:
            return None
        try:
            return Record.load(data)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("model center record %s unusable: %s", uuid, exc)
            return None

    async def _save(self, uuid: str, record: Record) -> None:
        """Write the record atomically (fsyncs) off the event loop."""
        await self.ctx.runner.run(self.ctx.state.save, f"{FOLDER}/{uuid}",
                                  record.dump(self.mount_point(uuid)),
                                  timeout=self.config.virtiofs_path_timeout,
                                  what=f"saving model center {uuid}")

    async def _forget(self, uuid: str) -> None:
        await self.ctx.runner.run(self.ctx.state.delete, f"{FOLDER}/{uuid}",
                                  timeout=self.config.virtiofs_path_timeout,
                                  what=f"deleting model center {uuid}")

    def records(self) -> dict[str, Record]:
        found = {}
        for name in self.ctx.state.names(FOLDER):
            uuid = name.split("/", 1)[1]
            record = self.record(uuid)
            if record is not None:
                found[uuid] = record
        return found

    def _mount_entry(self, uuid: str) -> mounttable.MountEntry | None:
        return mounttable.mount_at(self.mount_point(uuid), self.config.procfs_root)

    def _health(self, uuid: str) -> Health:
        return self.health.setdefault(uuid, Health())

    def _mark(self, uuid: str, reason: str | None) -> Health:
        health = self._health(uuid)
        health.healthy, health.reason, health.checked_at = reason is None, reason, time.time()
        if reason is not None:
            health.last_problem = reason
        return health

    async def _mkdir(self, path: Path) -> None:
        await self.ctx.runner.run(path.mkdir, parents=True, exist_ok=True,
                                  timeout=self.config.virtiofs_path_timeout, what=f"mkdir {path}")

    async def _rmdir(self, path: Path) -> None:
        def rmdir() -> None:
            try:
                path.rmdir()
            except OSError as exc:
                log.debug("keeping %s: %s", path, exc)
        try:
            await self.ctx.runner.run(rmdir, timeout=self.config.virtiofs_path_timeout)
        except AgentError as exc:
            log.warning("rmdir %s: %s", path, exc)

    # -- health -----------------------------------------------------------------------------
    async def check(self, uuid: str, record: Record | None = None) -> str | None:
        """None if the mount of ``uuid`` is up and answers in time; else what is wrong."""
        record = record or self.record(uuid)
        entry = self._mount_entry(uuid)
        if entry is None:
            return "not mounted"
        if record is not None and not self.backend(record.kind).fstype_matches(entry):
            return f"{entry.fstype} is mounted there instead of {record.kind}"
        return await mounttable.probe(self.mount_point(uuid), self.config.modelcenter_probe_timeout)

    # -- mount ------------------------------------------------------------------------------
    async def mount(self, uuid: str, storage_url: str, options: MountOptions) -> Path:
        url = parse_storage_url(storage_url)
        try:
            options.check_for(url.kind)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        options = zstack_defaults(url, options, self.config)
        wanted = Record(uuid, storage_url, options.given(), url.kind)
        mount_point = self.mount_point(uuid)
        backend = self.backend(url.kind)
        async with self.lock(uuid):
            current = self.record(uuid)
            entry = self._mount_entry(uuid)
            if current is not None and (current.storage_url, current.options) != (
                    wanted.storage_url, wanted.options) and entry is not None:
                differs = "storage" if current.storage_url != storage_url else "mount options"
                raise ConflictError(
                    f"model center {uuid} is already mounted at {mount_point} with other "
                    f"{differs} ({current.url.masked}); umount it first")
            if entry is not None:
                reason = None if backend.fstype_matches(entry) else \
                    f"{entry.fstype} is mounted there, not {url.kind}"
                if reason and current is None:
                    raise ConflictError(f"{mount_point} already holds a {entry.fstype} mount "
                                        f"that is not this model center's {url.kind} storage")
                reason = reason or await mounttable.probe(
                    mount_point, self.config.modelcenter_probe_timeout)
                if reason is None:
                    log.info("model center %s: reusing the healthy mount at %s", uuid, mount_point)
                    wanted.daemon = await backend.daemon(mount_point) or (
                        current.daemon if current else None)
                    await self._save(uuid, wanted)
                    self._mark(uuid, None)
                    return mount_point
                log.warning("model center %s: existing mount at %s is unusable (%s); "
                            "mounting again", uuid, mount_point, reason)
                await backend.recover(mount_point, current.daemon if current else None)
            try:
                await self._mount(uuid, wanted, url)
            except BaseException:
                if current is None:  # a first mount that failed leaves no directory behind
                    await self._rmdir(mount_point)
                raise
            return mount_point

    async def _mount(self, uuid: str, record: Record, url: StorageUrl) -> None:
        """Mount and record it (caller holds the lock and has cleared the mount point)."""
        mount_point = self.mount_point(uuid)
        backend = self.backend(record.kind)
        await self._mkdir(mount_point)
        await backend.mount(url, mount_point, record.mount_options, uuid)
        reason = await mounttable.probe(mount_point, self.config.modelcenter_probe_timeout)
        daemon = await backend.daemon(mount_point) if reason is None else None
        if reason is not None:
            await backend.recover(mount_point)
            raise AgentError(f"mounted {url.masked} at {mount_point} but it does not answer: "
                             f"{reason}")
        record.daemon = daemon
        await self._save(uuid, record)
        health = self._mark(uuid, None)
        health.failures, health.noticed_at = 0, None
        health.repaired()
        log.info("model center %s: %s mounted at %s", uuid, url.masked, mount_point)

    # -- umount -----------------------------------------------------------------------------
    async def umount(self, uuid: str, force: bool) -> None:
        mount_point = self.mount_point(uuid)
        async with self.lock(uuid):
            record = self.record(uuid)
            entry = self._mount_entry(uuid)
            if record is None and entry is None:
                self.health.pop(uuid, None)
                return
            try:
                # Share paths are real paths (resolved at attach); so is mount_point.
                users = await self.shares_using(uuid)
            except AgentError as exc:
                if not force:
                    raise AgentError(f"cannot tell whether VMs still share model center {uuid} "
                                     f"({exc}); retry, or pass force") from None
                users = []
            if users and not force:
                listed = ", ".join(f"VM {s.vm_uuid} tag {s.tag} ({s.source_path})" for s in users)
                raise ConflictError(f"model center {uuid} is still shared with running VMs: "
                                    f"{listed}; detach those shares first, or pass force")
            if users:
                log.warning("model center %s: force umount while shared with %s", uuid,
                            ", ".join(f"{s.vm_uuid}/{s.tag}" for s in users))
            kind = record.kind if record else _kind_of(entry)
            daemon = record.daemon if record else None
            backend = self.backend(kind)
            if entry is not None:
                reason = await mounttable.probe(mount_point, self.config.modelcenter_probe_timeout)
                if reason is not None:
                    log.warning("model center %s: mount is unusable (%s); tearing it down",
                                uuid, reason)
                    await backend.recover(mount_point, daemon)
                else:
                    await backend.umount(mount_point, force, daemon)
                for _ in range(8):  # stacked mounts, e.g. from an earlier crash
                    if self._mount_entry(uuid) is None:
                        break
                    await backend.recover(mount_point, daemon)
                if self._mount_entry(uuid) is not None:
                    raise AgentError(f"{mount_point} is still mounted after umount")
            await self._forget(uuid)
            self.health.pop(uuid, None)
            await self._rmdir(mount_point)
            log.info("model center %s: unmounted %s", uuid, mount_point)

    # -- list -------------------------------------------------------------------------------
    async def list(self) -> list[dict[str, Any]]:
        records = self.records()

        async def one(uuid: str, record: Record) -> dict[str, Any]:
            # Probing is read-only and bounded, so it is fine while a (re)mount holds the lock.
            reason = await self.check(uuid, record)
            if reason is not None and self.busy(uuid):
                reason = f"{reason} (being mounted or repaired right now)"
            health = self._mark(uuid, reason)
            return {"modelCenterUuid": uuid, "mountPoint": str(self.mount_point(uuid)),
                    "isMounted": self._mount_entry(uuid) is not None,
                    "healthy": bool(health.healthy), "reason": health.reason,
                    "kind": record.kind, "storageUrl": record.url.masked,
                    "remounts": health.remounts}

        found = list(await asyncio.gather(*(one(u, r) for u, r in sorted(records.items()))))
        # Like ZStack's agent, also every other directory under the root (e.g. mounted by
        # ZStack's agent before this one took over): the MN sees what the host has.
        for name in await self._unrecorded_dirs(set(records)):
            entry = self._mount_entry(name)
            found.append({"modelCenterUuid": name, "mountPoint": str(self.mount_point(name)),
                          "isMounted": entry is not None, "healthy": False,
                          "reason": "not mounted by this agent (no record)",
                          "kind": _kind_of(entry) if entry is not None else None})
        return found

    async def _unrecorded_dirs(self, recorded: set[str]) -> list[str]:
        def scan() -> list[str]:
            try:
                with os.scandir(self.root) as it:
                    return sorted(e.name for e in it if not e.name.startswith(".")
                                  and e.name not in recorded and e.is_dir(follow_symlinks=False))
            except OSError:
                return []
        try:
            return await self.ctx.runner.run(scan, timeout=self.config.modelcenter_probe_timeout,
                                             what="listing the models root")
        except AgentError as exc:
            log.warning("model center list: %s", exc)
            return []

    # -- repair -----------------------------------------------------------------------------
    async def repair(self, uuid: str, reason: str | None = None) -> bool:
        """Remount ``uuid`` if it is (still) unhealthy; True if it is healthy afterwards."""
        async with self.lock(uuid):
            record = self.record(uuid)
            if record is None:
                return False
            now = await self.check(uuid, record)
            health = self._health(uuid)
            if now is None:
                self._mark(uuid, None).failures = 0
                health.repaired()
                return True
            mount_point = self.mount_point(uuid)
            backend = self.backend(record.kind)
            held = await self._remount_blocked(uuid, record, backend)
            if held:
                delay = health.repair_failed(self.config.modelcenter_health_interval,
                                             REPAIR_BACKOFF_CAP)
                log.error("model center %s: %s is unhealthy (%s) but NOT remounted: %s; "
                          "next look in %.0fs", uuid, mount_point, now, held, delay)
                self._mark(uuid, f"{now}; not remounted: {held}")
                return False
            log.warning("model center %s: remounting %s (%s)", uuid, mount_point, now)
            try:
                await backend.recover(mount_point, record.daemon)
                await self._mount(uuid, record, record.url)
            except Exception as exc:  # noqa: BLE001 - a background repair must report, not die
                delay = health.repair_failed(self.config.modelcenter_health_interval,
                                             REPAIR_BACKOFF_CAP)
                log.error("model center %s: remount failed: %s (next attempt in %.0fs)", uuid,
                          exc, delay)
                self._mark(uuid, f"{now}; remount failed: {exc}")
                return False
            health.remounts += 1
            health.last_remount_at = time.monotonic()
            health.repaired()
            return True

    async def shares_using(self, uuid: str) -> list:
        """Shares (virtiofs) of running VMs inside this model center (AgentError if unknown)."""
        mount_point = self.mount_point(uuid)
        return [s for lister in self.share_listers for s in await lister()
                if _inside(s.source_path, mount_point) or _inside(s.export_dir, mount_point)]

    async def _remount_blocked(self, uuid: str, record: Record, backend: Backend) -> str | None:
        """Why a remount must not happen now, or None.

        A mount that is only slow keeps serving the VMs that share it once it recovers;
        killing its daemon would break their shares for good (virtiofsd holds the old mount).
        So while running VMs share it, it is remounted only when nothing serves it any more:
        not mounted, or (juicefs) its daemons are dead or zombies.
        """
        if self._mount_entry(uuid) is None:
            return None
        try:
            users = await self.shares_using(uuid)
        except AgentError as exc:
            users = None
            why = f"cannot tell whether VMs share it ({exc})"
        if users == []:
            return None
        alive = await backend.daemon_alive(self.mount_point(uuid), record.daemon)
        if backend.kind == "juicefs" and not alive:
            return None  # the daemon is gone: only a remount can bring the mount back
        if users:
            why = "shared with running VMs (" + ", ".join(
                f"{s.vm_uuid}/{s.tag}" for s in users) + ")"
        serving = f"juicefs pid {', '.join(map(str, alive))} still alive" if alive else \
            "its storage may only be slow"
        return f"{why} and {serving}; it recovers on its own, or umount with force"

    def schedule_repair(self, uuid: str, reason: str | None = None) -> None:
        """One repair at a time per mount, in the background."""
        if uuid in self._repairing:
            return
        self._repairing.add(uuid)

        async def run() -> None:
            try:
                await self.repair(uuid, reason)
            finally:
                self._repairing.discard(uuid)

        self.ctx.spawn(run(), name=f"modelcenter-repair {uuid}")

    async def restore(self) -> None:
        """At start-up: bring back every recorded mount that is not up (in parallel)."""
        records = self.records()
        if records:
            log.info("model center: restoring %d mount(s)", len(records))
        for uuid in records:
            self.schedule_repair(uuid, "restore at start-up")


def _inside(path: str | None, root: Path) -> bool:
    if not path:
        return False
    root_text = str(root).rstrip("/")
    return path == root_text or path.startswith(root_text + "/")


def _kind_of(entry: mounttable.MountEntry | None) -> str:
    if entry is None:
        return "file"
    if entry.fstype == "fuse.juicefs":
        return "juicefs"
    if entry.fstype in ("nfs", "nfs4"):
        return "nfs"
    return "file"


def zstack_defaults(url: StorageUrl, options: MountOptions, config) -> MountOptions:
    """A raw metadata URL is ZStack's form: mount as ZStack's agent does (read-only, the
    volume's ``models`` directory as root: config modelcenter_meta_url_subdir), unless
    mountOptions say otherwise."""
    if not url.raw_meta:
        return options
    given = options.given()
    given.setdefault("read_only", True)
    if config.modelcenter_meta_url_subdir and "subdir" not in given:
        given["subdir"] = config.modelcenter_meta_url_subdir
    return MountOptions.model_validate(given)


def ensure_models_root(config) -> None:
    os.makedirs(config.models_root, mode=0o755, exist_ok=True)
