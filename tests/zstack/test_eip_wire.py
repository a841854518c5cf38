"""Flat-network EIP commands exactly as the ZStack MN sends them, against real namespaces.

Bodies: ``FlatEipBackend.ApplyEipCmd``/``DeleteEipCmd`` (``{eip: EipTO}``) and
``BatchApplyEipCmd``/``BatchDeleteEipCmd`` (``{eips: [EipTO]}``), fields in the order of
``EipTO`` (zstackio/zstack plugin/flatNetworkProvider/src/main/java/org/zstack/network/
service/flat/FlatEipBackend.java, class EipTO: eipUuid, vipUuid, vmUuid, nicUuid, ipVersion,
vip, vipNetmask, vipGateway, vipPrefixLen, nicIp, nicMac, nicGateway, nicNetmask,
nicPrefixLen, nicName, vmBridgeName, publicBridgeName, skipArpCheck, addfdb, physicalNic),
serialised by Gson (nulls left out, booleans always written) with the ``kvmHostAddons``
KVMHost appends to every body. All four paths are async (``KVMHostAsyncHttpCallMsg``); the
MN reads ``FlatNetworkServiceConstant.AgentRsp`` = ``success`` (default true) and ``error``.
Addresses and bridges are the test world's (tests/eip_world.py) so that every apply is real.
"""
from __future__ import annotations

import asyncio
import secrets

import pytest
from pyroute2 import IPRoute
from kvmagent.plugins.eip import EipTO

from kvmagent.eip.naming import mac_for

from ..eip_world import (
    CLIENT_IP,
    CLIENT_IP6,
    NIC_GATEWAY,
    NIC_GATEWAY6,
    VIP_GATEWAY,
    VIP_GATEWAY6,
    World,
    nic_ip6_of,
    nic_ip_of,
    nic_mac_of,
    tcp_exchange,
    vip6_of,
    vip_of,
)
from .wire import mn_async

pytestmark = pytest.mark.netns

APPLY = "/flatnetworkprovider/eip/apply"
DELETE = "/flatnetworkprovider/eip/delete"
BATCH_APPLY = "/flatnetworkprovider/eip/batchapply"
BATCH_DELETE = "/flatnetworkprovider/eip/batchdelete"
ADDONS = {"kvmHostAddons": {}}
V6_MASK = "ffff:ffff:ffff:ffff:0:0:0:0"   # IPv6NetworkUtils.getFormalNetmaskOfNetworkCidr


def eip_to(world: World, i: int, vm: int = 0, version: int = 4, **over) -> dict:
    """One EipTO in Gson order, as eipStructToEipTO fills it (plain vnic: addfdb false, no
    physicalNic; nicName is VmNicVO.internalName)."""
    v6 = version == 6
    body = {
        "eipUuid": secrets.token_hex(16), "vipUuid": secrets.token_hex(16),
        "vmUuid": f"{vm + 1:032x}", "nicUuid": f"{vm + 1:032x}"[::-1], "ipVersion": version,
        "vip": vip6_of(i) if v6 else vip_of(i), "vipNetmask": V6_MASK if v6 else "255.255.255.0",
        "vipGateway": VIP_GATEWAY6 if v6 else VIP_GATEWAY, "vipPrefixLen": 64 if v6 else 24,
        "nicIp": nic_ip6_of(vm) if v6 else nic_ip_of(vm), "nicMac": nic_mac_of(vm),
        "nicGateway": NIC_GATEWAY6 if v6 else NIC_GATEWAY,
        "nicNetmask": V6_MASK if v6 else "255.255.255.0", "nicPrefixLen": 64 if v6 else 24,
        "nicName": f"vnic{vm + 42}.0", "vmBridgeName": world.vm_br,
        "publicBridgeName": world.pub_br, "skipArpCheck": False, "addfdb": False,
    }
    body.update(over)
    return body


@pytest.fixture
async def agent(eip_agent):
    return await eip_agent()


async def carries(world: World, body: dict) -> None:
    """TCP from the client to the VIP reaches the VM (DNAT) and the VM's TCP to the client
    arrives from the VIP (SNAT)."""
    client_ip = CLIENT_IP6 if body["ipVersion"] == 6 else CLIENT_IP
    inbound = await asyncio.to_thread(tcp_exchange, world.vm_ns(0), body["nicIp"],
                                      world.client_ns, body["vip"], 7791)
    assert inbound["server_saw"] == client_ip, inbound
    outbound = await asyncio.to_thread(tcp_exchange, world.client_ns, client_ip,
                                       world.vm_ns(0), client_ip, 7792)
    assert outbound["server_saw"] == body["vip"], outbound


def fdb_macs(ifname: str) -> list[str]:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return [e.get("lladdr") for e in ipr.fdb("dump") if e["ifindex"] == index]


def nothing_left(world: World) -> None:
    left = world.leftovers()
    assert left == {"netns": [], "links": [], "nft": [], "iptables": {4: None, 6: None}}, left


def test_research_fixtures_validate():
    """The fixture bodies written down from FlatEipBackend (research notes, bridges as in a
    real ZStack host) pass validation unchanged, IPv6 netmask format and VF fields included."""
    v4 = {"eipUuid": "7c3e1f0a2b9d4e6f8a1b2c3d4e5f6a7b", "vipUuid": "0b6f1c2d3e4f40a1b2c3d4e5f6a7b8c9",
          "vmUuid": "5a1d2c3b4e5f46a7b8c9d0e1f2a3b4c5", "nicUuid": "9e8d7c6b5a4f43e2d1c0b9a8f7e6d5c4",
          "ipVersion": 4, "vip": "172.20.51.136", "vipNetmask": "255.255.0.0",
          "vipGateway": "172.20.0.1", "vipPrefixLen": 16, "nicIp": "192.168.10.25",
          "nicMac": "fa:a4:3c:6e:1d:00", "nicGateway": "192.168.10.1",
          "nicNetmask": "255.255.255.0", "nicPrefixLen": 24, "nicName": "vnic42.0",
          "vmBridgeName": "br_eth1_100", "publicBridgeName": "br_eth0", "skipArpCheck": False,
          "addfdb": False}
    spec = EipTO.model_validate(v4).to_spec()
    assert (spec.vip_prefixlen, spec.nic_prefixlen, spec.fdb_nic) == (16, 24, None)
    v6 = dict(v4, ipVersion=6, vip="2001:db8:20::88", vipNetmask=V6_MASK,
              vipGateway="2001:db8:20::1", vipPrefixLen=64, nicIp="2001:db8:10::25",
              nicGateway="2001:db8:10::1", nicNetmask=V6_MASK, nicPrefixLen=64,
              addfdb=True, physicalNic="enp59s0f0")
    spec = EipTO.model_validate(v6).to_spec()
    assert (spec.ip_version, spec.vip_prefixlen, spec.fdb_nic) == (6, 64, "enp59s0f0")


async def test_apply_and_delete_ipv4(agent, world, mn):
    body = eip_to(world, 0, skipArpCheck=True)      # single apply: struct.isSkipArpCheck()
    reply = await mn_async(agent, mn, APPLY, {"eip": body, **ADDONS}, resource=body["vmUuid"])
    assert reply.get("success", True) is True and not reply.get("error"), reply
    await carries(world, body)
    # Delete bodies are as complete as apply bodies (eipStructToEipTO on the same struct).
    reply = await mn_async(agent, mn, DELETE, {"eip": body, **ADDONS})
    assert reply.get("success", True) is True and not reply.get("error"), reply
    await asyncio.to_thread(nothing_left, world)
    # revoke of an EIP this host does not have (GC retry, host reconnect): still success
    reply = await mn_async(agent, mn, DELETE, {"eip": body, **ADDONS})
    assert reply.get("success", True) is True, reply


async def test_apply_and_delete_ipv6(agent, world, mn):
    body = eip_to(world, 0, version=6)
    reply = await mn_async(agent, mn, APPLY, {"eip": body, **ADDONS})
    assert reply.get("success", True) is True and not reply.get("error"), reply
    await carries(world, body)
    reply = await mn_async(agent, mn, DELETE, {"eip": body, **ADDONS})
    assert reply.get("success", True) is True, reply
    await asyncio.to_thread(nothing_left, world)


async def test_batchapply_and_batchdelete(agent, world, mn):
    """Host connect / VM start: batch bodies carry skipArpCheck false; an empty list
    (transformToList skipped every NIC) is success too."""
    await asyncio.to_thread(world.add_vm, 1)
    v4, v6 = eip_to(world, 0), eip_to(world, 1, vm=1, version=6)
    reply = await mn_async(agent, mn, BATCH_APPLY, {"eips": [v4, v6], **ADDONS})
    assert reply.get("success", True) is True and not reply.get("error"), reply
    await carries(world, v4)
    reply = await mn_async(agent, mn, BATCH_APPLY, {"eips": [v4, v6], **ADDONS})   # reconnect
    assert reply.get("success", True) is True, reply
    await carries(world, v4)
    reply = await mn_async(agent, mn, BATCH_DELETE, {"eips": [v4, v6], **ADDONS})
    assert reply.get("success", True) is True, reply
    await asyncio.to_thread(nothing_left, world)
    for path in (BATCH_APPLY, BATCH_DELETE):
        reply = await mn_async(agent, mn, path, {"eips": [], **ADDONS})
        assert reply.get("success", True) is True, reply


async def test_vf_nic_gets_an_fdb_entry(agent, world, mn):
    """VmVfNicFactory: addfdb true and physicalNic the VF's interface."""
    nic = await asyncio.to_thread(world.add_nic, "vf")
    body = eip_to(world, 0, addfdb=True, physicalNic=nic)
    reply = await mn_async(agent, mn, APPLY, {"eip": body, **ADDONS})
    assert reply.get("success", True) is True, reply
    assert mac_for(body["eipUuid"], "vn") in await asyncio.to_thread(fdb_macs, nic)
    reply = await mn_async(agent, mn, DELETE, {"eip": body, **ADDONS})
    assert reply.get("success", True) is True, reply
    assert mac_for(body["eipUuid"], "vn") not in await asyncio.to_thread(fdb_macs, nic)
    await asyncio.to_thread(nothing_left, world)


async def test_errors_reach_the_mn_as_success_false(agent, world, mn):
    """The MN turns success=false into operr("operation error, because:%s", error): the
    error must say what is wrong; nothing is left behind."""
    body = eip_to(world, 0, publicBridgeName="br_nosuch0")
    reply = await mn_async(agent, mn, APPLY, {"eip": body, **ADDONS})
    assert reply["success"] is False and "publicBridgeName" in reply["error"], reply
    body = eip_to(world, 0, version=6, vip="198.51.100.77")
    reply = await mn_async(agent, mn, APPLY, {"eip": body, **ADDONS})
    assert reply["success"] is False and "vip" in reply["error"], reply
    good, bad = eip_to(world, 0), eip_to(world, 1, vmBridgeName="br_nosuch1")
    reply = await mn_async(agent, mn, BATCH_APPLY, {"eips": [good, bad], **ADDONS})
    assert reply["success"] is False and bad["eipUuid"] in reply["error"], reply
    assert "vmBridgeName" in reply["error"], reply
    await carries(world, good)                    # the valid one is applied anyway
    reply = await mn_async(agent, mn, BATCH_DELETE, {"eips": [good, bad], **ADDONS})
    assert reply.get("success", True) is True, reply
    await asyncio.to_thread(nothing_left, world)
