"""Host plugin against the real qemu:///system libvirtd."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import libvirt
import psutil
import pytest

from kvmagent.core.libvirt_conn import version_string

pytestmark = pytest.mark.libvirt


def real_versions() -> tuple[str, str]:
    conn = libvirt.open("qemu:///system")
    try:
        return version_string(conn.getLibVersion()), version_string(conn.getVersion())
    finally:
        conn.close()


async def test_connect_persists_identity_and_reports_versions(make_agent, mn):
    agent = await make_agent()
    reply = await agent.call("/host/connect", {"hostUuid": "3f1c0e2a", "sendCommandUrl": mn.send_command_url,
                                               "version": "5.2.1"})
    libvirt_version, qemu_version = real_versions()
    assert reply["success"] is True
    assert (reply["libvirtVersion"], reply["qemuVersion"]) == (libvirt_version, qemu_version)
    # A restarted agent (same state dir) still knows who it is and where the MN is.
    again = await make_agent()
    ping = await again.call_async(mn, "/host/ping", {"hostUuid": "3f1c0e2a"})
    assert ping == {"success": True, "error": None, "hostUuid": "3f1c0e2a", "version": "5.2.1",
                    "sendCommandUrl": mn.send_command_url, "agentVersion": ping["agentVersion"]}


async def test_ping_for_another_host_answers_our_uuid_so_the_mn_reconnects(agent):
    """KVMHost.needReconnectHost: rsp.hostUuid != the MN's host uuid => reconnect at once."""
    await agent.call("/host/connect", {"hostUuid": "aaa", "version": "5.2.1"})
    reply = await agent.call("/host/ping", {"hostUuid": "bbb"})
    assert (reply["success"], reply["hostUuid"], reply["version"]) == (True, "aaa", "5.2.1")


async def test_connect_rejects_bad_host_uuid(agent):
    status, body = await agent.post("/host/connect", {"hostUuid": "../etc", "sendCommandUrl": "x"})
    assert status == 400
    assert "field 'hostUuid'" in body["error"] and "field 'sendCommandUrl'" in body["error"]
    assert agent.ctx.identity.host_uuid is None


async def test_echo_get_and_post(agent):
    assert (await agent.client.get("/host/echo")).status == 200
    assert await agent.call("/host/echo") == {"success": True, "error": None}


async def test_fact_matches_the_machine(agent):
    fact = await agent.call("/host/fact")
    libvirt_version, qemu_version = real_versions()
    assert fact["success"] is True
    assert fact["cpuNum"] == os.cpu_count()
    assert fact["totalMemory"] == psutil.virtual_memory().total
    assert (fact["libvirtVersion"], fact["qemuVersion"]) == (libvirt_version, qemu_version)
    assert fact["kernelVersion"] == os.uname().release
    assert fact["osDistribution"] and fact["cpuModelName"] and fact["hostCpuModelName"]
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") as fh:
        assert fact["hugepages"]["2M"]["total"] == int(fh.read())
    assert fact["libvirtAvailable"] is True


async def test_capacity(agent):
    cap = await agent.call("/host/capacity")
    assert cap["cpuNum"] == os.cpu_count()
    assert cap["totalMemory"] == psutil.virtual_memory().total
    conn = libvirt.open("qemu:///system")  # used = what the active domains hold (other tests' too)
    try:
        infos = [d.info() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
    finally:
        conn.close()
    assert cap["usedCpu"] >= 0 and cap["usedMemory"] >= 0
    assert abs(cap["usedMemory"] - sum(i[2] for i in infos) * 1024) <= 4 * 2**30  # VMs come and go


async def test_libvirt_down_still_answers_ping_and_reports_unavailable(make_agent):
    agent = await make_agent(libvirt_uri="qemu:///system?socket=/nonexistent/libvirt-sock")
    ping = await agent.call("/host/ping")
    assert ping["success"] is True
    fact = await agent.call("/host/fact")
    assert fact["success"] is True and fact["libvirtAvailable"] is False
    assert fact["libvirtVersion"] is None and fact["cpuNum"] == os.cpu_count()
    metrics = agent.ctx.metrics.render().decode()
    assert "kvmagent_libvirt_connected 0.0" in metrics


def _libvirtd_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "libvirtd"]


@pytest.mark.skipif(os.path.exists("/run/systemd/system"), reason="restarts libvirtd by hand")
async def test_reconnects_after_libvirtd_restart(agent):
    """Kill libvirtd under a connected agent, start it again: the agent reconnects by itself."""
    import asyncio

    await agent.ctx.libvirt.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lambda *a: None)
    assert (await agent.call("/host/fact"))["libvirtAvailable"] is True
    for pid in _libvirtd_pids():
        os.kill(pid, 15)
    deadline = time.monotonic() + 15
    while _libvirtd_pids() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    try:
        deadline = time.monotonic() + 10
        while agent.ctx.libvirt.available and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not agent.ctx.libvirt.available, "agent did not notice libvirtd went away"
        assert (await agent.call("/host/ping"))["success"] is True
    finally:
        subprocess.run([shutil.which("libvirtd") or "/usr/sbin/libvirtd", "-d"], check=True)
    deadline = time.monotonic() + 20
    while not agent.ctx.libvirt.available and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert agent.ctx.libvirt.available, "agent did not reconnect after libvirtd came back"
    assert (await agent.call("/host/fact"))["libvirtAvailable"] is True


@pytest.mark.parametrize("rule, check", [
    ("-A INPUT -p tcp --dport 500 -j ACCEPT", ["-C", "INPUT", "-p", "tcp", "--dport", "500", "-j", "ACCEPT"]),
    ("-I INPUT 1 -j ZS", ["-C", "INPUT", "-j", "ZS"]),
    ("-t nat -A POSTROUTING -j MASQUERADE", ["-t", "nat", "-C", "POSTROUTING", "-j", "MASQUERADE"]),
    ("-N ZS-HOST", ["-S", "ZS-HOST"]),
    ("-A INPUT -j ACCEPT; rm -rf /", ["-C", "INPUT", "-j", "ACCEPT;", "rm", "-rf", "/"]),  # argv, no shell
])
def test_iptables_rule_plan(rule, check):
    from kvmagent.host.iptables import plan

    assert plan([rule])[0][0] == check


@pytest.mark.parametrize("rule", ["-F", "-D INPUT -j ACCEPT", "-P INPUT ACCEPT", "-X ZS",
                                  "-t security -A INPUT -j ACCEPT", "-A 'unterminated", ""])
def test_iptables_rules_that_do_not_add_are_refused(rule):
    from kvmagent.core.errors import AgentError
    from kvmagent.host.iptables import plan

    with pytest.raises(AgentError, match=r"iptablesRules\.0"):
        plan([rule])


def test_dmi_and_smbios_facts_from_a_sysfs_tree(tmp_path):
    """This CI machine has no DMI table (a VM without SMBIOS): the parsing is shown on a tree
    laid out as the kernel does (/sys/class/dmi/id, /sys/firmware/dmi/entries/<type>-<n>/raw)."""
    from kvmagent.host.facts import dmi_facts

    dmi = tmp_path / "class/dmi/id"
    dmi.mkdir(parents=True)
    for name, value in {"product_name": "PowerEdge R740", "product_serial": "9XK2T33",
                        "sys_vendor": "Dell Inc.", "product_uuid": "4c4c4544-0058-4b10-8032-b9c04f543333",
                        "bios_vendor": "Dell Inc.", "bios_version": "2.12.2",
                        "bios_date": "07/09/2021"}.items():
        (dmi / name).write_text(value + "\n")
    entries = tmp_path / "firmware/dmi/entries"
    for i in range(24):  # 24 memory devices (type 17)
        (entries / f"17-{i}").mkdir(parents=True)
    psu = entries / "39-0"
    psu.mkdir(parents=True)
    # SMBIOS type 39: header (type, length 0x16, handle), group, strings #1..#7, max power 750 W.
    area = bytes([39, 0x16, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7]) + (750).to_bytes(2, "little") + bytes(8)
    strings = b"\0".join([b"PSU1", b"PWR SPLY,750W,RDNT,DELTA", b"DELL", b"CN1797", b"ASSET",
                          b"05RHVVA00", b"A00"]) + b"\0\0"
    (psu / "raw").write_bytes(area + strings)
    facts = dmi_facts(tmp_path)
    assert facts == {
        "system_product_name": "PowerEdge R740", "system_serial_number": "9XK2T33",
        "system_manufacturer": "Dell Inc.", "system_uuid": "4c4c4544-0058-4b10-8032-b9c04f543333",
        "bios_vendor": "Dell Inc.", "bios_version": "2.12.2", "bios_release_date": "07/09/2021",
        "memory_slots_maximum": "24", "power_supply_model_name": "PWR SPLY,750W,RDNT,DELTA",
        "power_supply_manufacturer": "DELL", "power_supply_max_power_capacity": "750"}


def test_no_dmi_means_null_facts_the_mn_skips(tmp_path):
    from kvmagent.host.facts import dmi_facts

    assert set(dmi_facts(tmp_path).values()) == {None}


def test_cpu_cache_totals_from_sysfs(tmp_path):
    """Two cores, private L1d/L1i/L2, one shared L3: what lscpu shows as totals."""
    from kvmagent.host.facts import cpu_cache_kib

    for cpu in (0, 1):
        for index, (level, kind, size, shared) in enumerate([
                (1, "Data", "32K", str(cpu)), (1, "Instruction", "32K", str(cpu)),
                (2, "Unified", "512K", str(cpu)), (3, "Unified", "16384K", "0-1")]):
            d = tmp_path / f"devices/system/cpu/cpu{cpu}/cache/index{index}"
            d.mkdir(parents=True)
            for name, value in (("level", level), ("type", kind), ("size", size),
                                ("shared_cpu_list", shared)):
                (d / name).write_text(f"{value}\n")
    assert cpu_cache_kib(tmp_path) == "128.0,1024.0,16384.0"
