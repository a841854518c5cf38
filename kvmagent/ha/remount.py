"""After a fence, umount and remount a storage that ZStack mounted (``mountedByZStack``: NFS).

ZStack's agent (ZU ``after_kill_vm`` / ``try_remount_fs``): unless Permissive left VMs running
on it, ``pkill -9 -f <mount>`` then ``umount -f``; then, while the fencer runs and the path is
not mounted, ``mount [-o <mountOptions>] <url> <mountPath>`` (after 180 s, then again).

Here: no pkill (it kills any process whose command line merely mentions the path, VMs the
strategy spared included); ``umount -f``, else ``umount -l`` (a hung NFS cannot be unmounted
otherwise, and a lazy detach lets the new mount take its place); every step is a child process
with a deadline; the first remount is tried at once and retried every ``RETRY`` seconds while the
fencer runs. Success shows as heartbeats succeeding again (reported Connected by the fencer);
each attempt's outcome is in ``/ha/selffencer/state`` and the log.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..core import mounttable
from ..core.blocking import run_process
from ..core.context import AgentContext
from ..core.logs import mask_text

if TYPE_CHECKING:
    from .fencer import FencerConfig

log = logging.getLogger(__name__)

UMOUNT_TIMEOUT = 10.0
MOUNT_TIMEOUT = 60.0
RETRY = 30.0


def mount_argv(url: str, mount_path: str, options: str) -> list[str]:
    """The remount command, as ZStack builds it (``linux.mount`` without a type)."""
    return ["mount", *(["-o", options] if options else []), "--", url, mount_path]


def from_url(entry: mounttable.MountEntry, url: str) -> bool:
    """The mount comes from ``url`` (as the mount table shows NFS sources: ``host:/export``)."""
    return entry.source.rstrip("/") == url.rstrip("/")


class Remounter:
    def __init__(self, ctx: AgentContext, cfg: FencerConfig):
        self.ctx = ctx
        self.cfg = cfg
        self.last: str | None = None  # outcome of the last step, for /ha/selffencer/state
        self.last_at: float | None = None
        self._task: asyncio.Task | None = None

    def after_fence(self, spared_vm_uuids: list[str] | None) -> None:
        """``spared_vm_uuids``: VMs left running on the storage; None when nobody knows which
        VMs use it (then it is not unmounted: a VM may still run on it)."""
        if self._task is None or self._task.done():
            self._task = self.ctx.spawn(self._run(spared_vm_uuids),
                                        name=f"remount {self.cfg.ps_uuid}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _note(self, outcome: str) -> None:
        self.last, self.last_at = mask_text(outcome), time.time()
        log.warning("selffencer %s: %s", self.cfg.ps_uuid, mask_text(outcome))

    async def _run(self, spared: list[str] | None) -> None:
        cfg = self.cfg
        if not cfg.url:
            self._note("mountedByZStack but no url: not remounting")
            return
        if spared is None:
            self._note(f"keeping the mount {cfg.mount_path}: which VMs use it is unknown (see "
                       "fenceError), and some may still run on it")
        elif spared and cfg.strategy == "Permissive":
            self._note(f"keeping the mount {cfg.mount_path}: VMs spared by Permissive still use "
                       f"it ({', '.join(spared)})")
        elif (mounted := mounttable.mount_at(cfg.mount_path)) is not None:
            if not from_url(mounted, cfg.url):
                # Not the storage ZStack mounted there: someone else's file system, never ours to
                # unmount (nor to mount over).
                self._note(f"not unmounting {cfg.mount_path}: {mounted.source} is mounted there, "
                           f"not {cfg.url}")
                return
            await self._umount()
        while mounttable.mount_at(cfg.mount_path) is None:
            argv = mount_argv(cfg.url, cfg.mount_path, cfg.mount_options)
            try:
                result = await run_process(argv, timeout=MOUNT_TIMEOUT)
                ok, detail = result.ok, result.describe()
            except Exception as exc:  # a timeout (the child is killed) or no mount binary
                ok, detail = False, str(exc)
            if ok:
                self._note(f"remounted {cfg.url} on {cfg.mount_path}")
                return
            self._note(f"remount of {cfg.url} on {cfg.mount_path} failed ({detail}); "
                       f"retrying in {RETRY:g}s")
            await asyncio.sleep(RETRY)

    async def _umount(self) -> None:
        path = self.cfg.mount_path
        for argv in (["umount", "-f", path], ["umount", "-l", path]):
            try:
                result = await run_process(argv, timeout=UMOUNT_TIMEOUT)
                if result.ok:
                    self._note(f"unmounted {path} ({' '.join(argv[:2])})")
                    return
                detail = result.describe()
            except Exception as exc:
                detail = str(exc)
            log.warning("selffencer %s: %s failed: %s", self.cfg.ps_uuid, " ".join(argv), detail)
        self._note(f"could not unmount {path}")
