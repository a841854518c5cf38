"""VM commands: lifecycle, state, and the per-VM HA flag (see kvmagent.vm.service)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvmagent.core.context import AgentContext
from kvmagent.core.errors import AgentError
from kvmagent.core.models import AgentRequest, AgentResponse, EmptyRequest, WireModel
from kvmagent.core.plugin import ASYNC, SYNC, Plugin
from kvmagent.core.validate import AbsPath, IfName, Mac, Uuid
from kvmagent.vm.config import BridgeNic, DirectKernel, Disk, Domain
from kvmagent.vm.service import VmService

plugin = Plugin("vm", "virtual machines on libvirt")

SERVICE = "vm"
PATH_CHECK_TIMEOUT = 15.0


def service(ctx: AgentContext) -> VmService:
    return ctx.services[SERVICE]


@plugin.on_startup
async def _start(ctx: AgentContext) -> None:
    ctx.services[SERVICE] = VmService(ctx)
    await ctx.services[SERVICE].start()


@plugin.on_cleanup
async def _stop(ctx: AgentContext) -> None:
    await ctx.services[SERVICE].close()


class VolumeTO(WireModel):
    install_path: AbsPath
    format: Literal["qcow2", "raw"] = "qcow2"


class NicTO(WireModel):
    uuid: str | None = None
    mac: Mac
    bridge_name: IfName
    device_id: int = Field(0, ge=0, le=63)


class BootKernelTO(WireModel):
    kernel: AbsPath
    initrd: AbsPath | None = None
    cmdline: str | None = Field(None, max_length=2048)


class StartVmCmd(AgentRequest):
    vm_instance_uuid: Uuid
    vm_name: str = Field("", max_length=256)
    cpu_num: int = Field(ge=1, le=512)
    memory: int = Field(ge=16 * 2**20, description="bytes")
    enable_ha: bool = False
    root_volume: VolumeTO
    data_volumes: list[VolumeTO] = Field(default_factory=list, max_length=24)
    nics: list[NicTO] = Field(default_factory=list, max_length=32)
    memory_backing: Literal["default", "memfd-shared", "hugepages"] = "default"
    boot_kernel: BootKernelTO | None = None
    console_log_path: AbsPath | None = None


class StartVmRsp(AgentResponse):
    vm_instance_uuid: str | None = None
    state: str | None = None


class StopVmCmd(AgentRequest):
    uuid: Uuid
    type: Literal["grace", "cold", "force"] = "grace"
    timeout: float | None = Field(None, gt=0, le=3600, description="seconds; grace only")


class VmUuidCmd(AgentRequest):
    uuid: Uuid


class VmStateRsp(AgentResponse):
    state: str | None = Field(None, description="extension: the state after the command")


class VmStatesCmd(AgentRequest):
    vm_uuids: list[Uuid] = Field(max_length=100000)


class VmStatesRsp(AgentResponse):
    states: dict[str, str] = Field(default_factory=dict)


class UpdateHaCmd(AgentRequest):
    host_uuid: str | None = None
    vm_instance_uuid: Uuid
    enable_ha: bool


class UpdateHaRsp(AgentResponse):
    vm_instance_uuid: str | None = None
    enable_ha: bool | None = None


class ReconcileHaCmd(AgentRequest):
    host_uuid: str | None = None
    ha_enabled_vm_uuids: list[Uuid] = Field(max_length=100000)


class ReconcileHaRsp(AgentResponse):
    enabled: list[str] = Field(default_factory=list, description="flag turned on")
    disabled: list[str] = Field(default_factory=list, description="flag turned off")
    missing: list[str] = Field(default_factory=list, description="listed but not on this host")


def build_domain(svc: VmService, cmd: StartVmCmd, domain_type: str) -> Domain:
    disks = [Disk(svc.check_path(cmd.root_volume.install_path, "rootVolume.installPath"), "vda",
                  cmd.root_volume.format)]
    for i, vol in enumerate(cmd.data_volumes):
        disks.append(Disk(svc.check_path(vol.install_path, f"dataVolumes.{i}.installPath"),
                          f"vd{chr(ord('b') + i)}", vol.format))
    kernel = None
    if cmd.boot_kernel:
        bk = cmd.boot_kernel
        kernel = DirectKernel(svc.check_path(bk.kernel, "bootKernel.kernel"),
                              svc.check_path(bk.initrd, "bootKernel.initrd") if bk.initrd else None,
                              bk.cmdline)
    console = None
    if cmd.console_log_path:
        console = svc.check_path(cmd.console_log_path, "consoleLogPath", must_exist=False)
    nics = [BridgeNic(n.mac.lower(), n.bridge_name) for n in sorted(cmd.nics, key=lambda n: n.device_id)]
    for nic in nics:
        svc.check_bridge(nic.bridge)
    return Domain(
        uuid=cmd.vm_instance_uuid, name=cmd.vm_instance_uuid, title=cmd.vm_name,
        vcpus=cmd.cpu_num, memory_kib=cmd.memory // 1024, domain_type=domain_type,
        memory_backing=cmd.memory_backing, enable_ha=cmd.enable_ha, disks=disks, nics=nics,
        kernel=kernel, console_log=console)


@plugin.command("/vm/start", mode=ASYNC)
async def start_vm(ctx: AgentContext, cmd: StartVmCmd) -> StartVmRsp:
    """Define and start a VM; starting a running VM again succeeds without a second domain."""
    svc = service(ctx)
    domain_type = await svc.domain_type()
    # realpath/exists on volumes touch primary storage, which may hang: never on the loop.
    spec = await ctx.runner.run(build_domain, svc, cmd, domain_type, timeout=PATH_CHECK_TIMEOUT,
                                what="checking the VM's volume and kernel paths")
    state = await svc.start_vm(spec)
    return StartVmRsp(vm_instance_uuid=cmd.vm_instance_uuid, state=state)


@plugin.command("/vm/stop", mode=ASYNC)
async def stop_vm(ctx: AgentContext, cmd: StopVmCmd) -> AgentResponse:
    """grace: ACPI shutdown, wait ``timeout``, then destroy; cold/force: destroy. Idempotent."""
    timeout = cmd.timeout or ctx.config.vm_stop_default_timeout
    await service(ctx).stop_vm(cmd.uuid, cmd.type, timeout)
    return AgentResponse()


@plugin.command("/vm/destroy", mode=ASYNC)
async def destroy_vm(ctx: AgentContext, cmd: VmUuidCmd) -> AgentResponse:
    """Power off and undefine at once; a missing VM is already destroyed."""
    await service(ctx).destroy_vm(cmd.uuid)
    return AgentResponse()


@plugin.command("/vm/reboot", mode=ASYNC)
async def reboot_vm(ctx: AgentContext, cmd: VmUuidCmd) -> VmStateRsp:
    """Ask the guest to reboot (ACPI)."""
    return VmStateRsp(state=await service(ctx).simple_op(cmd.uuid, "reboot"))


@plugin.command("/vm/pause", mode=ASYNC)
async def pause_vm(ctx: AgentContext, cmd: VmUuidCmd) -> VmStateRsp:
    """Suspend the VM's vCPUs."""
    return VmStateRsp(state=await service(ctx).simple_op(cmd.uuid, "pause"))


@plugin.command("/vm/resume", mode=ASYNC)
async def resume_vm(ctx: AgentContext, cmd: VmUuidCmd) -> VmStateRsp:
    """Resume a paused VM."""
    return VmStateRsp(state=await service(ctx).simple_op(cmd.uuid, "resume"))


@plugin.command("/vm/vmstate", mode=SYNC)
async def vm_state(ctx: AgentContext, cmd: VmStatesCmd) -> VmStatesRsp:
    """States of the listed VMs; a VM not on this host is Stopped."""
    return VmStatesRsp(states=await service(ctx).states_of(cmd.vm_uuids))


@plugin.command("/vm/vmsync", mode=SYNC)
async def vm_sync(ctx: AgentContext, cmd: EmptyRequest) -> VmStatesRsp:
    """States of every VM on the host."""
    return VmStatesRsp(states=await service(ctx).states_of())


def refuse_other_host(ctx: AgentContext, host_uuid: str | None) -> None:
    """An enableHa command naming another host changes nothing here."""
    if host_uuid and ctx.identity.host_uuid and host_uuid != ctx.identity.host_uuid:
        raise AgentError(f"hostUuid {host_uuid} is not this host ({ctx.identity.host_uuid}); "
                         "nothing changed")


@plugin.command("/host/vm/updateEnableHa/live", mode=ASYNC)
async def update_ha(ctx: AgentContext, cmd: UpdateHaCmd) -> UpdateHaRsp:
    """Set one running VM's HA flag (kept in its libvirt metadata)."""
    refuse_other_host(ctx, cmd.host_uuid)
    await service(ctx).set_ha(cmd.vm_instance_uuid, cmd.enable_ha)
    return UpdateHaRsp(vm_instance_uuid=cmd.vm_instance_uuid, enable_ha=cmd.enable_ha)


class ListHaCmd(AgentRequest):
    host_uuid: str | None = None
    vm_uuids: list[Uuid] | None = Field(None, max_length=100000, description="None: every VM")


class ListHaRsp(AgentResponse):
    enable_ha: dict[str, bool] = Field(default_factory=dict)


@plugin.command("/host/vm/enableHa/list", mode=SYNC)
async def list_ha(ctx: AgentContext, cmd: ListHaCmd) -> ListHaRsp:
    """Extension: the HA flag of every VM on the host (or the listed ones), from libvirt metadata."""
    refuse_other_host(ctx, cmd.host_uuid)
    flags = await service(ctx).ha_flags()
    if cmd.vm_uuids is not None:
        flags = {u: flags[u] for u in cmd.vm_uuids if u in flags}
    return ListHaRsp(enable_ha=flags)


@plugin.command("/host/vm/reconcileEnableHa/live", mode=ASYNC)
async def reconcile_ha(ctx: AgentContext, cmd: ReconcileHaCmd) -> ReconcileHaRsp:
    """The listed VMs become HA-enabled, every other VM on the host disabled."""
    refuse_other_host(ctx, cmd.host_uuid)  # a misrouted whole truth would turn HA off here
    enabled, disabled, missing = await service(ctx).reconcile_ha(set(cmd.ha_enabled_vm_uuids))
    return ReconcileHaRsp(enabled=enabled, disabled=disabled, missing=missing)
