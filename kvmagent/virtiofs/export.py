"""The directory virtiofsd exports: a bind mount the agent makes from a no-follow walk.

virtiofsd never exports the requested path itself (a symlink could redirect it): a killable
child opens each component of the path below the model-center mount with
``O_PATH|O_NOFOLLOW|O_DIRECTORY`` and binds the directory it opened, read-only or read-write.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..core import mounttable
from ..core.blocking import run_process
from ..core.context import AgentContext
from ..core.errors import AgentError, BlockingTimeout
from .domain_xml import vm_key

log = logging.getLogger(__name__)

# argv: model-center mount point, path below it ("" for the mount itself), export dir, "1"
# for read-only. Opens each component with O_PATH|O_NOFOLLOW|O_DIRECTORY (a symlink or a
# non-directory fails), refuses to cross into another mount, then binds /proc/self/fd/N:
# the directory that was opened, whatever happens to the path meanwhile.
_BIND_FD = r"""
import ctypes, errno, os, stat, sys
base, rel, export, ro = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
F = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
def fail(msg):
    sys.stderr.write(msg + "\n")
    sys.exit(3)
try:
    fd = os.open(base, F)
    dev = os.fstat(fd).st_dev
    done = base
    for part in [p for p in rel.split("/") if p]:
        if part in (".", ".."):
            fail(f"{done}/{part}: '.' and '..' are not allowed")
        try:
            nfd = os.open(part, F, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                fail(f"{done}/{part} is a symbolic link or not a directory (refused)")
            raise
        os.close(fd)
        fd, done = nfd, f"{done}/{part}"
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            fail(f"{done} is not a directory")
        if st.st_dev != dev:
            fail(f"{done} is on another file system than the model center (refused)")
except OSError as exc:
    fail(f"{exc.filename or done}: {exc.strerror}")
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
if libc.mount(f"/proc/self/fd/{fd}".encode(), export.encode(), None, MS_BIND, None) != 0:
    fail(f"mount: {os.strerror(ctypes.get_errno())}")
flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if ro else 0)
if libc.mount(None, export.encode(), None, flags, None) != 0:
    err = ctypes.get_errno()
    libc.umount2(export.encode(), 2)  # MNT_DETACH
    fail(f"remount {'read-only' if ro else 'read-write'}: {os.strerror(err)}")
"""




class Exports:
    """Bind mounts under ``virtiofs_readonly_root`` (default ``<state_dir>/virtiofs-ro``)."""

    def __init__(self, ctx: AgentContext):
        self.ctx = ctx
        self.config = ctx.config

    def readonly_root(self) -> Path:
        return Path(self.config.virtiofs_readonly_root or self.config.state_dir / "virtiofs-ro")

    def bind_path(self, vm: str, tag: str) -> Path:
        # "tag-" keeps tags like "." or ".." ordinary file names.
        return self.readonly_root() / vm_key(vm) / f"tag-{tag}"


    async def bind(self, vm: str, tag: str, mc_entry: mounttable.MountEntry, rel: str,
                    readonly: bool) -> str:
        """Bind-mount ``<model-center mount>/<rel>`` at this share's export dir.

        A killable child walks ``rel`` from the model-center mount one component at a time
        (``O_PATH|O_NOFOLLOW|O_DIRECTORY``; a symlink anywhere fails the walk) and binds the
        directory it opened (``/proc/self/fd/N``), so a symlink swapped in after the checks
        cannot redirect the export. The result is then checked in the mount table: the
        export's root must be exactly ``rel`` on the model center's device.
        """
        bind = self.bind_path(vm, tag)
        timeout = self.config.virtiofs_path_timeout
        await self.ctx.runner.run(bind.mkdir, parents=True, exist_ok=True, mode=0o755,
                                  timeout=timeout, what=f"mkdir {bind}")
        for _ in range(8):  # a stale bind mount, e.g. from a crash between bind and record
            if mounttable.mount_at(bind, self.config.procfs_root) is None:
                break
            if not await mounttable.lazy_umount(bind):
                raise AgentError(f"cannot clear the stale bind mount {bind}")
        kind = "read-only" if readonly else "read-write"
        source = os.path.join(mc_entry.mount_point, rel) if rel else mc_entry.mount_point
        try:
            result = await run_process(
                [sys.executable, "-I", "-S", "-c", _BIND_FD, mc_entry.mount_point, rel,
                 str(bind), "1" if readonly else "0"], timeout=timeout)
        except BlockingTimeout:
            await self.unbind(str(bind))
            raise AgentError(f"{kind} bind mount of {source} did not finish within "
                             f"{timeout:g}s (is the storage hung?)") from None
        if not result.ok:
            await self.unbind(str(bind))
            err = result.stderr.decode(errors="replace").strip().splitlines()
            raise AgentError(f"{kind} bind mount of {source} failed: "
                             f"{err[-1] if err else result.describe()}")
        entry = mounttable.mount_at(bind, self.config.procfs_root)
        # rel comes from a realpath: no '.', '..' or '//' to normalise
        want_root = f"{mc_entry.root.rstrip('/')}/{rel}" if rel else mc_entry.root
        if entry is None or entry.dev != mc_entry.dev or entry.root != want_root \
                or entry.readonly != readonly:
            await self.unbind(str(bind))
            raise AgentError(f"{bind} did not become a {kind} bind mount of {source} "
                             f"(it changed while it was being shared?)")
        return str(bind)

    async def unbind(self, path: str | None) -> None:
        if not path or not path.startswith(str(self.readonly_root()) + "/"):
            return
        for _ in range(8):
            if mounttable.mount_at(path, self.config.procfs_root) is None:
                break
            if not await mounttable.lazy_umount(path):
                log.warning("cannot unmount %s", path)
                return

        def rmdir() -> None:
            for p in (Path(path), Path(path).parent):
                try:
                    p.rmdir()
                except OSError:
                    return
        try:
            await self.ctx.runner.run(rmdir, timeout=self.config.virtiofs_path_timeout)
        except AgentError as exc:
            log.warning("rmdir %s: %s", path, exc)
