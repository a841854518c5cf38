"""Mounting and unmounting a virtiofs tag inside the guest, through its guest agent."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..core import mounttable
from ..vm.guest_agent import GuestAgentError, Send, guest_exec

GUEST_MOUNT_RETRY = 0.5  # seconds between in-guest mount attempts
GUEST_UMOUNT_MAX = 16  # in-guest mounts of one tag undone before an unplug (the guest lists them)


@dataclass
class GuestMount:
    attempted: bool
    success: bool
    error: str | None



async def guest_virtiofs_mounts(send: Send, tag: str, timeout: float) -> list[str]:
    """Where the guest has virtiofs ``tag`` mounted, from its /proc/mounts."""
    code, mounts = await guest_exec(send, "cat", ["/proc/mounts"], timeout)
    if code != 0:
        raise GuestAgentError(f"cat /proc/mounts in the guest failed: {mounts or f'exit {code}'}")
    found = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == tag and fields[2] == "virtiofs":
            found.append(mounttable.unescape(fields[1]))
    return found


@dataclass
class GuestUnmount:
    paths: list[str]  # where the tag was unmounted
    outcome: str  # what happened, for the log
    ok: bool = True  # no in-guest mount of the tag is left (as far as the guest told)
    attempted: bool = True  # False: the guest agent did not answer at all


async def guest_umount(send: Send, tag: str, timeout: float) -> GuestUnmount:
    """Lazily unmount the mounts of ``tag`` in the guest (at most GUEST_UMOUNT_MAX of them).

    Done before an unplug so the guest keeps no dead mount at the path (a later attach there
    would otherwise find it "already mounted"); lazy so a process holding a file open cannot
    hold up the unplug. Never raises, and the whole takes at most ``2 * timeout`` plus one
    command: the unplug goes ahead either way.
    """
    done: list[str] = []
    failed: list[str] = []
    deadline = time.monotonic() + 2 * timeout
    try:
        paths = (await guest_virtiofs_mounts(send, tag, timeout))[:GUEST_UMOUNT_MAX]
        for path in paths:
            if time.monotonic() > deadline:
                failed.append(f"{path}: no time left")
                continue
            code, out = await guest_exec(send, "umount", ["-l", "--", path], timeout)
            if code == 0:
                done.append(path)
            else:
                failed.append(f"{path}: {out or f'exit {code}'}")
    except GuestAgentError as exc:
        return GuestUnmount(done, f"in-guest unmount not done: {exc}", ok=False,
                            attempted=bool(done or failed))
    except (KeyError, TypeError, ValueError) as exc:
        return GuestUnmount(done, f"in-guest unmount not done: unexpected guest agent answer: "
                                  f"{exc}", ok=False)
    if failed:
        return GuestUnmount(done, f"in-guest unmount failed at {'; '.join(failed)}", ok=False)
    return GuestUnmount(done, f"unmounted in the guest at {', '.join(done)}" if done
                        else "not mounted in the guest")


async def guest_mount(send: Send, tag: str, mount_path: str, readonly: bool,
                      timeout: float, wait: float, fresh: bool = False) -> GuestMount:
    """Mount virtiofs ``tag`` at ``mount_path`` inside the guest through its agent.

    The attach returns once QEMU has the device; the guest learns of it through an ACPI
    hot-plug moments later, and until then mounting the tag fails (EINVAL on Linux 6.1,
    "tag not found"). So a failed mount is retried for up to ``wait`` seconds.
    ``fresh``: a mount of the tag already at ``mount_path`` is of an older device (a re-export):
    unmount it rather than take it for this one.
    """
    try:
        await send({"execute": "guest-ping"})
    except GuestAgentError as exc:
        # ZStack's wording for the MN (its agent reports this as an attempted mount)
        return GuestMount(True, False, f"QGA not connected for VM, unable to mount virtiofs "
                                       f"source inside VM ({exc})")
    try:
        if mount_path in await guest_virtiofs_mounts(send, tag, timeout):
            if not fresh:
                return GuestMount(True, True, None)  # already mounted there
            await guest_exec(send, "umount", ["-l", "--", mount_path], timeout)
        code, out = await guest_exec(send, "mkdir", ["-p", "--", mount_path], timeout)
        if code != 0:
            return GuestMount(True, False, f"mkdir -p {mount_path} in the guest failed: "
                                           f"{out or f'exit {code}'}")
        args = ["-t", "virtiofs"] + (["-o", "ro"] if readonly else []) + ["--", tag, mount_path]
        deadline = time.monotonic() + wait
        while True:
            code, out = await guest_exec(send, "mount", args, timeout)
            if code == 0:
                return GuestMount(True, True, None)
            if time.monotonic() >= deadline:
                return GuestMount(True, False, f"Failed to mount virtiofs source in VM (tried "
                                               f"for {wait:g}s): {out or f'exit {code}'}")
            await asyncio.sleep(GUEST_MOUNT_RETRY)
    except GuestAgentError as exc:
        return GuestMount(True, False, f"guest agent: {exc}")
    except (KeyError, TypeError, ValueError) as exc:
        return GuestMount(True, False, f"guest agent gave an unexpected answer: {exc}")
