"""HA commands: self-fencers on shared storage, peer heartbeat checks, network groups."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kvmagent.core.context import AgentContext
from kvmagent.core.errors import AgentError
from kvmagent.core.models import AgentRequest, AgentResponse, EmptyRequest, WireModel
from kvmagent.core.plugin import ASYNC, SYNC, Plugin
from kvmagent.core.validate import AbsPath, IfName
from kvmagent.ha.fencer import FencerConfig, FencerManager, detection_bounds
from kvmagent.ha.netgroup import Group, NetworkGroupMonitor
from kvmagent.ha.peer import check_peer
from kvmagent.ha.probe import StorageProbe

plugin = Plugin("ha", "storage self-fencing and network-group monitoring")

FENCERS, NETGROUPS, PEER_PROBES = "ha.fencers", "ha.networkgroups", "ha.peer_probes"
PsUuid = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")


@plugin.on_startup
async def _start(ctx: AgentContext) -> None:
    fencers = ctx.services[FENCERS] = FencerManager(ctx, ctx.config.ha_inventory_refresh)
    groups = ctx.services[NETGROUPS] = NetworkGroupMonitor(ctx, ctx.config.ha_netns)
    await fencers.restore()
    await groups.restore()


@plugin.on_cleanup
async def _stop(ctx: AgentContext) -> None:
    await ctx.services[FENCERS].close()
    await ctx.services[NETGROUPS].close()


class SetupSelfFencerCmd(AgentRequest):
    host_uuid: str = PsUuid
    interval: float = Field(gt=0, le=3600, description="seconds between heartbeats")
    max_attempts: int = Field(ge=1, le=1000)
    storage_checker_timeout: float = Field(gt=0, le=3600, description="hard limit of one write")
    strategy: Literal["Force", "Permissive"] = "Permissive"
    uuids: list[str] = Field(min_length=1, max_length=256, description="primary storage uuids")
    mount_paths: list[AbsPath] = Field(min_length=1, max_length=256, description="same order")

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.uuids) != len(self.mount_paths):
            raise ValueError(f"uuids ({len(self.uuids)}) and mountPaths ({len(self.mount_paths)}) "
                             "must have the same length")
        for uuid in self.uuids:
            if not uuid or len(uuid) > 64 or not uuid.replace("-", "").isalnum():
                raise ValueError(f"uuids: {uuid!r} is not a storage uuid")
        return self


class SetupSelfFencerRsp(AgentResponse):
    outcome: dict[str, str] = Field(default_factory=dict,
                                    description="extension: psUuid -> started/replaced/unchanged")


class CancelSelfFencerCmd(AgentRequest):
    ps_uuids: list[str] = Field(max_length=256)


class FencerTO(WireModel):
    ps_uuid: str
    mount_path: str
    state: str
    consecutive_failures: int
    last_heartbeat_at: float | None = None
    strategy: str
    interval: float
    max_attempts: int
    storage_checker_timeout: float
    last_error: str | None = None
    fenced_vm_uuids: list[str] = Field(default_factory=list)
    fenced_at: float | None = Field(None, description="unix time of the last fence")
    detection_seconds: tuple[float, float] = Field(description="best and worst case")


class SelfFencerStateRsp(AgentResponse):
    ps_uuids: list[str] = Field(default_factory=list)
    fencers: list[FencerTO] = Field(default_factory=list)


class CheckVmStateCmd(AgentRequest):
    primary_storage_uuid: str = PsUuid
    target_host_uuid: str = PsUuid
    mount_path: AbsPath
    interval: float = Field(2.0, gt=0, le=600)
    times: int = Field(3, ge=2, le=100)
    storage_checker_timeout: float = Field(5.0, gt=0, le=600)


class CheckVmStateRsp(AgentResponse):
    result: dict[str, bool] = Field(default_factory=dict)
    vm_uuids: list[str] = Field(default_factory=list)
    reason: str | None = Field(None, description="extension: why alive or not")


class ResourceTO(WireModel):
    name: IfName
    weight: int = Field(1, ge=1, le=1000)


class GroupTO(WireModel):
    network_group_uuid: str = PsUuid
    min_available_count: int = Field(ge=1, le=100000)
    resources: list[ResourceTO] = Field(min_length=1, max_length=1024)


class SetupNetworkGroupCmd(AgentRequest):
    host_uuid: str | None = None
    groups: list[GroupTO] = Field(max_length=1024)
    vm_groups: dict[str, list[str]] = Field(default_factory=dict)


class CancelNetworkGroupCmd(AgentRequest):
    network_group_uuids: list[str] = Field(max_length=1024)


class NetworkGroupStatusRsp(AgentResponse):
    network_group_status: dict[str, str] = Field(default_factory=dict)
    failed_vm_uuids: list[str] = Field(default_factory=list)


@plugin.command("/ha/selffencer/setup", mode=ASYNC)
async def setup_fencers(ctx: AgentContext, cmd: SetupSelfFencerCmd) -> SetupSelfFencerRsp:
    """Start (or keep, or replace) one heartbeat loop per primary storage."""
    if ctx.identity.host_uuid and cmd.host_uuid != ctx.identity.host_uuid:
        raise AgentError(f"hostUuid {cmd.host_uuid} is not this host ({ctx.identity.host_uuid})")
    configs = [FencerConfig(ps, path, cmd.host_uuid, cmd.interval, cmd.max_attempts,
                            cmd.storage_checker_timeout, cmd.strategy)
               for ps, path in zip(cmd.uuids, cmd.mount_paths, strict=True)]
    return SetupSelfFencerRsp(outcome=await ctx.services[FENCERS].setup(configs))


@plugin.command("/ha/selffencer/cancel", mode=ASYNC)
async def cancel_fencers(ctx: AgentContext, cmd: CancelSelfFencerCmd) -> AgentResponse:
    """Stop the loops of these storages (unknown ones are ignored)."""
    await ctx.services[FENCERS].cancel(cmd.ps_uuids)
    return AgentResponse()


@plugin.command("/ha/selffencer/state", mode=SYNC)
async def fencer_state(ctx: AgentContext, cmd: EmptyRequest) -> SelfFencerStateRsp:
    """Every loop with its state, failures and last heartbeat."""
    fencers = []
    for ps_uuid, fencer in sorted(ctx.services[FENCERS].fencers.items()):
        cfg, st = fencer.cfg, fencer.status
        fencers.append(FencerTO(
            ps_uuid=ps_uuid, mount_path=cfg.mount_path, state=st.state,
            consecutive_failures=st.consecutive_failures, last_heartbeat_at=st.last_heartbeat_at,
            strategy=cfg.strategy, interval=cfg.interval, max_attempts=cfg.max_attempts,
            storage_checker_timeout=cfg.storage_checker_timeout, last_error=st.last_error,
            fenced_vm_uuids=st.fenced_vm_uuids, fenced_at=st.fenced_at,
            detection_seconds=detection_bounds(cfg)))
    return SelfFencerStateRsp(ps_uuids=[f.ps_uuid for f in fencers], fencers=fencers)


@plugin.command("/filesystem/check/vmstate", mode=ASYNC)
async def check_vm_state(ctx: AgentContext, cmd: CheckVmStateCmd) -> CheckVmStateRsp:
    """Is another host's heartbeat on this storage still advancing? With its VM uuids."""
    probes = ctx.services.setdefault(PEER_PROBES, {})
    probe = probes.setdefault(cmd.mount_path, StorageProbe())
    verdict = await check_peer(probe, cmd.mount_path, cmd.target_host_uuid, cmd.times,
                               cmd.interval, cmd.storage_checker_timeout)
    return CheckVmStateRsp(result={cmd.primary_storage_uuid: verdict.alive},
                           vm_uuids=verdict.vm_uuids, reason=verdict.reason)


@plugin.command("/ha/networkgroup/setup", mode=ASYNC)
async def setup_groups(ctx: AgentContext, cmd: SetupNetworkGroupCmd) -> AgentResponse:
    """Watch the groups' NICs/bridges; report every status change."""
    groups = [Group(g.network_group_uuid, g.min_available_count,
                    {r.name: r.weight for r in g.resources}) for g in cmd.groups]
    known = {g.uuid for g in groups} | set(ctx.services[NETGROUPS].config.groups)
    unknown = sorted({g for gs in cmd.vm_groups.values() for g in gs} - known)
    if unknown:
        raise AgentError(f"vmGroups refers to unknown network groups: {', '.join(unknown)}")
    await ctx.services[NETGROUPS].setup(groups, cmd.vm_groups)
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


