"""Fencer hostBusinessNic on real guests: the business NIC (a veth in a test network namespace,
its bridge ``br_<nic>`` in the host, ZStack's naming) loses carrier, and the VMs plugged into
that bridge are killed, except the block-listed ones; a VM without a NIC there survives."""
from __future__ import annotations

import asyncio
import os
import subprocess
import uuid as uuidlib

import libvirt
import pytest

from kvmagent.ha.inventory import VmRecord
from kvmagent.ha.nicfencer import bridge_nic

from . import ha_kit
from .ha_kit import HOST, connected_agent, setup_body
from .vmkit import start_body

storages = ha_kit.storages  # fixture
pytestmark = [pytest.mark.netns]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def business_nic():
    """(netns, nic, peer, bridge): the NIC ``kvt<hex>`` with carrier from its peer, in a netns
    of its own; the host gets only an empty bridge ``br_<nic>`` for the guests' taps."""
    tag = uuidlib.uuid4().hex[:6]
    ns, nic, peer, bridge = f"kvtest-nic-{tag}", f"kvt{tag}", f"kvt{tag}p", f"br_kvt{tag}"
    ip("netns", "add", ns)
    ip("-n", ns, "link", "add", nic, "type", "veth", "peer", "name", peer)
    ip("-n", ns, "link", "set", nic, "up")
    ip("-n", ns, "link", "set", peer, "up")
    ip("link", "add", bridge, "type", "bridge")
    ip("link", "set", bridge, "up")
    yield ns, nic, peer, bridge
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=10)
    ip("netns", "del", ns)


def test_bridge_to_nic_is_zstacks_naming():
    """ZU test_without_ha_for_businessnic.py: br_zsn0 -> zsn0, br_zsn0.1000 -> zsn0."""
    assert [bridge_nic(b) for b in ("br_zsn0", "br_zsn0.1000", "zsn0", "br_eth0_100", "")] == \
        ["zsn0", "zsn0", "zsn0", "eth0", None]


@pytest.mark.guest
async def test_carrier_loss_kills_the_vms_on_that_nic_but_not_the_block_listed(
        make_agent, mn, lv, guest_image, workdir, storages, business_nic):
    ns, nic, peer, bridge = business_nic
    agent = await connected_agent(make_agent, mn, ha_netns=ns, ha_inventory_refresh=1.0,
                                  vm_path_roots=[workdir, guest_image.kernel.parent])

    async def boot(on_bridge: bool):
        body = start_body(guest_image, workdir)
        if on_bridge:
            body["nics"] = [{"mac": "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3)),
                             "bridgeName": bridge, "deviceId": 0}]
        lv[1].append(body["vmInstanceUuid"])
        reply = await agent.call_async(mn, "/vm/start", body, timeout=120)
        assert reply["success"] is True, reply
        return body["vmInstanceUuid"]

    victim, blocked, unplugged = await boot(True), await boot(True), await boot(False)
    # As the VPC router manager sends it: allow hostStorageState, block hostBusinessNic.
    await agent.call_async(mn, "/add/vm/fencer/rule/to/host", {
        "hostUuid": HOST, "allowRules": [{"fencerName": "hostStorageState", "vmUuids": [blocked]}],
        "blockRules": [{"fencerName": "hostBusinessNic", "vmUuids": [blocked]}]})
    storage = storages("ps")
    reply = await agent.call_async(mn, "/ha/selffencer/setup", {
        **setup_body({"ps-n": storage}), "interval": 0.5, "maxAttempts": 2,
        "fencers": ["hostBusinessNic"]})
    assert reply["success"] is True

    ip("-n", ns, "link", "set", peer, "down")  # the cable is pulled: nic has no carrier
    fenced = await mn.wait_report("/ha/events/vm-fenced", timeout=30)
    assert fenced == {"hostUuid": HOST, "values": [{"vmUuid": victim, "fencerName": "hostBusinessNic"}]}
    conn = lv[0]
    active = {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    assert victim not in active
    assert {blocked, unplugged} <= active, "block-listed and unplugged VMs keep running"
    state = (await agent.call("/ha/selffencer/state"))["nicFencer"]
    assert state["running"] and state["killedVmUuids"] == [victim] and state["downChecks"][nic] > 2
    # Only the NIC fencer runs: no storage heartbeat, no storage report.
    assert not (storage / "zs-heartbeat").exists()
    assert mn.reports_for("/kvm/reportselffencer") == []


async def test_no_fence_while_the_nic_has_carrier(make_agent, mn, storages, business_nic):
    """No guest: an up NIC never counts as down (the inventory snapshot stands in for a VM)."""
    ns, nic, _, _ = business_nic
    agent = await connected_agent(make_agent, mn, ha_netns=ns)
    storage = storages("ps")
    await agent.call_async(mn, "/ha/selffencer/setup", {
        **setup_body({"ps-n": storage}), "interval": 0.2, "maxAttempts": 1,
        "fencers": ["hostBusinessNic"]})
    manager = agent.ctx.services["ha.fencers"]
    while manager.inventory.taken_at is None:  # the first refresh would replace the stand-in
        await asyncio.sleep(0.1)
    manager.inventory.snapshot = {"vm1": VmRecord("vm1", (), False, True, (f"br_{nic}",))}
    checks = manager.nic_fencer.checks
    await asyncio.sleep(1.5)
    assert manager.nic_fencer.checks - checks >= 3, "the NIC was not checked"
    assert manager.nic_fencer.running and manager.nic_fencer.last_error is None
    assert manager.nic_fencer.down_counts == {}
