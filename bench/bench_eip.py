"""EIP throughput: a batch of 50 EIPs applied and deleted through the agent's HTTP API.

Baseline, measured in the same run on the same namespace world: the same mechanism calls
(``kvmagent.eip`` netlink + sysctl + nft + host firewall steps) for the same 50 EIPs done directly, one
after the other, without the agent (no HTTP, no locks, no records, no parallelism). The
ratio shows what the agent's bounded parallel batch buys over that. Also: one EIP re-applied
50 times through the agent (the idempotent "repair" path), a batch with ARP probes on, and
a batch without the host FORWARD rules (``host_firewall=False``): what those rules cost.
"""
from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from kvmagent.plugins.eip import EipTO, make_plugin

from kvmagent.core.config import AgentConfig
from kvmagent.core.server import create_app
from kvmagent.eip import netlink, nft
from kvmagent.eip.hostfw import HostFirewall
from kvmagent.eip.naming import Names
from kvmagent.eip.spec import EipSpec
from tests.eip_world import World

COUNT = 50
NOTHING = {"netns": [], "links": [], "nft": [], "iptables": {4: None, 6: None}}
PARALLEL = 8


def run() -> dict[str, object]:
    world = World()
    try:
        world.build()
        return asyncio.run(_bench(world))
    finally:
        world.destroy()


async def _bench(world: World) -> dict[str, object]:
    figures: dict[str, object] = {"eips": COUNT, "parallel": PARALLEL}
    bodies = [world.eip(i, vm=i) for i in range(COUNT)]
    specs = [EipTO.model_validate(b).to_spec() for b in bodies]

    # Baseline: the mechanism, sequential, no agent.
    firewall = HostFirewall(world.prefix)
    started = time.perf_counter()
    for spec in specs:
        await _direct_apply(spec, world.prefix, firewall)
    figures["baseline_direct_sequential_apply_eips_per_s"] = COUNT / (time.perf_counter() - started)
    assert len((await asyncio.to_thread(world.leftovers))["netns"]) == COUNT
    started = time.perf_counter()
    for spec in specs:
        await firewall.remove(spec.eip_uuid)
        await asyncio.to_thread(netlink.teardown, Names.of(world.prefix, spec.eip_uuid))
    figures["baseline_direct_sequential_delete_eips_per_s"] = COUNT / (time.perf_counter() - started)
    assert (await asyncio.to_thread(world.leftovers))["netns"] == []

    with tempfile.TemporaryDirectory(prefix="bench-eip-") as tmp:
        config = AgentConfig(listen="127.0.0.1:0", state_dir=Path(tmp) / "state",
                             models_root=Path(tmp) / "models")
        app = create_app(config, [make_plugin(prefix=world.prefix, parallel=PARALLEL)])
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            async def call(path: str, body: dict) -> dict:
                resp = await client.post(path, json=body)
                reply = await resp.json()
                assert resp.status == 200 and reply["success"], reply
                return reply

            started = time.perf_counter()
            await call("/flatnetworkprovider/eip/batchapply", {"eips": bodies})
            apply_s = time.perf_counter() - started
            assert len((await asyncio.to_thread(world.leftovers))["netns"]) == COUNT
            started = time.perf_counter()
            await call("/flatnetworkprovider/eip/batchapply", {"eips": bodies})
            reapply_s = time.perf_counter() - started
            started = time.perf_counter()
            await call("/flatnetworkprovider/eip/batchdelete", {"eips": bodies})
            delete_s = time.perf_counter() - started
            assert (await asyncio.to_thread(world.leftovers)) == NOTHING

            figures["agent_batch_apply_eips_per_s"] = COUNT / apply_s
            figures["agent_batch_reapply_eips_per_s"] = COUNT / reapply_s
            figures["agent_batch_delete_eips_per_s"] = COUNT / delete_s
            figures["ratio_batch_apply_vs_baseline"] = (
                figures["agent_batch_apply_eips_per_s"]
                / figures["baseline_direct_sequential_apply_eips_per_s"])
            figures["ratio_batch_delete_vs_baseline"] = (
                figures["agent_batch_delete_eips_per_s"]
                / figures["baseline_direct_sequential_delete_eips_per_s"])

            one = bodies[0]
            await call("/flatnetworkprovider/eip/apply", {"eip": one})
            started = time.perf_counter()
            for _ in range(COUNT):
                await call("/flatnetworkprovider/eip/apply", {"eip": one})
            figures["agent_single_eip_reapplied_sequential_per_s"] = (
                COUNT / (time.perf_counter() - started))
            await call("/flatnetworkprovider/eip/delete", {"eip": one})

            checked = [dict(b, skipArpCheck=False) for b in bodies]
            started = time.perf_counter()
            await call("/flatnetworkprovider/eip/batchapply", {"eips": checked})
            figures["agent_batch_apply_with_arp_check_eips_per_s"] = (
                COUNT / (time.perf_counter() - started))
            await call("/flatnetworkprovider/eip/batchdelete", {"eips": checked})
            assert (await asyncio.to_thread(world.leftovers)) == NOTHING
        finally:
            await client.close()
        # The same batch without the host FORWARD rules (a host where nothing drops bridged
        # traffic would not need them): what they cost.
        config = AgentConfig(listen="127.0.0.1:0", state_dir=Path(tmp) / "state-nofw",
                             models_root=Path(tmp) / "models")
        app = create_app(config, [make_plugin(prefix=world.prefix, parallel=PARALLEL,
                                              host_firewall=False)])
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            for path, key in (("batchapply", "apply"), ("batchdelete", "delete")):
                started = time.perf_counter()
                resp = await client.post(f"/flatnetworkprovider/eip/{path}", json={"eips": bodies})
                assert resp.status == 200 and (await resp.json())["success"]
                figures[f"agent_batch_{key}_without_host_rules_eips_per_s"] = (
                    COUNT / (time.perf_counter() - started))
            assert (await asyncio.to_thread(world.leftovers)) == NOTHING
            figures["ratio_batch_apply_with_vs_without_host_rules"] = (
                figures["agent_batch_apply_eips_per_s"]
                / figures["agent_batch_apply_without_host_rules_eips_per_s"])
        finally:
            await client.close()
    return figures


async def _direct_apply(spec: EipSpec, prefix: str, firewall: HostFirewall) -> None:
    names = Names.of(prefix, spec.eip_uuid)
    report = netlink.ApplyReport()
    await asyncio.to_thread(netlink.prepare, spec, names, report)
    await nft.set_sysctls(names, timeout=15)
    await nft.apply_ruleset(names, nft.build_ruleset(spec, names), timeout=15)
    await firewall.add(spec, names)
    await asyncio.to_thread(netlink.converge_links, spec, names, report, arp_timeout=0.4)


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<50} {value:.4g}" if isinstance(value, float) else f"{key:<50} {value}")
