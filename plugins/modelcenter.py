"""Model center commands: mount model storage on the host (see kvmagent.modelcenter)."""
from __future__ import annotations

from pydantic import Field, field_validator

from kvmagent.core.context import AgentContext
from kvmagent.core.models import AgentRequest, AgentResponse, EmptyRequest, WireModel, secret
from kvmagent.core.plugin import ASYNC, SYNC, Plugin
from kvmagent.core.validate import Uuid
from kvmagent.modelcenter import ModelCenterService, MountOptions, MountWatcher, StorageUrlError
from kvmagent.modelcenter.service import SERVICE
from kvmagent.modelcenter.urls import parse_storage_url

plugin = Plugin("modelcenter", "model storage mounted on the host (JuiceFS/ZDFS, NFS, local)")


def service(ctx: AgentContext) -> ModelCenterService:
    return ctx.services[SERVICE]


@plugin.on_startup
async def _start(ctx: AgentContext) -> None:
    svc = ModelCenterService(ctx)
    ctx.services[SERVICE] = svc
    await svc.start()  # creates and resolves the models root
    # Neither blocks start-up: restores and probes run in the background.
    await svc.restore()
    watcher = MountWatcher(svc)
    ctx.services[f"{SERVICE}.watcher"] = watcher
    ctx.spawn(watcher.run(), name="modelcenter-watcher")


class MountCmd(AgentRequest):
    model_center_uuid: Uuid
    storage_url: str = secret(max_length=4096, description=(
        "a JuiceFS metadata URL as ZStack sends it (redis://, rediss://, unix://, mysql://, "
        "postgres://, sqlite3://, tikv://, etcd://, badger://, fdb://), passed to juicefs "
        "verbatim and mounted read-only at the volume's 'models' directory; extensions: "
        "juicefs://<meta-url>, zdfs://<meta-url>, nfs://host/export, file:///dir"))
    mount_options: MountOptions | None = Field(None, description=(
        "known options only, as an object or a list of 'name=value' strings"))

    @field_validator("storage_url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parse_storage_url(value)
        except StorageUrlError as exc:
            raise ValueError(str(exc)) from None
        return value


class MountRsp(AgentResponse):
    mount_point: str | None = None


class UmountCmd(AgentRequest):
    model_center_uuid: Uuid
    force: bool = Field(False, description="extension: unmount even while VMs share it")


class MountTO(WireModel):
    model_center_uuid: str
    mount_point: str
    is_mounted: bool = Field(description="something is mounted at mountPoint (ZStack's "
                             "os.path.ismount); 'healthy' says whether it is this model "
                             "center's storage and answers")
    healthy: bool = Field(description="extension: mounted, the right file system, answering")
    reason: str | None = Field(None, description="extension: why it is not healthy")
    kind: str | None = Field(None, description="extension: juicefs, nfs or file")
    storage_url: str | None = Field(None, description="extension: with credentials masked")
    remounts: int = Field(0, description="extension: remounts by the watcher since start")


class ListRsp(AgentResponse):
    mounts: list[MountTO] = Field(default_factory=list)


@plugin.command("/modelcenter/mount", mode=ASYNC)
async def mount(ctx: AgentContext, cmd: MountCmd) -> MountRsp:
    """Mount storageUrl at <modelsRoot>/<modelCenterUuid>; a healthy mount is reused."""
    point = await service(ctx).mount(cmd.model_center_uuid, cmd.storage_url,
                                     cmd.mount_options or MountOptions())
    return MountRsp(mount_point=str(point))


@plugin.command("/modelcenter/umount", mode=ASYNC)
async def umount(ctx: AgentContext, cmd: UmountCmd) -> AgentResponse:
    """Unmount; refused while a running VM shares a path under it (unless force)."""
    await service(ctx).umount(cmd.model_center_uuid, cmd.force)
    return AgentResponse()


@plugin.command("/modelcenter/list", mode=SYNC)
async def list_mounts(ctx: AgentContext, cmd: EmptyRequest) -> ListRsp:
    """Recorded mounts, each probed now (bounded) for health."""
    return ListRsp(mounts=[MountTO.model_validate(m) for m in await service(ctx).list()])
