"""Reconcile and vmsync over 500 domains (libvirt test:///default driver)."""
from __future__ import annotations

import pytest

from kvmagent.vm.service import read_ha_flag

from .scale import TEST_URI, clear, populate

COUNT = 500


@pytest.fixture
def domains():
    conn, uuids = populate(COUNT)
    yield conn, uuids
    clear(conn, uuids)


@pytest.fixture
async def scale_agent(make_agent):
    from kvmagent.core.plugin import discover_plugins

    return await make_agent(plugins=[p for p in discover_plugins() if p.name in ("host", "vm")],
                            libvirt_uri=TEST_URI)


async def test_vmsync_over_500_domains(scale_agent, domains):
    conn, uuids = domains
    conn.lookupByName(uuids[7]).suspend()
    states = (await scale_agent.call("/vm/vmsync"))["states"]
    assert {u: states[u] for u in uuids} == {u: ("Paused" if u == uuids[7] else "Running") for u in uuids}


async def test_reconcile_over_500_domains_touches_only_what_changes(scale_agent, domains, mn):
    conn, uuids = domains
    wanted = uuids[:250]
    first = await scale_agent.call_async(mn, "/host/vm/reconcileEnableHa/live",
                                         {"haEnabledVmUuids": wanted + ["f" * 32]})
    assert first["enabled"] == sorted(wanted) and first["disabled"] == [] and first["missing"] == ["f" * 32]
    assert [u for u in uuids if read_ha_flag(conn.lookupByName(u))] == wanted

    # Shift the window: 100 leave, 100 join; the rest stays untouched.
    wanted2 = uuids[100:350]
    second = await scale_agent.call_async(mn, "/host/vm/reconcileEnableHa/live",
                                          {"haEnabledVmUuids": wanted2})
    assert second["enabled"] == sorted(uuids[250:350])
    assert second["disabled"] == sorted(uuids[:100])
    assert [u for u in uuids if read_ha_flag(conn.lookupByName(u))] == wanted2

    # Converged: a replay changes nothing.
    third = await scale_agent.call_async(mn, "/host/vm/reconcileEnableHa/live",
                                         {"haEnabledVmUuids": wanted2})
    assert (third["enabled"], third["disabled"], third["missing"]) == ([], [], [])


@pytest.mark.parametrize("body, fragment", [
    ({"vmUuids": ["not-a-uuid"]}, "field 'vmUuids.0'"),
    ({"vmUuids": "0" * 32}, "field 'vmUuids'"),
])
async def test_enable_ha_list_bad_input_is_400(scale_agent, body, fragment):
    status, reply = await scale_agent.post("/host/vm/enableHa/list", body)
    assert status == 400 and fragment in reply["error"], reply


async def test_enable_ha_list_reads_the_flags(scale_agent, domains, mn):
    conn, uuids = domains
    await scale_agent.call_async(mn, "/host/vm/reconcileEnableHa/live", {"haEnabledVmUuids": uuids[:2]})
    listed = await scale_agent.call("/host/vm/enableHa/list", {"vmUuids": uuids[:3] + ["f" * 32]})
    assert listed["enableHa"] == {uuids[0]: True, uuids[1]: True, uuids[2]: False}
