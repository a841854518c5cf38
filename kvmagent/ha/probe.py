"""Heartbeat I/O on shared storage in a killable child process.

A write to a hung NFS/FUSE mount blocks the writing process, possibly for ever, so it never
happens in the agent: a tiny Python child (``-I -S``: stdlib only, fast start) does the I/O
and is killed at the deadline. While a killed child has not exited yet (stuck in the kernel),
no new one is started for that storage: the attempt fails at once, so a hung mount costs at
most one stuck process per storage, never one per interval.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass

from ..core.blocking import kill_group, reap_later

HEARTBEAT_DIR = "zs-heartbeat"

# The storage must really be there, else a heartbeat written to whatever lies under the mount
# path would hide the outage from this host while peers see it stop (split brain):
# - a storage ZStack mounted (NFS) must be a mount point: its device differs from its parent's,
#   or (a bind mount of the same file system) the mount table lists it. An unmounted or lazily
#   unmounted path is a bare directory, whatever file system holds it.
# - any other storage (local, shared mount point) may be a plain directory, even on /: the
#   device its first good heartbeat saw is kept, and a different one fails ("unmounted").
#   After a fence (``adopt``), a different device that is a mount point of its own (not the
#   directory under an unmounted storage) is taken: the storage was mounted again.
# Only the heartbeat directory is ever created, never the mount path. On success the child
# prints the device number of the mount path.
_WRITE = r"""
import os, re, sys
mount, directory, name, data, must_be_mount, expected, adopt = sys.argv[1:8]
data = data.encode()
st = os.stat(mount)
if must_be_mount == "1":
    parent = os.stat(os.path.join(mount, ".."))
    listed = False
    if st.st_dev == parent.st_dev and st.st_ino != parent.st_ino:
        real = os.path.realpath(mount)
        unescape = lambda f: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), f)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            listed = any(len(line.split(" ")) > 4 and unescape(line.split(" ")[4]) == real
                         for line in fh)
        if not listed:
            sys.exit(f"{mount} is not a mount point: the storage is not mounted")
elif expected and st.st_dev != int(expected) and not (
        adopt == "1" and st.st_dev != os.stat(os.path.join(mount, "..")).st_dev):
    sys.exit(f"{mount} is on another file system (device {st.st_dev}) than at its first "
             f"heartbeat (device {expected}): the storage is not mounted")
try:
    os.mkdir(directory)
except FileExistsError:
    pass
tmp = os.path.join(directory, "." + name + ".tmp")
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
try:
    os.write(fd, data)
    os.fsync(fd)
finally:
    os.close(fd)
os.replace(tmp, os.path.join(directory, name))
print(st.st_dev)
"""

_READ = r"""
import sys
try:
    with open(sys.argv[1], "rb") as fh:
        sys.stdout.buffer.write(fh.read(1 << 20))
except FileNotFoundError:
    sys.exit(3)
"""

_IS_DIR = r"""
import os, sys
sys.exit(0 if os.path.isdir(sys.argv[1]) else 3)
"""
MISSING = 3  # exit code of a child that found no such file (or no directory)


def heartbeat_bytes(vm_uuids: list[str], now: float | None = None) -> bytes:
    """The heartbeat exactly as ZStack's agent writes it (ZU ``FileSystemHeartbeatController``,
    Python 2 ``json.dumps``): default separators, ``heartbeat_time`` as a float (shortest
    repr), ``vm_uuids`` a comma-joined string or null, no trailing newline."""
    doc = {"heartbeat_time": time.time() if now is None else now,
           "vm_uuids": ",".join(vm_uuids) if vm_uuids else None}
    return json.dumps(doc).encode()


def parse_heartbeat(data: bytes) -> tuple[float, list[str]] | None:
    """(time, vm uuids) from ZStack's format or ours (older versions wrote a list);
    None for an empty or partial file (ZStack's writer truncates before it writes)."""
    text = data.decode(errors="replace").strip()
    if not text:
        return None
    try:
        doc = json.loads(text)
        beat = float(doc["heartbeat_time"])
    except (ValueError, KeyError, TypeError):
        return None
    uuids = doc.get("vm_uuids")
    if isinstance(uuids, str):
        return beat, [u for u in uuids.split(",") if u]
    if isinstance(uuids, list):
        return beat, [str(u) for u in uuids]
    return beat, []


def heartbeat_name(host_uuid: str) -> str:
    return f"heartbeat-file-kvm-host-{host_uuid}.hb"


def heartbeat_path(mount_path: str, host_uuid: str) -> str:
    return os.path.join(mount_path, HEARTBEAT_DIR, heartbeat_name(host_uuid))


def device_of(result: ProbeResult) -> int | None:
    """The device number a successful heartbeat write saw."""
    try:
        return int(result.output.strip())
    except ValueError:
        return None


@dataclass
class ProbeResult:
    ok: bool
    error: str = ""
    missing: bool = False  # the file (or directory) does not exist
    output: bytes = b""
    seconds: float = 0.0


class StorageProbe:
    """Runs one I/O child at a time for one storage."""

    def __init__(self) -> None:
        self._stuck: asyncio.subprocess.Process | None = None
        self._one_at_a_time = asyncio.Lock()  # concurrent callers must not each leave a child

    @property
    def stuck_pid(self) -> int | None:
        if self._stuck is not None and self._stuck.returncode is None:
            return self._stuck.pid
        return None

    async def write_heartbeat(self, mount_path: str, host_uuid: str, vm_uuids: list[str],
                              timeout: float, *, must_be_mount: bool = False,
                              device: int | None = None, adopt: bool = False) -> ProbeResult:
        """Write the heartbeat. ``must_be_mount``: fail unless the path is a mount point;
        ``device``: fail unless the path is on that device (``adopt``: or is a mount point of
        another one). On success ``output`` holds the
        path's device number (see :func:`device_of`)."""
        payload = heartbeat_bytes(sorted(vm_uuids)).decode()
        return await self._run([_WRITE, mount_path, os.path.join(mount_path, HEARTBEAT_DIR),
                                heartbeat_name(host_uuid), payload, "1" if must_be_mount else "0",
                                "" if device is None else str(device), "1" if adopt else "0"],
                               timeout)

    async def read(self, path: str, timeout: float) -> ProbeResult:
        return await self._run([_READ, path], timeout)

    async def is_dir(self, path: str, timeout: float) -> ProbeResult:
        return await self._run([_IS_DIR, path], timeout)

    async def _run(self, script_and_args: list[str], timeout: float) -> ProbeResult:
        async with self._one_at_a_time:
            return await self._run_alone(script_and_args, timeout)

    async def _run_alone(self, script_and_args: list[str], timeout: float) -> ProbeResult:
        if self.stuck_pid is not None:
            return ProbeResult(False, f"the previous I/O (pid {self.stuck_pid}) is still stuck "
                                      "in the storage")
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", *script_and_args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives as the child finishes, and a fencer being replaced then never stops.
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except (TimeoutError, asyncio.CancelledError) as exc:
            kill_group(proc.pid)
            self._stuck = proc
            reap_later(proc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return ProbeResult(False, f"storage I/O did not finish within {timeout:g}s",
                               seconds=time.monotonic() - started)
        seconds = time.monotonic() - started
        if proc.returncode == MISSING:
            return ProbeResult(False, f"no such file: {script_and_args[1]}", missing=True,
                               seconds=seconds)
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            return ProbeResult(False, lines[-1] if lines else f"exit {proc.returncode}", seconds=seconds)
        return ProbeResult(True, output=out, seconds=seconds)
