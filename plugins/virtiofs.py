"""Virtiofs commands: share model directories live into running VMs (see kvmagent.virtiofs)."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, AliasChoices, Field, field_validator

from kvmagent.core.context import AgentContext
from kvmagent.core.models import AgentRequest, AgentResponse, WireModel
from kvmagent.core.plugin import ASYNC, SYNC, Plugin
from kvmagent.core.validate import AbsPath, Uuid
from kvmagent.virtiofs import SERVICE, VirtiofsService

plugin = Plugin("virtiofs", "live virtiofs shares of model directories into VMs")

# No leading '-': the tag is an argument of mount(8) in the guest.
_TAG = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,35}$")


def _tag(value: str) -> str:
    if not _TAG.match(value):
        raise ValueError("must be 1-36 characters of A-Z a-z 0-9 . _ -, not starting with '-'")
    return value


Tag = Annotated[str, AfterValidator(_tag)]


def service(ctx: AgentContext) -> VirtiofsService:
    return ctx.services[SERVICE]


@plugin.on_startup
async def _start(ctx: AgentContext) -> None:
    ctx.services[SERVICE] = VirtiofsService(ctx)
    await ctx.services[SERVICE].start()


# ZStack's agent (virtiofs_device.py) defaults: cache "none", queue 1024.
DEFAULT_CACHE = "none"
DEFAULT_QUEUE = 1024
MAX_QUEUE = 1024  # QEMU vhost-user-fs: queue-size a power of two, at most 1024


class AttachCmd(AgentRequest):
    vm_instance_uuid: Uuid
    tag: Tag
    source_path: AbsPath = Field(description="a directory of a mounted model center: must "
                                 "resolve inside <modelsRoot>/<modelCenterUuid>/")
    mount_path: AbsPath | None = Field(None, description="where the guest agent mounts it; "
                                       "absent or empty: no in-guest mount")
    readonly: bool = Field(True, description="extension: false shares read-write")
    cache_mode: Literal["none", "auto", "always"] = Field(
        DEFAULT_CACHE, validation_alias=AliasChoices("cacheMode", "cache"),
        description="virtiofsd cache mode; ZStack's MN names it 'cache' (cacheMode wins when "
                    "both are given)")
    queue: int = Field(DEFAULT_QUEUE, description="virtqueue size: a power of two up to 1024; "
                       "0 (a Java int left unset) means 1024")

    @field_validator("mount_path", mode="before")
    @classmethod
    def _empty_mount_path(cls, value):
        return None if value == "" else value  # ZStack: empty means no in-guest mount

    @field_validator("cache_mode", mode="before")
    @classmethod
    def _null_cache(cls, value):
        return DEFAULT_CACHE if value is None else value

    @field_validator("queue", mode="before")
    @classmethod
    def _queue(cls, value):
        if value is None or value == 0:
            return DEFAULT_QUEUE
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if value < 0 or value > MAX_QUEUE or value & (value - 1):
            raise ValueError(f"must be a power of two from 1 to {MAX_QUEUE} (QEMU's "
                             f"vhost-user-fs queue-size)")
        return value


class AttachRsp(AgentResponse):
    """ZStack's VirtiofsResponse: the three qga fields always present, qgaMountError only
    when the in-guest mount failed. A failed in-guest mount keeps the device attached and
    the reply successful (ZStack's current agent)."""

    qga_mount_attempted: bool = False
    qga_mount_success: bool = False
    qga_mount_error: str | None = None


class DetachCmd(AgentRequest):
    vm_instance_uuid: Uuid
    tag: Tag


class StatusCmd(AgentRequest):
    vm_instance_uuid: Uuid | None = None


class ShareTO(WireModel):
    vm_instance_uuid: str
    tag: str
    source_path: str
    readonly: bool = True
    cache_mode: str = "auto"
    queue: int = DEFAULT_QUEUE
    device_alias: str | None = None
    problem: str | None = Field(None, description="extension: why the share does not export "
                                "its model center's current mount (a failed re-export after a "
                                "remount); None when it does")


class StatusRsp(AgentResponse):
    libvirt_version: str | None = Field(None, description="'unknown' when libvirt cannot tell")
    virtiofs_hotplug_supported: bool = Field(
        False, description="libvirt >= 7.9.0 (live attach/detach of virtiofs), as ZStack decides")
    supported: bool = Field(False, description="extension: everything a share needs is here "
                            "(libvirt, QEMU, virtiofsd)")
    reason: str | None = Field(None, description="extension: why not supported")
    qemu_version: str | None = Field(None, description="extension")
    virtiofsd_path: str | None = Field(None, description="extension")
    virtiofsd_found: bool = Field(False, description="extension")
    shares: list[ShareTO] = Field(default_factory=list)


@plugin.command("/virtiofs/attach", mode=ASYNC)
async def attach(ctx: AgentContext, cmd: AttachCmd) -> AttachRsp:
    """Share sourcePath into the running VM under tag (live and persistent); mount it in
    the guest when its agent answers. The same tag and source again is a no-op."""
    result = await service(ctx).attach(cmd.vm_instance_uuid, cmd.tag, cmd.source_path,
                                       cmd.mount_path, cmd.readonly, cmd.cache_mode, cmd.queue)
    return AttachRsp(qga_mount_attempted=result.attempted, qga_mount_success=result.success,
                     qga_mount_error=None if result.success or not result.attempted
                     else result.error)


@plugin.command("/virtiofs/detach", mode=ASYNC)
async def detach(ctx: AgentContext, cmd: DetachCmd) -> AttachRsp:
    """Unmount in the guest (failures ignored, as ZStack does), unplug the share and wait
    until the guest released it; an absent tag succeeds."""
    result = await service(ctx).detach(cmd.vm_instance_uuid, cmd.tag)
    return AttachRsp(qga_mount_attempted=result.attempted, qga_mount_success=result.success,
                     qga_mount_error=None if result.success or not result.attempted
                     else result.error)


@plugin.command("/virtiofs/status", mode=SYNC)
async def status(ctx: AgentContext, cmd: StatusCmd) -> StatusRsp:
    """Support (libvirt/QEMU versions, virtiofsd) and the shares of running VMs."""
    return StatusRsp.model_validate(await service(ctx).status(cmd.vm_instance_uuid))
