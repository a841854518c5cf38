"""Storage-heartbeat self-fencing (fencer ``hostStorageState``): one loop per primary storage.

Every ``interval`` seconds the loop writes this host's heartbeat file on the storage through
a killable child (:mod:`.probe`) with a hard ``storageCheckerTimeout``. After ``maxAttempts``
consecutive failures it fences, once per outage (see :meth:`Fencer.fence` and the README's
kill-set table), and keeps probing; the first good heartbeat afterwards reports the storage
Connected again.

Timing (N = maxAttempts, I = interval, T = storageCheckerTimeout): an attempt takes between
0 s (an I/O error, or the previous attempt's child still stuck) and T; attempts start every
max(I, its duration). From the moment the storage hangs, fencing starts after
    at least (N-1)*I            (the hang begins as an attempt starts; failures are immediate)
    at most  I + (N-1)*max(I, T) + T   (it begins just after a good beat; every attempt times out)

Lifecycle: a loop is stopped by a flag it checks after every await *and* by cancellation, so
a cancellation lost in a race (Python 3.11's ``wait_for``) cannot keep a replaced loop alive;
a fence in progress is its own task and is never cut short by a stop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ..core.context import AgentContext
from .inventory import VmInventory, VmRecord
from .killer import HOOK_VMS_KILLED, kill_and_clean_up

__all__ = ["HOOK_VMS_KILLED"]  # re-exported: plugins/eip.py registers its clean-up there
from .probe import StorageProbe, device_of
from .remount import Remounter
from .rules import HOST_STORAGE_STATE, FencerRules

log = logging.getLogger(__name__)

REPORT_FENCER = "/kvm/reportselffencer"
REPORT_STORAGE = "/kvm/reportstoragestatus"
DISCONNECTED = "Disconnected"  # ZStack's first reportselffencer carries this as vmUuidsString

HEALTHY, FAILING, FENCED, STOPPED, IDLE = "Healthy", "Failing", "Fenced", "Stopped", "Idle"
STOP_TIMEOUT = 10.0  # a loop's own steps are bounded well below this
PREVIOUS_FENCE_WAIT = 120.0


@dataclass(frozen=True)
class FencerConfig:
    ps_uuid: str
    mount_path: str
    host_uuid: str
    interval: float
    max_attempts: int
    storage_checker_timeout: float
    strategy: Literal["Force", "Permissive"]
    url: str = ""
    mounted_by_zstack: bool = False
    mount_options: str = ""
    fencers: tuple[str, ...] = (HOST_STORAGE_STATE,)

    @property
    def watches_storage(self) -> bool:
        return HOST_STORAGE_STATE in self.fencers


def detection_bounds(cfg: FencerConfig) -> tuple[float, float]:
    """(best, worst) seconds from a storage hang to the fencing decision."""
    attempts, interval, timeout = cfg.max_attempts, cfg.interval, cfg.storage_checker_timeout
    best = (attempts - 1) * interval
    worst = interval + (attempts - 1) * max(interval, timeout) + timeout
    return best, worst


def storage_kill_set(strategy: str, on_storage: list[VmRecord], rules: FencerRules) -> list[VmRecord]:
    """Which VMs on a failed storage to kill.

    Force: every VM with a disk on it. Permissive: the VMs the MN allow-listed for
    ``hostStorageState`` plus those whose ``enableHa`` flag is set. Block rules of
    ``hostStorageState`` always exempt."""
    blocked = rules.blocked(HOST_STORAGE_STATE)
    allowed = rules.allowed(HOST_STORAGE_STATE)
    return [vm for vm in on_storage if vm.uuid not in blocked
            and (strategy == "Force" or vm.uuid in allowed or vm.enable_ha)]


@dataclass
class FencerStatus:
    state: str = HEALTHY
    consecutive_failures: int = 0
    last_heartbeat_at: float | None = None
    last_error: str | None = None
    fenced_vm_uuids: list[str] = field(default_factory=list)
    fenced_at: float | None = None
    fence_error: str | None = None  # what went wrong in the last fence


class Fencer:
    def __init__(self, ctx: AgentContext, cfg: FencerConfig, inventory: VmInventory,
                 rules: FencerRules, probe: StorageProbe, *, disconnected_reported: bool = False,
                 on_change: Callable[[], None] = lambda: None,
                 previous_fence: asyncio.Task | None = None, device: int | None = None):
        self.ctx = ctx
        self.cfg = cfg
        self.inventory = inventory
        self.rules = rules
        self.status = FencerStatus()
        self.probe = probe
        self.remounter = Remounter(ctx, cfg)
        self._task: asyncio.Task | None = None
        self.fencing: asyncio.Task | None = None
        self._previous_fence = previous_fence
        self._stopping = False
        # The MN was told Disconnected and not yet Connected: persisted (via on_change), so a
        # recovery after an agent restart or a replaced fencer is still reported.
        self.disconnected_reported = disconnected_reported
        # Device of the mount path at its first good heartbeat (not for a storage ZStack
        # mounted, which must be a mount point instead): persisted, as another device later means
        # the storage is no longer mounted there.
        self.device = None if cfg.mounted_by_zstack else device
        self._on_change = on_change

    def start(self) -> None:
        self._task = self.ctx.spawn(self._loop(), name=f"selffencer {self.cfg.ps_uuid}")

    async def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop the loop (a fence in progress goes on by itself). True when it has ended."""
        self._stopping = True
        self.remounter.stop()
        stopped = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            stopped = bool(done)
            if not stopped:  # the flag still ends it at its next step
                log.error("selffencer %s: loop did not stop within %gs", self.cfg.ps_uuid, timeout)
        self.status.state = STOPPED
        return stopped

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # a fencer must never stop watching its storage
                log.exception("selffencer %s: heartbeat round failed unexpectedly", self.cfg.ps_uuid)
                self.status.last_error = "internal error in the heartbeat round; see the agent log"
            if self._stopping:
                return
            await asyncio.sleep(max(0.0, self.cfg.interval - (loop.time() - started)))

    async def beat(self) -> None:
        cfg = self.cfg
        vm_uuids = [vm.uuid for vm in self.inventory.vms_on(cfg.mount_path)]
        result = await self.probe.write_heartbeat(
            cfg.mount_path, cfg.host_uuid, vm_uuids, cfg.storage_checker_timeout,
            must_be_mount=cfg.mounted_by_zstack, device=self.device,
            adopt=self.status.state == FENCED or self.disconnected_reported)  # after a fence
        if self._stopping:
            return
        status = self.status
        if result.ok:
            device = device_of(result)
            if not cfg.mounted_by_zstack and device != self.device:
                log.warning("selffencer %s: %s is on device %s%s; another device later fails the "
                            "heartbeat", cfg.ps_uuid, cfg.mount_path, device,
                            "" if self.device is None else f" (was {self.device}: mounted again)")
                self.device = device
                self._on_change()
            recovered = status.state in (FAILING, FENCED) or self.disconnected_reported
            status.state, status.consecutive_failures = HEALTHY, 0
            status.last_heartbeat_at, status.last_error = time.time(), None
            if self.disconnected_reported:
                self.disconnected_reported = False
                self._on_change()
                self._report(REPORT_STORAGE, {"psStatus": "Connected",
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
            # Its own task: a stop or replacement of this loop never abandons a fence half way.
            self.fencing = self.ctx.spawn(self.fence(result.error), name=f"fence {cfg.ps_uuid}")
            await asyncio.shield(self.fencing)

    def _report(self, path: str, body: dict) -> None:
        self.ctx.reporter.report(path, {"hostUuid": self.cfg.host_uuid,
                                        "psUuids": [self.cfg.ps_uuid], **body}, wait_for_mn=True)

    async def fence(self, error: str) -> None:
        """ZStack's sequence: reportselffencer "Disconnected", kill, reportselffencer with the
        killed uuids (only when something was killed), then umount/remount a storage ZStack
        mounted. Also (extension) reportstoragestatus Disconnected, and Connected on recovery."""
        cfg = self.cfg
        if self._previous_fence is not None and not self._previous_fence.done():
            await asyncio.wait({self._previous_fence}, timeout=PREVIOUS_FENCE_WAIT)
        detail = f"{cfg.max_attempts} consecutive heartbeat failures on {cfg.mount_path}: {error}"
        reason = (f"primary storage[uuids:{[cfg.ps_uuid]}] on host[uuid:{cfg.host_uuid}] heartbeat "
                  f"fail, self fencer has been triggered ({detail})")
        self.status.fenced_at = time.time()
        self.disconnected_reported = True
        self._on_change()
        self._report(REPORT_FENCER, {"vmUuidsString": DISCONNECTED, "fencerFailure": True,
                                     "reason": reason})
        self._report(REPORT_STORAGE, {"psStatus": DISCONNECTED, "reason": detail})
        problems: list[str] = []
        killed: list[str] = []
        on_storage: list[VmRecord] | None = None  # None: who uses the storage is unknown
        try:
            on_storage, killed = await self._kill_per_strategy(problems)
        except Exception as exc:  # whatever happens, the MN hears of this fence
            log.exception("selffencer %s: fencing failed", cfg.ps_uuid)
            problems.append(f"internal error while fencing: {type(exc).__name__}: {exc}")
        if killed:
            self._report(REPORT_FENCER, {"vmUuidsString": ",".join(killed), "fencerFailure": True,
                                         "reason": "; ".join([reason, *problems])})
        elif problems:
            log.error("selffencer %s: fenced, nothing killed: %s", cfg.ps_uuid, "; ".join(problems))
        self.status.fence_error = "; ".join(problems) or None
        if cfg.mounted_by_zstack and not self._stopping:
            spared = None if on_storage is None else sorted({vm.uuid for vm in on_storage} - set(killed))
            self.remounter.after_fence(spared)

    async def _kill_per_strategy(self, problems: list[str]) -> tuple[list[VmRecord] | None, list[str]]:
        """Kill per strategy and rules, run the hooks: (VMs on the storage, None when unknown;
        killed uuids)."""
        cfg = self.cfg
        records, source = await self.inventory.current()
        if records is None:
            problems.append(f"cannot tell which VMs use the storage: {source}")
            return None, []
        on_storage = self.inventory.vms_on(cfg.mount_path)
        targets = storage_kill_set(cfg.strategy, on_storage, self.rules)
        spared = sorted(vm.uuid for vm in on_storage if vm not in targets)
        if spared:
            log.warning("selffencer %s (%s): sparing VMs on the storage (not allow-listed, no "
                        "enableHa, or block-listed): %s", cfg.ps_uuid, cfg.strategy, ", ".join(spared))
        killed, notes = await kill_and_clean_up(
            self.ctx, [vm.uuid for vm in targets], f"selffencer {cfg.ps_uuid}",
            f"({cfg.strategy} strategy; because heartbeats on {cfg.mount_path} failed "
            f"{cfg.max_attempts} times; inventory from {source})")
        problems += notes
        self.status.fenced_vm_uuids = killed
        return on_storage, killed
