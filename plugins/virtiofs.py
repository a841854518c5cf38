"""Virtiofs commands: share model directories live into running VMs (see kvmagent.virtiofs)."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

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


class AttachCmd(AgentRequest):
    vm_instance_uuid: Uuid
    tag: Tag
    source_path: AbsPath = Field(description="a directory of a mounted model center: must "
                                 "resolve inside <modelsRoot>/<modelCenterUuid>/")
    mount_path: AbsPath | None = Field(None, description="where the guest agent mounts it")
    readonly: bool = True
    cache_mode: Literal["none", "auto", "always"] = "auto"


class AttachRsp(AgentResponse):
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
    device_alias: str | None = None
    problem: str | None = Field(None, description="extension: why the share does not export "
                                "its model center's current mount (a failed re-export after a "
                                "remount); None when it does")


class StatusRsp(AgentResponse):
    supported: bool = False
    reason: str | None = Field(None, description="extension: why not supported")
    libvirt_version: str | None = None
    qemu_version: str | None = Field(None, description="extension")
    virtiofsd_path: str | None = Field(None, description="extension")
    virtiofsd_found: bool = Field(False, description="extension")
    shares: list[ShareTO] = Field(default_factory=list)


@plugin.command("/virtiofs/attach", mode=ASYNC)
async def attach(ctx: AgentContext, cmd: AttachCmd) -> AttachRsp:
    """Share sourcePath into the running VM under tag (live and persistent); mount it in
    the guest when its agent answers. The same tag and source again is a no-op."""
    result = await service(ctx).attach(cmd.vm_instance_uuid, cmd.tag, cmd.source_path,
                                       cmd.mount_path, cmd.readonly, cmd.cache_mode)
    return AttachRsp(qga_mount_attempted=result.attempted, qga_mount_success=result.success,
                     qga_mount_error=result.error)


@plugin.command("/virtiofs/detach", mode=ASYNC)
async def detach(ctx: AgentContext, cmd: DetachCmd) -> AgentResponse:
    """Unplug the share and wait until the guest released it; an absent tag succeeds."""
    await service(ctx).detach(cmd.vm_instance_uuid, cmd.tag)
    return AgentResponse()


@plugin.command("/virtiofs/status", mode=SYNC)
async def status(ctx: AgentContext, cmd: StatusCmd) -> StatusRsp:
    """Support (libvirt/QEMU versions, virtiofsd) and the shares of running VMs."""
    return StatusRsp.model_validate(await service(ctx).status(cmd.vm_instance_uuid))
