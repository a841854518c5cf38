"""Network-group monitoring from netlink link events (pyroute2), not by polling ``ip``.

Two rule shapes are accepted side by side:
- ours: groups ``{networkGroupUuid, minAvailableCount, resources [{name, weight}]}`` plus
  ``vmGroups {vmUuid: [groupUuid]}``;
- ZStack's (ZU HA-network-group code, 2026): per VM
  ``{vmUuid: {"groups": {groupUuid: {"rules": [{"resource", "weight"}], "minScore"}}}}``.
A group is Down when the summed weight of its resources that are up (administratively up and
running, i.e. carrier) is below its minimum (``minAvailableCount`` / ``minScore``); a VM fails
when one of its groups is Down for it. Only HA-enabled VMs are reported, and failed VMs are
reported, never killed. The report is ``{hostUuid, networkGroupStatus {group: Available|Down},
failedVmUuids (sorted)}``:
- a status change is reported once links have been stable for ``SETTLE`` seconds (flap
  damping: a link bouncing faster than that reports nothing);
- while VMs are failed it is repeated every ``REPEAT`` seconds (ZStack repeats it every
  fencer cycle, so the MN can act on VMs whose first report it missed);
- after an agent restart the full state is reported once.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel

from ..core.context import AgentContext
from ..core.errors import AgentError
from ..core.lazy import lazy_import
from ..core.state import conforms

pyroute2 = lazy_import("pyroute2")  # loaded when the first network group is watched

log = logging.getLogger(__name__)

STATE_DOC = "ha/networkgroups"
REPORT_PATH = "/kvm/reportnetworkgroupstatus"
AVAILABLE, DOWN = "Available", "Down"
SETTLE = 1.0
REPEAT = 10.0
IFF_UP, IFF_RUNNING = 0x1, 0x40


@dataclass
class Group:
    uuid: str
    min_available: int
    resources: dict[str, int]  # ifname -> weight


# ZStack's per-VM rules: vm -> group -> (min score, resource -> weight)
VmRules = dict[str, dict[str, tuple[int, dict[str, int]]]]


class StoredRule(BaseModel):
    minScore: int
    rules: dict[str, int]


class StoredConfig(BaseModel):
    """The shape of the state document (a document of another shape is set aside)."""
    groups: list[Group]
    vmGroups: dict[str, list[str]]
    vmRules: dict[str, dict[str, StoredRule]] = {}  # absent in documents of older agents


@dataclass
class Config:
    groups: dict[str, Group] = field(default_factory=dict)
    vm_groups: dict[str, list[str]] = field(default_factory=dict)
    vm_rules: VmRules = field(default_factory=dict)

    def to_doc(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups.values()], "vmGroups": self.vm_groups,
                "vmRules": {vm: {g: {"minScore": m, "rules": r} for g, (m, r) in groups.items()}
                            for vm, groups in self.vm_rules.items()}}

    @classmethod
    def stored(cls, doc: object) -> Config:
        """From the state document; ValueError when it has another shape (set aside)."""
        return cls.from_doc(conforms(StoredConfig)(doc))

    @classmethod
    def from_doc(cls, doc: dict) -> Config:
        groups = {g["uuid"]: Group(**g) for g in doc.get("groups", [])}
        rules = {vm: {g: (int(r["minScore"]), dict(r["rules"])) for g, r in groups_.items()}
                 for vm, groups_ in (doc.get("vmRules") or {}).items()}
        return cls(groups, dict(doc.get("vmGroups", {})), rules)


def netns_kwargs(netns: str | None) -> dict:
    """pyroute2 arguments to watch ``netns`` (None: the host's). flags=0: a namespace that
    does not exist is an error, not silently created empty (pyroute2's default, O_CREAT),
    where a watcher would see no links at all."""
    return {"netns": netns, "flags": 0} if netns else {}


def score(resources: dict[str, int], links: dict[str, bool]) -> int:
    return sum(w for name, w in resources.items() if links.get(name, False))


def link_up(flags: int) -> bool:
    return bool(flags & IFF_UP and flags & IFF_RUNNING)


class NetworkGroupMonitor:
    def __init__(self, ctx: AgentContext, netns: str | None = None):
        self.ctx = ctx
        self.netns = netns
        self.config = Config()
        self.links: dict[str, bool] = {}
        self._reported: tuple | None = None
        self._ipr = None  # pyroute2.AsyncIPRoute while watching
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._report_lock = asyncio.Lock()
        self._settle: asyncio.TimerHandle | None = None
        self._repeater: asyncio.Task | None = None

    # -- configuration -----------------------------------------------------------------------
    async def restore(self) -> None:
        config = self.ctx.state.load(STATE_DOC, check=Config.stored)  # wrong shape: aside
        if config is not None and (config.groups or config.vm_rules):
            self.config = config
            try:
                await self._ensure_watching()
            except TimeoutError:  # keep starting: fencers and VMs matter more; it keeps trying
                log.error("network groups: netlink not ready within 10s (netns %s); the watch "
                          "keeps retrying in the background", self.netns or "host")
                return
            self._report(force=True)  # the MN gets the full picture once after a restart

    async def setup(self, groups: list[Group], vm_groups: dict[str, list[str]],
                    vm_rules: VmRules | None = None) -> None:
        async with self._lock:
            for group in groups:
                self.config.groups[group.uuid] = group
            self.config.vm_groups.update(vm_groups)
            self.config.vm_rules.update(vm_rules or {})
            self._persist()
            try:
                await self._ensure_watching()
            except TimeoutError:
                raise AgentError(f"cannot watch links in network namespace {self.netns or 'host'}: "
                                 "netlink did not answer within 10s") from None
            self._report()

    async def cancel(self, uuids: list[str]) -> None:
        async with self._lock:
            for uuid in uuids:
                self.config.groups.pop(uuid, None)
                for groups in self.config.vm_rules.values():
                    groups.pop(uuid, None)
            self.config.vm_rules = {vm: g for vm, g in self.config.vm_rules.items() if g}
            self.config.vm_groups = {vm: [g for g in gs if g in self.config.groups]
                                     for vm, gs in self.config.vm_groups.items()}
            self.config.vm_groups = {vm: gs for vm, gs in self.config.vm_groups.items() if gs}
            self._persist()
            self._report()

    def _persist(self) -> None:
        self.ctx.state.save(STATE_DOC, self.config.to_doc())

    # -- status -------------------------------------------------------------------------------
    def statuses(self) -> dict[str, str]:
        result = {}
        for group in self.config.groups.values():
            up = score(group.resources, self.links)
            result[group.uuid] = AVAILABLE if up >= group.min_available else DOWN
        for groups in self.config.vm_rules.values():
            for uuid, (min_score, resources) in groups.items():
                if result.get(uuid) != DOWN:
                    result[uuid] = AVAILABLE if score(resources, self.links) >= min_score else DOWN
        return result

    def _failing_members(self, down: set[str]) -> set[str]:
        members = {vm for vm, groups in self.config.vm_groups.items() if down & set(groups)}
        for vm, groups in self.config.vm_rules.items():
            if any(score(resources, self.links) < min_score
                   for min_score, resources in groups.values()):
                members.add(vm)
        return members

    async def failed_vms(self, statuses: dict[str, str]) -> list[str]:
        down = {g for g, s in statuses.items() if s == DOWN}
        if not down:
            return []
        members = self._failing_members(down)
        vm_service = self.ctx.services.get("vm")
        try:
            enabled = await vm_service.ha_enabled_vms() if vm_service else set()
        except Exception as exc:  # a silent libvirtd must not stop the report
            log.warning("network groups: HA flags unavailable (%s); listing all member VMs", exc)
            enabled = members
        return sorted(members & enabled)

    def _report(self, force: bool = False) -> None:
        self.ctx.spawn(self._report_now(force), name="networkgroup report")

    def _report_settled(self) -> None:
        """Report once the links stop changing for SETTLE seconds (flap damping)."""
        if self._settle is not None:
            self._settle.cancel()
        self._settle = asyncio.get_running_loop().call_later(SETTLE, self._report)

    async def _report_now(self, force: bool) -> None:
        async with self._report_lock:  # one at a time, or a slow older one could report last
            statuses = self.statuses()
            failed = await self.failed_vms(statuses)
            key = (tuple(sorted(statuses.items())), tuple(failed))
            if key == self._reported and not force:
                return
            self._reported = key
        log.warning("network groups: %s; failed HA VMs: %s", statuses, failed or "none")
        self.ctx.reporter.report(REPORT_PATH, {"hostUuid": self.ctx.identity.host_uuid,
                                               "networkGroupStatus": statuses,
                                               "failedVmUuids": failed})
        if failed and (self._repeater is None or self._repeater.done()):
            self._repeater = self.ctx.spawn(self._repeat(), name="networkgroup repeat")

    async def _repeat(self) -> None:
        """While VMs are failed, say so again every REPEAT seconds."""
        while True:
            await asyncio.sleep(REPEAT)
            if not (self._reported and self._reported[1]):
                return
            await self._report_now(force=True)

    async def status(self) -> tuple[dict[str, str], list[str]]:
        statuses = self.statuses()
        return statuses, await self.failed_vms(statuses)

    # -- netlink -------------------------------------------------------------------------------
    async def _ensure_watching(self) -> None:
        if self._task is None or self._task.done():
            self._ready.clear()
            self._task = self.ctx.spawn(self._watch(), name="networkgroup netlink")
        await asyncio.wait_for(self._ready.wait(), 10)

    async def _watch(self) -> None:
        while True:
            try:
                self._ipr = pyroute2.AsyncIPRoute(**netns_kwargs(self.netns))
                await self._ipr.bind(groups=pyroute2.netlink.rtnl.RTMGRP_LINK)
                self.links = {link.get("ifname"): link_up(link["flags"])
                              async for link in await self._ipr.link("dump")}
                self._ready.set()
                while True:
                    async for msg in self._ipr.get():
                        self._on_message(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("network groups: netlink watch failed (%s); restarting in 1s", exc)
                await asyncio.sleep(1)
            finally:
                if self._ipr is not None:
                    self._ipr.close()
                    self._ipr = None

    def _on_message(self, msg) -> None:
        name = msg.get("ifname")
        if name is None:
            return
        up = msg["event"] != "RTM_DELLINK" and link_up(msg["flags"])
        if self.links.get(name) == up:
            return
        self.links[name] = up
        if any(name in g.resources for g in self.config.groups.values()) or any(
                name in resources for groups in self.config.vm_rules.values()
                for _, resources in groups.values()):
            self._report_settled()

    async def close(self) -> None:
        if self._settle is not None:
            self._settle.cancel()
        if self._repeater is not None:
            self._repeater.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
