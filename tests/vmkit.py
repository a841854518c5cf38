"""Booting the tiny test guest through the agent, and reading what it prints."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from .guest.build import BOOT_MARKER, GuestImage, build_guest
from .guest.domain import guest_cmdline


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()


@pytest.fixture
def workdir():
    """A directory QEMU (user libvirt-qemu) can reach; pytest's tmp_path is 0700."""
    path = Path(tempfile.mkdtemp(prefix="kvmagent-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lv():
    """A direct libvirt connection, to check what the agent did from the outside."""
    conn = libvirt.open("qemu:///system")
    made: list[str] = []
    yield conn, made
    for uuid in made:  # never leave a test's domain running
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            continue
        for step in (dom.destroy, dom.undefine):  # undefine even when destroy failed
            try:
                step()
            except libvirt.libvirtError:
                pass
    conn.close()


@dataclass
class Console:
    path: Path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self, marker: str) -> int:
        return self.text().count(marker)

    async def wait_for(self, marker: str, timeout: float = 90, occurrences: int = 1) -> float:
        """Seconds until ``marker`` appeared ``occurrences`` times in the serial log."""
        started = time.monotonic()
        while self.count(marker) < occurrences:
            if time.monotonic() - started > timeout:
                tail = "\n".join(self.text().splitlines()[-15:])
                raise AssertionError(f"{marker!r} x{occurrences} not in {self.path} after "
                                     f"{timeout}s; console tail:\n{tail}")
            await asyncio.sleep(0.2)
        return time.monotonic() - started


@dataclass
class TinyVm:
    uuid: str
    console: Console
    disk: Path
    reply: dict[str, Any]


def start_body(image: GuestImage, workdir: Path, *, uuid: str | None = None, enable_ha: bool = False,
               memory_backing: str = "default", disk_dir: Path | None = None,
               vfs_tags: tuple[str, ...] = (), guest_agent: bool = True,
               vfs_discover: bool = True) -> dict[str, Any]:
    """A /vm/start body for the tiny guest. ``guest_agent=False``: the guest runs no qemu-ga;
    ``vfs_discover=False``: its init does not mount virtiofs tags by itself."""
    uuid = uuid or uuidlib.uuid4().hex
    disk = (disk_dir or workdir) / f"{uuid}.raw"
    with open(disk, "wb") as fh:
        fh.truncate(4 * 2**20)
    return {
        "vmInstanceUuid": uuid, "vmName": f"tiny-{uuid[:8]}", "cpuNum": 1, "memory": 256 * 2**20,
        "enableHa": enable_ha, "memoryBacking": memory_backing,
        "rootVolume": {"installPath": str(disk), "format": "raw"},
        "bootKernel": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                       "cmdline": guest_cmdline(vfs_tags, " ".join(
                           ([] if guest_agent else ["kvmagent.qga=0"])
                           + ([] if vfs_discover else ["kvmagent.vfsdiscover=0"])))},
        "consoleLogPath": str(workdir / f"{uuid}.console.log"),
    }


async def boot_vm(agent, mn, lv, image: GuestImage, workdir: Path, **kwargs: Any) -> TinyVm:
    """/vm/start through the agent (as the MN does) and wait for the guest's boot marker."""
    body = start_body(image, workdir, **kwargs)
    lv[1].append(body["vmInstanceUuid"])
    reply = await agent.call_async(mn, "/vm/start", body, timeout=120)
    assert reply["success"] is True, reply
    console = Console(Path(body["consoleLogPath"]))
    await console.wait_for(BOOT_MARKER)
    return TinyVm(body["vmInstanceUuid"], console, Path(body["rootVolume"]["installPath"]), reply)


# ----- the guest agent, spoken directly (to check what the agent did inside the guest) -----
QGA_MARKER = "KVMAGENT-GUEST-QGA"


def _qga(dom: libvirt.virDomain, execute: str, **arguments: Any) -> Any:
    cmd = {"execute": execute, **({"arguments": arguments} if arguments else {})}
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), 10, 0))["return"]


async def wait_guest_agent(vm: TinyVm, dom: libvirt.virDomain, timeout: float = 60) -> None:
    """Until the guest's qemu-ga runs and libvirt has seen it connect."""
    await vm.console.wait_for(QGA_MARKER, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(_qga, dom, "guest-ping")
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def guest_run(dom: libvirt.virDomain, path: str, *args: str,
                    timeout: float = 30) -> tuple[int, str]:
    """Run a program in the guest through its agent: (exit code, stdout)."""
    pid = (await asyncio.to_thread(_qga, dom, "guest-exec", path=path, arg=list(args),
                                   **{"capture-output": True}))["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = await asyncio.to_thread(_qga, dom, "guest-exec-status", pid=pid)
        if status.get("exited"):
            out = base64.b64decode(status.get("out-data") or "").decode(errors="replace")
            return status.get("exitcode", -1), out
        assert time.monotonic() < deadline, f"{path} {args} still running in the guest"
        await asyncio.sleep(0.1)
