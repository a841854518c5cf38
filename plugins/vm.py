"""VM commands: lifecycle, state, and the per-VM HA flag (see kvmagent.vm.service)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, TypeAdapter, ValidationInfo, field_validator

from kvmagent.core.context import AgentContext
from kvmagent.core.errors import AgentError
from kvmagent.core.models import AgentRequest, AgentResponse, EmptyRequest, WireModel, secret
from kvmagent.core.plugin import ASYNC, SYNC, Plugin
from kvmagent.core.validate import AbsPath, IfName, Mac, Uuid
from kvmagent.vm.build import build_domain, device_info
from kvmagent.vm.service import VmService

plugin = Plugin("vm", "virtual machines on libvirt")

SERVICE = "vm"
PATH_CHECK_TIMEOUT = 15.0
ABS_PATH = TypeAdapter(AbsPath)


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
    """ZS VolumeTO.java. ``deviceType`` comes first: the path's shape depends on it."""
    device_type: str = Field("file", max_length=64,
                             description="file or block; other types are refused")
    install_path: str = Field(min_length=1, max_length=4096)
    format: Literal["qcow2", "raw"] | None = Field(None, description="default: qcow2 for file, "
                                                   "raw for block")
    device_id: int = Field(0, ge=0, le=1024)
    volume_uuid: Uuid | None = None
    resource_uuid: Uuid | None = None
    use_virtio: bool = True
    use_virtio_scsi: bool = Field(False, alias="useVirtioSCSI")
    shareable: bool = False
    cache_mode: Literal["none", "writethrough", "writeback", "directsync", "unsafe",
                        "default"] | None = "none"
    aio_native: bool = False
    wwn: str | None = Field(None, pattern=r"^0x[0-9a-fA-F]{16}$")

    @field_validator("install_path")
    @classmethod
    def _file_path(cls, value: str, info: ValidationInfo) -> str:
        # Only a file volume's path is checked here (400 naming the field); any other type is
        # refused by the handler with "volume type X is not supported", whatever its path.
        if info.data.get("device_type", "file") == "file":
            return ABS_PATH.validate_python(value)
        return value


class VHostAddOnTO(WireModel):
    queue_num: int = Field(1, ge=0, le=256)


class NicTO(WireModel):
    """ZS KVMAgentCommands.NicTO."""
    uuid: str | None = None
    mac: Mac
    bridge_name: IfName | None = None
    nic_internal_name: IfName | None = Field(None, description="the tap device's name")
    device_id: int = Field(0, ge=0, le=63)
    use_virtio: bool | None = None
    driver_type: str | None = Field(None, pattern=r"^[a-z0-9_-]{1,32}$")
    mtu: int | None = Field(None, ge=68, le=65535)
    v_host_add_on: VHostAddOnTO | None = None
    type: str | None = Field("VNIC", max_length=32)
    state: Literal["enable", "disable"] | None = None


class CdRomTO(WireModel):
    """ZS KVMAgentCommands.CdRomTO (an empty drive has isEmpty and no path)."""
    path: str | None = Field(None, max_length=4096)
    image_uuid: str | None = None
    device_id: int = Field(0, ge=0, le=64)
    is_empty: bool = False


class ChannelTO(WireModel):
    socket_path: AbsPath
    target_name: str = Field("org.qemu.guest_agent.0", pattern=r"^[A-Za-z0-9._-]{1,64}$")


class AddonsTO(WireModel):
    channel: ChannelTO | None = None


class PriorityTO(WireModel):
    cpu_shares: int | None = Field(None, ge=2, le=262144)


class BootKernelTO(WireModel):
    kernel: AbsPath
    initrd: AbsPath | None = None
    cmdline: str | None = Field(None, max_length=2048)


class StartVmCmd(AgentRequest):
    """ZS KVMAgentCommands.StartVmCmd: the fields this agent uses (the rest is ignored)."""
    vm_instance_uuid: Uuid
    vm_name: str = Field("", max_length=256)
    vm_internal_id: int = 0
    cpu_num: int = Field(ge=1, le=512)
    max_vcpu_num: int = Field(0, ge=0, le=512)
    socket_num: int | None = Field(None, ge=1, le=512)
    cpu_on_socket: int | None = Field(None, ge=1, le=512)
    threads_per_core: int | None = Field(None, ge=1, le=8)
    use_numa: bool = False
    memory: int = Field(ge=16 * 2**20, description="bytes")
    clock: Literal["utc", "localtime"] | None = "utc"
    machine_type: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    boot_dev: list[Literal["hd", "cdrom", "network"]] = Field(default_factory=lambda: ["hd"],
                                                              max_length=3)
    boot_mode: str | None = Field(None, max_length=32, description="Legacy or UEFI")
    secure_boot: bool = False
    use_boot_menu: bool = False
    boot_menu_splash_timeout: int | None = Field(None, ge=0, le=65535)
    create_paused: bool = False
    enable_ha: bool = False
    root_volume: VolumeTO
    data_volumes: list[VolumeTO] = Field(default_factory=list, max_length=24)
    cd_roms: list[CdRomTO] = Field(default_factory=list, max_length=8)
    nics: list[NicTO] = Field(default_factory=list, max_length=32)
    addons: AddonsTO | None = None
    console_log_to_file: bool = False
    use_huge_page: bool = False
    mem_access: str | None = Field(None, alias="MemAccess", max_length=32)
    nested_virtualization: Literal["none", "host-model", "host-passthrough", "custom"] | None = None
    vm_cpu_model: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    console_mode: str | None = Field(None, max_length=16)
    console_password: str | None = secret(default=None, max_length=64)
    video_type: Literal["virtio", "vga", "cirrus", "qxl", "bochs", "ramfb", "none"] | None = None
    priority_config_struct: PriorityTO | None = None
    system_serial_number: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    chassis_asset_tag: str | None = Field(None, pattern=r"^[A-Za-z0-9._ -]{1,64}$")
    # Extensions (not sent by the MN): see the README.
    memory_backing: Literal["default", "memfd-shared", "hugepages"] = "default"
    boot_kernel: BootKernelTO | None = None
    console_log_path: AbsPath | None = None


class DeviceAddressTO(WireModel):
    type: str | None = None
    bus: str | None = None
    domain: str | None = None
    slot: str | None = None
    function: str | None = None
    controller: str | None = None
    target: str | None = None
    unit: str | None = None


class VmNicInfoTO(WireModel):
    mac_address: str
    device_address: DeviceAddressTO


class VirtualDeviceInfoTO(WireModel):
    resource_uuid: str | None = None
    device_address: DeviceAddressTO | None = None


class VirtualizerInfoTO(WireModel):
    uuid: str | None = None
    virtualizer: str = "qemu-kvm"
    version: str | None = None


class StartVmRsp(AgentResponse):
    nic_infos: list[VmNicInfoTO] = Field(default_factory=list)
    virtual_device_info_list: list[VirtualDeviceInfoTO] = Field(default_factory=list)
    mem_balloon_info: VirtualDeviceInfoTO | None = None
    virtualizer_info: VirtualizerInfoTO | None = None
    vm_instance_uuid: str | None = Field(None, description="extension")
    state: str | None = Field(None, description="extension: KvmVmState after the start")


class StopVmCmd(AgentRequest):
    uuid: Uuid
    type: Literal["grace", "cold", "force"] = "grace"
    timeout: float | None = Field(None, gt=0, le=3600, description="seconds; grace only")


class VmUuidCmd(AgentRequest):
    uuid: Uuid


class RebootVmCmd(VmUuidCmd):
    boot_dev: list[Literal["hd", "cdrom", "network"]] | None = Field(None, max_length=3)


class VmStateRsp(AgentResponse):
    state: str | None = Field(None, description="extension: the KvmVmState after the command")


class RebootVmRsp(VmStateRsp):
    virtualizer_info: VirtualizerInfoTO | None = None


class VmStatesCmd(AgentRequest):
    vm_uuids: list[Uuid] = Field(max_length=100000)


class CheckVmStateCmd(VmStatesCmd):
    host_uuid: str | None = None


class VmStatesRsp(AgentResponse):
    states: dict[str, str] = Field(default_factory=dict, description="vmUuid -> KvmVmState")


class VmSyncRsp(VmStatesRsp):
    vm_in_shutdowns: list[str] = Field(default_factory=list,
                                       description="VMs libvirt says are shutting down")


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


async def virtualizer(ctx: AgentContext, uuid: str | None) -> VirtualizerInfoTO:
    try:
        _, qemu_version = await ctx.libvirt.versions()
    except AgentError:
        qemu_version = None
    return VirtualizerInfoTO(uuid=uuid, version=qemu_version)


@plugin.command("/vm/start", mode=ASYNC)
async def start_vm(ctx: AgentContext, cmd: StartVmCmd) -> StartVmRsp:
    """Define and start a VM; starting a running VM again succeeds without a second domain."""
    svc = service(ctx)
    domain_type = await svc.domain_type()
    config = ctx.config
    # realpath/exists on volumes touch primary storage, which may hang: never on the loop.
    spec = await ctx.runner.run(build_domain, svc, cmd, domain_type, config.vm_vnc_listen,
                                str(config.vm_console_log_dir), timeout=PATH_CHECK_TIMEOUT,
                                what="checking the VM's volume and kernel paths")
    state, xml = await svc.start_vm(spec, paused=cmd.create_paused)
    info = device_info(xml)
    return StartVmRsp(vm_instance_uuid=cmd.vm_instance_uuid, state=state,
                      virtualizer_info=await virtualizer(ctx, cmd.vm_instance_uuid), **info)


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
async def reboot_vm(ctx: AgentContext, cmd: RebootVmCmd) -> RebootVmRsp:
    """Ask the guest to reboot (ACPI); ``bootDev`` is not applied (see the README)."""
    state = await service(ctx).simple_op(cmd.uuid, "reboot")
    return RebootVmRsp(state=state, virtualizer_info=await virtualizer(ctx, cmd.uuid))


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
    """Extension: KvmVmState of the listed VMs; a VM not on this host is Shutdown."""
    return VmStatesRsp(states=await service(ctx).states_of(cmd.vm_uuids))


@plugin.command("/vm/checkstate", mode=ASYNC)
async def check_state(ctx: AgentContext, cmd: CheckVmStateCmd) -> VmStatesRsp:
    """KvmVmState of every listed VM; one not on this host is Shutdown."""
    return VmStatesRsp(states=await service(ctx).states_of(cmd.vm_uuids))


@plugin.command("/vm/vmsync", mode=ASYNC)
async def vm_sync(ctx: AgentContext, cmd: EmptyRequest) -> VmSyncRsp:
    """KvmVmState of every VM on the host, and the ones shutting down."""
    states, shutting_down = await service(ctx).sync_states()
    return VmSyncRsp(states=states, vm_in_shutdowns=shutting_down)


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
