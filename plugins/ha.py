"""HA commands: self-fencers on shared storage, fencer rules, peer checks, network groups."""
from __future__ import annotations

import ipaddress
import logging
from typing import Literal

from pydantic import Field, field_validator, model_validator

from kvmagent.core.context import AgentContext
from kvmagent.core.errors import AgentError
from kvmagent.core.models import AgentRequest, AgentResponse, EmptyRequest, WireModel
from kvmagent.core.plugin import ASYNC, SYNC, Plugin
from kvmagent.core.validate import AbsPath, IfName
from kvmagent.ha.fencer import FencerConfig, detection_bounds
from kvmagent.ha.manager import FencerManager
from kvmagent.ha.netgroup import Group, NetworkGroupMonitor
from kvmagent.ha.peer import check_peer
from kvmagent.ha.rules import FENCER_NAME, HOST_BUSINESS_NIC, HOST_STORAGE_STATE
from kvmagent.ha.scan import scan_host

log = logging.getLogger(__name__)

plugin = Plugin("ha", "storage self-fencing and network-group monitoring")

FENCERS, NETGROUPS = "ha.fencers", "ha.networkgroups"
PsUuid = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")


@plugin.on_startup
async def _start(ctx: AgentContext) -> None:
    fencers = ctx.services[FENCERS] = FencerManager(ctx, ctx.config.ha_inventory_refresh,
                                                    ctx.config.ha_netns)
    groups = ctx.services[NETGROUPS] = NetworkGroupMonitor(ctx, ctx.config.ha_netns)
    await fencers.restore()
    await groups.restore()


@plugin.on_cleanup
async def _stop(ctx: AgentContext) -> None:
    await ctx.services[FENCERS].close()
    await ctx.services[NETGROUPS].close()


KNOWN_FENCERS = (HOST_STORAGE_STATE, HOST_BUSINESS_NIC)
# Never a storage's mount path: with Force and mountedByZStack a fence would umount -f them.
SYSTEM_DIRS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32",
                         "/lib64", "/libx32", "/media", "/mnt", "/opt", "/proc", "/root", "/run",
                         "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var"})
PEER_READ_MIN_TIMEOUT = 1.0  # one read of a peer's heartbeat gets at least this long


class SetupSelfFencerCmd(AgentRequest):
    """SetupSelfFencerCmd (premium ``SelfFencerKvmBackend``); every list has one entry per PS."""
    host_uuid: str = PsUuid
    interval: float = Field(ge=0.2, le=3600, description="seconds between heartbeats (>= 0.2)")
    max_attempts: int = Field(ge=1, le=1000)
    storage_checker_timeout: float = Field(ge=0.5, le=3600,
                                           description="hard limit of one heartbeat write (>= 0.5)")
    strategy: str | None = Field(None, max_length=64, description="Permissive; anything else, "
                                 "null or absent: Force (as ZU's agent reads it)")
    # The MN always sends these lists, possibly empty (then nothing is set up, as in ZU).
    uuids: list[str] = Field(max_length=256, description="primary storage uuids")
    mount_paths: list[AbsPath] = Field(max_length=256, description="same order")
    urls: list[str] = Field(default_factory=list, max_length=256,
                            description="remount source of a storage ZStack mounted")
    mounted_by_zstack: list[bool] = Field(default_factory=list, max_length=256,
                                          alias="mountedByZStack")
    mount_options: list[str] = Field(default_factory=list, max_length=256)
    fencers: list[str] | None = Field(
        None, max_length=16, description="fencer kinds: hostStorageState, hostBusinessNic; "
        "omitted: hostStorageState (what agents did before the field existed); [] none")

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.uuids) != len(self.mount_paths):
            raise ValueError(f"uuids ({len(self.uuids)}) and mountPaths ({len(self.mount_paths)}) "
                             "must have the same length")
        for i, path in enumerate(self.mount_paths):
            if path in SYSTEM_DIRS:
                raise ValueError(f"mountPaths.{i}: {path} is a system directory, not the mount "
                                 "path of a primary storage")
        for uuid in self.uuids:
            if not uuid or len(uuid) > 64 or not uuid.replace("-", "").isalnum():
                raise ValueError(f"uuids: {uuid!r} is not a storage uuid")
        for name in ("urls", "mountedByZStack", "mountOptions"):
            values = getattr(self, {"urls": "urls", "mountedByZStack": "mounted_by_zstack",
                                    "mountOptions": "mount_options"}[name])
            if values and len(values) != len(self.uuids):
                raise ValueError(f"{name} ({len(values)}) must be empty or as long as uuids "
                                 f"({len(self.uuids)})")
        for i, text in enumerate(self.urls + self.mount_options):
            if text.startswith("-") or any(c.isspace() for c in text) or len(text) > 4096:
                field = f"urls.{i}" if i < len(self.urls) else f"mountOptions.{i - len(self.urls)}"
                raise ValueError(f"{field}: {text[:80]!r} is not a mount source or option list")
        for name in self.fencers or ():
            if not FENCER_NAME.match(name):
                raise ValueError(f"fencers: {name[:80]!r} is not a fencer name")
        return self


class SetupSelfFencerRsp(AgentResponse):
    outcome: dict[str, str] = Field(default_factory=dict,
                                    description="extension: psUuid -> started/replaced/unchanged")


class CancelSelfFencerCmd(AgentRequest):
    host_uuid: str | None = None
    ps_uuids: list[str] = Field(default_factory=list, max_length=256)
    mount_points: list[str] = Field(default_factory=list, max_length=256)


class FencerTO(WireModel):
    ps_uuid: str
    mount_path: str
    fencers: list[str]
    state: str
    consecutive_failures: int = 0
    last_heartbeat_at: float | None = None
    strategy: str
    interval: float
    max_attempts: int
    storage_checker_timeout: float
    last_error: str | None = None
    fenced_vm_uuids: list[str] = Field(default_factory=list)
    fenced_at: float | None = Field(None, description="unix time of the last fence")
    fence_error: str | None = Field(None, description="what went wrong in the last fence")
    detection_seconds: tuple[float, float] = Field(description="best and worst case")
    mounted_by_zstack: bool = Field(False, alias="mountedByZStack")
    remount: str | None = Field(None, description="outcome of the last umount/remount step")


class NicFencerTO(WireModel):
    running: bool
    interval: float | None = None
    max_attempts: int | None = None
    down_checks: dict[str, int] = Field(default_factory=dict, description="NIC -> down checks")
    killed_vm_uuids: list[str] = Field(default_factory=list)
    last_error: str | None = None


class SelfFencerStateRsp(AgentResponse):
    ps_uuids: list[str] = Field(default_factory=list)
    fencers: list[FencerTO] = Field(default_factory=list)
    nic_fencer: NicFencerTO | None = None


class FencerRuleTO(WireModel):
    """VmRuleAttachFencer (premium ``org.zstack.ha.VmRuleAttachFencer``)."""
    fencer_name: str = Field(pattern=FENCER_NAME.pattern)
    vm_uuids: list[str] = Field(default_factory=list, max_length=100000)

    @field_validator("vm_uuids")
    @classmethod
    def _uuids(cls, value: list[str]) -> list[str]:
        for uuid in value:
            if not uuid or len(uuid) > 64 or not uuid.replace("-", "").isalnum():
                raise ValueError(f"{uuid[:80]!r} is not a VM uuid")
        return value


class FencerRulesCmd(AgentRequest):
    """Add/RemoveVmFencerRuleToHostCmd (premium ``HaManagerImpl``)."""
    host_uuid: str | None = None
    allow_rules: list[FencerRuleTO] | None = Field(None, max_length=64)
    block_rules: list[FencerRuleTO] | None = Field(None, max_length=64)


class FencerRulesRsp(AgentResponse):
    allow_rules: dict[str, list[str]] = Field(default_factory=dict)
    block_rules: dict[str, list[str]] = Field(default_factory=dict)


class CheckVmStateCmd(AgentRequest):
    """CheckFileSystemVmStateCmd (premium ``AbstractFileSystemHostHeartbeatChecker``)."""
    primary_storage_uuid: str = PsUuid
    target_host_uuid: str = PsUuid
    mount_path: AbsPath
    interval: float = Field(2.0, ge=0.1, le=600)
    times: int = Field(3, ge=0, le=100000)
    # The MN fills this from successTimes (an int, may be 0): raised to PEER_READ_MIN_TIMEOUT.
    storage_checker_timeout: float = Field(5.0, ge=0, le=600)


class CheckVmStateRsp(AgentResponse):
    result: dict[str, bool] = Field(default_factory=dict)
    vm_uuids: list[str] = Field(default_factory=list)
    reason: str | None = Field(None, description="extension: why alive or not")


class ScanHostCmd(AgentRequest):
    """ScanCmd (premium ``HaKvmHostSiblingChecker``); startPort/endPort are not used."""
    host_uuid: str | None = None
    slibing_host_uuid: str | None = None
    ip: str = Field(max_length=64)
    start_port: int = 1
    end_port: int = 65535
    interval: float = Field(1.0, ge=0, le=600)
    times: int = Field(5, ge=0, le=1000)
    success_interval: float = Field(1.0, ge=0, le=600)
    success_times: int = Field(3, ge=0, le=1000)

    @field_validator("ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value[:80]!r} is not an IP address") from None


class ScanHostRsp(AgentResponse):
    result: Literal["success", "failure", "unstable"] | None = None


class ResourceTO(WireModel):
    name: IfName
    weight: int = Field(1, ge=1, le=1000)


class GroupTO(WireModel):
    network_group_uuid: str = PsUuid
    min_available_count: int = Field(ge=1, le=100000)
    resources: list[ResourceTO] = Field(min_length=1, max_length=1024)


class RuleTO(WireModel):
    resource: IfName
    weight: int = Field(1, ge=0, le=1000)


class GroupRuleTO(WireModel):
    rules: list[RuleTO] = Field(min_length=1, max_length=1024)
    min_score: int = Field(ge=1, le=100000)


class VmRuleTO(WireModel):
    groups: dict[str, GroupRuleTO] = Field(max_length=1024)


class SetupNetworkGroupCmd(AgentRequest):
    host_uuid: str | None = None
    groups: list[GroupTO] = Field(default_factory=list, max_length=1024)
    vm_groups: dict[str, list[str]] = Field(default_factory=dict)
    vm_rules: dict[str, VmRuleTO] = Field(
        default_factory=dict, description="ZStack's shape: {vmUuid: {groups: {groupUuid: "
        "{rules: [{resource, weight}], minScore}}}}")

    @field_validator("vm_rules")
    @classmethod
    def _uuids(cls, value: dict[str, VmRuleTO]) -> dict[str, VmRuleTO]:
        for name in [*value, *(g for r in value.values() for g in r.groups)]:
            if not name or len(name) > 64 or not name.replace("-", "").isalnum():
                raise ValueError(f"{name[:80]!r} is not a uuid")
        return value


class CancelNetworkGroupCmd(AgentRequest):
    network_group_uuids: list[str] = Field(max_length=1024)


class NetworkGroupStatusRsp(AgentResponse):
    network_group_status: dict[str, str] = Field(default_factory=dict)
    failed_vm_uuids: list[str] = Field(default_factory=list)


def check_host(ctx: AgentContext, host_uuid: str | None) -> None:
    """A command meant for another host changes nothing here."""
    if host_uuid and ctx.identity.host_uuid and host_uuid != ctx.identity.host_uuid:
        raise AgentError(f"hostUuid {host_uuid} is not this host ({ctx.identity.host_uuid})")


@plugin.command("/ha/selffencer/setup", mode=ASYNC)
async def setup_fencers(ctx: AgentContext, cmd: SetupSelfFencerCmd) -> SetupSelfFencerRsp:
    """Start (or keep, or replace) the fencers of each primary storage."""
    check_host(ctx, cmd.host_uuid)
    manager: FencerManager = ctx.services[FENCERS]
    kinds = tuple(dict.fromkeys(cmd.fencers if cmd.fencers is not None else [HOST_STORAGE_STATE]))
    unknown = [k for k in kinds if k not in KNOWN_FENCERS]
    if unknown:  # other storage types' fencers (Ceph, sharedblock) do not run on file systems
        log.warning("selffencer setup: ignoring fencers this agent does not run: %s", unknown)
    kinds = tuple(k for k in kinds if k in KNOWN_FENCERS)
    n = len(cmd.uuids)
    urls, mounted, options = (cmd.urls or [""] * n, cmd.mounted_by_zstack or [False] * n,
                              cmd.mount_options or [""] * n)
    for i, path in enumerate(cmd.mount_paths):  # all checked before anything starts
        if any(c.mount_path == path for c in manager.configs.values()):
            continue  # checked when it was first set up; a replay must not wait on a hung storage
        probe = manager.probe_for(path)
        found = await probe.is_dir(path, min(cmd.storage_checker_timeout, 10.0))
        if found.missing:
            raise AgentError(f"mountPaths.{i}: the mount path[{path}] is not a directory")
        if not found.ok:  # a hung storage is what the fencer is for: start it all the same
            log.warning("selffencer setup: cannot check %s now (%s); starting its fencer",
                        path, found.error)
    strategy = "Permissive" if cmd.strategy == "Permissive" else "Force"  # ZU: != Permissive
    configs = [FencerConfig(ps, path, cmd.host_uuid, cmd.interval, cmd.max_attempts,
                            cmd.storage_checker_timeout, strategy, urls[i], mounted[i],
                            options[i], kinds)
               for i, (ps, path) in enumerate(zip(cmd.uuids, cmd.mount_paths, strict=True))]
    return SetupSelfFencerRsp(outcome=await manager.setup(configs))


@plugin.command("/ha/selffencer/cancel", mode=ASYNC)
async def cancel_fencers(ctx: AgentContext, cmd: CancelSelfFencerCmd) -> AgentResponse:
    """Stop the fencers of these storages, by psUuids or mountPoints (unknown ones ignored)."""
    check_host(ctx, cmd.host_uuid)
    await ctx.services[FENCERS].cancel(cmd.ps_uuids, cmd.mount_points)
    return AgentResponse()


@plugin.command("/ha/selffencer/state", mode=SYNC)
async def fencer_state(ctx: AgentContext, cmd: EmptyRequest) -> SelfFencerStateRsp:
    """Extension: every fencer with its state, failures and last heartbeat."""
    manager: FencerManager = ctx.services[FENCERS]
    fencers = []
    for ps_uuid, cfg in sorted(manager.configs.items()):
        fencer = manager.fencers.get(ps_uuid)
        st = fencer.status if fencer is not None else None
        fencers.append(FencerTO(
            ps_uuid=ps_uuid, mount_path=cfg.mount_path, fencers=list(cfg.fencers),
            state=manager.state_of(ps_uuid), strategy=cfg.strategy, interval=cfg.interval,
            max_attempts=cfg.max_attempts, storage_checker_timeout=cfg.storage_checker_timeout,
            detection_seconds=detection_bounds(cfg), mounted_by_zstack=cfg.mounted_by_zstack,
            **({} if st is None else dict(
                consecutive_failures=st.consecutive_failures,
                last_heartbeat_at=st.last_heartbeat_at, last_error=st.last_error,
                fenced_vm_uuids=st.fenced_vm_uuids, fenced_at=st.fenced_at,
                fence_error=st.fence_error,
                remount=fencer.remounter.last))))
    nic = manager.nic_fencer
    nic_to = NicFencerTO(running=nic.running, interval=nic.cfg and nic.cfg.interval,
                         max_attempts=nic.cfg and nic.cfg.max_attempts,
                         down_checks=dict(nic.down_counts), last_error=nic.last_error,
                         killed_vm_uuids=sorted({u for s in nic.killed.values() for u in s}))
    return SelfFencerStateRsp(ps_uuids=[f.ps_uuid for f in fencers], fencers=fencers,
                              nic_fencer=nic_to)


def _rules(rules: list[FencerRuleTO] | None) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for rule in rules or ():
        merged.setdefault(rule.fencer_name, []).extend(rule.vm_uuids)
    return merged


def _rules_rsp(ctx: AgentContext) -> FencerRulesRsp:
    rules = ctx.services[FENCERS].rules
    return FencerRulesRsp(allow_rules=rules.allow, block_rules=rules.block)


@plugin.command("/add/vm/fencer/rule/to/host", mode=ASYNC)
async def add_fencer_rules(ctx: AgentContext, cmd: FencerRulesCmd) -> FencerRulesRsp:
    """Allow a fencer to kill (allowRules) or forbid it (blockRules) for these VMs; persisted."""
    check_host(ctx, cmd.host_uuid)
    ctx.services[FENCERS].rules.add(_rules(cmd.allow_rules), _rules(cmd.block_rules))
    return _rules_rsp(ctx)


@plugin.command("/remove/vm/fencer/rule/from/host", mode=ASYNC)
async def remove_fencer_rules(ctx: AgentContext, cmd: FencerRulesCmd) -> FencerRulesRsp:
    """Take these VMs out of the named fencers' allow/block rules (unknown ones ignored)."""
    check_host(ctx, cmd.host_uuid)
    ctx.services[FENCERS].rules.remove(_rules(cmd.allow_rules), _rules(cmd.block_rules))
    return _rules_rsp(ctx)


@plugin.command("/get/vm/fencer/rule/", mode=ASYNC)
async def get_fencer_rules(ctx: AgentContext, cmd: EmptyRequest) -> FencerRulesRsp:
    """Every rule: allowRules and blockRules as {fencerName: [vmUuid]}."""
    return _rules_rsp(ctx)


@plugin.command("/filesystem/check/vmstate", mode=ASYNC)
async def check_vm_state(ctx: AgentContext, cmd: CheckVmStateCmd) -> CheckVmStateRsp:
    """Is another host's heartbeat on this storage still advancing? With its VM uuids."""
    probe = ctx.services[FENCERS].probe_for(cmd.mount_path)  # one stuck child per storage at most
    verdict = await check_peer(probe, cmd.mount_path, cmd.target_host_uuid, cmd.times,
                               cmd.interval, max(cmd.storage_checker_timeout, PEER_READ_MIN_TIMEOUT))
    return CheckVmStateRsp(result={cmd.primary_storage_uuid: verdict.alive},
                           vm_uuids=verdict.vm_uuids, reason=verdict.reason)


@plugin.command("/ha/scanhost", mode=ASYNC)
async def scan(ctx: AgentContext, cmd: ScanHostCmd) -> ScanHostRsp:
    """Is the sibling host at ``ip`` up? ICMP echo (TCP answer without raw sockets)."""
    return ScanHostRsp(result=await scan_host(cmd.ip, cmd.interval, cmd.times,
                                              cmd.success_interval, cmd.success_times))


@plugin.command("/ha/networkgroup/setup", mode=ASYNC)
async def setup_groups(ctx: AgentContext, cmd: SetupNetworkGroupCmd) -> AgentResponse:
    """Watch the groups' NICs/bridges; report status changes and failed HA VMs."""
    check_host(ctx, cmd.host_uuid)
    groups = [Group(g.network_group_uuid, g.min_available_count,
                    {r.name: r.weight for r in g.resources}) for g in cmd.groups]
    known = {g.uuid for g in groups} | set(ctx.services[NETGROUPS].config.groups)
    unknown = sorted({g for gs in cmd.vm_groups.values() for g in gs} - known)
    if unknown:
        raise AgentError(f"vmGroups refers to unknown network groups: {', '.join(unknown)}")
    vm_rules = {vm: {g: (r.min_score, {x.resource: x.weight for x in r.rules})
                     for g, r in rule.groups.items()} for vm, rule in cmd.vm_rules.items()}
    await ctx.services[NETGROUPS].setup(groups, cmd.vm_groups, vm_rules)
    return AgentResponse()


@plugin.command("/ha/networkgroup/cancel", mode=ASYNC)
async def cancel_groups(ctx: AgentContext, cmd: CancelNetworkGroupCmd) -> AgentResponse:
    """Stop watching these groups."""
    await ctx.services[NETGROUPS].cancel(cmd.network_group_uuids)
    return AgentResponse()


@plugin.command("/ha/networkgroup/status", mode=SYNC)
async def group_status(ctx: AgentContext, cmd: EmptyRequest) -> NetworkGroupStatusRsp:
    """Current status of every group and the HA VMs in Down groups."""
    statuses, failed = await ctx.services[NETGROUPS].status()
    return NetworkGroupStatusRsp(network_group_status=statuses, failed_vm_uuids=failed)


