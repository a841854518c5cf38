"""Virtiofs: attach-to-visible-in-guest through the agent, against a plain libvirt
attachDeviceFlags of the same device XML, in the same run on the same tiny guest (TCG).

"Visible" is the guest printing ``VIRTIOFS-READ <tag> ...`` on its serial console: it found
the new device, mounted the tag and read a file. The guest looks for new tags every 0.5 s,
which bounds the resolution of both figures alike. The agent's attach also makes the
read-only bind mount, records the share and asks the guest agent (the guest runs without
qemu-ga here, so libvirt answers at once and both sides do the same work in the guest).
Detach is measured the same way, until the device left the live XML.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import libvirt
from aiohttp.test_utils import TestClient, TestServer

from kvmagent.core.config import AgentConfig
from kvmagent.core.plugin import discover_plugins
from kvmagent.core.server import create_app
from kvmagent.virtiofs.domain_xml import shares_in_xml
from kvmagent.vm.config import VirtiofsShare
from tests.guest.build import BOOT_MARKER, build_guest
from tests.vmkit import Console, start_body

MODEL_CENTER = "0c0ffee0" * 4
ROUNDS = 5


def run() -> dict[str, object]:
    return asyncio.run(measure())


async def wait_console(console: Console, marker: str, timeout: float = 60) -> float:
    t0 = time.perf_counter()
    while marker not in console.text():
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{marker!r} not seen within {timeout}s")
        await asyncio.sleep(0.02)
    return time.perf_counter() - t0


async def measure() -> dict[str, object]:
    image = build_guest()
    base = Path(tempfile.mkdtemp(prefix="kvmagent-bench-vfs-"))
    os.chmod(base, 0o755)
    models, store = base / "models", base / "store"
    store.mkdir()
    # The model center: a file:// store bind-mounted by the agent at <models>/<MODEL_CENTER>.
    config = AgentConfig(listen="127.0.0.1:0", state_dir=base / "state", domain_type="qemu",
                         models_root=models, vm_path_roots=[base, image.kernel.parent],
                         modelcenter_file_roots=[store])
    plugins = discover_plugins(["host", "vm", "modelcenter", "virtiofs"])
    client = TestClient(TestServer(create_app(config, plugins)))
    await client.start_server()
    conn = libvirt.open("qemu:///system")
    body = start_body(image, base, memory_backing="memfd-shared", guest_agent=False)
    uuid = body["vmInstanceUuid"]
    console = Console(Path(body["consoleLogPath"]))

    async def call(path: str, data: dict) -> dict:
        resp = await client.post(path, json=data)
        reply = await resp.json()
        if not reply.get("success"):
            raise RuntimeError(f"{path}: {reply}")
        return reply

    agent_attach, agent_visible, agent_detach = [], [], []
    direct_attach, direct_visible, direct_detach = [], [], []
    try:
        await call("/modelcenter/mount", {"modelCenterUuid": MODEL_CENTER, "storageUrl": f"file://{store}"})
        await call("/vm/start", body)
        await wait_console(console, BOOT_MARKER, 120)
        dom = conn.lookupByUUIDString(uuid)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG

        async def gone(tag: str) -> None:
            while any(s.tag == tag for s in shares_in_xml(dom.XMLDesc(0))):
                await asyncio.sleep(0.02)

        for i in range(ROUNDS):
            for who in (("agent", "direct") if i % 2 == 0 else ("direct", "agent")):
                tag = f"{who}{i}"
                (store / tag).mkdir()
                (store / tag / "weights.txt").write_text(f"{tag}\n")
                # The agent shares it through the model center; libvirt directly from the store.
                source = models / MODEL_CENTER / tag if who == "agent" else store / tag
                marker = f"VIRTIOFS-READ {tag} weights.txt {tag}"
                t0 = time.perf_counter()
                if who == "agent":
                    await call("/virtiofs/attach", {"vmInstanceUuid": uuid, "tag": tag,
                                                    "sourcePath": str(source),
                                                    "mountPath": f"/models/{tag}"})
                    agent_attach.append(time.perf_counter() - t0)
                    await wait_console(console, marker)
                    agent_visible.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    await call("/virtiofs/detach", {"vmInstanceUuid": uuid, "tag": tag})
                    agent_detach.append(time.perf_counter() - t0)
                else:
                    xml = VirtiofsShare(source_dir=str(source), tag=tag, readonly=False).to_xml()
                    await asyncio.to_thread(dom.attachDeviceFlags, xml, flags)
                    direct_attach.append(time.perf_counter() - t0)
                    await wait_console(console, marker)
                    direct_visible.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    live = next(s for s in shares_in_xml(dom.XMLDesc(0)) if s.tag == tag)
                    await asyncio.to_thread(dom.detachDeviceFlags, VirtiofsShare(
                        source_dir=live.source_dir, tag=tag, readonly=False).to_xml(), flags)
                    await gone(tag)
                    direct_detach.append(time.perf_counter() - t0)
                await wait_console(console, f"VIRTIOFS-GONE {tag}")
    finally:
        for path, data in (("/vm/destroy", {"uuid": uuid}),
                           ("/modelcenter/umount", {"modelCenterUuid": MODEL_CENTER, "force": True})):
            try:
                await call(path, data)
            except Exception as exc:
                print(f"   cleanup {path} failed: {exc}")
        await client.close()
        conn.close()
        shutil.rmtree(base, ignore_errors=True)
    med = statistics.median
    return {
        "rounds": ROUNDS,
        "attach call agent ms (HTTP, checks, ro bind, libvirt, QGA probe)": med(agent_attach) * 1000,
        "attach call direct ms (attachDeviceFlags)": med(direct_attach) * 1000,
        "attach->read in guest agent s": med(agent_visible),
        "attach->read in guest direct s": med(direct_visible),
        "attach->read overhead agent-direct ms": (med(agent_visible) - med(direct_visible)) * 1000,
        "detach until released agent s (waits for device-removed)": med(agent_detach),
        "detach until gone from XML direct s": med(direct_detach),
    }
