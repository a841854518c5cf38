"""VM bookkeeping at scale: vmsync and HA reconcile over 500 domains through the agent, against
the same libvirt calls made directly in the same run. Twice: on libvirt's in-process
test:///default driver (no RPC cost), and on the real libvirtd with 500 defined, inactive
domains (real round trips)."""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import libvirt
from aiohttp.test_utils import TestClient, TestServer

from kvmagent.core.config import AgentConfig
from kvmagent.core.plugin import discover_plugins
from kvmagent.core.server import CTX, create_app
from kvmagent.vm.service import read_ha_flag, write_ha_flag
from tests.scale import TEST_URI, clear, populate

COUNT = 500
ROUNDS = 5


def _gone(exc: libvirt.libvirtError) -> bool:
    """Another user's domain vanished between the list and the call (a shared libvirtd)."""
    return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def direct_vmsync(conn: libvirt.virConnect) -> dict[str, int]:
    """The obvious loop: list, then ask each domain its state."""
    states = {}
    for dom in conn.listAllDomains():
        try:
            states[dom.name()] = dom.state()[0]
        except libvirt.libvirtError as exc:
            if not _gone(exc):
                raise
    return states


def direct_reconcile(conn: libvirt.virConnect, wanted: set[str]) -> int:
    """The obvious loop: read every domain's flag, write the ones that differ."""
    changed = 0
    for dom in conn.listAllDomains():
        want = dom.name() in wanted
        try:
            if read_ha_flag(dom) != want:
                write_ha_flag(dom, want)
                changed += 1
        except libvirt.libvirtError as exc:
            if not _gone(exc):
                raise
    return changed


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def run() -> dict[str, object]:
    figures: dict[str, object] = {"domains": COUNT}
    for label, uri in (("test", TEST_URI), ("libvirtd", "qemu:///system")):
        conn, uuids = populate(COUNT, uri)
        try:
            for key, value in asyncio.run(measure(uri, conn, uuids)).items():
                figures[f"{label}: {key}"] = value
        finally:
            clear(conn, uuids)
    return figures


async def measure(uri: str, conn: libvirt.virConnect, uuids: list[str]) -> dict[str, float]:
    config = AgentConfig(listen="127.0.0.1:0", state_dir=Path(tempfile.mkdtemp()), libvirt_uri=uri)
    plugins = [p for p in discover_plugins() if p.name in ("host", "vm")]
    client = TestClient(TestServer(create_app(config, plugins)))
    await client.start_server()
    windows = [set(uuids[i * 50: i * 50 + 250]) for i in range(ROUNDS)]

    def reset() -> None:
        for u in uuids:
            write_ha_flag(conn.lookupByName(u), False)

    async def agent_call(path: str, body: dict) -> float:
        t0 = time.perf_counter()
        resp = await client.post(path, json=body)
        assert (await resp.json())["success"]
        return time.perf_counter() - t0

    try:
        await agent_call("/vm/vmsync", {})
        sync_agent = [await agent_call("/vm/vmsync", {}) for _ in range(ROUNDS)]
        sync_direct = [timed(direct_vmsync, conn) for _ in range(ROUNDS)]
        reset()
        rec_direct = [timed(direct_reconcile, conn, w) for w in windows]
        reset()
        await client.server.app[CTX].services["vm"].ha_flags()  # warm, as in a running agent
        rec_agent = [await agent_call("/host/vm/reconcileEnableHa/live",
                                      {"haEnabledVmUuids": sorted(w)}) for w in windows]
    finally:
        await client.close()
    med = statistics.median
    return {
        "vmsync agent ms (HTTP + one getAllDomainStats)": med(sync_agent) * 1000,
        "vmsync direct loop ms (listAllDomains + state())": med(sync_direct) * 1000,
        "vmsync speedup (direct/agent)": med(sync_direct) / med(sync_agent),
        "reconcile agent ms (HTTP, cached flags, parallel writes)": med(rec_agent) * 1000,
        "reconcile direct loop ms (read all, write changed)": med(rec_direct) * 1000,
        "reconcile speedup (direct/agent)": med(rec_direct) / med(rec_agent),
    }
