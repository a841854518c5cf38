"""Flat-network EIPs with real traffic between namespaces (see tests/eip_world.py)."""
from __future__ import annotations

import asyncio
import secrets

import pytest

from kvmagent.eip import nft as eipnft
from kvmagent.eip.spec import EipSpec
from kvmagent.plugins import host as host_plugin
from kvmagent.plugins.eip import make_plugin

from .eip_world import (CLIENT_IP, World, nic_ip_of, ns_nft_rules, ns_run, ping_through,
                        root_link_exists, tcp_exchange, vip_of, wait_for)

pytestmark = pytest.mark.netns

APPLY = "/flatnetworkprovider/eip/apply"
DELETE = "/flatnetworkprovider/eip/delete"
BATCH_APPLY = "/flatnetworkprovider/eip/batchapply"
BATCH_DELETE = "/flatnetworkprovider/eip/batchdelete"
SYNC = "/flatnetworkprovider/eip/sync"


@pytest.fixture
def world():
    w = World()
    try:
        w.build()
        w.add_vm(0)
        yield w
    finally:
        w.destroy()


@pytest.fixture
def eip_agent(make_agent, world):
    """``await eip_agent()``: an agent with the host and EIP plugins, EIP names prefixed with
    the world's random prefix. Called again in one test, it shares the state dir (restart)."""
    async def factory(**settings):
        return await make_agent(plugins=[host_plugin.plugin,
                                         make_plugin(prefix=world.prefix, **settings)])
    return factory


def manager(agent):
    return agent.ctx.services["eip"]


def expected_rules(world: World, body: dict) -> int:
    spec = EipSpec.from_dict({k: body[c] for k, c in _FIELDS.items()})
    return eipnft.rule_count(eipnft.build_ruleset(spec, _names(world, body)))


_FIELDS = {"eip_uuid": "eipUuid", "vm_uuid": "vmUuid", "vip": "vip", "vip_netmask": "vipNetmask",
           "vip_gateway": "vipGateway", "public_bridge_name": "publicBridgeName",
           "nic_uuid": "nicUuid", "nic_mac": "nicMac", "nic_ip": "nicIp",
           "nic_netmask": "nicNetmask", "nic_gateway": "nicGateway",
           "vm_bridge_name": "vmBridgeName"}


def _names(world: World, body: dict):
    from kvmagent.eip.naming import Names
    return Names.of(world.prefix, body["eipUuid"])


async def traffic(world: World, body: dict, vm: int = 0) -> None:
    """DNAT in (ping + TCP answered by the VM namespace) and SNAT out (VM -> client)."""
    vm_ns = world.vm_ns(vm)
    ping = await asyncio.to_thread(ping_through, world.client_ns, body["vip"], vm_ns)
    assert ping == {"reply_from": body["vip"], "vm_saw_dst": body["nicIp"],
                    "vm_saw_src": CLIENT_IP}, ping
    inbound = await asyncio.to_thread(tcp_exchange, vm_ns, body["nicIp"], world.client_ns,
                                      body["vip"])
    assert inbound["answered_by"] == vm_ns and inbound["server_saw"] == CLIENT_IP, inbound
    outbound = await asyncio.to_thread(tcp_exchange, world.client_ns, CLIENT_IP, vm_ns,
                                       CLIENT_IP, 7778)
    assert outbound["server_saw"] == body["vip"], outbound          # SNAT to the VIP
    assert outbound["client_local"] == body["nicIp"], outbound      # the VM used its own IP


async def assert_gone(world: World, agent, body: dict) -> None:
    left = await asyncio.to_thread(world.leftovers)
    assert left == {"netns": [], "links": [], "nft": []}, left
    observed = await manager(agent).observe(body["eipUuid"])
    assert observed.empty, observed
    assert body["eipUuid"] not in manager(agent).records
    assert agent.ctx.state.load(f"eips/{body['eipUuid']}") is None


async def assert_one_copy(world: World, agent, body: dict) -> None:
    names = _names(world, body)
    obs = await manager(agent).observe(body["eipUuid"])
    assert obs.netns
    assert sorted(obs.root_links) == sorted([names.pub_host, names.vm_host])
    assert obs.root_links[names.pub_host]["master"] is not None
    assert sorted(obs.ns_links) == sorted(["lo", names.pub_ns, names.vm_ns])
    assert obs.addresses == sorted([
        "lo:127.0.0.1/8", f"{names.pub_ns}:{body['vip']}/24",
        f"{names.vm_ns}:{body['nicGateway']}/24"]), obs.addresses
    assert obs.neighbours == [(body["nicIp"], body["nicMac"])]
    assert obs.default_routes == [f"{body['vipGateway']}@{names.pub_ns}"]
    rules = await asyncio.to_thread(ns_nft_rules, names.netns)
    assert len(rules) == expected_rules(world, body)
    left = await asyncio.to_thread(world.leftovers)
    assert left["netns"] == [names.netns] and left["nft"] == [], left


async def test_apply_carries_traffic_and_delete_leaves_nothing(eip_agent, world, mn):
    agent = await eip_agent()
    body = world.eip(0)
    reply = await agent.call_async(mn, APPLY, {"eip": body})
    assert reply == {"success": True, "error": None}, reply
    await assert_one_copy(world, agent, body)
    await traffic(world, body)
    record = agent.ctx.state.load(f"eips/{body['eipUuid']}")
    assert record["status"] == "applied" and record["spec"]["vip"] == body["vip"]

    reply = await agent.call_async(mn, DELETE, {"eip": body})
    assert reply == {"success": True, "error": None}, reply
    await assert_gone(world, agent, body)
