"""Host commands as the ZStack MN sends them (ZSTACK-WIRE.md §2).

Bodies are written from ZS plugin/kvm/src/main/java/org/zstack/kvm/KVMAgentCommands.java
(ConnectCmd, PingCmd, UpdateHostConfigurationCmd, HostFactCmd, HostCapacityCmd) as
KVMHost.java puts them on the wire; the hugepage bodies from ZU host_plugin.py
(``enable_hugepage``), their Java class being premium.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import uuid as uuidlib
from pathlib import Path

import psutil
import pytest

from kvmagent.host.facts import cpuinfo

from .wire import mn_async, mn_sync

pytestmark = pytest.mark.libvirt

HOST = "6b5f8e2f0c6a4e1f9d3a2b7c8e9f0a1b"
HUGEPAGES_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


def connect_cmd(mn, **changes):
    """KVMHost.connectToAgent (KH:4802-4817): every field always sent (iptablesRules [] by
    Platform.java, primitives by Gson); no kvmHostAddons (direct restf.syncJsonPost)."""
    return {"hostUuid": HOST, "sendCommandUrl": mn.send_command_url, "iptablesRules": [],
            "ignoreMsrs": False, "pageTableExtensionDisabled": False, "tcpServerPort": 7123,
            "version": "5.2.1", **changes}


# HostFactResponse fields (KAC:448-497) the MN stores; all must be present in the reply.
FACT_FIELDS = (
    "osDistribution osVersion osRelease qemuImgVersion libvirtVersion hvmCpuFlag eptFlag "
    "cpuArchitecture cpuModelName cpuGHz cpuProcessorNum powerSupplyModelName "
    "powerSupplyManufacturer ipmiAddress powerSupplyMaxPowerCapacity hostCpuModelName "
    "systemProductName systemSerialNumber systemManufacturer systemUUID biosVendor biosVersion "
    "biosReleaseDate bmcVersion uptime memorySlotsMaximum cpuCache ipAddresses "
    "libvirtCapabilities virtualizerInfo iscsiInitiatorName").split()


async def test_echo_with_the_empty_body_restfacade_sends(agent):
    """RESTFacadeImpl.echo: syncJsonPost(url, "") - an empty string body; only 2xx counts."""
    assert (await mn_sync(agent, "/host/echo", ""))["success"] is True


async def test_fact_before_connect_has_what_the_mn_dereferences(agent, mn):
    """createCollectHostFactsFlow runs before /host/connect: async via KVMHost.Http, body
    HostFactCmd {} + kvmHostAddons, header X-Resource-UUID. The MN dereferences hvmCpuFlag
    (null = "cannot find either 'vmx' or 'svm'"), libvirtVersion (compareTo) and
    virtualizerInfo (setUuid) without null checks."""
    fact = await mn_async(agent, mn, "/host/fact", {"kvmHostAddons": {}}, resource=HOST)
    assert fact["success"] is True, fact
    assert [f for f in FACT_FIELDS if f not in fact] == []
    cpu = cpuinfo(Path("/proc"))
    expected_hvm = "vmx" if "vmx" in cpu.flags else "svm" if "svm" in cpu.flags else ""
    assert fact["hvmCpuFlag"] == expected_hvm  # honest: "" on this TCG machine, never null
    assert fact["eptFlag"] == ("ept" if "ept" in cpu.flags else None)
    assert fact["libvirtVersion"] and fact["qemuImgVersion"]
    assert fact["virtualizerInfo"]["virtualizer"] == "qemu-kvm"
    assert fact["virtualizerInfo"]["version"] == fact["qemuVersion"]
    assert fact["cpuProcessorNum"] == str(os.cpu_count())
    assert all(not a.startswith("127.") for a in fact["ipAddresses"])
    assert fact["uptime"] and len(fact["cpuCache"].split(",")) == 3


async def test_connect_then_ping_echoes_the_mns_version_and_uuid(agent, mn):
    """Ping (async, body {hostUuid}, no kvmHostAddons): the MN reconnects when hostUuid or
    version differ from its own and updates the URL when sendCommandUrl differs."""
    reply = await mn_sync(agent, "/host/connect", connect_cmd(mn, tcpServerPort=0))
    assert reply["success"] is True and reply["libvirtVersion"] and reply["qemuVersion"]
    ping = await mn_async(agent, mn, "/host/ping", {"hostUuid": HOST})
    assert (ping["success"], ping["hostUuid"], ping["version"], ping["sendCommandUrl"]) == \
        (True, HOST, "5.2.1", mn.send_command_url)


async def test_update_configuration_moves_reports_to_the_new_url(agent, mn):
    """UpdateHostConfigurationCmd {hostUuid, sendCommandUrl}, async, no kvmHostAddons."""
    await mn_sync(agent, "/host/connect", connect_cmd(mn, sendCommandUrl="http://10.9.9.9:8080/x",
                                                      tcpServerPort=0))
    reply = await mn_async(agent, mn, "/host/update/configuration",
                           {"hostUuid": HOST, "sendCommandUrl": mn.send_command_url})
    assert reply == {"success": True, "error": None}
    ping = await mn_async(agent, mn, "/host/ping", {"hostUuid": HOST})
    assert ping["sendCommandUrl"] == mn.send_command_url
    agent.ctx.reporter.report("/kvm/reportvmstate", {"vmUuid": "v", "vmState": "Running"})
    assert (await mn.wait_report("/kvm/reportvmstate"))["hostUuid"] == HOST


async def test_connect_opens_the_mns_tcp_liveness_channel(make_agent, mn):
    """tcpServerPort: the MN's TCP server (KVMHostFactory.startTcpServer) expects a connection
    from the host that keeps writing; we play that server on the MN stub's address."""
    received = asyncio.Queue()

    async def serve(reader, writer):
        received.put_nowait(await reader.read(16))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        agent = await make_agent()
        reply = await mn_sync(agent, "/host/connect", connect_cmd(mn, tcpServerPort=port))
        assert reply["success"] is True
        assert (await asyncio.wait_for(received.get(), 10)).startswith(b"0")
        # An agent restart: the MN sees pings answered and does not connect again.
        await agent.client.close()
        await make_agent()
        assert (await asyncio.wait_for(received.get(), 10)).startswith(b"0")
    finally:
        server.close()


@pytest.fixture
def netns():
    """A network namespace whose firewall stands in for the host's (the host's own firewall is
    shared with the other tests on this machine)."""
    name = f"kvt-ipt-{uuidlib.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


def rules_in(ns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-S"], check=True,
                         capture_output=True, text=True).stdout
    return out.splitlines()


async def test_iptables_rules_are_applied_once(make_agent, mn, netns):
    """KvmHost.iptables.rule.* (conf/zstack.properties examples), sent at every connect."""
    agent = await make_agent(iptables_command=["ip", "netns", "exec", netns, "iptables"])
    rules = ["-N ZS-HOST", "-A ZS-HOST -s 172.20.0.100/32 -d 10.0.0.1/32 -p tcp -m tcp "
             "--sport 4000 --dport 500 -j ACCEPT", "-I INPUT 1 -j ZS-HOST"]
    for _ in range(2):  # a reconnect replays them: nothing twice
        reply = await mn_sync(agent, "/host/connect", connect_cmd(mn, iptablesRules=rules,
                                                                  tcpServerPort=0))
        assert reply["success"] is True, reply
    applied = rules_in(netns)
    assert applied.count("-N ZS-HOST") == 1 and applied.count("-A INPUT -j ZS-HOST") == 1
    assert len([r for r in applied if r.startswith("-A ZS-HOST")]) == 1


async def test_iptables_rules_that_remove_are_refused_and_change_nothing(make_agent, mn, netns):
    agent = await make_agent(iptables_command=["ip", "netns", "exec", netns, "iptables"])
    before = rules_in(netns)
    rules = ["-N ZS-HOST", "-F INPUT"]
    reply = await mn_sync(agent, "/host/connect", connect_cmd(mn, iptablesRules=rules))
    assert reply["success"] is False and "iptablesRules.1" in reply["error"]
    assert rules_in(netns) == before and agent.ctx.identity.host_uuid is None


def fake_kvm_params(root: Path, ignore_msrs: str, ept: str | None) -> Path:
    (root / "module/kvm/parameters").mkdir(parents=True)
    (root / "module/kvm/parameters/ignore_msrs").write_text(ignore_msrs + "\n")
    if ept is not None:
        (root / "module/kvm_intel/parameters").mkdir(parents=True)
        (root / "module/kvm_intel/parameters/ept").write_text(ept + "\n")
    return root


async def test_ignore_msrs_is_written_to_the_kvm_parameter(make_agent, mn, tmp_path):
    """Unit test on a sysfs tree (the real one is below): Y when asked, N when not."""
    sysfs = fake_kvm_params(tmp_path / "sys", "N", None)
    agent = await make_agent(sysfs_root=sysfs)
    body = connect_cmd(mn, ignoreMsrs=True, tcpServerPort=0)
    assert (await mn_sync(agent, "/host/connect", body))["success"]
    assert (sysfs / "module/kvm/parameters/ignore_msrs").read_text() == "Y\n"
    assert (await mn_sync(agent, "/host/connect", connect_cmd(mn, tcpServerPort=0)))["success"]
    assert (sysfs / "module/kvm/parameters/ignore_msrs").read_text() == "N\n"


async def test_ignore_msrs_on_this_host(agent, mn):
    param = Path("/sys/module/kvm/parameters/ignore_msrs")
    if not param.exists():
        pytest.skip("kvm module not loaded on this machine")
    before = param.read_text()
    body = connect_cmd(mn, ignoreMsrs=before.strip() != "Y", tcpServerPort=0)
    if not param.stat().st_mode & 0o200:  # read-only here (e.g. kvm built with it fixed)
        reply = await mn_sync(agent, "/host/connect", body)
        assert reply["success"] is False and "ignoreMsrs: cannot set" in reply["error"]
        assert agent.ctx.identity.host_uuid is None  # refused before anything changed
        return
    try:
        assert (await mn_sync(agent, "/host/connect", body))["success"]
        assert param.read_text() != before
    finally:
        param.write_text(before)


async def test_an_ept_mismatch_is_refused_naming_the_field(make_agent, mn, tmp_path):
    """The MN sends pageTableExtensionDisabled=true when the facts had no eptFlag; ZU reloads
    kvm_intel, we refuse (an Intel host's kvm_intel tree; this machine is AMD)."""
    sysfs = fake_kvm_params(tmp_path / "sys", "N", "Y")
    agent = await make_agent(sysfs_root=sysfs)
    reply = await mn_sync(agent, "/host/connect", connect_cmd(mn, pageTableExtensionDisabled=True))
    assert reply["success"] is False and "pageTableExtensionDisabled" in reply["error"]
    assert agent.ctx.identity.host_uuid is None
    ok = await mn_sync(agent, "/host/connect", connect_cmd(mn, tcpServerPort=0))
    assert ok["success"] is True  # matching: nothing to do


async def test_capacity_as_the_capacity_check_reads_it(agent, mn):
    """HostCapacityCmd {} + kvmHostAddons via KVMHostAsyncHttpCallMsg (KH:1444-1477)."""
    cap = await mn_async(agent, mn, "/host/capacity", {"kvmHostAddons": {}}, resource=HOST)
    assert cap["success"] is True
    assert cap["cpuNum"] == os.cpu_count() and cap["cpuSockets"] >= 1
    assert cap["totalMemory"] == psutil.virtual_memory().total >= 2**30  # kvm.reservedMemory
    assert cap["usedCpu"] >= 0 and cap["usedMemory"] >= 0


def pages_2m() -> tuple[int, int]:
    return (int((HUGEPAGES_2M / "nr_hugepages").read_text()),
            int((HUGEPAGES_2M / "free_hugepages").read_text()))


async def test_enable_and_disable_hugepage(make_agent, mn, hugepage_lock):
    """pageSize MiB, reserveSize bytes (ZU: pages = (memory - reserve) / pageSize)."""
    agent = await make_agent()
    total = psutil.virtual_memory().total
    in_use = pages_2m()[0] - pages_2m()[1]
    reserve = total - (in_use + 16) * 2 * 2**20  # leaves room for exactly 16 more 2M pages
    body = {"pageSize": 2, "reserveSize": reserve, "kvmHostAddons": {}}
    reply = await mn_async(agent, mn, "/host/enable/hugepage", body)
    assert reply["success"] is True, reply
    assert pages_2m()[0] >= in_use + 16

    # A reboot empties the pool; the next agent start puts it back.
    (HUGEPAGES_2M / "nr_hugepages").write_text(f"{in_use}\n")
    await agent.client.close()
    restarted = await make_agent()
    for _ in range(100):
        if pages_2m()[0] >= in_use + 16:
            break
        await asyncio.sleep(0.1)
    assert pages_2m()[0] >= in_use + 16

    reply = await mn_async(restarted, mn, "/host/disable/hugepage", {"kvmHostAddons": {}})
    assert reply["success"] is True
    assert pages_2m()[1] == 0  # every free page given back
    assert restarted.ctx.state.load("host-hugepage") is None


@pytest.mark.parametrize("body, field", [
    ({"pageSize": 3, "reserveSize": 0}, "pageSize"),
    ({"pageSize": 2, "reserveSize": 2**62}, "reserveSize"),
    ({"pageSize": 2}, "reserveSize"),
])
async def test_bad_hugepage_requests_fail_naming_the_field(agent, mn, body, field, hugepage_lock):
    before = pages_2m()[0]
    reply = await mn_async(agent, mn, "/host/enable/hugepage", body)
    assert reply["success"] is False and f"'{field}'" in reply["error"]
    assert pages_2m()[0] == before
