"""Flat-network EIPs with real traffic between namespaces (see tests/eip_world.py)."""
from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import subprocess

import pytest
from kvmagent.plugins.eip import make_plugin

from kvmagent.eip import nft as eipnft
from kvmagent.eip.hostfw import HostFirewall, chain_name
from kvmagent.eip.naming import Names, mac_for
from kvmagent.eip.spec import EipSpec
from kvmagent.ha.fencer import HOOK_VMS_KILLED

from .eip_world import (
    CLIENT_IP,
    CLIENT_IP6,
    FirewallLab,
    World,
    arp_ask,
    async_wait_for,
    host_forward_drops,
    ns_nft_rules,
    ns_run,
    ping_through,
    root_link_exists,
    tcp_exchange,
    vip_of,
    wait_for,
)

pytestmark = pytest.mark.netns

APPLY = "/flatnetworkprovider/eip/apply"
DELETE = "/flatnetworkprovider/eip/delete"
BATCH_APPLY = "/flatnetworkprovider/eip/batchapply"
BATCH_DELETE = "/flatnetworkprovider/eip/batchdelete"
SYNC = "/flatnetworkprovider/eip/sync"


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


def host_rules(world: World, body: dict) -> list[str]:
    """The host FORWARD accepts of one IPv4 EIP as ``iptables -S`` prints them."""
    names, chain = _names(world, body), chain_name(world.prefix)
    return [f"-A {chain} -d {body['vip']}/32 -m physdev --physdev-out {names.pub_host} -j ACCEPT",
            f"-A {chain} -s {body['vip']}/32 -m physdev --physdev-in {names.pub_host} -j ACCEPT",
            f"-A {chain} -s {body['nicIp']}/32 -m physdev --physdev-out {names.vm_host} -j ACCEPT",
            f"-A {chain} -d {body['nicIp']}/32 -m physdev --physdev-in {names.vm_host} -j ACCEPT"]


def _names(world: World, body: dict):
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
    assert left == {"netns": [], "links": [], "nft": [],
                    "iptables": {4: None, 6: None}}, left
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
    assert all(link["up"] for link in obs.root_links.values())
    assert all(link["up"] for link in obs.ns_links.values())
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
    assert sorted(left["iptables"][4] or []) == sorted(host_rules(world, body)), left


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


async def test_apply_twice_is_one_copy_and_reapply_updates(eip_agent, world):
    agent = await eip_agent()
    body = world.eip(0)
    for _ in range(2):
        assert (await agent.call(APPLY, {"eip": body}))["success"]
    await assert_one_copy(world, agent, body)
    await traffic(world, body)
    # Same EIP, another VIP: the old address, rules and ARP answers go, one copy of the new.
    moved = dict(body, vip=vip_of(1))
    assert (await agent.call(APPLY, {"eip": moved}))["success"]
    await assert_one_copy(world, agent, moved)
    await traffic(world, moved)
    assert (await agent.call(DELETE, {"eip": moved}))["success"]
    await assert_gone(world, agent, moved)


async def test_delete_of_absent_eip_succeeds(eip_agent, world):
    agent = await eip_agent()
    body = world.eip(0)
    for _ in range(2):
        reply = await agent.call(DELETE, {"eip": body})
        assert reply == {"success": True, "error": None}
    await assert_gone(world, agent, body)


async def test_apply_repairs_half_built_eip(eip_agent, world):
    agent = await eip_agent()
    body = world.eip(0)
    names = _names(world, body)
    assert (await agent.call(APPLY, {"eip": body}))["success"]

    # 1. The namespace end of the VM-side veth is deleted by hand: its peer goes with it.
    await asyncio.to_thread(ns_run, names.netns, "ip", "link", "del", names.vm_ns)
    assert not await asyncio.to_thread(root_link_exists, names.vm_host)
    # 2. The host end of the public veth too, 3. the VIP address, 4. the whole ruleset.
    await asyncio.to_thread(lambda: __import__("subprocess").run(
        ["ip", "link", "del", names.pub_host], check=True))
    await asyncio.to_thread(ns_run, names.netns, "nft", "flush", "ruleset")
    broken = await asyncio.to_thread(ping_through, world.client_ns, body["vip"],
                                     world.vm_ns(0), 1.0)
    assert broken == {}, broken

    assert (await agent.call(APPLY, {"eip": body}))["success"]
    await assert_one_copy(world, agent, body)
    await traffic(world, body)

    # A stray address and a foreign permanent neighbour in the namespace are removed too.
    await asyncio.to_thread(ns_run, names.netns, "ip", "addr", "add", "198.51.100.99/24",
                            "dev", names.pub_ns)
    await asyncio.to_thread(ns_run, names.netns, "ip", "neigh", "add", "10.77.0.99", "lladdr",
                            "02:00:00:00:00:99", "dev", names.vm_ns, "nud", "permanent")
    result = await agent.call(SYNC, {})
    assert result["success"] and result["repaired"] == [body["eipUuid"]], result
    await assert_one_copy(world, agent, body)
    assert (await agent.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, agent, body)


async def test_apply_racing_delete_ends_in_the_last_state(eip_agent, world, mn):
    agent = await eip_agent()
    body = world.eip(0)
    eip_uuid = body["eipUuid"]
    mgr = manager(agent)
    for rnd in range(20):
        if rnd % 5 == 4:  # some rounds through the MN callback path
            send = [lambda: agent.call_async(mn, APPLY, {"eip": body}),
                    lambda: agent.call_async(mn, DELETE, {"eip": body})]
        else:
            send = [lambda: agent.call(APPLY, {"eip": body}),
                    lambda: agent.call(DELETE, {"eip": body})]
        if rnd % 2:
            send.reverse()
        replies = await asyncio.gather(*(fn() for fn in send))
        assert all(r["success"] for r in replies), replies
        ops = [h for h in mgr.history if h["eip"] == eip_uuid]
        # Serialised: each operation started after the previous one ended.
        for before, after in itertools.pairwise(ops):
            assert after["start"] >= before["end"], (before, after)
        last = ops[-1]["op"]
        if last == "apply":
            await assert_one_copy(world, agent, body)
            assert mgr.records[eip_uuid]["status"] == "applied"
        else:
            await assert_gone(world, agent, body)
    # Whatever the last round left, an apply then works and a delete leaves nothing.
    assert (await agent.call(APPLY, {"eip": body}))["success"]
    await traffic(world, body)
    assert (await agent.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, agent, body)


async def test_delete_arriving_during_apply_runs_after_it(eip_agent, world, mn):
    agent = await eip_agent()
    body = world.eip(0, skipArpCheck=False)  # the ARP probe makes the apply take a while
    names = _names(world, body)
    apply_task = asyncio.ensure_future(agent.call_async(mn, APPLY, {"eip": body}))
    assert await asyncio.to_thread(wait_for, lambda: agent.ctx.locks.locked("eip", names.netns))
    delete_reply = await agent.call_async(mn, DELETE, {"eip": body})
    assert (await apply_task)["success"] and delete_reply["success"]
    ops = [(h["op"], h["ok"]) for h in manager(agent).history]
    assert ops == [("apply", True), ("delete", True)], ops
    await assert_gone(world, agent, body)


async def test_failed_apply_rolls_back(eip_agent, world):
    agent = await eip_agent()
    body = world.eip(0, skipArpCheck=False)
    # Someone on the public network already holds the VIP: the ARP probe sees it.
    await asyncio.to_thread(ns_run, world.client_ns, "ip", "addr", "add", f"{body['vip']}/24",
                            "dev", f"{world.tag}c1")
    reply = await agent.call(APPLY, {"eip": body})
    assert not reply["success"] and "already in use" in reply["error"], reply
    assert body["vip"] in reply["error"] and "skipArpCheck" in reply["error"]
    await assert_gone(world, agent, body)   # namespace and veths it had made are gone

    await asyncio.to_thread(ns_run, world.client_ns, "ip", "addr", "del", f"{body['vip']}/24",
                            "dev", f"{world.tag}c1")
    assert (await agent.call(APPLY, {"eip": body}))["success"]
    await traffic(world, body)
    # A re-apply that fails (its VM bridge is gone) leaves the applied EIP as it was.
    broken = dict(body, vmBridgeName="nosuchbr0")
    reply = await agent.call(APPLY, {"eip": broken})
    assert not reply["success"] and "vmBridgeName 'nosuchbr0'" in reply["error"], reply
    assert manager(agent).records[body["eipUuid"]]["status"] == "applied"
    assert manager(agent).records[body["eipUuid"]]["spec"]["vm_bridge_name"] == world.vm_br
    await assert_one_copy(world, agent, body)
    await traffic(world, body)
    # A re-apply moving the EIP to a VIP someone holds fails after the ruleset was already
    # rewritten for it: the rollback converges back to the applied VIP.
    taken = vip_of(5)
    await asyncio.to_thread(ns_run, world.client_ns, "ip", "addr", "add", f"{taken}/24",
                            "dev", f"{world.tag}c1")
    reply = await agent.call(APPLY, {"eip": dict(body, vip=taken)})
    assert not reply["success"] and "already in use" in reply["error"], reply
    assert manager(agent).records[body["eipUuid"]]["spec"]["vip"] == body["vip"]
    await assert_one_copy(world, agent, body)
    await traffic(world, body)
    assert (await agent.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, agent, body)


async def test_restarted_agent_knows_repairs_and_deletes(eip_agent, world):
    first = await eip_agent()
    body = world.eip(0)
    names = _names(world, body)
    # Two more EIPs whose records say the agent died in the middle of working on them.
    died_deleting, died_applying = world.eip(1, vm=1), world.eip(2, vm=2)
    for other in (body, died_deleting, died_applying):
        assert (await first.call(APPLY, {"eip": other}))["success"]
    await first.client.close()                      # the agent stops; the EIPs stay
    for other, status in ((died_deleting, "deleting"), (died_applying, "applying")):
        doc = f"eips/{other['eipUuid']}"
        first.ctx.state.save(doc, dict(first.ctx.state.load(doc), status=status,
                                       wasApplied=False))
    await traffic(world, body)
    await asyncio.to_thread(ns_run, names.netns, "ip", "link", "del", names.pub_ns)

    second = await eip_agent()                      # same state dir
    mgr = manager(second)
    await asyncio.wait_for(mgr.restored.wait(), 30)
    assert mgr.applied() == [body["eipUuid"]]
    for other in (died_deleting, died_applying):    # finished: removed, not resurrected
        assert (await mgr.observe(other["eipUuid"])).empty
        assert second.ctx.state.load(f"eips/{other['eipUuid']}") is None
    restore = [h for h in mgr.history if h["op"] == "restore"]
    assert restore and restore[-1]["ok"], list(mgr.history)
    await assert_one_copy(world, second, body)
    await traffic(world, body)
    sync = await second.call(SYNC, {})
    assert sync["success"] and sync["eips"] == [body["eipUuid"]] and sync["repaired"] == []
    assert (await second.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, second, body)


async def test_selffencer_hook_deletes_eips_of_killed_vms(eip_agent, world):
    agent = await eip_agent()
    await asyncio.to_thread(world.add_vm, 1)
    killed = world.eip(0, vm=0)
    survivor = world.eip(1, vm=1)
    for body in (killed, survivor):
        assert (await agent.call(APPLY, {"eip": body}))["success"]
    errors = await agent.ctx.run_hooks(HOOK_VMS_KILLED, [killed["vmUuid"]])
    assert errors == []
    assert killed["eipUuid"] not in manager(agent).records
    obs = await manager(agent).observe(killed["eipUuid"])
    assert obs.empty
    await assert_one_copy(world, agent, survivor)
    await traffic(world, survivor, vm=1)
    assert (await agent.call(DELETE, {"eip": survivor}))["success"]
    await assert_gone(world, agent, survivor)


async def test_batch_apply_reports_failed_eips_and_batch_delete(eip_agent, world, mn):
    agent = await eip_agent(parallel=4)
    for k in range(1, 4):
        await asyncio.to_thread(world.add_vm, k)
    good = [world.eip(i, vm=i) for i in range(12)]  # VMs 4-11 need no namespace: no traffic
    bad = world.eip(20, vm=20, vmBridgeName="nosuchbr1")
    reply = await agent.call_async(mn, BATCH_APPLY, {"eips": good[:6] + [bad] + good[6:]})
    assert reply["success"] is False, reply
    assert [f["eipUuid"] for f in reply["failedEips"]] == [bad["eipUuid"]], reply
    assert "1 of 13 EIPs failed" in reply["error"] and "nosuchbr1" in reply["error"]
    assert manager(agent).applied() == sorted(b["eipUuid"] for b in good)
    for k, body in enumerate(good[:4]):  # each VIP reaches its own VM
        await traffic(world, body, vm=k)
    # The event loop stays free while a batch works: the agent answers at once meanwhile.
    more = [world.eip(30 + i, vm=30 + i) for i in range(8)]
    batch = asyncio.ensure_future(agent.call(BATCH_APPLY, {"eips": more}))
    slowest = 0.0
    while not batch.done():
        started = asyncio.get_running_loop().time()
        assert (await agent.call("/host/echo", {}))["success"]
        slowest = max(slowest, asyncio.get_running_loop().time() - started)
        await asyncio.sleep(0.01)
    assert (await batch)["success"]
    assert slowest < 0.25, slowest
    good += more
    # Ran in parallel, but never more than `parallel` at once.
    spans = [(h["began"], h["end"]) for h in manager(agent).history if h["op"] == "apply"]
    peak = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert 1 < peak <= 4, peak

    reply = await agent.call_async(mn, BATCH_DELETE, {"eips": good + [bad]})
    assert reply == {"success": True, "error": None, "failedEips": []}, reply
    left = await asyncio.to_thread(world.leftovers)
    assert left == {"netns": [], "links": [], "nft": [],
                    "iptables": {4: None, 6: None}}, left
    assert manager(agent).records == {}


async def test_sync_removes_orphans_only(eip_agent, world, make_agent, tmp_path):
    agent = await eip_agent()
    kept = world.eip(0)
    assert (await agent.call(APPLY, {"eip": kept}))["success"]
    # An agent that lost its state dir left an EIP namespace behind, and a stray link.
    lost = await make_agent(plugins=[make_plugin(prefix=world.prefix)],
                            state_dir=tmp_path / "lost-state")
    orphan = world.eip(1)
    assert (await lost.call(APPLY, {"eip": orphan}))["success"]
    await lost.client.close()
    stray = _names(world, world.eip(2)).pub_host
    await asyncio.to_thread(lambda: __import__("subprocess").run(
        ["ip", "link", "add", stray, "type", "bridge"], check=True))
    orphan_names = _names(world, orphan)

    reply = await agent.call(SYNC, {})
    assert reply["success"], reply
    assert reply["eips"] == [kept["eipUuid"]]
    assert reply["orphansRemoved"] == sorted(
        [orphan_names.pub_host, orphan_names.vm_host, f"netns {orphan_names.netns}", stray])
    left = await asyncio.to_thread(world.leftovers)
    assert left["netns"] == [_names(world, kept).netns] and left["nft"] == [], left
    await assert_one_copy(world, agent, kept)
    await traffic(world, kept)
    assert (await agent.call(DELETE, {"eip": kept}))["success"]
    await assert_gone(world, agent, kept)


BAD_FIELDS = [
    ("eipUuid", "not-a-uuid"), ("vmUuid", ""), ("nicUuid", "../../etc"),
    ("vip", "198.51.100.300"), ("vip", "224.0.0.1"), ("vipGateway", "gateway"),
    ("vipNetmask", "255.0.255.0"), ("nicNetmask", "255.255.255.255"),
    ("nicMac", "02:00:00:00:00"), ("nicMac", "01:00:5e:00:00:01"),
    ("nicIp", "10.77.0.5; rm -rf /"), ("nicGateway", "10.78.0.1"),
    ("publicBridgeName", "br-with-a-very-long-name"), ("publicBridgeName", "br0\"; drop"),
    ("vmBridgeName", "../x"), ("vipGateway", "198.51.101.1"), ("nicIp", "10.77.0.255"),
    # `$` of Python's re matches before a final newline: the checks must not let one through
    ("eipUuid", "a" * 32 + "\n"), ("publicBridgeName", "br0\n"), ("nicMac", "02:77:00:00:00:00\n"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
async def test_bad_input_is_400_naming_the_field(eip_agent, world, field, value):
    agent = await eip_agent()
    body = world.eip(0, **{field: value})
    status, reply = await agent.post(APPLY, {"eip": body})
    assert status == 400 and reply["success"] is False, (status, reply)
    assert field in reply["error"], reply
    # In a batch, the invalid entry is reported (naming its field) and the valid one applied.
    good = world.eip(1)
    status, reply = await agent.post(BATCH_APPLY, {"eips": [good, body]})
    assert status == 200 and reply["success"] is False, (status, reply)
    [failed] = reply["failedEips"]
    assert failed["error"].startswith("eips[1]: ") and field in failed["error"], failed
    assert "'body'" not in failed["error"], failed
    assert field in reply["error"] and "1 of 2 EIPs failed" in reply["error"], reply
    assert manager(agent).applied() == [good["eipUuid"]]
    assert (await agent.call(DELETE, {"eip": good}))["success"]
    left = await asyncio.to_thread(world.leftovers)
    assert left == {"netns": [], "links": [], "nft": [],
                    "iptables": {4: None, 6: None}}, left
    assert manager(agent).records == {} and agent.ctx.state.names("eips") == []


async def test_batch_body_that_is_not_a_list_is_400(eip_agent, world):
    agent = await eip_agent()
    for path in (BATCH_APPLY, BATCH_DELETE):
        for eips in ({"eipUuid": "a" * 32}, "all", 7):
            status, reply = await agent.post(path, {"eips": eips})
            assert status == 400 and "eips" in reply["error"], (path, eips, reply)


async def test_delete_needs_only_the_eip_uuid(eip_agent, world):
    agent = await eip_agent()
    await asyncio.to_thread(world.add_vm, 1)
    body, other = world.eip(0), world.eip(1, vm=1)
    for b in (body, other):
        assert (await agent.call(APPLY, {"eip": b}))["success"]
    # A stale object from the MN: only the uuid, and fields that would not even validate.
    stale = {"eipUuid": body["eipUuid"].upper(), "vip": "not-an-ip", "nicMac": "zz"}
    reply = await agent.call(DELETE, {"eip": stale})
    assert reply == {"success": True, "error": None}, reply
    assert body["eipUuid"] not in manager(agent).records
    # Unknown uuid, partial object: success (absent is success).
    reply = await agent.call(DELETE, {"eip": {"eipUuid": secrets.token_hex(16), "vip": "x"}})
    assert reply == {"success": True, "error": None}, reply
    # Without the uuid there is nothing to delete: 400 naming the field.
    status, reply = await agent.post(DELETE, {"eip": {"vip": body["vip"]}})
    assert status == 400 and "eipUuid" in reply["error"], reply
    # A batch delete: partial entries work, broken ones are listed, the rest is deleted.
    reply = await agent.call(BATCH_DELETE, {"eips": [{"eipUuid": other["eipUuid"]},
                                                     {"vip": other["vip"]}, "junk",
                                                     {"eipUuid": "nope"}]})
    assert reply["success"] is False, reply
    errors = [f["error"] for f in reply["failedEips"]]
    assert len(errors) == 3, reply
    assert errors[0].startswith("eips[1]: field 'eipUuid'"), errors
    assert errors[1] == "eips[2]: must be an EIP object, got str", errors
    assert errors[2].startswith("eips[3]: field 'eipUuid'"), errors
    assert reply["failedEips"][2]["eipUuid"] == "nope"
    assert manager(agent).records == {}
    left = await asyncio.to_thread(world.leftovers)
    assert left == {"netns": [], "links": [], "nft": [],
                    "iptables": {4: None, 6: None}}, left


async def test_apply_where_an_ipv6_sysctl_key_is_missing(eip_agent, world, monkeypatch):
    """A host booted with ipv6.disable=1 has no net.ipv6 keys; the apply must not fail on
    them (simulated here with a key no host has)."""
    monkeypatch.setattr(eipnft, "SYSCTLS",
                        (*eipnft.SYSCTLS, "net.ipv6.conf.nosuchlink0.disable_ipv6=1"))
    agent = await eip_agent()
    body = world.eip(0)
    reply = await agent.call(APPLY, {"eip": body})
    assert reply == {"success": True, "error": None}, reply
    names = _names(world, body)
    forwarding = await asyncio.to_thread(ns_run, names.netns, "sysctl", "-n",
                                         "net.ipv4.ip_forward")
    assert forwarding.stdout.strip() == b"1"
    await traffic(world, body)
    assert (await agent.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, agent, body)


async def test_missing_fields_and_same_bridges_are_400(eip_agent, world):
    agent = await eip_agent()
    body = world.eip(0)
    del body["nicMac"]
    status, reply = await agent.post(APPLY, {"eip": body})
    assert status == 400 and "nicMac" in reply["error"], reply
    status, reply = await agent.post(APPLY, {"eip": world.eip(0, vmBridgeName=world.pub_br)})
    assert status == 400 and "vmBridgeName" in reply["error"], reply
    status, reply = await agent.post(APPLY, {})
    assert status == 400 and "eip" in reply["error"], reply
    left = await asyncio.to_thread(world.leftovers)
    assert left == {"netns": [], "links": [], "nft": [],
                    "iptables": {4: None, 6: None}}, left


def test_names_fit_the_kernel_limit():
    from kvmagent.eip.naming import Names, Patterns
    for prefix in ("e", "eip", "abcd"):
        for _ in range(50):
            names = Names.of(prefix, secrets.token_hex(16))
            assert all(len(n) <= 15 for n in names.links)
            patterns = Patterns(prefix)
            assert patterns.netns_hash(names.netns) == names.hash
            assert all(patterns.link_hash(n) == names.hash for n in names.links)
    assert Names.of("eip", "A" * 32) == Names.of("eip", "a" * 32)
    assert Patterns("eip").link_hash(Names.of("ei", "a" * 32).pub_host) is None
    with pytest.raises(ValueError):
        Names.of("toolong", "a" * 32)


async def test_veths_follow_the_mtu_of_their_bridge(eip_agent, world):
    agent = await eip_agent()
    body = world.eip(0)
    names = _names(world, body)
    assert (await agent.call(APPLY, {"eip": body}))["success"]
    obs = await manager(agent).observe(body["eipUuid"])
    assert obs.ns_links[names.vm_ns]["mtu"] == obs.root_links[names.vm_host]["mtu"] == 1500
    await asyncio.to_thread(lambda: __import__("subprocess").run(
        ["ip", "link", "set", world.vm_br, "mtu", "9000"], check=True))
    assert (await agent.call(APPLY, {"eip": body}))["success"]
    obs = await manager(agent).observe(body["eipUuid"])
    assert obs.ns_links[names.vm_ns]["mtu"] == obs.root_links[names.vm_host]["mtu"] == 9000
    assert obs.ns_links[names.pub_ns]["mtu"] == 1500
    assert (await agent.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, agent, body)


async def test_arp_answers_only_the_vm_for_the_gateway_and_only_the_vip(eip_agent, world):
    agent = await eip_agent()
    await asyncio.to_thread(world.add_vm, 1)           # a neighbour VM without this EIP
    body = world.eip(0, vm=0)
    assert (await agent.call(APPLY, {"eip": body}))["success"]
    ns_mac = {role: mac_for(body["eipUuid"], role) for role in ("pn", "vn")}
    vm0, vm1, client = (world.vm_ns(0), f"{world.tag}m0b"), (world.vm_ns(1), f"{world.tag}m1b"), (
        world.client_ns, f"{world.tag}c1")
    ask = asyncio.to_thread
    assert await ask(arp_ask, *vm0, body["nicGateway"]) == ns_mac["vn"]   # the EIP's VM
    assert await ask(arp_ask, *vm1, body["nicGateway"]) is None           # any other MAC
    assert await ask(arp_ask, *client, body["vip"]) == ns_mac["pn"]       # the VIP
    assert await ask(arp_ask, *client, body["nicGateway"]) is None        # nothing else
    assert await ask(arp_ask, *client, "198.51.100.99") is None
    assert (await agent.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, agent, body)


async def test_openapi_lists_the_eip_commands(eip_agent, world):
    agent = await eip_agent()
    schema = await (await agent.client.get("/openapi.json")).json()
    for path in (APPLY, DELETE, BATCH_APPLY, BATCH_DELETE, SYNC):
        assert path in schema["paths"], sorted(schema["paths"])


async def test_timed_out_step_is_stopped_before_the_lock_is_released(eip_agent, world):
    """A blocking step that overruns its timeout is told to stop, and the operation only
    ends (releasing the EIP's lock) once the thread has really stopped."""
    import threading
    import time as _time

    from kvmagent.core.errors import BlockingTimeout
    agent = await eip_agent(netlink_timeout=0.2, abort_grace=5)
    stopped = threading.Event()

    def slow(abort: threading.Event) -> None:
        while not abort.wait(0.01):
            pass
        _time.sleep(0.2)            # finishing the current netlink request
        stopped.set()

    with pytest.raises(BlockingTimeout):
        await manager(agent)._blocking(slow, "slow step")
    assert stopped.is_set()


async def test_abandoned_step_keeps_the_lock_until_its_thread_returns(eip_agent, world,
                                                                     monkeypatch):
    """A step that overruns its timeout and keeps going well past abort_grace: the apply
    waits for its thread (the lock stays held, no rollback runs beside it), fails, and leaves
    the record 'applying' so the next sync/apply finishes the job."""
    import time as _time

    from kvmagent.eip import netlink as eipnetlink
    agent = await eip_agent(netlink_timeout=0.5, abort_grace=0.1)
    mgr = manager(agent)
    body = world.eip(0)
    names = _names(world, body)
    real = eipnetlink.converge_links
    finished: list[float] = []

    def stubborn(spec, names, report, *, arp_timeout, abort=None):
        real(spec, names, report, arp_timeout=arp_timeout, abort=abort)
        abort.wait(10)          # overruns its timeout ...
        _time.sleep(0.6)        # ... and a netlink request in flight finishes much later
        finished.append(_time.monotonic())
        raise eipnetlink.Aborted("stopped")

    monkeypatch.setattr(eipnetlink, "converge_links", stubborn)
    reply = await agent.call(APPLY, {"eip": body})
    assert reply["success"] is False and "did not finish within 0.5s" in reply["error"], reply
    assert finished, "the apply ended before its thread did"
    [entry] = [h for h in mgr.history if h["op"] == "apply"]
    assert entry["end"] >= finished[0], (entry, finished)   # lock held until the thread ended
    # Not rolled back: the record says 'applying' and what was built is still there.
    assert mgr.records[body["eipUuid"]]["status"] == "applying"
    assert agent.ctx.state.load(f"eips/{body['eipUuid']}")["status"] == "applying"
    assert not (await mgr.observe(body["eipUuid"])).empty
    monkeypatch.undo()

    # The next apply finishes the job.
    assert (await agent.call(APPLY, {"eip": body}))["success"]
    await assert_one_copy(world, agent, body)
    await traffic(world, body)
    assert (await agent.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, agent, body)
    assert not agent.ctx.locks.locked("eip", names.netns)


async def test_abandoned_fresh_apply_is_removed_by_the_next_sync(eip_agent, world,
                                                                monkeypatch):
    from kvmagent.eip import netlink as eipnetlink
    agent = await eip_agent(netlink_timeout=0.3, abort_grace=0.1)
    body = world.eip(0)
    real = eipnetlink.prepare

    def stuck(spec, names, report, *, abort=None):
        real(spec, names, report, abort=abort)
        abort.wait(10)
        eipnetlink._check(abort)     # prepare checks abort between its steps

    monkeypatch.setattr(eipnetlink, "prepare", stuck)
    reply = await agent.call(APPLY, {"eip": body})
    assert reply["success"] is False and "did not finish" in reply["error"], reply
    assert manager(agent).records[body["eipUuid"]]["status"] == "applying"
    monkeypatch.undo()
    reply = await agent.call(SYNC, {})
    assert reply["success"] and reply["eips"] == [], reply
    await assert_gone(world, agent, body)


def test_leftover_check_sees_our_root_rules_and_only_ours():
    """The clean-up checks above must be able to fail, and must not fail on other people's rules.

    A root rule naming one of our link names is a leftover; docker's ``return`` rules are not,
    even when the random prefix ("turn") is a substring of them (CI once tripped on exactly that).
    """
    world = World(prefix="turn")
    ours = Names.of(world.prefix, secrets.token_hex(16)).pub_host
    table = f"kvmagent_test_{world.tag}"
    rules = {"nftables": [
        {"add": {"table": {"family": "inet", "name": table}}},
        {"add": {"chain": {"family": "inet", "table": table, "name": "fwd"}}},
        {"add": {"rule": {"family": "inet", "table": table, "chain": "fwd", "expr": [
            {"counter": None}, {"return": None}]}}},
        {"add": {"rule": {"family": "inet", "table": table, "chain": "fwd", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": ours}},
            {"return": None}]}}},
    ]}
    subprocess.run(["nft", "-j", "-f", "-"], input=json.dumps(rules).encode(), check=True,
                   capture_output=True, timeout=30)
    try:
        left = world.leftovers()
        assert left["nft"] == [f'iifname "{ours}" return'], left
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True, timeout=30)
    assert world.leftovers()["nft"] == []


# ----- the host firewall (docker's FORWARD DROP), IPv6, fdb ---------------------------------
async def traffic6(world: World, body: dict, vm: int = 0) -> None:
    """IPv6: TCP in through DNAT (answered by the VM namespace, which sees the client's
    address) and out through SNAT (the client sees the VIP)."""
    vm_ns = world.vm_ns(vm)
    inbound = await asyncio.to_thread(tcp_exchange, vm_ns, body["nicIp"], world.client_ns,
                                      body["vip"], 7779)
    assert inbound["answered_by"] == vm_ns and inbound["server_saw"] == CLIENT_IP6, inbound
    outbound = await asyncio.to_thread(tcp_exchange, world.client_ns, CLIENT_IP6, vm_ns,
                                       CLIENT_IP6, 7780)
    assert outbound["server_saw"] == body["vip"], outbound          # SNAT to the VIP
    assert outbound["client_local"] == body["nicIp"], outbound


async def test_without_the_host_rules_docker_forward_policy_drops_eip_traffic(eip_agent, world):
    """Why hostfw exists: on this host (docker running: FORWARD policy DROP, br_netfilter
    on) an EIP without the agent's host rules carries nothing; the same EIP with them does."""
    if not await asyncio.to_thread(host_forward_drops):
        pytest.skip("this host does not drop bridged IPv4 in FORWARD (docker not running?)")
    agent = await eip_agent(host_firewall=False)
    body = world.eip(0)
    assert (await agent.call(APPLY, {"eip": body}))["success"]
    assert (await asyncio.to_thread(world.leftovers))["iptables"] == {4: None, 6: None}
    with pytest.raises(OSError):     # timed out or refused: the host dropped it
        await asyncio.to_thread(tcp_exchange, world.vm_ns(0), body["nicIp"], world.client_ns,
                                body["vip"], 7781, 2.0)
    assert (await agent.call(DELETE, {"eip": body}))["success"]
    await agent.client.close()
    agent = await eip_agent()
    assert (await agent.call(APPLY, {"eip": body}))["success"]
    await traffic(world, body)
    assert (await agent.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, agent, body)


async def test_ipv6_eip_carries_tcp_through_dnat_and_snat(eip_agent, world, mn):
    """ipVersion 6 as ZStack sends it (FlatEipBackend.eipStructToEipTO: prefix lengths, the
    netmask in its 8-group form), through the MN's async call; delete leaves nothing."""
    agent = await eip_agent()
    body = world.eip6(0)
    reply = await agent.call_async(mn, APPLY, {"eip": body})
    assert reply == {"success": True, "error": None}, reply
    names = _names(world, body)
    obs = await manager(agent).observe(body["eipUuid"])
    assert obs.addresses == sorted(["lo:127.0.0.1/8", f"{names.pub_ns}:{body['vip']}/64",
                                    f"{names.vm_ns}:{body['nicGateway']}/64"]), obs.addresses
    assert obs.default_routes == [f"{body['vipGateway']}@{names.pub_ns}"]
    assert obs.neighbours == [(body["nicIp"], body["nicMac"])]
    fw = (await asyncio.to_thread(world.leftovers))["iptables"]
    assert fw[4] is None and len(fw[6]) == 4 + 12, fw      # 4 address rules, 12 for ND
    await traffic6(world, body)
    # batchapply of the same EIP (host reconnect) keeps one copy and still carries traffic
    reply = await agent.call_async(mn, BATCH_APPLY, {"eips": [dict(body, skipArpCheck=False)]})
    assert reply["success"], reply
    assert len((await asyncio.to_thread(world.leftovers))["iptables"][6]) == 16
    await traffic6(world, body)
    reply = await agent.call_async(mn, BATCH_DELETE, {"eips": [body]})
    assert reply["success"], reply
    await assert_gone(world, agent, body)


async def test_ipv4_and_ipv6_eips_of_one_vm_side_by_side(eip_agent, world):
    agent = await eip_agent()
    v4, v6 = world.eip(0), world.eip6(1)
    v6["nicGateway"] = "2001:db8:77::1"
    assert (await agent.call(BATCH_APPLY, {"eips": [v4, v6]}))["success"]
    await traffic(world, v4)
    await traffic6(world, v6)
    assert (await agent.call(DELETE, {"eip": v4}))["success"]
    await traffic6(world, v6)
    assert (await agent.call(DELETE, {"eip": v6}))["success"]
    left = await asyncio.to_thread(world.leftovers)
    assert left == {"netns": [], "links": [], "nft": [], "iptables": {4: None, 6: None}}, left


@pytest.mark.parametrize("over,field", [
    ({"ipVersion": 6}, "vip"),                                   # IPv4 addresses, version 6
    ({"ipVersion": 5}, "ipVersion"),
    ({"ipVersion": 6, "vip": "2001:db8:51::10", "vipGateway": "2001:db8:51::1",
      "nicIp": "2001:db8:77::10", "nicGateway": "2001:db8:78::1", "vipPrefixLen": 64,
      "nicPrefixLen": 64}, "nicGateway"),
    ({"vip": "2001:db8:51::10"}, "vip"),                         # IPv6 address, version 4
    ({"physicalNic": "eth0; reboot", "addfdb": True}, "physicalNic"),
])
async def test_bad_ip_version_fields_are_400_naming_the_field(eip_agent, world, over, field):
    agent = await eip_agent()
    status, reply = await agent.post(APPLY, {"eip": world.eip(0, **over)})
    assert status == 400 and field in reply["error"], (status, reply)
    left = await asyncio.to_thread(world.leftovers)
    assert left == {"netns": [], "links": [], "nft": [], "iptables": {4: None, 6: None}}, left


def _fdb(ifname: str) -> list[tuple[str, bool]]:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return sorted((e.get("lladdr"), bool(e["flags"] & 0x02))
                      for e in ipr.fdb("dump") if e["ifindex"] == index)


async def test_addfdb_puts_the_namespace_mac_into_the_physical_nic(eip_agent, world, mn):
    """addfdb + physicalNic (ZStack's SR-IOV VF NICs): a permanent ``self`` fdb entry for the
    MAC of the namespace's VM-side end on that NIC, gone after delete. Without addfdb, or
    with a NIC that does not exist, nothing is left behind."""
    agent = await eip_agent()
    nic = await asyncio.to_thread(world.add_nic, "pf")
    body = world.eip(0, addfdb=True, physicalNic=nic)
    mac = mac_for(body["eipUuid"], "vn")
    reply = await agent.call_async(mn, APPLY, {"eip": body})
    assert reply == {"success": True, "error": None}, reply
    assert (mac, True) in await asyncio.to_thread(_fdb, nic)
    await traffic(world, body)
    assert (await agent.call(DELETE, {"eip": {"eipUuid": body["eipUuid"]}}))["success"]
    assert (mac, True) not in await asyncio.to_thread(_fdb, nic)
    await assert_gone(world, agent, body)

    plain = world.eip(0, addfdb=False, physicalNic=nic)
    assert (await agent.call(APPLY, {"eip": plain}))["success"]
    assert mac_for(plain["eipUuid"], "vn") not in [m for m, _ in await asyncio.to_thread(_fdb, nic)]
    assert (await agent.call(DELETE, {"eip": plain}))["success"]

    missing = world.eip(0, addfdb=True, physicalNic=f"{world.tag}nope")
    reply = await agent.call_async(mn, APPLY, {"eip": missing})
    assert reply["success"] is False and "physicalNic" in reply["error"], reply
    await assert_gone(world, agent, missing)


DOCKER_LOCK = "/tmp/kvmagent-docker.lock"
DOCKERD_LOG = "/var/log/dockerd.log"


def _restart_dockerd() -> None:
    """Stop the running dockerd (SIGTERM, as its init would) and start it again the way
    scripts/setup-host.sh does (``setsid dockerd`` with its output in /var/log/dockerd.log,
    appended here so earlier logs stay); returns once the engine answers."""
    import os
    import shutil
    import signal

    import psutil
    procs = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "dockerd"]
    assert procs, "dockerd is not running on this host"
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=30)
    for proc in alive:
        proc.kill()
    dockerd = shutil.which("dockerd", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")
    with open(DOCKERD_LOG, "ab") as log:
        subprocess.Popen(["setsid", dockerd], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT)
    if not wait_for(lambda: subprocess.run(["docker", "version"], capture_output=True)
                    .returncode == 0, timeout=60, interval=0.5):
        raise AssertionError(f"dockerd did not come back; see {DOCKERD_LOG}")


def _forward(cmd: str = "iptables") -> list[str]:
    return subprocess.run([cmd, "-w", "10", "-S", "FORWARD"], capture_output=True,
                          check=True).stdout.decode().splitlines()


async def test_eip_carries_traffic_after_docker_restarts(eip_agent, world):
    """The real dockerd restarted (it puts its FORWARD chains and DROP policy back): once
    docker's chains are back, the agent's jump and every host rule are there too and the EIP
    carries IPv4 and IPv6 traffic. Under the machine's docker lock; needs a docker that
    manages iptables (the simulated rewrite below runs everywhere)."""
    import fcntl
    if not await asyncio.to_thread(host_forward_drops):
        pytest.skip("this host's docker does not manage iptables (nothing of ours to rewrite)")
    agent = await eip_agent(firewall_check=0.2)
    v4, v6 = world.eip(0), world.eip6(1)
    assert (await agent.call(BATCH_APPLY, {"eips": [v4, v6]}))["success"]
    await traffic(world, v4)
    jump = f"-A FORWARD -j {chain_name(world.prefix)}"

    def all_back() -> bool:
        forward = _forward()
        fw = world.leftovers()["iptables"]
        return ("-P FORWARD DROP" in forward and "-A FORWARD -j DOCKER-USER" in forward
                and jump in forward and jump in _forward("ip6tables")
                and sorted(fw[4] or []) == sorted(host_rules(world, v4))
                and len(fw[6] or []) == 16)

    with open(DOCKER_LOCK, "a") as lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        try:
            await asyncio.to_thread(_restart_dockerd)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert await asyncio.to_thread(wait_for, all_back, 30), (_forward(), world.leftovers())
    await traffic(world, v4)
    await traffic6(world, v6)
    assert (await agent.call(BATCH_DELETE, {"eips": [v4, v6]}))["success"]
    left = await asyncio.to_thread(world.leftovers)
    assert left == {"netns": [], "links": [], "nft": [], "iptables": {4: None, 6: None}}, left


@pytest.mark.parametrize("backend", ["legacy", "nft"])
@pytest.mark.parametrize("version", [4, 6])
async def test_docker_style_forward_rewrite_is_undone_by_the_check(world, backend, version):
    """What a restarting dockerd does to FORWARD, in a lab host namespace: ``-F FORWARD``, a
    ``DOCKER-USER`` chain jumped to from the top, policy DROP. The periodic check (every
    20 ms here) notices, rebuilds, and the EIP's traffic passes again below docker's jump."""
    body = world.eip6(0) if version == 6 else world.eip(0)
    spec = EipSpec.from_dict({k: body[c] for k, c in _FIELDS.items()} | {"ip_version": version})
    lab = FirewallLab(body, _names(world, body), backend)
    chain, cmd = chain_name(world.prefix), lab.command(version)
    watcher = None
    try:
        await asyncio.to_thread(lab.build)
        fw = HostFirewall(world.prefix, netns=lab.host,
                          commands={4: lab.command(4), 6: lab.command(6)})
        await fw.add(spec, lab.names)
        assert await asyncio.to_thread(lab.passes, "eip", body["vip"], "client", 7821)
        ready = asyncio.Event()
        ready.set()
        watcher = asyncio.create_task(fw.watch(0.02, ready))
        rebuilds = fw.rebuilds
        for args in (("-F", "FORWARD"), ("-N", "DOCKER-USER"), ("-A", "DOCKER-USER", "-j",
                     "RETURN"), ("-I", "FORWARD", "1", "-j", "DOCKER-USER"),
                     ("-P", "FORWARD", "DROP")):
            await asyncio.to_thread(ns_run, lab.host, cmd, "-w", "10", *args)
        assert await async_wait_for(lambda: fw.rebuilds > rebuilds)
        assert await asyncio.to_thread(lab.passes, "eip", body["vip"], "client", 7822)
        assert await asyncio.to_thread(lab.passes, "eip", body["nicGateway"], "vm", 7823)
        forward = (await asyncio.to_thread(ns_run, lab.host, cmd, "-w", "10", "-S", "FORWARD")
                   ).stdout.decode().splitlines()
        assert "-P FORWARD DROP" in forward and "-A FORWARD -j DOCKER-USER" in forward
        assert f"-A FORWARD -j {chain}" in forward
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.to_thread(lab.destroy)


def test_an_engine_the_agent_starts_does_not_manage_iptables(tmp_path):
    """ZStack's rule (daemon.json "iptables": false before docker is started or installed):
    a spawned dockerd gets --iptables=false, an init-started one a config file saying so;
    an operator's own iptables setting, or a file that is not JSON, is left alone."""
    import json

    from kvmagent.core.config import AgentConfig
    from kvmagent.host.docker_engine import keep_off_iptables, mentions_iptables, plan_start

    config = AgentConfig(listen="127.0.0.1:0", state_dir=tmp_path / "s",
                         models_root=tmp_path / "m")
    assert plan_start(config, "/usr/sbin/dockerd", False, True).argv == \
        ["/usr/sbin/dockerd", "--iptables=false"]
    assert "--iptables=false" not in plan_start(config, "/usr/sbin/dockerd", True, True).argv

    path = tmp_path / "etc" / "docker" / "daemon.json"
    assert not mentions_iptables(path)
    assert keep_off_iptables(path) == "created"
    assert json.loads(path.read_text()) == {"iptables": False} and mentions_iptables(path)
    assert keep_off_iptables(path) == "kept"
    path.write_text(json.dumps({"log-driver": "json-file"}))
    assert keep_off_iptables(path) == "added"
    assert json.loads(path.read_text()) == {"log-driver": "json-file", "iptables": False}
    path.write_text(json.dumps({"iptables": True}))
    assert keep_off_iptables(path) == "kept"
    assert json.loads(path.read_text()) == {"iptables": True}
    path.write_text("{not json")
    assert keep_off_iptables(path) == "unreadable" and path.read_text() == "{not json"
    # A symlinked file stays a symlink (its target gets the setting), a file keeps its mode.
    import os
    target = tmp_path / "conf" / "docker.json"
    target.parent.mkdir()
    target.write_text(json.dumps({"debug": True}))
    target.chmod(0o600)
    path.unlink()
    path.symlink_to(target)
    assert keep_off_iptables(path) == "added"
    assert path.is_symlink() and os.readlink(path) == str(target)
    assert json.loads(target.read_text()) == {"debug": True, "iptables": False}
    assert target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("backend", ["legacy", "nft"])
@pytest.mark.parametrize("version", [4, 6])
async def test_host_rules_open_only_the_eips_traffic_on_either_backend(world, backend, version):
    """The host rules against a real kernel and real iptables of either backend, in a lab
    host namespace with FORWARD policy DROP and br_netfilter on (not the machine's firewall):
    before, nothing passes; after, the public side reaches the VIP and the VM reaches its
    gateway, but not another address behind the same port; a flushed FORWARD is put back by
    check(); removal closes it again and leaves no chain."""
    body = world.eip6(0) if version == 6 else world.eip(0)
    spec = EipSpec.from_dict({k: body[c] for k, c in _FIELDS.items()} | {"ip_version": version})
    lab = FirewallLab(body, _names(world, body), backend)
    try:
        await asyncio.to_thread(lab.build)
        fw = HostFirewall(world.prefix, netns=lab.host,
                          commands={4: lab.command(4), 6: lab.command(6)})

        async def paths() -> tuple[bool, bool, bool]:
            return (await asyncio.to_thread(lab.passes, "eip", body["vip"], "client", 7801),
                    await asyncio.to_thread(lab.passes, "eip", body["nicGateway"], "vm", 7802),
                    await asyncio.to_thread(lab.passes, "eip", lab.extra, "client", 7803))

        assert await paths() == (False, False, False)
        await fw.add(spec, lab.names)
        assert await paths() == (True, True, False)
        await asyncio.to_thread(ns_run, lab.host, lab.command(version), "-w", "10",
                                "-F", "FORWARD")                       # a firewall reload
        assert await paths() == (False, False, False)
        assert await fw.check() == [version]
        assert await paths() == (True, True, False)
        assert await fw.check() == []                                  # intact: nothing to do
        plen = 128 if version == 6 else 32                             # same count, other rule
        await asyncio.to_thread(ns_run, lab.host, lab.command(version), "-w", "10", "-R",
                                chain_name(world.prefix), "1", "-d", f"{lab.extra}/{plen}",
                                "-m", "physdev", "--physdev-out", lab.names.pub_host,
                                "-j", "ACCEPT")
        assert await paths() == (False, True, False)                # the VIP lost its rule
        assert await fw.check() == [version]
        assert await paths() == (True, True, False)
        await fw.remove(spec.eip_uuid)
        assert await paths() == (False, False, False)
        listed = await asyncio.to_thread(ns_run, lab.host, lab.command(version), "-w", "10",
                                         "-S")
        assert chain_name(world.prefix) not in listed.stdout.decode()
    finally:
        await asyncio.to_thread(lab.destroy)


async def test_start_up_removes_host_rules_no_record_needs(eip_agent, world, make_agent, tmp_path):
    """An agent that lost its state dir left its host chain behind: the next start-up
    (no record needs it) removes it; a later apply builds it again."""
    first = await eip_agent()
    body = world.eip(0)
    assert (await first.call(APPLY, {"eip": body}))["success"]
    assert len((await asyncio.to_thread(world.leftovers))["iptables"][4]) == 4
    await first.client.close()
    second = await make_agent(plugins=[make_plugin(prefix=world.prefix)],
                              state_dir=tmp_path / "fresh-state")
    await asyncio.wait_for(manager(second).restored.wait(), 30)
    assert (await asyncio.to_thread(world.leftovers))["iptables"] == {4: None, 6: None}
    sync = await second.call(SYNC, {})                 # the namespace goes with sync
    assert sync["success"] and f"netns {_names(world, body).netns}" in sync["orphansRemoved"]
    assert (await second.call(APPLY, {"eip": body}))["success"]
    await traffic(world, body)
    assert (await second.call(DELETE, {"eip": body}))["success"]
    await assert_gone(world, second, body)


@pytest.mark.parametrize("backend", ["legacy", "nft"])
async def test_apply_after_the_chain_was_deleted_behind_the_agents_back(world, backend):
    """``iptables -F; -X`` (or a firewalld reload) removed the chain and its jump between two
    checks: the next apply of the EIP (the MN re-applying it) succeeds and its traffic passes,
    although the firewall remembered the chain as there."""
    body = world.eip(0)
    spec = EipSpec.from_dict({k: body[c] for k, c in _FIELDS.items()})
    lab = FirewallLab(body, _names(world, body), backend)
    chain, iptables = chain_name(world.prefix), lab.command(4)
    try:
        await asyncio.to_thread(lab.build)
        fw = HostFirewall(world.prefix, netns=lab.host,
                          commands={4: lab.command(4), 6: lab.command(6)})
        await fw.add(spec, lab.names)
        for args in (("-D", "FORWARD", "-j", chain), ("-F", chain), ("-X", chain)):
            await asyncio.to_thread(ns_run, lab.host, iptables, "-w", "10", *args)
        assert not await asyncio.to_thread(lab.passes, "eip", body["vip"], "client", 7811)
        await fw.add(spec, lab.names)
        assert await asyncio.to_thread(lab.passes, "eip", body["vip"], "client", 7812)
        listed = await asyncio.to_thread(ns_run, lab.host, iptables, "-w", "10", "-S")
        assert sorted(line for line in listed.stdout.decode().splitlines()
                      if line.startswith(f"-A {chain} ")) == sorted(host_rules(world, body))
    finally:
        await asyncio.to_thread(lab.destroy)


async def test_firewall_check_waits_for_the_start_up_restore(eip_agent, world, monkeypatch):
    """A restart with two EIPs where restoring the second is slow: while only the first is
    restored, the periodic firewall check (every 20 ms here) must not take the chain, which
    still holds both EIPs' rules from the last run, for changed and rebuild it without the
    second (whose traffic would then be dropped until its restore ends)."""
    from kvmagent.eip.manager import EipManager

    await asyncio.to_thread(world.add_vm, 1)
    first = await eip_agent()
    a, b = world.eip(0), world.eip(1, vm=1)
    assert (await first.call(BATCH_APPLY, {"eips": [a, b]}))["success"]
    both = sorted(host_rules(world, a) + host_rules(world, b))
    await first.client.close()

    gate, settle = asyncio.Event(), EipManager._settle

    async def slow_settle(self, eip_uuid: str, op: str) -> str:
        if eip_uuid == b["eipUuid"]:
            await gate.wait()
        return await settle(self, eip_uuid, op)

    monkeypatch.setattr(EipManager, "_settle", slow_settle)
    second = await eip_agent(firewall_check=0.02)
    fw = manager(second).firewall
    assert await async_wait_for(lambda: a["eipUuid"] in fw.wanted[4])
    await asyncio.sleep(0.5)         # 25 check intervals: time for the wrong rebuild
    assert fw.rebuilds == 0
    assert sorted((await asyncio.to_thread(world.leftovers))["iptables"][4]) == both
    gate.set()
    await asyncio.wait_for(manager(second).restored.wait(), 30)
    assert fw.rebuilds == 0
    assert sorted((await asyncio.to_thread(world.leftovers))["iptables"][4]) == both
    await traffic(world, a)
    await traffic(world, b, vm=1)
    assert (await second.call(BATCH_DELETE, {"eips": [a, b]}))["success"]
