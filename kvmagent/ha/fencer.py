"""Storage-heartbeat self-fencing: one loop per primary storage.

Every ``interval`` seconds the loop writes this host's heartbeat file on the storage through
a killable child (:mod:`.probe`) with a hard ``storageCheckerTimeout``. After ``maxAttempts``
consecutive failures it reports the storage Disconnected, kills the VMs whose disks live on
it (Permissive: only HA-enabled ones; Force: all), runs the ``selffencer.vms_killed`` hooks
and reports what it killed. It fences once per outage and keeps probing; the first good
heartbeat afterwards reports the storage Connected again.

Timing (N = maxAttempts, I = interval, T = storageCheckerTimeout): an attempt takes between
0 s (an I/O error, or the previous attempt's child still stuck) and T; attempts start every
max(I, its duration). From the moment the storage hangs, fencing starts after
    at least (N-1)*I            (the hang begins as an attempt starts; failures are immediate)
    at most  I + (N-1)*max(I, T) + T   (it begins just after a good beat; every attempt times out)
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

from ..core.context import AgentContext
from ..core.state import conforms
from .inventory import VmInventory
from .killer import kill_vm
from .probe import StorageProbe

log = logging.getLogger(__name__)

STATE_DOC = "ha/selffencers"
HOOK_VMS_KILLED = "selffencer.vms_killed"

HEALTHY, FAILING, FENCED, STOPPED = "Healthy", "Failing", "Fenced", "Stopped"
HOOKS_TIMEOUT = 60.0


@dataclass(frozen=True)
class FencerConfig:
    ps_uuid: str
    mount_path: str
    host_uuid: str
    interval: float
    max_attempts: int
    storage_checker_timeout: float
    strategy: Literal["Force", "Permissive"]


def detection_bounds(cfg: FencerConfig) -> tuple[float, float]:
    """(best, worst) seconds from a storage hang to the fencing decision."""
    attempts, interval, timeout = cfg.max_attempts, cfg.interval, cfg.storage_checker_timeout
    best = (attempts - 1) * interval
    worst = interval + (attempts - 1) * max(interval, timeout) + timeout
    return best, worst


@dataclass
class FencerStatus:
    state: str = HEALTHY
    consecutive_failures: int = 0
    last_heartbeat_at: float | None = None
    last_error: str | None = None
    fenced_vm_uuids: list[str] = field(default_factory=list)
    fenced_at: float | None = None


class Fencer:
    def __init__(self, ctx: AgentContext, cfg: FencerConfig, inventory: VmInventory, *,
                 disconnected_reported: bool = False, on_change: Callable[[], None] = lambda: None):
        self.ctx = ctx
        self.cfg = cfg
        self.inventory = inventory
        self.status = FencerStatus()
        self.probe = StorageProbe(allow_root_fs=ctx.config.ha_allow_root_fs_storage)
        self._task: asyncio.Task | None = None
        self._fencing: asyncio.Task | None = None
        # The MN was told Disconnected and not yet Connected: persisted (via on_change), so a
        # recovery after an agent restart or a replaced fencer is still reported.
        self.disconnected_reported = disconnected_reported
        self._on_change = on_change

    def start(self) -> None:
        self._task = self.ctx.spawn(self._loop(), name=f"selffencer {self.cfg.ps_uuid}")

    async def stop(self) -> None:
        if self._fencing is not None and not self._fencing.done():
            # Never abandon a fence half way: VMs killed but nothing reported.
            await asyncio.wait([self._fencing], timeout=120)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.status.state = STOPPED

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # a fencer must never stop watching its storage
                log.exception("selffencer %s: heartbeat round failed unexpectedly", self.cfg.ps_uuid)
                self.status.last_error = "internal error in the heartbeat round; see the agent log"
            await asyncio.sleep(max(0.0, self.cfg.interval - (loop.time() - started)))

    async def beat(self) -> None:
        cfg = self.cfg
        vm_uuids = [vm.uuid for vm in self.inventory.vms_on(cfg.mount_path)]
        result = await self.probe.write_heartbeat(cfg.mount_path, cfg.host_uuid, vm_uuids,
                                                  cfg.storage_checker_timeout)
        status = self.status
        if result.ok:
            recovered = status.state in (FAILING, FENCED) or self.disconnected_reported
            status.state, status.consecutive_failures = HEALTHY, 0
            status.last_heartbeat_at, status.last_error = time.time(), None
            if self.disconnected_reported:
                self.disconnected_reported = False
                self._on_change()
                self.ctx.reporter.report("/kvm/reportstoragestatus", {
                    "psUuids": [cfg.ps_uuid], "psStatus": "Connected",
                    "reason": f"heartbeat on {cfg.mount_path} succeeds again"})
            if recovered:
                log.warning("selffencer %s: heartbeat on %s recovered", cfg.ps_uuid, cfg.mount_path)
            return
        status.consecutive_failures += 1
        status.last_error = result.error
        log.warning("selffencer %s: heartbeat %d/%d on %s failed: %s", cfg.ps_uuid,
                    status.consecutive_failures, cfg.max_attempts, cfg.mount_path, result.error)
        if status.state == HEALTHY:
            status.state = FAILING
        if status.state == FAILING and status.consecutive_failures >= cfg.max_attempts:
            status.state = FENCED
            self._fencing = asyncio.get_running_loop().create_task(self.fence(result.error))
            await asyncio.shield(self._fencing)

    async def fence(self, error: str) -> None:
        cfg = self.cfg
        reason = (f"{cfg.max_attempts} consecutive heartbeat failures on {cfg.mount_path}: {error}")
        self.status.fenced_at = time.time()
        self.disconnected_reported = True
        self._on_change()
        self.ctx.reporter.report("/kvm/reportstoragestatus", {
            "psUuids": [cfg.ps_uuid], "psStatus": "Disconnected", "reason": reason})
        killed: list[str] = []
        failure_reasons: list[str] = []
        notes: list[str] = []
        try:
            killed = await self._kill_per_strategy(failure_reasons, notes)
        except Exception as exc:  # whatever happens, the MN hears of this fence
            log.exception("selffencer %s: fencing failed", cfg.ps_uuid)
            failure_reasons.append(f"internal error while fencing: {type(exc).__name__}: {exc}")
        self.ctx.reporter.report("/kvm/reportselffencer", {
            "psUuids": [cfg.ps_uuid], "vmUuidsString": ",".join(killed),
            "fencerFailure": bool(failure_reasons),
            "reason": "; ".join([reason, *failure_reasons, *notes])})

    async def _kill_per_strategy(self, failure_reasons: list[str], notes: list[str]) -> list[str]:
        """Kill the VMs on the storage per strategy, run the hooks; returns the killed uuids."""
        cfg = self.cfg
        records, source = await self.inventory.current()
        if records is None:
            targets = []
            failure_reasons.append(f"cannot tell which VMs use the storage: {source}")
        else:
            on_storage = self.inventory.vms_on(cfg.mount_path)
            targets = [vm for vm in on_storage if cfg.strategy == "Force" or vm.enable_ha]
            spared = sorted(vm.uuid for vm in on_storage if vm not in targets)
            if spared:
                log.warning("selffencer %s (Permissive): not killing VMs without HA: %s",
                            cfg.ps_uuid, ", ".join(spared))
        results = await asyncio.gather(*(kill_vm(self.ctx, vm.uuid) for vm in targets),
                                       return_exceptions=True)  # one VM's error spares no other
        outcomes = [(vm, r if isinstance(r, tuple) else (False, f"kill failed: {r!r}"))
                    for vm, r in zip(targets, results, strict=True)]
        killed = sorted(vm.uuid for vm, (stopped, _) in outcomes if stopped)
        failure_reasons += [f"{vm.uuid}: {note}" for vm, (stopped, note) in outcomes if not stopped]
        notes += [f"{vm.uuid}: {note}" for vm, (stopped, note) in outcomes if stopped and note]
        self.status.fenced_vm_uuids = killed
        if killed:
            log.error("selffencer %s: killed VMs %s (%s strategy; inventory from %s)",
                      cfg.ps_uuid, ", ".join(killed), cfg.strategy, source)
            try:  # clean-up (EIPs) must not hold the report back for ever
                failure_reasons += await asyncio.wait_for(
                    self.ctx.run_hooks(HOOK_VMS_KILLED, killed), HOOKS_TIMEOUT)
            except TimeoutError:
                failure_reasons.append(f"clean-up hooks did not finish within {HOOKS_TIMEOUT:g}s")
        return killed


class FencerManager:
    """The fencers of this host: idempotent setup, cancel, persistence and restore."""

    def __init__(self, ctx: AgentContext, inventory_refresh: float = 15.0):
        self.ctx = ctx
        self.inventory = VmInventory(ctx)
        self.inventory_refresh = inventory_refresh
        self.fencers: dict[str, Fencer] = {}
        self._restored_disconnected: set[str] = set()
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task | None = None

    async def restore(self) -> None:
        docs = self.ctx.state.load(STATE_DOC, [], check=conforms(list[FencerConfig])) or []
        self._restored_disconnected = {d["ps_uuid"] for d in docs if d.pop("disconnected", False)}
        configs = [FencerConfig(**doc) for doc in docs]
        if configs:
            log.info("restoring %d self-fencer(s): %s", len(configs),
                     ", ".join(c.ps_uuid for c in configs))
            await self.setup(configs)

    async def setup(self, configs: list[FencerConfig]) -> dict[str, str]:
        """Start or replace; identical configs leave the running loop alone."""
        outcome = {}
        async with self._lock:
            for cfg in configs:
                current = self.fencers.get(cfg.ps_uuid)
                if current is not None and current.cfg == cfg and current.running:
                    outcome[cfg.ps_uuid] = "unchanged"
                    continue
                if current is not None:
                    await current.stop()
                disconnected = (current.disconnected_reported if current is not None
                                else cfg.ps_uuid in self._restored_disconnected)
                fencer = Fencer(self.ctx, cfg, self.inventory, on_change=self._persist,
                                disconnected_reported=disconnected)
                self.fencers[cfg.ps_uuid] = fencer
                fencer.start()
                outcome[cfg.ps_uuid] = "replaced" if current else "started"
                best, worst = detection_bounds(cfg)
                log.info("selffencer %s on %s: %s (%s, interval %gs x %d, timeout %gs: "
                         "detection in %.0f-%.0fs)", cfg.ps_uuid, cfg.mount_path,
                         outcome[cfg.ps_uuid], cfg.strategy, cfg.interval, cfg.max_attempts,
                         cfg.storage_checker_timeout, best, worst)
            self._persist()
            self._ensure_refresher()
        return outcome

    async def cancel(self, ps_uuids: list[str]) -> list[str]:
        cancelled = []
        async with self._lock:
            for ps_uuid in ps_uuids:
                fencer = self.fencers.pop(ps_uuid, None)
                if fencer is not None:
                    await fencer.stop()
                    cancelled.append(ps_uuid)
            self._persist()
        return cancelled

    async def close(self) -> None:
        for fencer in list(self.fencers.values()):
            await fencer.stop()
        if self._refresher:
            self._refresher.cancel()

    def _persist(self) -> None:
        docs = [{**asdict(f.cfg), "disconnected": f.disconnected_reported}
                for f in self.fencers.values()]
        try:
            self.ctx.state.save(STATE_DOC, docs)
        except OSError as exc:  # the loops go on; only the restart guarantee is weakened
            log.error("self-fencer configs not persisted: %s", exc)

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = self.ctx.spawn(self._refresh_loop(), name="selffencer inventory")

    async def _refresh_loop(self) -> None:
        while self.fencers:
            try:
                await self.inventory.refresh()
            except Exception as exc:  # keep the last snapshot; libvirt may be restarting
                log.warning("selffencer: VM inventory refresh failed: %s", exc)
            await asyncio.sleep(self.inventory_refresh)
