"""Agent configuration: a TOML file, overridden by command-line flags.

Every key has a default so ``kvmagent serve`` works with no file at all.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_CONFIG_PATH = Path("/etc/kvmagent/kvmagent.toml")


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = Field("0.0.0.0:7070", description="HOST:PORT the HTTP server binds to")
    state_dir: Path = Field(Path("/var/lib/kvmagent"), description="persistent state (atomic JSON)")
    libvirt_uri: str = Field("qemu:///system", description="libvirt connection URI")
    # kvm in production; "auto" probes /dev/kvm plus the capabilities, "qemu" is TCG.
    domain_type: Literal["kvm", "qemu", "auto"] = Field(
        "kvm", description="domain type of started VMs; auto: kvm when /dev/kvm and libvirt offer it")
    log_level: str = Field("INFO", description="DEBUG also logs request bodies (secrets masked)")
    plugins: list[str] | None = Field(None, description="entry-point names to load; None = all")

    # Security (off by default, as the ZStack MN speaks plain HTTP).
    auth_token: str | None = Field(None, description="require 'Authorization: Bearer <token>'")
    tls_cert: Path | None = Field(None, description="serve HTTPS with this certificate (PEM)")
    tls_key: Path | None = Field(None, description="private key of tls_cert (PEM)")
    tls_client_ca: Path | None = Field(None, description="verify client certificates against this CA")

    # Async commands.
    task_idempotency_window: float = Field(
        72 * 3600.0, ge=0, description="seconds a finished taskuuid is remembered (across "
        "restarts): a re-send within it is acknowledged, not run again. Default: ZStack's "
        "longest message timeout (72 h, e.g. APICreateDataVolumeTemplateFromVolumeMsg)")

    # Blocking work.
    executor_workers: int = Field(64, ge=1, le=1024, description="threads for blocking work")
    libvirt_workers: int = Field(16, ge=1, le=256, description="threads for libvirt calls")
    libvirt_call_timeout: float = Field(60.0, gt=0, description="one libvirt call")
    libvirt_reconnect_interval: float = Field(
        5.0, gt=0, description="seconds between reconnect attempts and liveness checks")

    # Callback and report delivery to the MN.
    delivery_timeout: float = Field(30.0, gt=0, description="one HTTP attempt")
    delivery_retry_window: float = Field(600.0, gt=0, description="give up after this many seconds")
    delivery_initial_backoff: float = Field(1.0, gt=0, description="first retry delay, doubled each time")
    delivery_tls_verify: bool = Field(
        True, description="verify the MN's certificate for https callback and report URLs")
    delivery_ca_file: Path | None = Field(
        None, description="CA bundle for the MN's certificate (default: the system's)")
    delivery_max_backoff: float = Field(30.0, gt=0, description="longest retry delay")

    # VMs.
    # ZStack's primary storages: NFS mounts under /opt/zstack/nfsprimarystorage, local and
    # shared-mount-point storages wherever the user points their URL (docs: /zstack_ps, /mnt/...).
    vm_path_roots: list[Path] = Field(
        [Path("/var/lib/libvirt"), Path("/var/lib/kvmagent"), Path("/var/lib/zstack"),
         Path("/opt"), Path("/zstack_ps"), Path("/mnt"), Path("/srv"), Path("/data")],
        description="volumes, ISOs, kernels, console logs and guest-agent sockets of VMs must "
        "resolve inside these (add the URL of each local or shared-mount-point primary storage)")
    vm_block_roots: list[Path] = Field(
        [Path("/dev/disk/by-id"), Path("/dev/disk/by-path"), Path("/dev/mapper")],
        description="volumes of deviceType block must be named inside these (the name, not its "
        "target: by-id links point at /dev/sdX) and be block devices not mounted on the host")
    vm_console_log_dir: Path = Field(
        Path("/var/log/kvmagent/console"),
        description="consoleLogToFile: <dir>/<vmUuid>-vm-kernel.log (written by virtlogd)")
    iptables_command: list[str] = Field(
        ["iptables"], description="argv prefix that runs iptables for ConnectCmd.iptablesRules "
        "(e.g. iptables-legacy)")
    vm_vnc_listen: str = Field(
        "0.0.0.0", description="address VNC consoles listen on (the MN's console proxy connects "
        "to the host's management IP)")
    vm_state_report_debounce: float = Field(
        2.0, ge=0, description="seconds a VM's state must settle before it is reported")
    vm_stop_default_timeout: float = Field(
        60.0, gt=0, description="grace stop: seconds to wait for the guest before destroying it")

    # HA.
    ha_inventory_refresh: float = Field(
        15.0, gt=0, description="seconds between refreshes of the fencers' VM snapshot")
    ha_netns: str | None = Field(
        None, description="network namespace whose links network groups watch (None: host)")

    # Capabilities.
    models_root: Path = Field(Path("/opt/zstack/models"),
                              description="model-center mounts (ZStack's MODEL_MOUNT_BASE: the "
                              "MN builds virtiofs sourcePaths under it); virtiofs sources must "
                              "lie inside")
    juicefs_binary: str | None = Field(None, description="path to juicefs; default: PATH / venv")
    virtiofsd_binary: Path = Field(Path("/usr/lib/qemu/virtiofsd"), description="virtiofsd for shares")
    docker_start_command: list[str] | None = Field(
        None, description="argv that starts dockerd without systemd; None: spawn dockerd_binary")
    docker_install_allowed: bool = Field(
        False, description="apt-get install docker.io when no docker engine is installed")
    sysfs_root: Path = Field(Path("/sys"), description="sysfs (a fake tree in unit tests)")
    procfs_root: Path = Field(Path("/proc"), description="procfs (a fake tree in unit tests)")
    # Vhost target environment (docker engine, hugetlbfs).
    docker_url: str = Field("unix:///var/run/docker.sock", description="docker engine base URL")
    docker_timeout: float = Field(10.0, gt=0, description="one docker API call (client timeout)")
    docker_start_timeout: float = Field(
        60.0, gt=0, description="wait this long for the engine to answer after starting it")
    dockerd_binary: str = Field(
        "dockerd", description="dockerd name or path; its absence means docker is not installed")
    docker_daemon_json: Path = Field(
        Path("/etc/docker/daemon.json"), description="the engine's config file, where an engine "
        "the agent starts through init or installs gets \"iptables\": false")
    dockerd_log_file: Path = Field(
        Path("/var/log/dockerd.log"), description="log of a dockerd the agent spawns itself")
    hugetlbfs_mount_point: Path = Field(
        Path("/dev/hugepages2M"), description="where a pagesize=2M hugetlbfs is mounted when "
        "none is mounted yet (an existing one with that page size is reused)")

    # Model center mounts and virtiofs shares.
    modelcenter_health_interval: float = Field(
        10.0, gt=0, description="seconds between health probes of each model-center mount")
    modelcenter_probe_timeout: float = Field(
        5.0, gt=0, description="a mount that does not answer statfs within this is hung")
    modelcenter_remount_after: int = Field(
        2, ge=1, description="consecutive failed probes before the watcher remounts")
    modelcenter_auto_remount: bool = Field(
        True, description="remount dead or hung mounts (kill a stuck juicefs, umount -l, mount)")
    modelcenter_mount_timeout: float = Field(
        60.0, gt=0, description="one mount command (juicefs mount -d waits for the volume)")
    modelcenter_umount_timeout: float = Field(30.0, gt=0, description="one umount command")
    modelcenter_meta_url_subdir: str = Field(
        "models", description="a raw JuiceFS metadata URL (ZStack's storageUrl) mounts this "
        "directory of the volume (juicefs --subdir), as ZStack's agent does; '' = the root")
    juicefs_cache_dir: Path | None = Field(
        None, description="parent of per-mount juicefs cache dirs; None: juicefs' default")
    juicefs_log_dir: Path | None = Field(
        None, description="juicefs mount logs (<uuid>.log); None: <state_dir>/juicefs-logs")
    virtiofs_readonly_root: Path | None = Field(
        None, description="where the agent's bind mounts that virtiofsd exports live (every "
        "share; read-only ones are how a share is made read-only, libvirt 9 cannot); "
        "None: <state_dir>/virtiofs-ro")
    virtiofs_detach_timeout: float = Field(
        30.0, gt=0, description="wait this long for the guest to release a detached share")
    virtiofs_qga_timeout: int = Field(
        5, ge=1, le=300, description="seconds for one guest-agent command (in-guest mount)")
    virtiofs_guest_mount_wait: float = Field(
        20.0, gt=0, description="keep retrying the in-guest mount this long while the guest is "
        "still probing the hot-plugged device (its tag is unknown to it until then)")
    virtiofs_path_timeout: float = Field(
        10.0, gt=0, description="resolving or bind-mounting a share's source path")
    modelcenter_file_roots: list[Path] = Field(
        [], description="file:// model storage must resolve inside one of these host dirs; "
        "empty: file:// is refused")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"listen must be HOST:PORT, got {value!r}")
        return value

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


def load_config(path: Path | None, overrides: dict | None = None) -> AgentConfig:
    """Read ``path`` (TOML; missing default file is fine) and apply non-None overrides."""
    data: dict = {}
    if path is not None:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    elif DEFAULT_CONFIG_PATH.exists():
        with open(DEFAULT_CONFIG_PATH, "rb") as fh:
            data = tomllib.load(fh)
    data = {k.replace("-", "_"): v for k, v in data.items()}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return AgentConfig(**data)
