"""Host commands: connect, ping, echo, facts, capacity, host configuration, hugepages.

Shapes: ZS plugin/kvm/.../KVMAgentCommands.java (ConnectCmd, PingResponse, HostFactResponse,
HostCapacityResponse, UpdateHostConfigurationCmd); the hugepage commands have no public Java
class, their fields come from ZU host_plugin.py (``enable_hugepage``). See ZSTACK-WIRE.md §2.
"""
from __future__ import annotations

import logging
import platform

import libvirt
import psutil
from pydantic import Field

from kvmagent import __version__
from kvmagent.core.context import AgentContext
from kvmagent.core.dispatch import BadRequest
from kvmagent.core.errors import AgentError
from kvmagent.core.models import AgentRequest, AgentResponse, EmptyRequest, WireModel
from kvmagent.core.blocking import run_process
from kvmagent.core.plugin import ASYNC, SYNC, Plugin
from kvmagent.host import facts, iptables, kvm_params
from kvmagent.host.hugepages import PAGE_SIZES_KB, HugePages
from kvmagent.host.liveness import mn_host, write_counter

log = logging.getLogger(__name__)

plugin = Plugin("host", "host identity, liveness and facts")

VERSION_DOC = "mn-version"  # the MN's version from ConnectCmd, echoed by every ping
HUGEPAGE_DOC = "host-hugepage"  # the last /host/enable/hugepage, re-applied after a reboot
LIVENESS = "host.liveness"
HUGEPAGES = "host.hugepages"
QEMU_IMG = "host.qemu-img-version"
SYSFS_TIMEOUT = 10.0
HUGEPAGE_TIMEOUT = 60.0


@plugin.on_startup
async def _start(ctx: AgentContext) -> None:
    ctx.services[HUGEPAGES] = HugePages(ctx.config.sysfs_root, ctx.config.procfs_root)
    connected = ctx.state.load(VERSION_DOC) or {}
    if connected.get("tcpServerPort"):  # the MN does not reconnect a host that answers pings
        _start_liveness(ctx, ctx.identity.send_command_url, connected["tcpServerPort"])
    wanted = ctx.state.load(HUGEPAGE_DOC)
    if wanted:  # runtime pools are lost by a reboot; ZU kept them on the kernel command line
        ctx.spawn(_reapply_hugepages(ctx, wanted["pageSize"], wanted["reserveSize"]),
                  name="hugepages re-apply")


@plugin.on_cleanup
async def _stop(ctx: AgentContext) -> None:
    task = ctx.services.pop(LIVENESS, None)
    if task:
        task.cancel()


class ConnectCmd(AgentRequest):
    host_uuid: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")
    send_command_url: str | None = Field(None, pattern=r"^https?://")
    version: str | None = Field(None, max_length=64, description="the MN's version; ping echoes it")
    iptables_rules: list[str] = Field(default_factory=list, max_length=1000)
    ignore_msrs: bool = False
    page_table_extension_disabled: bool = False
    tcp_server_port: int = Field(0, ge=0, le=65535)


class ConnectRsp(AgentResponse):
    host_uuid: str | None = None
    libvirt_version: str | None = None
    qemu_version: str | None = None
    libvirt_available: bool = Field(False, description="extension: false while libvirtd is down")


class PingCmd(AgentRequest):
    host_uuid: str | None = None


class PingRsp(AgentResponse):
    host_uuid: str | None = None
    version: str | None = Field(None, description="ConnectCmd.version (the MN's), not ours")
    send_command_url: str | None = None
    agent_version: str = Field(__version__, description="extension: this agent's version")


class UpdateHostConfigurationCmd(AgentRequest):
    host_uuid: str | None = None
    send_command_url: str = Field(pattern=r"^https?://", max_length=2048)


class VirtualizerInfoTO(WireModel):
    uuid: str | None = None
    virtualizer: str = "qemu-kvm"
    version: str | None = None


class FactRsp(AgentResponse):
    os_distribution: str = ""
    os_version: str = ""
    os_release: str = ""
    qemu_img_version: str | None = None
    libvirt_version: str | None = None
    hvm_cpu_flag: str = Field("", description='"vmx"/"svm"; "" (never null) without either')
    ept_flag: str | None = None
    cpu_architecture: str = ""
    cpu_model_name: str | None = Field(None, description="libvirt's host CPU model")
    cpu_ghz: str | None = Field(None, alias="cpuGHz")
    cpu_processor_num: str | None = None
    power_supply_model_name: str | None = None
    power_supply_manufacturer: str | None = None
    ipmi_address: str | None = None
    power_supply_max_power_capacity: str | None = None
    host_cpu_model_name: str | None = Field(None, description="/proc/cpuinfo model name")
    system_product_name: str | None = None
    system_serial_number: str | None = None
    system_manufacturer: str | None = None
    system_uuid: str | None = Field(None, alias="systemUUID")
    bios_vendor: str | None = None
    bios_version: str | None = None
    bios_release_date: str | None = None
    bmc_version: str | None = None
    uptime: str | None = None
    memory_slots_maximum: str | None = None
    cpu_cache: str | None = None
    ip_addresses: list[str] = Field(default_factory=list)
    libvirt_capabilities: list[str] = Field(default_factory=list)
    virtualizer_info: VirtualizerInfoTO = Field(default_factory=VirtualizerInfoTO)
    iscsi_initiator_name: str | None = None
    # Extensions.
    cpu_num: int = 0
    cpu_sockets: int = 0
    cpu_speed: int = 0
    total_memory: int = 0
    kernel_version: str = ""
    qemu_version: str | None = None
    hugepages: dict[str, dict[str, int]] = {}
    libvirt_available: bool = False


class CapacityRsp(AgentResponse):
    cpu_num: int = 0
    cpu_speed: int = 0
    used_cpu: int = Field(0, description="vCPUs of the running (and paused) VMs")
    total_memory: int = 0
    used_memory: int = Field(0, description="bytes: current memory of the running VMs")
    cpu_sockets: int = 1


class EnableHugePageCmd(AgentRequest):
    page_size: int = Field(description="MiB: 2 or 1024")
    reserve_size: int = Field(ge=0, description="bytes kept out of hugepages")


class HugePageRsp(AgentResponse):
    pools: dict[str, dict[str, int]] = Field(default_factory=dict,
                                             description="extension: the pools afterwards")


async def libvirt_versions(ctx: AgentContext) -> tuple[str | None, str | None]:
    """Versions, or (None, None) while libvirtd is down: callers still answer."""
    try:
        return await ctx.libvirt.versions()
    except AgentError:
        return None, None


# -- connect -----------------------------------------------------------------------------------
def _start_liveness(ctx: AgentContext, url: str | None, port: int) -> None:
    old = ctx.services.pop(LIVENESS, None)
    if old:
        old.cancel()
    host = mn_host(url)
    if host and port:
        ctx.services[LIVENESS] = ctx.spawn(write_counter(host, port), name="mn liveness")


@plugin.command("/host/connect", mode=SYNC)
async def connect(ctx: AgentContext, req: ConnectCmd) -> ConnectRsp:
    """Bind this agent to a host uuid, learn the MN's report URL and version (persisted)."""
    iptables.plan(req.iptables_rules)  # refuse a bad rule before anything changes
    sysfs = ctx.config.sysfs_root
    await ctx.runner.run(kvm_params.check_ept, sysfs, req.page_table_extension_disabled,
                         timeout=SYSFS_TIMEOUT, what="kvm_intel ept check")
    await ctx.runner.run(kvm_params.set_ignore_msrs, sysfs, req.ignore_msrs,
                         timeout=SYSFS_TIMEOUT, what="kvm ignore_msrs")
    if req.iptables_rules:
        await iptables.apply(ctx.config.iptables_command, req.iptables_rules)
    previous = ctx.identity.host_uuid
    ctx.identity.update(req.host_uuid, req.send_command_url)
    ctx.state.save(VERSION_DOC, {"version": req.version, "tcpServerPort": req.tcp_server_port})
    if previous and previous != req.host_uuid:
        log.warning("host uuid changed from %s to %s", previous, req.host_uuid)
    _start_liveness(ctx, ctx.identity.send_command_url, req.tcp_server_port)
    libvirt_version, qemu_version = await libvirt_versions(ctx)
    return ConnectRsp(host_uuid=req.host_uuid, libvirt_version=libvirt_version,
                      qemu_version=qemu_version, libvirt_available=libvirt_version is not None)


@plugin.command("/host/ping", mode=ASYNC)
async def ping(ctx: AgentContext, req: PingCmd) -> PingRsp:
    """The hostUuid, MN version and report URL of the last connect: the MN reconnects the host
    when any differs from its own (KVMHost.needReconnectHost)."""
    known = ctx.identity.host_uuid
    if req.host_uuid and known != req.host_uuid:
        log.warning("pinged as host %s but connected as %s: the MN will reconnect",
                    req.host_uuid, known)
    version = (ctx.state.load(VERSION_DOC) or {}).get("version")
    return PingRsp(host_uuid=known, version=version, send_command_url=ctx.identity.send_command_url)


@plugin.command("/host/update/configuration", mode=ASYNC)
async def update_configuration(ctx: AgentContext, req: UpdateHostConfigurationCmd) -> AgentResponse:
    """The MN moved (its sendCommandUrl changed): reports go to the new URL from now on."""
    known = ctx.identity.host_uuid
    if known is None:
        raise AgentError("this agent is not connected to an MN yet: /host/connect first")
    ctx.identity.update(known, req.send_command_url)
    return AgentResponse()


@plugin.command("/host/echo", mode=SYNC, methods=("GET", "POST"))
async def echo(ctx: AgentContext, req: EmptyRequest) -> AgentResponse:
    """Answer at once; the MN uses it to see the agent's HTTP server is up."""
    return AgentResponse()


# -- facts and capacity ------------------------------------------------------------------------
async def qemu_img_version(ctx: AgentContext) -> str | None:
    """``qemu-img --version`` (argv, no shell), cached per agent."""
    if QEMU_IMG not in ctx.services:
        result = await run_process(["qemu-img", "--version"], timeout=10)
        version = None
        if result.ok:
            words = result.stdout.decode(errors="replace").split()
            if "version" in words and words.index("version") + 1 < len(words):
                version = words[words.index("version") + 1].strip(",")
        ctx.services[QEMU_IMG] = version
    return ctx.services[QEMU_IMG]


def _host_facts(ctx: AgentContext) -> dict:
    config = ctx.config
    cpu = facts.cpuinfo(config.procfs_root)
    distro, distro_version, codename = facts.os_release()
    total, _ = facts.memory()
    return dict(
        os_distribution=distro, os_version=distro_version, os_release=codename or "Core",
        hvm_cpu_flag=cpu.hvm_flag, ept_flag=cpu.ept_flag, cpu_architecture=platform.machine(),
        cpu_ghz=cpu.ghz, cpu_processor_num=str(psutil.cpu_count(logical=True) or 0),
        host_cpu_model_name=cpu.model or None, uptime=facts.uptime_since(),
        cpu_cache=facts.cpu_cache_kib(config.sysfs_root), ip_addresses=facts.ipv4_addresses(),
        iscsi_initiator_name=facts.iscsi_initiator_name(),
        cpu_num=psutil.cpu_count(logical=True) or 0, cpu_sockets=facts.cpu_sockets(config.sysfs_root),
        cpu_speed=facts.cpu_speed_mhz(), total_memory=total, kernel_version=facts.kernel_version(),
        hugepages=ctx.services[HUGEPAGES].summary(), **facts.dmi_facts(config.sysfs_root))


@plugin.command("/host/fact", mode=ASYNC)
async def fact(ctx: AgentContext, req: EmptyRequest) -> FactRsp:
    """Hardware, OS and virtualisation facts (HostFactResponse)."""
    values = await ctx.runner.run(_host_facts, ctx, timeout=SYSFS_TIMEOUT, what="host facts")
    libvirt_version, qemu_version = await libvirt_versions(ctx)
    cpu_model, capabilities = None, []
    if libvirt_version is not None:
        try:
            cpu_model, capabilities = facts.capabilities_facts(
                await ctx.libvirt.call(lambda conn: conn.getCapabilities()))
        except (AgentError, libvirt.libvirtError) as exc:
            log.warning("libvirt capabilities not read: %s", exc)
    return FactRsp(
        **values, qemu_img_version=await qemu_img_version(ctx), libvirt_version=libvirt_version,
        qemu_version=qemu_version, cpu_model_name=cpu_model, libvirt_capabilities=capabilities,
        virtualizer_info=VirtualizerInfoTO(uuid=ctx.identity.host_uuid, version=qemu_version),
        libvirt_available=libvirt_version is not None)


@plugin.command("/host/capacity", mode=ASYNC)
async def capacity(ctx: AgentContext, req: EmptyRequest) -> CapacityRsp:
    """CPU and memory capacity (HostCapacityResponse); used = what the VMs on this host hold."""
    try:
        used_cpu, used_memory = await ctx.libvirt.call(facts.vm_usage)
    except libvirt.libvirtError as exc:
        raise AgentError(f"libvirt: cannot count the running VMs: {exc}") from None
    total, _ = facts.memory()
    sockets = await ctx.runner.run(facts.cpu_sockets, ctx.config.sysfs_root, timeout=SYSFS_TIMEOUT,
                                   what="cpu sockets")
    return CapacityRsp(cpu_num=psutil.cpu_count(logical=True) or 0, cpu_speed=facts.cpu_speed_mhz(),
                       used_cpu=used_cpu, total_memory=total, used_memory=used_memory,
                       cpu_sockets=sockets)


# -- hugepages ---------------------------------------------------------------------------------
def _page_label(page_size_mib: int) -> str:
    for label, kb in PAGE_SIZES_KB.items():
        if kb == page_size_mib * 1024:
            return label
    raise BadRequest(f"field 'pageSize': {page_size_mib} MiB pages are not supported "
                     f"(2 or 1024)")


async def _reapply_hugepages(ctx: AgentContext, page_size: int, reserve: int) -> None:
    try:
        await _apply_enable(ctx, page_size, reserve)
    except AgentError as exc:
        log.error("hugepages from /host/enable/hugepage not re-applied: %s", exc)


async def _apply_enable(ctx: AgentContext, page_size: int, reserve: int) -> None:
    label = _page_label(page_size)
    async with ctx.locks.hold("hugepages", label):
        await ctx.runner.run(ctx.services[HUGEPAGES].fill_memory_but, label, reserve,
                             timeout=HUGEPAGE_TIMEOUT, what="hugepages enable")


@plugin.command("/host/enable/hugepage", mode=ASYNC)
async def enable_hugepage(ctx: AgentContext, req: EnableHugePageCmd) -> HugePageRsp:
    """All memory but ``reserveSize`` bytes as ``pageSize`` MiB pages, now and after reboots."""
    _page_label(req.page_size)
    total = psutil.virtual_memory().total
    if req.reserve_size >= total:
        raise BadRequest(f"field 'reserveSize': {req.reserve_size} bytes is not below this host's "
                         f"memory ({total} bytes)")
    await _apply_enable(ctx, req.page_size, req.reserve_size)
    ctx.state.save(HUGEPAGE_DOC, {"pageSize": req.page_size, "reserveSize": req.reserve_size})
    return HugePageRsp(pools=ctx.services[HUGEPAGES].summary())


@plugin.command("/host/disable/hugepage", mode=ASYNC)
async def disable_hugepage(ctx: AgentContext, req: EmptyRequest) -> HugePageRsp:
    """Give every free hugepage back (pages in use by VMs stay until those VMs stop)."""
    pages: HugePages = ctx.services[HUGEPAGES]
    ctx.state.delete(HUGEPAGE_DOC)
    for label in await ctx.runner.run(pages.supported_sizes, timeout=SYSFS_TIMEOUT,
                                      what="hugepage sizes"):
        async with ctx.locks.hold("hugepages", label):
            await ctx.runner.run(pages.release_free, label, timeout=HUGEPAGE_TIMEOUT,
                                 what="hugepages disable")
    return HugePageRsp(pools=pages.summary())

