"""The host's mount table, bounded probes of mounts, and the processes serving FUSE mounts.

Nothing here touches a possibly hung mount from the agent's own threads: the mount table
comes from ``/proc/self/mountinfo`` (procfs never blocks on a storage), the probe is a
``stat -f`` child process killed at its deadline, and a mount is removed with a lazy umount.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from .blocking import run_process
from .errors import BlockingTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str
    options: str  # per-mount options (ro/rw, ...)
    root: str  # path inside the source file system that is mounted here
    dev: str = ""  # major:minor of the file system

    @property
    def readonly(self) -> bool:
        return "ro" in self.options.split(",")


def unescape(field: str) -> str:
    """A path field of mountinfo or /proc/mounts (space, tab, newline and backslash are
    written as ``\\ooo``)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1:i + 4]
        if field[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mounts(procfs: Path | str = "/proc") -> list[MountEntry]:
    entries = []
    with open(Path(procfs) / "self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            left, sep, right = line.rstrip("\n").partition(" - ")
            if not sep:
                continue
            fields, tail = left.split(" "), right.split(" ")
            if len(fields) < 6 or len(tail) < 2:
                continue
            entries.append(MountEntry(mount_point=unescape(fields[4]), fstype=tail[0],
                                      source=unescape(tail[1]), options=fields[5],
                                      root=unescape(fields[3]), dev=fields[2]))
    return entries


def mount_at(path: str | Path, procfs: Path | str = "/proc") -> MountEntry | None:
    """The top-most mount at ``path`` (the one a lookup sees), or None."""
    path = str(path)
    found = None
    for entry in read_mounts(procfs):
        if entry.mount_point == path:
            found = entry
    return found


def mounts_at(path: str | Path, procfs: Path | str = "/proc") -> int:
    path = str(path)
    return sum(1 for e in read_mounts(procfs) if e.mount_point == path)


async def probe(path: str | Path, timeout: float) -> str | None:
    """None when ``path`` answers a statfs within ``timeout``; else why it did not.

    statfs always goes to the file system (FUSE does not cache it), so a stopped or wedged
    FUSE daemon shows up here as a timeout; the child is killed at the deadline.
    """
    try:
        result = await run_process(["stat", "-f", "-c", "%T", "--", str(path)], timeout=timeout)
    except BlockingTimeout:
        return f"no answer within {timeout:g}s (hung)"
    if not result.ok:
        err = result.stderr.decode(errors="replace").strip().splitlines()
        reason = err[-1] if err else f"stat exited {result.returncode}"
        if ": " in reason:
            reason = reason.rsplit(": ", 1)[-1]
        return reason
    return None


def boot_id(procfs: Path | str = "/proc") -> str | None:
    try:
        return (Path(procfs) / "sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _started(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def daemon_ids(pid: int | None, ppid: int | None) -> dict | None:
    """What identifies the daemons of a healthy FUSE mount later: their pids and session id,
    with the boot id and each process's start time (pids and session ids are reused, across
    reboots and within one)."""
    if not pid:
        return None
    try:
        sid = os.getsid(ppid or pid)
    except OSError:
        return None
    return {"pid": pid, "ppid": ppid, "sid": sid, "bootId": boot_id(),
            "started": {str(p): _started(p) for p in (pid, ppid, sid) if p}}


def _same_process(pid: int | None, started: dict) -> bool:
    """``pid`` is alive and is the very process recorded (same start time)."""
    want = started.get(str(pid)) if pid else None
    have = _started(pid)
    return want is not None and have is not None and abs(have - want) < 0.05


def trusted_ids(daemon: dict | None) -> tuple[list[int], int | None]:
    """(pids, session id) of a stored ``daemon`` record that still name the same processes.

    Nothing is trusted from another boot, or from a record without boot id and start times.
    A pid counts only while its process has the recorded start time. The session id counts
    while its leader has the recorded start time, or has exited (the kernel does not hand out
    a pid still used as a session id, so its members are still the recorded daemons).
    """
    if not daemon or not daemon.get("bootId") or daemon.get("bootId") != boot_id():
        return [], None
    started = daemon.get("started") or {}
    pids = [p for p in (daemon.get("pid"), daemon.get("ppid"))
            if isinstance(p, int) and _same_process(p, started)]
    sid = daemon.get("sid")
    if not isinstance(sid, int) or str(sid) not in started:
        sid = None
    elif _started(sid) is not None and not _same_process(sid, started):
        sid = None  # the number now belongs to another process
    return pids, sid


def fuse_daemons(mount_point: str | Path, name: str = "juicefs", sid: int | None = None,
                 needles: tuple[str, ...] = (), pids: tuple[int, ...] = ()) -> list[psutil.Process]:
    """Processes named ``name`` serving ``mount_point``.

    juicefs rewrites its process title (one string, possibly cut short, environment
    clobbered), so besides the mount point as an argument this also matches ``needles``
    such as the log path, and -- given by the caller only when verified with
    :func:`trusted_ids` -- the session id the daemons share and their pids.
    """
    target = str(mount_point)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if not cmdline or name not in os.path.basename(cmdline[0].split(" ", 1)[0]):
            continue
        title = " ".join(a for a in cmdline if a) + " "
        if target in cmdline[1:] or f" {target} " in title or \
                any(f" {n} " in title for n in needles) or proc.pid in pids:
            found.append(proc)
            continue
        if sid is not None:
            try:
                if os.getsid(proc.pid) == sid:
                    found.append(proc)
            except OSError:
                pass
    return found


def live_daemons(mount_point: str | Path, name: str = "juicefs", daemon: dict | None = None,
                 needles: tuple[str, ...] = ()) -> list[psutil.Process]:
    """The daemons of ``mount_point`` that are alive (not zombies)."""
    pids, sid = trusted_ids(daemon)
    alive = []
    for proc in fuse_daemons(mount_point, name, sid, needles, tuple(pids)):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


def kill_daemons(mount_point: str | Path, name: str = "juicefs", daemon: dict | None = None,
                 needles: tuple[str, ...] = ()) -> list[int]:
    """SIGKILL the FUSE daemons of ``mount_point`` (a stopped process dies too).

    Only processes tied to this mount: by mount point or ``needles`` on their command line,
    or by ids of ``daemon`` that :func:`trusted_ids` still vouches for.
    """
    pids, sid = trusted_ids(daemon)
    killed = []
    # The supervisor first, so it does not respawn the worker we kill next.
    procs = sorted(fuse_daemons(mount_point, name, sid, needles, tuple(pids)),
                   key=lambda p: p.pid)
    for proc in procs:
        try:
            proc.kill()  # psutil checks the pid still names the process it found
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    if killed:
        psutil.wait_procs([p for p in procs if p.pid in killed], timeout=5)
    return killed


async def lazy_umount(path: str | Path, timeout: float = 10) -> bool:
    """``umount -l``: detaches at once even from a hung file system. True if it unmounted."""
    try:
        result = await run_process(["umount", "-l", "--", str(path)], timeout=timeout)
    except BlockingTimeout:
        log.warning("umount -l %s did not finish within %gs", path, timeout)
        return False
    return result.ok


_RESOLVE = ("import json,os,sys\n"
            "p=os.path.realpath(sys.argv[1])\n"
            "print(json.dumps([p,os.path.exists(p),os.path.isdir(p)]))")


async def resolve_path(path: str | Path, timeout: float) -> tuple[str, bool, bool]:
    """(realpath, exists, is_dir) of ``path``, computed in a child process killed at the
    deadline: resolving a path inside a hung FUSE/NFS mount blocks the caller forever."""
    import json
    import sys

    try:
        result = await run_process([sys.executable, "-I", "-S", "-c", _RESOLVE, str(path)],
                                   timeout=timeout)
    except BlockingTimeout:
        from .errors import AgentError

        raise AgentError(f"{path}: resolving the path did not finish within {timeout:g}s "
                         f"(is the storage under it hung?)") from None
    if not result.ok:
        from .errors import AgentError

        raise AgentError(f"{path}: cannot resolve: {result.describe()}")
    real, exists, is_dir = json.loads(result.stdout)
    return real, exists, is_dir
