"""Killing a VM without depending on a responsive libvirtd.

First ``virDomainDestroy`` with a short timeout; when libvirtd does not answer (or fails), the
QEMU process is killed directly. Its pid comes from libvirt's pid file, and is only killed when
the process's command line names that very domain: a stale pid file must never make the agent
kill an unrelated process.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import libvirt
import psutil

from ..core.context import AgentContext
from ..core.errors import AgentError

log = logging.getLogger(__name__)

QEMU_PID_DIR = Path("/run/libvirt/qemu")
HOOK_VMS_KILLED = "selffencer.vms_killed"  # async fn(ctx, vm_uuids): clean-up (EIPs) after a fence
HOOKS_TIMEOUT = 60.0


def _destroy(conn: libvirt.virConnect, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


def qemu_process(name: str, pid_dir: Path = QEMU_PID_DIR) -> psutil.Process | None:
    """The QEMU process of domain ``name``, verified by its command line."""
    candidates = []
    try:
        candidates.append(int((pid_dir / f"{name}.pid").read_text().strip()))
    except (OSError, ValueError):
        pass
    for pid in candidates:
        try:
            proc = psutil.Process(pid)
            if _names_domain(proc.cmdline(), name):
                return proc
        except psutil.Error:
            continue
    for proc in psutil.process_iter(["name"]):  # no (valid) pid file: search
        try:
            if "qemu" in (proc.info["name"] or "") and _names_domain(proc.cmdline(), name):
                return proc
        except psutil.Error:
            continue
    return None


def _names_domain(cmdline: list[str], name: str) -> bool:
    for i, arg in enumerate(cmdline[:-1]):
        if arg == "-name" and cmdline[i + 1].split(",")[0] in (f"guest={name}", name):
            return True
    return False


PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()


def exiting(pid: int, proc_root: Path = Path("/proc")) -> bool:
    """True once the kernel is tearing the process down: it can never run user code again."""
    try:
        stat = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return True  # gone
    fields = stat[stat.rindex(")") + 2:].split()
    return bool(int(fields[6]) & PF_EXITING) or fields[0] in ("Z", "X")


def kill_process(name: str, wait: float) -> tuple[bool, str]:
    """SIGKILL the QEMU of ``name``. (stopped, note): stopped is True when the process is gone
    or exiting. A QEMU whose disk is on a hung FUSE/NFS mount cannot finish exiting (closing
    its files blocks in the kernel) but, once exiting, it runs no guest code."""
    proc = qemu_process(name)
    if proc is None:
        return True, ""  # nothing runs under that name
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(wait)
    except psutil.NoSuchProcess:
        return True, ""
    except psutil.TimeoutExpired:
        if exiting(proc.pid):
            return True, (f"qemu pid {proc.pid} was killed and runs no guest code, but cannot "
                          "finish exiting until the storage answers")
        return False, f"qemu pid {proc.pid} still running {wait:g}s after SIGKILL"
    return True, ""


async def kill_vm(ctx: AgentContext, name: str, libvirt_timeout: float = 3.0,
                  kill_wait: float = 3.0) -> tuple[bool, str]:
    """Make VM ``name`` stop running guest code. (stopped, note)."""
    if ctx.libvirt.available:
        try:
            await ctx.libvirt.call(_destroy, name, timeout=libvirt_timeout, what=f"destroying {name}")
            return True, ""
        except (AgentError, libvirt.libvirtError) as exc:
            log.warning("fencer: libvirt could not destroy %s (%s); killing its qemu", name, exc)
    else:
        log.warning("fencer: libvirt is down; killing the qemu of %s directly", name)
    try:
        return await ctx.runner.run(kill_process, name, kill_wait, timeout=kill_wait + 5,
                                    what=f"killing qemu of {name}")
    except (AgentError, OSError, psutil.Error) as exc:
        return False, f"cannot kill qemu of {name}: {exc}"


async def kill_and_clean_up(ctx: AgentContext, vm_uuids: list[str], who: str, why: str,
                            before_hooks: Callable[[list[str]], None] | None = None
                            ) -> tuple[list[str], list[str]]:
    """A fencer's kill: every VM in parallel (one VM's error spares no other), one log line
    naming the killed VMs ``who`` killed and ``why``, ``before_hooks(killed)`` (a report), then
    the :data:`HOOK_VMS_KILLED` hooks, bounded so clean-up never holds a fencer for ever.
    (killed uuids sorted, problems)."""
    results = await asyncio.gather(*(kill_vm(ctx, uuid) for uuid in vm_uuids),
                                   return_exceptions=True)
    killed, problems = [], []
    for uuid, result in zip(vm_uuids, results, strict=True):
        stopped, note = result if isinstance(result, tuple) else (False, f"kill failed: {result!r}")
        if stopped:
            killed.append(uuid)
        if note:
            problems.append(f"{uuid}: {note}")
    killed.sort()
    if not killed:
        return killed, problems
    log.error("%s: killed VMs %s %s", who, ", ".join(killed), why)
    if before_hooks is not None:
        before_hooks(killed)
    try:
        async with asyncio.timeout(HOOKS_TIMEOUT):
            problems += await ctx.run_hooks(HOOK_VMS_KILLED, killed)
    except TimeoutError:
        problems.append(f"clean-up hooks did not finish within {HOOKS_TIMEOUT:g}s")
    return killed, problems
