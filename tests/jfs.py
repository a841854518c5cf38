"""A real, fully local JuiceFS volume (sqlite metadata, file storage) mounted over FUSE."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

JUICEFS = str(Path(sys.executable).with_name("juicefs"))
QUIET = ["--no-agent", "--no-color", "--quiet"]


class JuiceFsVolume:
    def __init__(self, name: str = "kvmagenttest"):
        self.base = Path(tempfile.mkdtemp(prefix="kvmagent-jfs-"))
        os.chmod(self.base, 0o755)
        self.meta = f"sqlite3://{self.base}/meta.db"
        self.mountpoint = self.base / "mnt"
        self.mountpoint.mkdir()
        subprocess.run([JUICEFS, *QUIET, "format", "--storage", "file", "--bucket",
                        f"{self.base}/bucket/", "--trash-days", "0", self.meta, name],
                       check=True, capture_output=True, timeout=60)

    def mount(self) -> JuiceFsVolume:
        subprocess.run([JUICEFS, *QUIET, "mount", "-d", "--log", str(self.base / "juicefs.log"),
                        "--no-bgjob", self.meta, str(self.mountpoint)],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mountpoint):
            assert time.monotonic() < deadline, "juicefs mount did not appear"
            time.sleep(0.1)
        os.chmod(self.mountpoint, 0o777)
        return self

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmd = proc.info["cmdline"] or []
            if cmd and "juicefs" in os.path.basename(cmd[0]) and str(self.mountpoint) in cmd:
                found.append(proc)
        return found

    def hang(self) -> None:
        """I/O on the mount blocks from now on (the FUSE daemon is stopped)."""
        procs = self.processes()
        assert procs, "no juicefs process found for the mount"
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for proc in self.processes():
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass

    def cleanup(self) -> None:
        self.resume()
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, timeout=30)
        for proc in self.processes():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.base, ignore_errors=True)
