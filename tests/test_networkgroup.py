"""Network groups watched through netlink in a test network namespace with real veth pairs."""
from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid as uuidlib

import pytest

from kvmagent.core.plugin import discover_plugins
from kvmagent.ha import netgroup

from .scale import TEST_URI, clear, populate

pytestmark = pytest.mark.netns

REPORT = "/kvm/reportnetworkgroupstatus"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def netns_with_group_links(prefix: str):
    """A fresh network namespace holding the veth pairs the network groups watch (bond0a,
    bond1a, mgmta, each up with its peer); removed afterwards."""
    name = f"{prefix}-{uuidlib.uuid4().hex[:6]}"
    ip("netns", "add", name)
    try:
        for a, b in (("bond0a", "bond0b"), ("bond1a", "bond1b"), ("mgmta", "mgmtb")):
            ip("-n", name, "link", "add", a, "type", "veth", "peer", "name", b)
            ip("-n", name, "link", "set", a, "up")
            ip("-n", name, "link", "set", b, "up")
        yield name
    finally:
        ip("netns", "del", name)


@pytest.fixture
def netns():
    with netns_with_group_links("kvmtest-ng") as name:
        yield name


@pytest.fixture
def vms():
    conn, uuids = populate(3)
    yield uuids
    clear(conn, uuids)


@pytest.fixture
def group_agent(make_agent, mn, netns):
    async def start():
        agent = await make_agent(
            plugins=[p for p in discover_plugins() if p.name in ("host", "vm", "ha")],
            libvirt_uri=TEST_URI, ha_netns=netns)
        await agent.call("/host/connect", {"hostUuid": "h1", "sendCommandUrl": mn.send_command_url})
        return agent
    return start


def setup_body(vms: list[str]) -> dict:
    return {
        "hostUuid": "h1",
        "groups": [
            {"networkGroupUuid": "storage-net", "minAvailableCount": 2,
             "resources": [{"name": "bond0a"}, {"name": "bond1a"}]},
            {"networkGroupUuid": "mgmt-net", "minAvailableCount": 1, "resources": [{"name": "mgmta"}]},
        ],
        "vmGroups": {vms[0]: ["storage-net"], vms[1]: ["storage-net"], vms[2]: ["mgmt-net"]},
    }


async def test_link_down_reports_the_ha_vms_of_the_down_group(group_agent, mn, netns, vms):
    agent = await group_agent()
    # vms[0] and vms[2] are HA-enabled; vms[1] is not.
    await agent.call_async(mn, "/host/vm/reconcileEnableHa/live", {"haEnabledVmUuids": [vms[0], vms[2]]})
    assert (await agent.call_async(mn, "/ha/networkgroup/setup", setup_body(vms)))["success"]
    first = await mn.wait_report(REPORT)
    assert first == {"hostUuid": "h1", "networkGroupStatus": {"storage-net": "Available",
                                                              "mgmt-net": "Available"},
                     "failedVmUuids": []}

    ip("-n", netns, "link", "set", "bond1b", "down")  # carrier lost on bond1a
    down = await mn.wait_report(REPORT, lambda b: b["networkGroupStatus"]["storage-net"] == "Down")
    assert down["failedVmUuids"] == [vms[0]], "only HA-enabled members of the Down group"
    status = await agent.call("/ha/networkgroup/status")
    assert status["networkGroupStatus"] == {"storage-net": "Down", "mgmt-net": "Available"}

    ip("-n", netns, "link", "set", "bond1b", "up")
    await mn.wait_report(REPORT, lambda b: len(mn.reports_for(REPORT)) >= 3)
    back = mn.reports_for(REPORT)[2]
    assert back["networkGroupStatus"]["storage-net"] == "Available" and back["failedVmUuids"] == []

    ip("-n", netns, "link", "del", "mgmta")
    gone = await mn.wait_report(REPORT, lambda b: b["networkGroupStatus"]["mgmt-net"] == "Down")
    assert gone["failedVmUuids"] == [vms[2]]
    # Only changes are reported: a flap of a link outside every group says nothing.
    count = len(mn.reports_for(REPORT))
    ip("-n", netns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    ip("-n", netns, "link", "set", "other1", "up")
    for state in ("up", "down"):  # carrier comes and goes on a link no group names
        ip("-n", netns, "link", "set", "other0", state)
    await asyncio.sleep(0.5)
    await agent.ctx.outbox.drain(5)
    assert len(mn.reports_for(REPORT)) == count


async def test_restart_reports_the_full_state_once_and_cancel_forgets(group_agent, mn, netns, vms):
    agent = await group_agent()
    await agent.call_async(mn, "/ha/networkgroup/setup", setup_body(vms))
    await mn.wait_report(REPORT)
    await agent.client.close()
    ip("-n", netns, "link", "set", "bond0a", "down")  # changed while the agent was away

    restarted = await group_agent()
    after = await mn.wait_report(REPORT, lambda b: b["networkGroupStatus"]["storage-net"] == "Down")
    assert after["networkGroupStatus"] == {"storage-net": "Down", "mgmt-net": "Available"}
    assert sum(1 for b in mn.reports_for(REPORT) if b == after) == 1

    await restarted.call_async(mn, "/ha/networkgroup/cancel", {"networkGroupUuids": ["storage-net"]})
    status = await restarted.call("/ha/networkgroup/status")
    assert status["networkGroupStatus"] == {"mgmt-net": "Available"}


@pytest.mark.parametrize("mutate, fragment", [
    (lambda b: b["groups"][0].update(minAvailableCount=0), "minAvailableCount"),
    (lambda b: b["groups"][0]["resources"][0].update(name="eth0; rm -rf"), "resources.0.name"),
    (lambda b: b["groups"][0].update(resources=[]), "resources"),
])
async def test_bad_group_setup_is_400(group_agent, vms, mutate, fragment):
    agent = await group_agent()
    body = setup_body(vms)
    mutate(body)
    status, reply = await agent.post("/ha/networkgroup/setup", body)
    assert status == 400 and fragment in reply["error"]
    assert (await agent.call("/ha/networkgroup/status"))["networkGroupStatus"] == {}


async def test_vm_groups_naming_an_unknown_group_changes_nothing(group_agent, mn, vms):
    agent = await group_agent()
    body = setup_body(vms)
    body["vmGroups"][vms[0]] = ["no-such-group"]
    reply = await agent.call_async(mn, "/ha/networkgroup/setup", body)
    assert reply["success"] is False and "no-such-group" in reply["error"]
    assert (await agent.call("/ha/networkgroup/status"))["networkGroupStatus"] == {}


def zstack_rules(vms: list[str]) -> dict:
    """ZStack's per-VM rule shape (ZU HA-network-group test, 2026): a VM fails when the weight
    of its group's healthy resources is below minScore."""
    group = {"rules": [{"resource": "bond0a", "weight": 1}, {"resource": "bond1a", "weight": 1}],
             "minScore": 2}
    return {"hostUuid": "h1", "vmRules": {vm: {"groups": {"zs-group": group}} for vm in vms[:2]}}


async def test_zstack_rule_shape_damped_flaps_and_repeated_failures(
        group_agent, mn, netns, vms, monkeypatch):
    monkeypatch.setattr(netgroup, "REPEAT", 1.0)
    agent = await group_agent()
    await agent.call_async(mn, "/host/vm/reconcileEnableHa/live",
                           {"hostUuid": "h1", "haEnabledVmUuids": [vms[0]]})
    assert (await agent.call_async(mn, "/ha/networkgroup/setup", zstack_rules(vms)))["success"]
    first = await mn.wait_report(REPORT)
    assert first == {"hostUuid": "h1", "networkGroupStatus": {"zs-group": "Available"},
                     "failedVmUuids": []}

    for _ in range(3):  # a link bouncing faster than the damping time reports nothing
        ip("-n", netns, "link", "set", "bond0b", "down")
        ip("-n", netns, "link", "set", "bond0b", "up")
    await asyncio.sleep(2 * netgroup.SETTLE + 0.5)
    await agent.ctx.outbox.drain(5)
    assert len(mn.reports_for(REPORT)) == 1

    ip("-n", netns, "link", "set", "bond0b", "down")  # stays down: score 1 < minScore 2
    down = await mn.wait_report(REPORT, lambda b: b["failedVmUuids"])
    assert down == {"hostUuid": "h1", "networkGroupStatus": {"zs-group": "Down"},
                    "failedVmUuids": [vms[0]]}, "only HA-enabled VMs; reported, not killed"
    # While VMs are failed the report is repeated (ZStack: every fencer cycle).
    await mn.wait_report(REPORT, lambda b: sum(1 for r in mn.reports_for(REPORT) if r == down) >= 2,
                         timeout=10)
    states = await agent.call("/vm/vmstate", {"vmUuids": [vms[0]]})
    assert states["states"] == {vms[0]: "Running"}, "a failed VM is reported, never killed"
