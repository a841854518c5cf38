"""Host commands: connect, ping, echo, facts, capacity."""
from __future__ import annotations

import logging

import psutil
from pydantic import Field

from kvmagent import __version__
from kvmagent.core.context import AgentContext
from kvmagent.core.errors import AgentError
from kvmagent.core.models import AgentRequest, AgentResponse, EmptyRequest
from kvmagent.core.plugin import ASYNC, SYNC, Plugin
from kvmagent.host import facts
from kvmagent.host.hugepages import HugePages

log = logging.getLogger(__name__)

plugin = Plugin("host", "host identity, liveness and facts")


class ConnectCmd(AgentRequest):
    host_uuid: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")
    send_command_url: str | None = Field(None, pattern=r"^https?://")
    version: str | None = None


class ConnectRsp(AgentResponse):
    host_uuid: str | None = None
    libvirt_version: str | None = None
    qemu_version: str | None = None
    libvirt_available: bool = Field(False, description="extension: false while libvirtd is down")


class PingCmd(AgentRequest):
    host_uuid: str | None = None


class PingRsp(AgentResponse):
    host_uuid: str | None = None
    version: str = __version__
    send_command_url: str | None = None


class FactRsp(AgentResponse):
    cpu_model_name: str = ""
    cpu_num: int = 0
    cpu_sockets: int = 0
    cpu_speed: int = 0
    total_memory: int = 0
    os_distribution: str = ""
    os_version: str = ""
    kernel_version: str = ""
    libvirt_version: str | None = None
    qemu_version: str | None = None
    hvm_cpu_flag: str = ""
    hugepages: dict[str, dict[str, int]] = {}
    libvirt_available: bool = False


class CapacityRsp(AgentResponse):
    cpu_num: int = 0
    cpu_speed: int = 0
    total_memory: int = 0
    used_memory: int = 0


async def libvirt_versions(ctx: AgentContext) -> tuple[str | None, str | None]:
    """Versions, or (None, None) while libvirtd is down: callers still answer."""
    try:
        return await ctx.libvirt.versions()
    except AgentError:
        return None, None


@plugin.command("/host/connect", mode=SYNC)
async def connect(ctx: AgentContext, req: ConnectCmd) -> ConnectRsp:
    """Bind this agent to a host uuid and learn the MN's report URL (persisted)."""
    previous = ctx.identity.host_uuid
    ctx.identity.update(req.host_uuid, req.send_command_url)
    libvirt_version, qemu_version = await libvirt_versions(ctx)
    if previous and previous != req.host_uuid:
        log.warning("host uuid changed from %s to %s", previous, req.host_uuid)
    return ConnectRsp(host_uuid=req.host_uuid, libvirt_version=libvirt_version,
                      qemu_version=qemu_version, libvirt_available=libvirt_version is not None)


@plugin.command("/host/ping", mode=ASYNC)
async def ping(ctx: AgentContext, req: PingCmd) -> PingRsp:
    """Liveness; fails when the MN pings for another host uuid than the one connected."""
    known = ctx.identity.host_uuid
    if req.host_uuid and known and req.host_uuid != known:
        raise AgentError(f"host uuid mismatch: this agent is connected as {known}, "
                         f"the ping was for {req.host_uuid}; reconnect the host")
    return PingRsp(host_uuid=known, send_command_url=ctx.identity.send_command_url)


@plugin.command("/host/echo", mode=SYNC, methods=("GET", "POST"))
async def echo(ctx: AgentContext, req: EmptyRequest) -> AgentResponse:
    """Answer at once; the MN uses it to see the agent's HTTP server is up."""
    return AgentResponse()


@plugin.command("/host/fact", mode=SYNC)
async def fact(ctx: AgentContext, req: EmptyRequest) -> FactRsp:
    """Hardware, OS and virtualisation facts."""
    config = ctx.config
    model, hvm = facts.cpuinfo(config.procfs_root)
    distro, distro_version = facts.os_release()
    total, _ = facts.memory()
    libvirt_version, qemu_version = await libvirt_versions(ctx)
    return FactRsp(
        cpu_model_name=model, cpu_num=psutil.cpu_count(logical=True) or 0,
        cpu_sockets=facts.cpu_sockets(config.sysfs_root), cpu_speed=facts.cpu_speed_mhz(),
        total_memory=total, os_distribution=distro, os_version=distro_version,
        kernel_version=facts.kernel_version(), libvirt_version=libvirt_version,
        qemu_version=qemu_version, hvm_cpu_flag=hvm,
        hugepages=HugePages(config.sysfs_root, config.procfs_root).summary(),
        libvirt_available=libvirt_version is not None,
    )


@plugin.command("/host/capacity", mode=SYNC)
async def capacity(ctx: AgentContext, req: EmptyRequest) -> CapacityRsp:
    """CPU and memory capacity (bytes)."""
    total, used = facts.memory()
    return CapacityRsp(cpu_num=psutil.cpu_count(logical=True) or 0,
                       cpu_speed=facts.cpu_speed_mhz(), total_memory=total, used_memory=used)
