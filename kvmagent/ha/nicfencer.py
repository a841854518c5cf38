"""Fencer ``hostBusinessNic``: kill the VMs whose business NIC lost its link.

ZStack's agent (ZU ``PhysicalNicFencer``) checks every ``interval`` whether each physical NIC's
operstate is DOWN; on the (maxAttempts+1)-th consecutive DOWN check it SIGKILLs every VM plugged
into a bridge of that NIC, except the VMs in the ``hostBusinessNic`` block rules. Strategy and
allow rules do not apply, and nothing is reported. Bridge to NIC is by ZStack's naming:
``br_eth0``, ``br_eth0_100`` and ``br_eth0.100`` belong to ``eth0``, ``br_bond0`` to ``bond0``.

Here the same, with these differences:
- the link state comes from netlink (pyroute2), and a NIC is down when it is administratively
  down *or has no carrier*: a NIC whose peer or slaves went away reads LOWERLAYERDOWN, not
  DOWN, and ZStack's check misses it;
- the NICs watched are the ones the running VMs' bridges map to (whatever their kind), not
  a list of PCI devices;
- one fencer per host (ZStack runs one per storage, N copies doing the same);
- each kill is reported (extension) as ``/ha/events/vm-fenced`` ``{hostUuid, values:
  [{vmUuid, fencerName}]}``, which the premium MN handles, and the ``selffencer.vms_killed``
  hooks (EIP clean-up) run for them.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..core.context import AgentContext
from ..core.lazy import lazy_import
from .inventory import VmInventory
from .killer import kill_and_clean_up
from .netgroup import netns_kwargs
from .rules import HOST_BUSINESS_NIC, FencerRules

pyroute2 = lazy_import("pyroute2")

log = logging.getLogger(__name__)

REPORT_VM_FENCED = "/ha/events/vm-fenced"
IFF_UP = 0x1
NETLINK_TIMEOUT = 10.0


def bridge_nic(bridge: str) -> str | None:
    """ZStack's mapping from a bridge name to its NIC (ZU ``get_physical_nic_by_bridge``)."""
    if not bridge:
        return None
    name = bridge.split("_")[1] if "_" in bridge else bridge
    return name.split(".")[0] or None


@dataclass(frozen=True)
class NicFencerConfig:
    host_uuid: str
    interval: float
    max_attempts: int


class NicFencer:
    def __init__(self, ctx: AgentContext, inventory: VmInventory, rules: FencerRules,
                 netns: str | None = None):
        self.ctx = ctx
        self.inventory = inventory
        self.rules = rules
        self.netns = netns
        self.cfg: NicFencerConfig | None = None
        self.down_counts: dict[str, int] = {}
        self.killed: dict[str, set[str]] = {}  # nic -> VMs killed in this outage
        self.last_error: str | None = None
        self.checks = 0  # completed link checks since the agent started
        self._task: asyncio.Task | None = None
        # The running loop's token: a loop runs while it is current, so a loop that outlived its
        # stop (a lost cancellation) ends at its next step instead of running beside its successor.
        self._token: object | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def configure(self, cfg: NicFencerConfig | None) -> None:
        if cfg == self.cfg and (cfg is None or self.running):
            return
        await self.stop()
        if cfg is None:  # no longer watched: an outage seen later is a new one
            self.down_counts, self.killed = {}, {}
        # A new configuration keeps the counts and the VMs killed per NIC: a NIC that stays down
        # is one outage, and its VMs are not fenced again.
        self.cfg = cfg
        if cfg is not None:
            token = self._token = object()
            self._task = self.ctx.spawn(self._loop(cfg, token), name="selffencer hostBusinessNic")
            log.info("hostBusinessNic fencer: every %gs, fencing after %d+1 down checks",
                     cfg.interval, cfg.max_attempts)

    async def stop(self, timeout: float = 10.0) -> None:
        self._token = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                log.error("hostBusinessNic fencer did not stop within %gs", timeout)
        self._task = None

    async def _loop(self, cfg: NicFencerConfig, token: object) -> None:
        ipr = None
        try:
            while self._token is token:
                try:
                    if ipr is None:
                        ipr = pyroute2.AsyncIPRoute(**netns_kwargs(self.netns))
                    async with asyncio.timeout(NETLINK_TIMEOUT):
                        links = {link.get("ifname"): _link_up(link)
                                 async for link in await ipr.link("dump")}
                    if self._token is not token:
                        return
                    await self.check(cfg, links)
                    self.checks += 1
                    self.last_error = None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # netlink or libvirt trouble: keep watching
                    log.error("hostBusinessNic fencer: check failed: %s", exc)
                    self.last_error = str(exc)
                    if ipr is not None:
                        ipr.close()
                        ipr = None
                await asyncio.sleep(cfg.interval)
        finally:
            if ipr is not None:
                ipr.close()

    async def check(self, cfg: NicFencerConfig, links: dict[str, bool]) -> None:
        vms = [vm for vm in (self.inventory.snapshot or {}).values() if vm.active]
        nics = {nic for vm in vms for b in vm.bridges if (nic := bridge_nic(b)) in links}
        for nic in nics | set(self.down_counts):
            if links.get(nic, True):
                if self.down_counts.pop(nic, 0) > cfg.max_attempts:
                    log.warning("hostBusinessNic fencer: %s has its link again", nic)
                self.killed.pop(nic, None)
            else:
                self.down_counts[nic] = self.down_counts.get(nic, 0) + 1
        faulty = {nic for nic, n in self.down_counts.items() if n > cfg.max_attempts}
        if faulty:
            await self._fence(cfg, faulty)

    async def _fence(self, cfg: NicFencerConfig, faulty: set[str]) -> None:
        records, source = await self.inventory.current()
        if records is None:
            log.error("hostBusinessNic fencer: NICs %s down, but %s", sorted(faulty), source)
            return
        blocked = self.rules.blocked(HOST_BUSINESS_NIC)
        targets: dict[str, str] = {}  # vm -> nic
        for vm in records.values():
            for nic in {bridge_nic(b) for b in vm.bridges} & faulty:
                if vm.active and vm.uuid not in blocked and vm.uuid not in self.killed.get(nic, ()):
                    targets[vm.uuid] = nic
        spared = sorted(vm.uuid for vm in records.values() if vm.uuid in blocked
                        and {bridge_nic(b) for b in vm.bridges} & faulty)
        if spared:
            log.warning("hostBusinessNic fencer: sparing block-listed VMs %s", ", ".join(spared))
        if not targets:
            return
        def report(killed: list[str]) -> None:
            for uuid in killed:
                self.killed.setdefault(targets[uuid], set()).add(uuid)
            self.ctx.reporter.report(REPORT_VM_FENCED, {
                "hostUuid": cfg.host_uuid,
                "values": [{"vmUuid": u, "fencerName": HOST_BUSINESS_NIC} for u in killed]},
                wait_for_mn=True)

        _, problems = await kill_and_clean_up(
            self.ctx, list(targets), "hostBusinessNic fencer",
            f"because NIC(s) {', '.join(sorted(faulty))} lost their link for more than "
            f"{cfg.max_attempts} checks", before_hooks=report)
        if problems:
            log.error("hostBusinessNic fencer: %s", "; ".join(problems))


def _link_up(link) -> bool:
    """Administratively up and with carrier."""
    return bool(link.get("flags", 0) & IFF_UP) and link.get("carrier") == 1
