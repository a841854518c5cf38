"""Vhost storage target environment: hugepages, hugetlbfs and the docker engine.

The mechanisms live in :mod:`kvmagent.hugepages` and :mod:`kvmagent.docker_engine`; this module
declares the commands. Pool changes of one page size are serialised (lock ``hugepages/<size>``),
so two prepares at once allocate once: the second finds the pages already there.

A request naming a NUMA node or page size this host does not have fails like any invalid body
(HTTP 400 for a sync call or an inline async one, ``success: false`` in the callback), before
anything is changed.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import socket
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field, field_validator

from kvmagent.core.context import AgentContext
from kvmagent.core.dispatch import BadRequest
from kvmagent.core.errors import AgentError
from kvmagent.core.models import AgentRequest, AgentResponse
from kvmagent.core.plugin import ASYNC, SYNC, Plugin
from kvmagent.core.validate import AbsPath
from kvmagent.host.docker_engine import DockerEngine, DockerUnreachable, socket_problem
from kvmagent.host.hugepages import (
    MAX_COUNT,
    HugepageInputError,
    HugePages,
    PoolState,
    ensure_hugetlbfs,
)

log = logging.getLogger(__name__)

plugin = Plugin("vhost", "vhost storage target environment: hugepages, hugetlbfs, docker")

HUGEPAGES = "vhost.hugepages"
DOCKER = "vhost.docker"
# Growing a pool of 1G pages can take the kernel a while (compaction); never forever.
HUGEPAGE_TIMEOUT = 300.0
MOUNT_TIMEOUT = 30.0
SOCKET_CHECK_TIMEOUT = 10.0
VHOST_PAGE_SIZE = "2M"
# docker's own rule for container names (daemon/names.go), plus a sane length bound.
CONTAINER_NAME = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,254}$"
# ZStack's MN names the target "zbsvhost-" + the host's management IP (ZbsConstants
# VHOST_TARGET_CONTAINER_PREFIX); an IPv6 one cannot be a docker name (':'), but is the
# MN's legitimate question: answered "not running", never refused.
ZBS_CONTAINER_PREFIX = "zbsvhost-"
CONTROL_CONNECT_TIMEOUT = 1.0  # seconds, as ZStack's agent waits for the control socket

def numa_node_field():
    return Field(None, ge=0, le=4095, description="NUMA node; absent: the host-wide pool")


class PrepareEnvCmd(AgentRequest):
    hugepage_nr: int = Field(1024, ge=0, le=MAX_COUNT,
                             description="free 2 MiB pages wanted (1024 = 2 GiB)")
    numa_node: int | None = numa_node_field()


class PrepareEnvRsp(AgentResponse):
    hugepages_total: int = Field(0, description="2M pages in the pool (node pool if numaNode)")
    hugepages_free: int = Field(0, description="free 2M pages in that pool")
    hugetlbfs_mount: str | None = Field(None, description="a hugetlbfs mount with 2M pages")
    docker_version: str | None = Field(None, description="the running engine's version")


class HugepagesCmd(AgentRequest):
    page_size: Literal["2M", "1G"]
    count: int = Field(ge=0, le=MAX_COUNT)
    numa_node: int | None = numa_node_field()


class HugepagesRsp(AgentResponse):
    total: int = Field(0, description="nr_hugepages of the pool after the change")
    free: int = Field(0, description="free_hugepages of the pool after the change")
    available: int = Field(0, description="extension: free minus reserved (resv_hugepages, "
                                          "host pool only): what ensure guarantees")


def _names_a_file(value: Any) -> Any:
    """Before :data:`AbsPath` (which drops a trailing '/'): a socket is a file, so a trailing
    '/' (or the path '/') is an error here, not something to normalize."""
    if isinstance(value, str) and value.endswith("/"):
        raise ValueError("must name a file: no trailing '/'")
    return value


SocketPath = Annotated[AbsPath, BeforeValidator(_names_a_file)]


def docker_name(name: str) -> bool:
    return re.match(CONTAINER_NAME, name) is not None


class HealthCmd(AgentRequest):
    container_name: str = Field(description="the target container: zbsvhost-<host management "
                                "IP> from ZStack's MN, or any docker container name")
    control_sock: SocketPath = Field(
        validation_alias=AliasChoices("controlSock", "socketPath"),
        description="the target's control socket (ZStack: /var/zbsvhost/sockets/admin.sock); "
                    "socketPath is the older name, accepted as an alias")

    @field_validator("container_name")
    @classmethod
    def _container_name(cls, value: str) -> str:
        if docker_name(value):
            return value
        ip = value[len(ZBS_CONTAINER_PREFIX):] if value.startswith(ZBS_CONTAINER_PREFIX) else ""
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError("must be a docker container name ([a-zA-Z0-9][a-zA-Z0-9_.-]+) "
                             "or zbsvhost-<IP address>") from None
        return value


class HealthRsp(AgentResponse):
    target_running: bool = Field(False, description="the container runs and its control "
                                 "socket accepts a connection (what ZStack's MN reads)")
    healthy: bool = Field(False, description="extension: the same as targetRunning")
    reason: str | None = Field(None, description="why not running; null when it runs")
    container_status: str | None = Field(
        None, description="extension: docker's status of the container (running, exited...), "
                          "null when it does not exist or the engine is unreachable")


@plugin.on_startup
async def startup(ctx: AgentContext) -> None:
    ctx.services[HUGEPAGES] = HugePages(ctx.config.sysfs_root, ctx.config.procfs_root)
    ctx.services[DOCKER] = DockerEngine(ctx.config, ctx.runner)


async def _checked_pool(ctx: AgentContext, page_size: str, numa_node: int | None) -> HugePages:
    """The pool exists on this host (else HTTP 400 naming the field); nothing is changed."""
    pages: HugePages = ctx.services[HUGEPAGES]
    try:
        await ctx.runner.run(pages.pool_dir, page_size, numa_node, timeout=SOCKET_CHECK_TIMEOUT,
                             what="hugepage pool lookup")
    except HugepageInputError as exc:
        raise BadRequest(str(exc)) from None
    return pages


async def _change(ctx: AgentContext, op: str, page_size: str, count: int,
                  numa_node: int | None) -> PoolState:
    pages = await _checked_pool(ctx, page_size, numa_node)
    async with ctx.locks.hold("hugepages", page_size):
        return await ctx.runner.run(getattr(pages, op), page_size, count, numa_node,
                                    timeout=HUGEPAGE_TIMEOUT, what=f"hugepages {op}")


def _pool_rsp(state: PoolState) -> HugepagesRsp:
    return HugepagesRsp(total=state.total, free=state.free, available=state.available)


@plugin.command("/host/hugepages/ensure", mode=ASYNC)
async def ensure_hugepages(ctx: AgentContext, req: HugepagesCmd) -> HugepagesRsp:
    """At least ``count`` free pages of ``pageSize``; grows by the shortfall or fails unchanged."""
    return _pool_rsp(await _change(ctx, "ensure", req.page_size, req.count, req.numa_node))


@plugin.command("/host/hugepages/release", mode=ASYNC)
async def release_hugepages(ctx: AgentContext, req: HugepagesCmd) -> HugepagesRsp:
    """Give back up to ``count`` free pages; pages in use are never taken."""
    return _pool_rsp(await _change(ctx, "release", req.page_size, req.count, req.numa_node))


@plugin.command("/zbs/primarystorage/vhost/target/prepareenv", mode=ASYNC)
async def prepare_env(ctx: AgentContext, req: PrepareEnvCmd) -> PrepareEnvRsp:
    """Docker engine running, ``hugepageNr`` free 2M pages and a 2M hugetlbfs mount."""
    pages = await _checked_pool(ctx, VHOST_PAGE_SIZE, req.numa_node)
    engine: DockerEngine = ctx.services[DOCKER]
    # Docker first: it is the likelier failure, and pages reserved for nothing help no one.
    version = await engine.ensure_running()
    async with ctx.locks.hold("hugepages", VHOST_PAGE_SIZE):
        state = await ctx.runner.run(pages.ensure, VHOST_PAGE_SIZE, req.hugepage_nr,
                                     req.numa_node, timeout=HUGEPAGE_TIMEOUT,
                                     what="hugepages ensure")
        mount = await ensure_hugetlbfs(ctx.config.procfs_root, VHOST_PAGE_SIZE,
                                       ctx.config.hugetlbfs_mount_point, runner=ctx.runner,
                                       timeout=MOUNT_TIMEOUT)
    return PrepareEnvRsp(hugepages_total=state.total, hugepages_free=state.free,
                         hugetlbfs_mount=mount, docker_version=version)


def control_sock_problem(path: str) -> str | None:
    """Why ``path`` is no live control socket (a unix stream socket that accepts a connection
    within CONTROL_CONNECT_TIMEOUT, as ZStack's agent checks), or None. Blocking."""
    problem = socket_problem(path)
    if problem is not None:
        return problem
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONTROL_CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:  # refused (nobody listens), timeout, wrong socket type
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            return f"control socket {path} accepts no connection: {why}"
    return None


def _not_running(reason: str, status: str | None = None) -> HealthRsp:
    return HealthRsp(target_running=False, healthy=False, reason=reason,
                     container_status=status)


@plugin.command("/zbs/primarystorage/vhost/target/health", mode=SYNC)
async def health(ctx: AgentContext, req: HealthCmd) -> HealthRsp:
    """targetRunning: the target container runs and its control socket accepts a
    connection. An unhealthy target is a successful answer (targetRunning false + reason)."""
    name = req.container_name
    if not docker_name(name):
        return _not_running(f"container {name} does not exist (docker container names "
                            f"cannot contain ':')")
    engine: DockerEngine = ctx.services[DOCKER]
    try:
        status = await engine.container_status(name)
    except DockerUnreachable as exc:
        return _not_running(f"docker engine unreachable: {exc.reason}")
    except AgentError as exc:  # the engine answered with an error
        return _not_running(str(exc))
    if status is None:
        return _not_running(f"container {name} does not exist")
    if status != "running":
        return _not_running(f"container {name} is {status}", status)
    try:
        problem = await ctx.runner.run(control_sock_problem, req.control_sock,
                                       timeout=SOCKET_CHECK_TIMEOUT,
                                       what=f"control socket {req.control_sock} check")
    except AgentError as exc:  # stat hung (storage under the path): not running, not a failure
        problem = str(exc)
    return HealthRsp(target_running=problem is None, healthy=problem is None, reason=problem,
                     container_status=status)

