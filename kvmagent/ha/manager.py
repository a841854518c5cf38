"""The fencers of this host: setup, replace and cancel that cannot hang, persistence, restore.

Setup, replace and cancel of one storage are serialised (a lock per storage; different
storages proceed in parallel) and every step is bounded: a replaced loop is stopped (flag and
cancellation, at most ``STOP_TIMEOUT``) before its successor starts, and a fence in progress is
never waited for; it finishes in its own task and the successor waits for it before fencing
itself. One probe (and so at most one stuck I/O child) per mount path is shared by every
successive loop of that storage. Rules are loaded before any fencer restarts.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, fields

from ..core.context import AgentContext
from ..core.logs import mask_data
from ..core.mounttable import boot_id
from ..core.locks import KeyedLocks
from ..core.state import conforms
from .fencer import IDLE, STOP_TIMEOUT, Fencer, FencerConfig, detection_bounds
from .inventory import VmInventory
from .nicfencer import NicFencer, NicFencerConfig
from .probe import StorageProbe
from .rules import HOST_BUSINESS_NIC, FencerRules

log = logging.getLogger(__name__)

STATE_DOC = "ha/selffencers"
CLOSE_TIMEOUT = 15.0
_FIELDS = {f.name for f in fields(FencerConfig)}


def config_from_doc(doc: object) -> tuple[FencerConfig, bool, int | None] | None:
    """(config, disconnected, device) from a persisted record; None (logged) for another shape.
    The device of the mount path counts only within the boot that recorded it (device numbers
    of NFS, FUSE and tmpfs are handed out afresh at each mount)."""
    try:
        assert isinstance(doc, dict)
        values = {k: v for k, v in doc.items() if k in _FIELDS}
        values["fencers"] = tuple(values.get("fencers", FencerConfig.fencers))
        cfg = FencerConfig(**values)
        assert all(isinstance(getattr(cfg, k), str) for k in ("ps_uuid", "mount_path", "host_uuid"))
        assert float(cfg.interval) > 0 and int(cfg.max_attempts) >= 1
        device = doc.get("device")
        if not isinstance(device, int) or isinstance(device, bool) or \
                doc.get("bootId") != boot_id():
            device = None
        return cfg, bool(doc.get("disconnected", False)), device
    except (AssertionError, TypeError, ValueError) as exc:
        log.error("state document %s: a self-fencer record of an unexpected shape is skipped "
                  "(%s): %.300r", STATE_DOC, exc or "bad field", mask_data(doc))
        return None


class FencerManager:
    def __init__(self, ctx: AgentContext, inventory_refresh: float = 15.0, netns: str | None = None):
        self.ctx = ctx
        self.inventory = VmInventory(ctx)
        self.rules = FencerRules(ctx.state)
        self.inventory_refresh = inventory_refresh
        self.configs: dict[str, FencerConfig] = {}
        self.fencers: dict[str, Fencer] = {}  # storages whose fencers include hostStorageState
        self.nic_fencer = NicFencer(ctx, self.inventory, self.rules, netns)
        self._disconnected: set[str] = set()  # restored: the MN was told Disconnected
        self._devices: dict[str, tuple[str, int]] = {}  # restored: ps -> (mount path, device)
        self._probes: dict[str, StorageProbe] = {}
        self._locks = KeyedLocks()
        self._nic_lock = asyncio.Lock()
        self._refresher: asyncio.Task | None = None
        self._closed = False

    def probe_for(self, mount_path: str) -> StorageProbe:
        probe = self._probes.get(mount_path)
        if probe is None:
            probe = self._probes[mount_path] = StorageProbe()
        return probe

    async def restore(self) -> None:
        self.rules.load()  # before any fencer can fence
        # Not a list of records: set aside with a log line. A record with bad fields: the
        # document is set aside too (for a human), and the good records run on (re-saved).
        docs = self.ctx.state.load(STATE_DOC, [], check=conforms(list[dict])) or []
        restored = [r for r in map(config_from_doc, docs) if r is not None]
        if len(restored) < len(docs):
            self.ctx.state.quarantine(STATE_DOC, f"holds {len(docs) - len(restored)} record(s) "
                                      f"of another shape ({len(restored)} restored)")
        self._disconnected = {cfg.ps_uuid for cfg, disconnected, _ in restored if disconnected}
        self._devices = {cfg.ps_uuid: (cfg.mount_path, dev) for cfg, _, dev in restored
                         if dev is not None}
        if restored:
            log.info("restoring %d self-fencer(s): %s", len(restored),
                     ", ".join(cfg.ps_uuid for cfg, _, _ in restored))
            await self.setup([cfg for cfg, _, _ in restored])

    async def setup(self, configs: list[FencerConfig]) -> dict[str, str]:
        """Start or replace; identical configs leave the running loop alone."""
        outcomes = await asyncio.gather(*(self._setup_one(cfg) for cfg in configs))
        self._persist()
        await self._configure_nic_fencer()
        self._ensure_refresher()
        return dict(zip((c.ps_uuid for c in configs), outcomes, strict=True))

    async def _setup_one(self, cfg: FencerConfig) -> str:
        async with self._locks.hold("selffencer", cfg.ps_uuid):
            current = self.fencers.get(cfg.ps_uuid)
            if self.configs.get(cfg.ps_uuid) == cfg and (
                    not cfg.watches_storage or (current is not None and current.running)):
                return "unchanged"
            previous_fence = None
            replaced = cfg.ps_uuid in self.configs
            # The device the mount path was on, kept while the storage keeps its mount path.
            restored_path, device = self._devices.pop(cfg.ps_uuid, (None, None))
            if current is not None:
                restored_path, device = current.cfg.mount_path, current.device
            if restored_path != cfg.mount_path:
                device = None
            if current is not None:
                await current.stop(STOP_TIMEOUT)
                previous_fence = current.fencing
                del self.fencers[cfg.ps_uuid]
            self.configs[cfg.ps_uuid] = cfg
            if cfg.watches_storage and not self._closed:
                disconnected = (current.disconnected_reported if current is not None
                                else cfg.ps_uuid in self._disconnected)
                fencer = Fencer(self.ctx, cfg, self.inventory, self.rules,
                                self.probe_for(cfg.mount_path), on_change=self._persist,
                                disconnected_reported=disconnected, previous_fence=previous_fence,
                                device=device)
                self.fencers[cfg.ps_uuid] = fencer
                fencer.start()
            outcome = "replaced" if replaced else "started"
            best, worst = detection_bounds(cfg)
            log.info("selffencer %s on %s: %s (fencers %s, %s, interval %gs x %d, timeout %gs: "
                     "detection in %.0f-%.0fs)", cfg.ps_uuid, cfg.mount_path, outcome,
                     ",".join(cfg.fencers) or "none", cfg.strategy, cfg.interval,
                     cfg.max_attempts, cfg.storage_checker_timeout, best, worst)
            return outcome

    async def cancel(self, ps_uuids: list[str], mount_points: list[str] = ()) -> list[str]:
        """Stop the fencers of these storages (by uuid or mount path); unknown ones are ignored."""
        points = {p.rstrip("/") or "/" for p in mount_points if p}  # MNs send "/x/" and "/x"
        wanted = set(ps_uuids) | {ps for ps, c in self.configs.items() if c.mount_path in points}
        cancelled = [ps for ps in await asyncio.gather(*(self._cancel_one(ps) for ps in sorted(wanted)))
                     if ps]
        self._persist()
        await self._configure_nic_fencer()
        return cancelled

    async def _cancel_one(self, ps_uuid: str) -> str | None:
        async with self._locks.hold("selffencer", ps_uuid):
            fencer = self.fencers.pop(ps_uuid, None)
            if fencer is not None:
                await fencer.stop(STOP_TIMEOUT)
            return ps_uuid if self.configs.pop(ps_uuid, None) is not None else None

    async def _configure_nic_fencer(self) -> None:
        """One hostBusinessNic fencer for the host while any storage's setup asks for it,
        with the shortest interval and fewest attempts asked for."""
        async with self._nic_lock:
            wanted = [c for c in self.configs.values() if HOST_BUSINESS_NIC in c.fencers]
            cfg = None
            if wanted and not self._closed:
                cfg = NicFencerConfig(wanted[0].host_uuid, min(c.interval for c in wanted),
                                      min(c.max_attempts for c in wanted))
            await self.nic_fencer.configure(cfg)

    def state_of(self, ps_uuid: str) -> str:
        fencer = self.fencers.get(ps_uuid)
        return fencer.status.state if fencer is not None else IDLE

    async def close(self) -> None:
        """Bounded: every loop is stopped in parallel, at most ``CLOSE_TIMEOUT`` in all."""
        self._closed = True
        stops = [f.stop(STOP_TIMEOUT) for f in self.fencers.values()] + [self.nic_fencer.stop()]
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.gather(*stops, return_exceptions=True)
        except TimeoutError:
            log.error("self-fencers did not all stop within %gs", CLOSE_TIMEOUT)
        if self._refresher:
            self._refresher.cancel()

    def _persist(self) -> None:
        docs = []
        for cfg in self.configs.values():
            fencer = self.fencers.get(cfg.ps_uuid)
            disconnected = (fencer.disconnected_reported if fencer is not None
                            else cfg.ps_uuid in self._disconnected)
            device = fencer.device if fencer is not None else None
            docs.append({**asdict(cfg), "disconnected": disconnected, "device": device,
                         "bootId": boot_id()})
        try:
            self.ctx.state.save(STATE_DOC, docs)
        except OSError as exc:  # the loops go on; only the restart guarantee is weakened
            log.error("self-fencer configs not persisted: %s", exc)

    def _ensure_refresher(self) -> None:
        if (self._refresher is None or self._refresher.done()) and self.configs:
            self._refresher = self.ctx.spawn(self._refresh_loop(), name="selffencer inventory")

    async def _refresh_loop(self) -> None:
        while self.configs:
            try:
                await self.inventory.refresh()
            except Exception as exc:  # keep the last snapshot; libvirt may be restarting
                log.warning("selffencer: VM inventory refresh failed: %s", exc)
            await asyncio.sleep(self.inventory_refresh)
