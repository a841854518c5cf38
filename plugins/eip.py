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

EIP fields (ZStack's ``FlatEipBackend.EipTO``): ``eipUuid, vmUuid, ipVersion? (4), vip,
vipNetmask, vipPrefixLen, vipGateway, publicBridgeName, nicUuid, nicMac, nicIp, nicNetmask,
nicPrefixLen, nicGateway, vmBridgeName, skipArpCheck? (false), addfdb? (false), physicalNic?``;
``vipUuid`` and ``nicName`` are read and not needed. IPv4 takes the dotted netmasks (a prefix
length as fallback), IPv6 the prefix lengths (the netmask as fallback). skipArpCheck false:
before an IPv4 VIP is first put up, an ARP probe on the public bridge fails the apply when
another MAC holds it. addfdb + physicalNic: the namespace's VM-side MAC in that NIC's fdb.

Start-up: records of applied EIPs (state ``eips/<eipUuid>``) are loaded and each EIP is
checked and repaired in the background, its accept rules in the host's FORWARD chain included
(:mod:`kvmagent.eip.hostfw`; checked again every ``firewall_check`` seconds). The
``selffencer.vms_killed`` hook deletes the EIPs of the VMs the HA self-fencer killed.
Mechanisms live in :mod:`kvmagent.eip`.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kvmagent.core.context import AgentContext
from kvmagent.core.models import AgentRequest, AgentResponse, WireModel
from kvmagent.core.plugin import ASYNC, Plugin
from kvmagent.eip.manager import EipManager, EipSettings
from kvmagent.eip.naming import DEFAULT_PREFIX
from kvmagent.eip.spec import (
    EipSpec,
    check_consistency,
    check_ifname,
    check_ip,
    check_ip_version,
    check_mac,
    check_netmask,
    check_nic_name,
    check_prefix6,
    check_uuid,
)
from kvmagent.ha.fencer import HOOK_VMS_KILLED

log = logging.getLogger(__name__)

SERVICE = "eip"


def _check_any_ip(value: str) -> str:
    """Syntax only here (the version check needs ipVersion, see EipTO._consistent)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    return value


class EipTO(WireModel):
    """ZStack's ``FlatEipBackend.EipTO``. IPv4 uses the netmasks (a prefix length is the
    fallback), IPv6 the prefix lengths (the netmask, ``ffff:ffff:ffff:ffff:0:0:0:0``, is the
    fallback), as ZStack's agent does. ``vipUuid`` is read for logs only."""

    eip_uuid: str
    vm_uuid: str
    vip_uuid: str | None = None
    ip_version: int = 4
    vip: str
    vip_netmask: str | None = None
    vip_prefix_len: int | None = None
    vip_gateway: str
    public_bridge_name: str
    nic_uuid: str
    nic_mac: str
    nic_ip: str
    nic_netmask: str | None = None
    nic_prefix_len: int | None = None
    nic_gateway: str
    vm_bridge_name: str
    skip_arp_check: bool = False
    addfdb: bool = False
    physical_nic: str | None = None

    _uuids = field_validator("eip_uuid", "vm_uuid", "nic_uuid")(check_uuid)
    _version = field_validator("ip_version", mode="before")(check_ip_version)
    _ips = field_validator("vip", "vip_gateway", "nic_ip", "nic_gateway")(_check_any_ip)
    _masks = field_validator("vip_netmask", "nic_netmask", mode="before")(
        lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v)
    _mac = field_validator("nic_mac")(check_mac)
    _flags = field_validator("skip_arp_check", "addfdb", mode="before")(
        lambda v: False if v is None else v)
    _bridges = field_validator("public_bridge_name", "vm_bridge_name")(check_ifname)
    _nic = field_validator("physical_nic")(lambda v: check_nic_name(v) if v else None)

    @model_validator(mode="after")
    def _consistent(self) -> EipTO:
        v = self.ip_version
        for name in ("vip", "vip_gateway", "nic_ip", "nic_gateway"):
            value = getattr(self, name)
            try:
                setattr(self, name, check_ip(value, v))
            except ValueError as exc:
                raise ValueError(f"{to_camel(name)}: {exc} (ipVersion is {v})") from None
        for side in ("vip", "nic"):
            setattr(self, f"{side}_netmask", self._mask(side))
        check_consistency(self.to_spec())
        return self

    def _mask(self, side: str) -> str:
        mask, plen = getattr(self, f"{side}_netmask"), getattr(self, f"{side}_prefix_len")
        first, second = (mask, plen) if self.ip_version == 4 else (plen, mask)
        value = first if first is not None else second
        if value is None:
            raise ValueError(f"{side}Netmask or {side}PrefixLen is required")
        check = check_netmask if self.ip_version == 4 else check_prefix6
        field_name = (f"{side}Netmask" if value is mask else f"{side}PrefixLen")
        try:
            return check(value)
        except ValueError as exc:
            raise ValueError(f"{field_name}: {exc}") from None

    def to_spec(self) -> EipSpec:
        data = self.model_dump(by_alias=False,
                               exclude={"vip_uuid", "vip_prefix_len", "nic_prefix_len"})
        return EipSpec(**data)


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
        # Also without records: a chain left in the host firewall by a lost state dir goes.
        ctx.spawn(manager.restore(), "eip restore")
        if config.host_firewall and config.firewall_check > 0:
            ctx.spawn(manager.firewall.watch(config.firewall_check, manager.restored),
                      "eip host firewall check")

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
