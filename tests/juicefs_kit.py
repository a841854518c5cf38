"""Local JuiceFS volumes for the model-center tests, and cleanup of everything they mount.

A volume is formatted here (sqlite3 metadata, file storage, both under a temp dir); the
agent mounts it through ``/modelcenter/mount``. The cleanup fixture resumes any stopped
juicefs process, kills the daemons and lazily unmounts every mount under the test's dirs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from kvmagent.core import mounttable

JUICEFS = str(Path(sys.executable).with_name("juicefs"))
QUIET = ["--no-agent", "--no-color", "--quiet"]


class LocalVolume:
    def __init__(self, name: str = "models"):
        self.base = Path(tempfile.mkdtemp(prefix="kvmagent-mc-"))
        os.chmod(self.base, 0o755)
        self.name = name
        self.meta = f"sqlite3://{self.base}/meta.db"
        subprocess.run([JUICEFS, *QUIET, "format", "--storage", "file", "--bucket",
                        f"{self.base}/bucket/", "--trash-days", "0", self.meta, name],
                       check=True, capture_output=True, timeout=120)

    @property
    def storage_url(self) -> str:
        return f"juicefs://{self.meta}"

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def daemons(mount_point: str | Path) -> list[psutil.Process]:
    """The juicefs processes serving a healthy ``mount_point`` (supervisor and worker): the
    session of the pids its .config names (juicefs rewrites its own process title)."""
    try:
        with open(Path(mount_point) / ".config") as fh:
            config = json.load(fh)
        sid = os.getsid(config.get("PPid") or config["Pid"])
    except (OSError, ValueError, KeyError):
        return []
    return mounttable.fuse_daemons(mount_point, sid=sid)


_STOPPED: set[int] = set()


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        if sig == signal.SIGSTOP:
            _STOPPED.add(proc.pid)
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(interval)


def cleanup_mounts(*roots: Path) -> None:
    """Resume, kill and lazily unmount whatever juicefs/bind mounts live under ``roots``."""
    prefixes = tuple(str(r).rstrip("/") + "/" for r in roots)
    for pid in list(_STOPPED):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            _STOPPED.discard(pid)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        title = " ".join(cmd)
        if cmd and "juicefs" in os.path.basename(cmd[0].split(" ", 1)[0]) and \
                any(p in title for p in prefixes):
            try:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    for _ in range(3):
        points = sorted({e.mount_point for e in mounttable.read_mounts()
                         if e.mount_point.startswith(prefixes)}, key=len, reverse=True)
        if not points:
            break
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


@pytest.fixture
def mount_cleanup(tmp_path):
    """Request first (or autouse) so it finalizes last: nothing stays mounted or stopped."""
    roots = [tmp_path]
    yield roots
    cleanup_mounts(*roots)


@pytest.fixture
def volume():
    vol = LocalVolume()
    yield vol
    cleanup_mounts(vol.base)
    vol.remove()


class MountedVolume(LocalVolume):
    """A volume the test mounts itself (not through the agent): for HA tests and benches."""

    def __init__(self, name: str = "kvmagenttest"):
        super().__init__(name)
        self.mountpoint = self.base / "mnt"
        self.mountpoint.mkdir()
        self._paused: list[psutil.Process] = []

    def mount(self) -> MountedVolume:
        subprocess.run([JUICEFS, *QUIET, "mount", "-d", "--log", str(self.base / "juicefs.log"),
                        "--no-bgjob", self.meta, str(self.mountpoint)],
                       check=True, capture_output=True, timeout=60)
        wait_until(lambda: os.path.ismount(self.mountpoint), 20, "juicefs mount")
        os.chmod(self.mountpoint, 0o777)  # QEMU (libvirt-qemu) keeps disks here
        return self

    def hang(self) -> None:
        """I/O on the mount blocks from now on (the FUSE daemons are stopped)."""
        self._paused = daemons(self.mountpoint)
        assert self._paused, "no juicefs process found for the mount"
        signal_all(self._paused, signal.SIGSTOP)

    def resume(self) -> None:
        signal_all(self._paused, signal.SIGCONT)

    def cleanup(self) -> None:
        self.resume()
        cleanup_mounts(self.base)
        self.remove()


def seed(volume: LocalVolume, files: dict[str, str]) -> None:
    """Write ``files`` (path inside the volume -> text) through a mount of the test's own."""
    point = Path(tempfile.mkdtemp(prefix="kvmagent-seed-"))
    try:
        subprocess.run([JUICEFS, *QUIET, "mount", "-d", "--no-bgjob", volume.meta, str(point)],
                       check=True, capture_output=True, timeout=60)
        for rel, text in files.items():
            (point / rel).parent.mkdir(parents=True, exist_ok=True)
            (point / rel).write_text(text)
    finally:
        subprocess.run([JUICEFS, *QUIET, "umount", str(point)], capture_output=True, timeout=60)
        cleanup_mounts(point)
        shutil.rmtree(point, ignore_errors=True)
