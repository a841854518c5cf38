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


class FakeCtx:
    """Unit-test stand-in for the agent context: spawns tasks, records reports and hooks."""
    def __init__(self):
        self.reports, self.hooks = [], []
        self.reporter = self

    def spawn(self, coro, name=None):
        return asyncio.get_running_loop().create_task(coro, name=name)

    def report(self, path, body, wait_for_mn=False):
        self.reports.append((path, body))

    async def run_hooks(self, name, *args):
        self.hooks.append((name, args))
        return []


class FakeInventory:
    def __init__(self, records):
        self.snapshot = {r.uuid: r for r in records}

    async def current(self):
        return self.snapshot, "test"


def nic_fencer(monkeypatch, records, netns="kvtest-no-such-netns"):
    from kvmagent.ha import killer, nicfencer
    from kvmagent.ha.rules import FencerRules

    class Memory:
        def save(self, *_):
            pass

    killed = []

    async def kill_vm(ctx, uuid):
        killed.append(uuid)
        return True, ""

    monkeypatch.setattr(killer, "kill_vm", kill_vm)
    return nicfencer.NicFencer(FakeCtx(), FakeInventory(records), FencerRules(Memory()), netns), killed


async def test_a_nic_that_stays_down_is_not_fenced_again_after_a_reconfiguration(monkeypatch):
    from kvmagent.ha.nicfencer import NicFencerConfig

    vm = VmRecord("vm1", (), False, True, ("br_eth9",))
    fencer, killed = nic_fencer(monkeypatch, [vm])
    first, second = NicFencerConfig(HOST, 30, 1), NicFencerConfig(HOST, 20, 1)
    await fencer.configure(first)
    for _ in range(2):
        await fencer.check(first, {"eth9": False})
    assert killed == ["vm1"] and fencer.ctx.hooks == [("selffencer.vms_killed", (["vm1"],))]
    await fencer.configure(second)  # e.g. another storage's setup with a shorter interval
    for _ in range(3):
        await fencer.check(second, {"eth9": False})
    assert killed == ["vm1"], "one outage, one fence"
    await fencer.check(second, {"eth9": True})  # the link is back: the next outage is new
    for _ in range(2):
        await fencer.check(second, {"eth9": False})
    assert killed == ["vm1", "vm1"]
    await fencer.configure(None)


async def test_a_loop_that_outlives_its_stop_ends_instead_of_running_beside_its_successor(monkeypatch):
    """The old loop swallows its cancellation (Python 3.11's wait_for race) and so is still
    running when stop() gives up: it must end at its next step, not go on checking."""
    from kvmagent.ha import nicfencer

    class StubbornIPRoute:
        lost = 0

        def __init__(self, **_):
            pass

        async def link(self, _):
            try:
                await asyncio.sleep(0.3)
            except asyncio.CancelledError:
                if StubbornIPRoute.lost:  # once only: a failing test must not hang
                    raise
                StubbornIPRoute.lost += 1
                await asyncio.sleep(0.3)  # the cancellation is lost

            async def links():
                yield {"ifname": "eth9", "flags": 1, "carrier": 1}
            return links()

        def close(self):
            pass

    monkeypatch.setattr(nicfencer.pyroute2, "AsyncIPRoute", StubbornIPRoute, raising=False)
    fencer, _ = nic_fencer(monkeypatch, [], netns=None)
    checked = []

    async def check(cfg, links):
        checked.append(cfg)

    monkeypatch.setattr(fencer, "check", check)
    old, new = nicfencer.NicFencerConfig(HOST, 0.05, 1), nicfencer.NicFencerConfig(HOST, 0.06, 1)
    await fencer.configure(old)
    await asyncio.sleep(0.1)  # the old loop is in its link dump
    fencer.stop = (lambda stop: lambda timeout=10.0: stop(0.01))(fencer.stop)  # give up at once
    await fencer.configure(new)
    await asyncio.sleep(2)
    assert new in checked and old not in checked, checked
    await nicfencer.NicFencer.stop(fencer)
