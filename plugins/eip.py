"""Flat-network elastic IPs: a per-EIP namespace joining the public and the VM bridge, NAT.

Commands (all async; see PROTOCOL.md "Flat network EIP")

``/flatnetworkprovider/eip/apply``        ``{eip: EIP}``  create or repair; idempotent
``/flatnetworkprovider/eip/delete``       ``{eip: EIP}``  remove everything; absent is success
``/flatnetworkprovider/eip/batchapply``   ``{eips: [EIP]}``
``/flatnetworkprovider/eip/batchdelete``  ``{eips: [EIP]}``
    Different EIPs run in parallel (bounded), each under its own lock. Extension: the reply
    carries ``failedEips: [{eipUuid, error}]``; ``success`` is false when any EIP failed, and
    ``error`` then names how many failed and the first errors. The others are applied.
    Entries are validated one by one: an invalid entry is listed in ``failedEips`` with an
    error naming the field (``eips[3]: field 'vip': ...``) and does not stop the valid ones;
    only a body whose ``eips`` is not a list is a 400.

A delete needs only ``eipUuid``: the agent's record holds the rest, so a stale or partial EIP
object from the MN still deletes (other fields are ignored, even if they would be invalid).

``/flatnetworkprovider/eip/sync``         extension, ``{removeOrphans?: true, repair?: true}``
    Removes network namespaces and links named with this agent's EIP prefix that no record
    owns (leftovers of a lost state dir or a crash), and re-converges every recorded EIP.
    Reply: ``eips`` (uuids this agent has applied), ``orphansRemoved`` (names),
    ``repaired`` (uuids that needed a change), ``failedEips``.

EIP fields: ``eipUuid, vmUuid, vip, vipNetmask, vipGateway, publicBridgeName, nicUuid, nicMac,
nicIp, nicNetmask, nicGateway, vmBridgeName, skipArpCheck?`` (default false: before the VIP is
first put up, an ARP probe on the public bridge fails the apply when another MAC holds it).
Netmasks are dotted (a prefix length is accepted too).

Start-up: records of applied EIPs (state ``eips/<eipUuid>``) are loaded and each EIP is
checked and repaired in the background. The ``selffencer.vms_killed`` hook deletes the EIPs of
the VMs the HA self-fencer killed. Mechanisms live in :mod:`kvmagent.eip`.
"""
from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from kvmagent.core.context import AgentContext
from kvmagent.core.models import AgentRequest, AgentResponse, WireModel
from kvmagent.core.plugin import ASYNC, Plugin
from kvmagent.eip.manager import EipManager, EipSettings
from kvmagent.eip.naming import DEFAULT_PREFIX
from kvmagent.eip.spec import (
    EipSpec,
    check_consistency,
    check_ifname,
    check_ipv4,
    check_mac,
    check_netmask,
    check_uuid,
)
from kvmagent.ha.fencer import HOOK_VMS_KILLED

log = logging.getLogger(__name__)

SERVICE = "eip"


class EipTO(WireModel):
    eip_uuid: str
    vm_uuid: str
    vip: str
    vip_netmask: str
    vip_gateway: str
    public_bridge_name: str
    nic_uuid: str
    nic_mac: str
    nic_ip: str
    nic_netmask: str
    nic_gateway: str
    vm_bridge_name: str
    skip_arp_check: bool = False

    _uuids = field_validator("eip_uuid", "vm_uuid", "nic_uuid")(check_uuid)
    _ips = field_validator("vip", "vip_gateway", "nic_ip", "nic_gateway")(check_ipv4)
    _masks = field_validator("vip_netmask", "nic_netmask", mode="before")(
        lambda v: check_netmask(str(v)) if isinstance(v, (str, int)) and not isinstance(v, bool)
        else v)
    _mac = field_validator("nic_mac")(check_mac)
    _skip = field_validator("skip_arp_check", mode="before")(lambda v: False if v is None else v)
    _bridges = field_validator("public_bridge_name", "vm_bridge_name")(check_ifname)

    @model_validator(mode="after")
    def _consistent(self) -> EipTO:
        check_consistency(self.to_spec())
        return self

    def to_spec(self) -> EipSpec:
        return EipSpec(**self.model_dump(by_alias=False))


class EipRefTO(WireModel):
    """What a delete needs of an EIP: its uuid (any other field is ignored)."""

    eip_uuid: str

    _uuid = field_validator("eip_uuid")(check_uuid)


class EipCmd(AgentRequest):
    eip: EipTO


class EipDeleteCmd(AgentRequest):
    eip: EipRefTO


class BatchEipCmd(AgentRequest):
    eips: list[Any] = Field(
        default_factory=list, max_length=4096,
        description="EIP objects (as in the apply command; a delete needs only eipUuid), "
                    "each validated on its own: invalid ones are reported in failedEips")


class FailedEip(WireModel):
    eip_uuid: str
    error: str


class BatchEipRsp(AgentResponse):
    failed_eips: list[FailedEip] = Field(
        default_factory=list, description="extension: the EIPs of the batch that failed")


class SyncCmd(AgentRequest):
    remove_orphans: bool = True
    repair: bool = True


class SyncRsp(AgentResponse):
    eips: list[str] = Field(default_factory=list, description="uuids of the applied EIPs")
    orphans_removed: list[str] = Field(default_factory=list)
    repaired: list[str] = Field(default_factory=list)
    failed_eips: list[FailedEip] = Field(default_factory=list)


def make_plugin(prefix: str = DEFAULT_PREFIX, **settings) -> Plugin:
    """The EIP plugin; tests build one per agent with their own name ``prefix``."""
    config = EipSettings(prefix=prefix, **settings)
    plugin = Plugin("eip", "flat-network elastic IPs (namespaces + nftables NAT)")

    @plugin.on_startup
    async def start(ctx: AgentContext) -> None:
        manager = EipManager(ctx, config)
        manager.load()
        ctx.services[SERVICE] = manager

        async def vms_killed(ctx: AgentContext, vm_uuids: list[str]) -> None:
            await manager.delete_vms(vm_uuids)

        ctx.add_hook(HOOK_VMS_KILLED, vms_killed)
        if manager.records:
            ctx.spawn(manager.restore(), "eip restore")
        else:
            manager.restored.set()

    @plugin.command("/flatnetworkprovider/eip/apply", mode=ASYNC)
    async def apply(ctx: AgentContext, req: EipCmd) -> AgentResponse:
        """Create (or repair) one EIP."""
        await _manager(ctx).apply(req.eip.to_spec())
        return AgentResponse()

    @plugin.command("/flatnetworkprovider/eip/delete", mode=ASYNC)
    async def delete(ctx: AgentContext, req: EipDeleteCmd) -> AgentResponse:
        """Remove one EIP (only eipUuid is needed); an absent EIP is success."""
        await _manager(ctx).delete(req.eip.eip_uuid)
        return AgentResponse()

    @plugin.command("/flatnetworkprovider/eip/batchapply", mode=ASYNC)
    async def batch_apply(ctx: AgentContext, req: BatchEipCmd) -> BatchEipRsp:
        """Apply many EIPs in parallel; the reply lists those that failed or were invalid."""
        valid, invalid = _validate_each(EipTO, req.eips)
        failures = await _manager(ctx).batch("apply", [e.to_spec() for e in valid])
        return _batch_reply("apply", len(req.eips), invalid + failures)

    @plugin.command("/flatnetworkprovider/eip/batchdelete", mode=ASYNC)
    async def batch_delete(ctx: AgentContext, req: BatchEipCmd) -> BatchEipRsp:
        """Delete many EIPs in parallel (only eipUuid is needed); the reply lists failures."""
        valid, invalid = _validate_each(EipRefTO, req.eips)
        failures = await _manager(ctx).batch("delete", [e.eip_uuid for e in valid])
        return _batch_reply("delete", len(req.eips), invalid + failures)

    @plugin.command("/flatnetworkprovider/eip/sync", mode=ASYNC)
    async def sync(ctx: AgentContext, req: SyncCmd) -> SyncRsp:
        """Extension: remove orphan EIP namespaces/links, repair recorded EIPs."""
        result = await _manager(ctx).sync(remove_orphans=req.remove_orphans, repair=req.repair)
        failed = [FailedEip(eip_uuid=f.eip_uuid, error=f.error) for f in result["failed"]]
        rsp = SyncRsp(eips=result["eips"], orphans_removed=result["orphans_removed"],
                      repaired=result["repaired"], failed_eips=failed)
        if failed:
            rsp.success = False
            rsp.error = _summary("sync", len(failed), None, failed)
        return rsp

    return plugin


def _manager(ctx: AgentContext) -> EipManager:
    return ctx.services[SERVICE]


def _validate_each(model: type[BaseModel], items: list[Any]) -> tuple[list[Any], list[FailedEip]]:
    """Validate batch entries one by one: (valid models, failures naming entry and field)."""
    valid, invalid = [], []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            invalid.append(FailedEip(eip_uuid="", error=f"eips[{index}]: must be an EIP "
                                                        f"object, got {type(item).__name__}"))
            continue
        try:
            valid.append(model.model_validate(item))
        except ValidationError as exc:
            raw = item.get("eipUuid")
            invalid.append(FailedEip(eip_uuid=raw if isinstance(raw, str) else "",
                                     error=f"eips[{index}]: {_describe(exc)}"))
    return valid, invalid


def _describe(exc: ValidationError) -> str:
    """Like a 400's error, but a cross-field check (no location; its message names the
    fields) is not attributed to a field called 'body'."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"field '{loc}': {msg}" if loc else msg)
    return "; ".join(parts)


def _summary(op: str, failed: int, total: int | None, failures) -> str:
    first = "; ".join(f"{f.eip_uuid}: {f.error}" for f in failures[:3])
    more = f"; and {failed - 3} more" if failed > 3 else ""
    of = f" of {total}" if total is not None else ""
    return f"{op}: {failed}{of} EIPs failed: {first}{more}"


def _batch_reply(op: str, total: int, failures) -> BatchEipRsp:
    rsp = BatchEipRsp(failed_eips=[FailedEip(eip_uuid=f.eip_uuid, error=f.error)
                                   for f in failures])
    if failures:
        rsp.success = False
        rsp.error = _summary(op, len(failures), total, failures)
    return rsp


plugin = make_plugin()
