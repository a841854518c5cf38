"""Compatibility fixtures: model center, virtiofs and ZBS vhost, called as ZStack's MN calls them.

Bodies are written as the MN's Java classes serialize them (Gson: nulls left out, primitives
always there, ``kvmHostAddons`` appended by KVMHost.java) and sent through
:func:`tests.zstack.wire.mn_async` (taskuuid + callbackurl, the reply read from the callback).
Each test asserts the fields the MN reads. Sources (see ../shared/ZSTACK-WIRE.md §5-6):

- model center: MountModelCenterCmd {modelCenterUuid, storageUrl}, MountModelCenterRsp
  {mountPoint} (MatheMatrix/zstack PR #3599, KVMAgentCommands); what the agent does and
  answers: zstack-utility kvmagent/kvmagent/plugins/host_model_mount_plugin.py
  (mount_model_center, list_model_centers: mounts [{modelCenterUuid, mountPoint, isMounted}]).
- virtiofs: AttachVirtiofsCmd {vmInstanceUuid, tag, sourcePath, mountPath} + cache, queue,
  DetachVirtiofsCmd {vmInstanceUuid, tag}; replies VirtiofsResponse {success, error,
  qgaMountAttempted, qgaMountSuccess, qgaMountError} and VirtiofsStatusResponse
  {libvirtVersion, virtiofsHotplugSupported} (zstack-utility plugins/virtiofs_plugin.py).
- ZBS vhost: ZbsStorageController.java PrepareVhostTargetEnvCmd {} and VhostTargetHealthCmd
  {containerName = "zbsvhost-" + managementIp, controlSock = VHOST_SOCKET_DIR + "/" +
  VHOST_ADMIN_SOCK_NAME}, VhostTargetHealthRsp {targetRunning}; healthy = success &&
  targetRunning (MatheMatrix/zstack plugin/zbs ZbsStorageController.java, ZbsConstants.java).

Real components: JuiceFS over FUSE, the tiny TCG guest with qemu-ga, dockerd, sysfs hugepages.
The vhost tests change dockerd's containers and the hugepage pools: run this file under
``flock /tmp/kvmagent-docker.lock flock /tmp/kvmagent-hugepages.lock``.
"""
from __future__ import annotations

import errno
import logging
import socket
import subprocess
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from kvmagent.core.plugin import discover_plugins
from kvmagent.host.hugepages import hugetlbfs_mounts
from kvmagent.virtiofs.domain_xml import shares_in_xml

from ..juicefs_kit import (  # noqa: F401
    JUICEFS,
    QUIET,
    LocalVolume,
    cleanup_mounts,
    daemons,
    mount_cleanup,
    seed,
)
from ..test_vhost import (  # noqa: F401
    busybox_image,
    dockerd_restored,
    engine_version,
    real_pool,
    real_pools,
    short_dir,
    start_target,
    stop_target,
)
from ..vmkit import boot_vm, guest_run, wait_guest_agent
from .wire import mn_async

ADDONS: dict = {}  # KVMHost.java appends "kvmHostAddons" to every body, often empty
SECRET = "Mn-s3cret"
INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


def zuuid() -> str:
    return uuidlib.uuid4().hex  # ZStack uuids: 32 hex digits, no dashes


@pytest.fixture
def models_volume():
    """A JuiceFS volume laid out as ZStack's model center has it: models under /models."""
    vol = LocalVolume("zsmodels")
    seed(vol, {"models/qwen/config.json": '{"model_type": "qwen2"}\n'})
    yield vol
    cleanup_mounts(vol.base)
    vol.remove()


# -- model center ---------------------------------------------------------------------------
async def test_modelcenter_mount_and_list_as_the_mn_sends_them(make_agent, mn, mount_cleanup,  # noqa: F811
                                                               models_volume, caplog):
    agent = await make_agent(plugins=discover_plugins(["host", "modelcenter"]),
                             modelcenter_mount_timeout=15)
    mc = zuuid()
    # storageUrl is the raw JuiceFS metadata URL, passed to juicefs verbatim
    body = {"modelCenterUuid": mc, "storageUrl": models_volume.meta, "kvmHostAddons": ADDONS}
    reply = await mn_async(agent, mn, "/modelcenter/mount", body, resource=mc, timeout=90)
    point = Path(agent.config.models_root) / mc
    assert reply["success"] is True and reply["mountPoint"] == str(point), reply
    # ZStack mounts the volume's "models" directory, read-only
    assert (point / "qwen" / "config.json").read_text() == '{"model_type": "qwen2"}\n'
    with pytest.raises(OSError) as err:
        (point / "qwen" / "new.bin").write_bytes(b"x")
    assert err.value.errno == errno.EROFS
    # The MN replays the mount (reconnect): the same answer, the same mount
    again = await mn_async(agent, mn, "/modelcenter/mount", body, resource=mc, timeout=90)
    assert again["success"] is True and again["mountPoint"] == str(point), again

    listed = await mn_async(agent, mn, "/modelcenter/list", {"kvmHostAddons": ADDONS})
    assert listed["success"] is True
    mine = [m for m in listed["mounts"] if m["modelCenterUuid"] == mc]
    assert len(mine) == 1 and mine[0]["mountPoint"] == str(point)
    assert mine[0]["isMounted"] is True

    # A directory under the root that nothing is mounted on (ZStack lists it too)
    (Path(agent.config.models_root) / "leftover").mkdir()
    listed = await mn_async(agent, mn, "/modelcenter/list", {"kvmHostAddons": ADDONS})
    left = [m for m in listed["mounts"] if m["modelCenterUuid"] == "leftover"]
    assert [m["isMounted"] for m in left] == [False]

    # A redis URL with a password whose server is down: a failure callback that, like every
    # log line, never shows the password
    caplog.set_level(logging.DEBUG)
    other = zuuid()
    bad = {"modelCenterUuid": other, "storageUrl": f"redis://:{SECRET}@127.0.0.1:1/1",
           "kvmHostAddons": ADDONS}
    reply = await mn_async(agent, mn, "/modelcenter/mount", bad, resource=other, timeout=90)
    assert reply["success"] is False and reply["error"], reply
    assert SECRET not in str(reply) and SECRET not in caplog.text
    assert "redis://:***@127.0.0.1:1/1" in reply["error"], reply
    assert not (Path(agent.config.models_root) / other).exists()
    # A credential juicefs reads only from the URL (a query parameter) reaches juicefs as is,
    # and no reply or log line
    bad["storageUrl"] = f"postgres://jfs@127.0.0.1:1/jfs?sslmode=disable&password={SECRET}"
    reply = await mn_async(agent, mn, "/modelcenter/mount", bad, resource=other, timeout=90)
    assert reply["success"] is False and "password=***" in reply["error"], reply
    assert SECRET not in str(reply) and SECRET not in caplog.text


async def test_modelcenter_mount_adopts_what_zstacks_agent_mounted(make_agent, mn, mount_cleanup,  # noqa: F811
                                                                    models_volume):
    """A host taken over from ZStack's agent: its juicefs mount of the model center is already
    at <root>/<uuid> (same command line as host_model_mount_plugin.py). The MN's replayed mount
    reuses it (no second juicefs), and from then on it is this agent's (restored, watched)."""
    agent = await make_agent(plugins=discover_plugins(["host", "modelcenter"]),
                             modelcenter_mount_timeout=30)
    mc = zuuid()
    point = Path(agent.config.models_root) / mc
    point.mkdir(parents=True)
    subprocess.run([JUICEFS, *QUIET, "mount", models_volume.meta, str(point), "--read-only", "-d",
                    "--subdir", "models", "--no-bgjob"], check=True, capture_output=True,
                   timeout=60)
    before = sorted(p.pid for p in daemons(point))
    assert before
    listed = await mn_async(agent, mn, "/modelcenter/list", {"kvmHostAddons": ADDONS})
    assert [m["isMounted"] for m in listed["mounts"] if m["modelCenterUuid"] == mc] == [True]

    reply = await mn_async(agent, mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": models_volume.meta, "kvmHostAddons": ADDONS},
        timeout=90)
    assert reply["success"] is True and reply["mountPoint"] == str(point), reply
    assert sorted(p.pid for p in daemons(point)) == before, "reused, not mounted twice"
    assert (point / "qwen" / "config.json").exists()
    listed = await mn_async(agent, mn, "/modelcenter/list", {"kvmHostAddons": ADDONS})
    mine = [m for m in listed["mounts"] if m["modelCenterUuid"] == mc]
    assert [(m["isMounted"], m["healthy"]) for m in mine] == [(True, True)], mine
    assert agent.ctx.state.names("modelcenter") == [f"modelcenter/{mc}"]


async def test_modelcenter_mount_refuses_a_url_juicefs_cannot_use(make_agent, mn):
    agent = await make_agent(plugins=discover_plugins(["host", "modelcenter"]))
    mc = zuuid()
    reply = await mn_async(agent, mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": f"s3://u:{SECRET}@bucket/x", "kvmHostAddons": ADDONS})
    assert reply["success"] is False and "storageUrl" in reply["error"], reply
    assert SECRET not in reply["error"]
    assert not (Path(agent.config.models_root) / mc).exists()


# -- virtiofs ---------------------------------------------------------------------------------
def _filesystem(dom: libvirt.virDomain, tag: str, flags: int = 0) -> ET.Element | None:
    for fs in ET.fromstring(dom.XMLDesc(flags)).findall("./devices/filesystem"):
        target = fs.find("target")
        if target is not None and target.get("dir") == tag:
            return fs
    return None


def _virtiofs_queue_sizes(qtree: str) -> list[int]:
    """queue-size of every vhost-user-fs device in QEMU's ``info qtree``."""
    sizes, device = [], ""
    for line in qtree.splitlines():
        text = line.strip()
        if text.startswith("dev: "):
            device = text[5:].split(",")[0]
        elif text.startswith("queue-size = ") and device == "vhost-user-fs-device":
            sizes.append(int(text.split()[2]))
    return sizes


@pytest.mark.libvirt
@pytest.mark.guest
async def test_virtiofs_attach_detach_status_as_the_mn_sends_them(
        make_agent, mn, lv, guest_image, workdir, mount_cleanup, models_volume, tmp_path):  # noqa: F811
    agent = await make_agent(
        plugins=discover_plugins(["host", "vm", "modelcenter", "virtiofs"]),
        vm_path_roots=[workdir, guest_image.kernel.parent], modelcenter_mount_timeout=30,
        juicefs_cache_dir=tmp_path / "jfscache")
    status = await mn_async(agent, mn, "/virtiofs/status", {"kvmHostAddons": ADDONS})
    assert status["virtiofsHotplugSupported"] is True, status  # libvirt 9.0 >= 7.9.0
    assert status["libvirtVersion"].split(".")[0].isdigit(), status
    assert status.get("success", True) is True  # ZStack's reply has no success: default true

    mc = zuuid()
    reply = await mn_async(agent, mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": models_volume.meta, "kvmHostAddons": ADDONS},
        timeout=90)
    assert reply["success"], reply
    source = f"{reply['mountPoint']}/qwen"

    vm = await boot_vm(agent, mn, lv, guest_image, workdir, memory_backing="memfd-shared")
    dom = lv[0].lookupByUUIDString(vm.uuid)
    await wait_guest_agent(vm, dom)
    attach = {"vmInstanceUuid": vm.uuid, "tag": "model-qwen", "sourcePath": source,
              "mountPath": "/mnt/models/qwen", "cache": "always", "queue": 1024,
              "kvmHostAddons": ADDONS}
    reply = await mn_async(agent, mn, "/virtiofs/attach", attach, resource=vm.uuid)
    assert reply["success"] is True, reply
    assert (reply["qgaMountAttempted"], reply["qgaMountSuccess"]) == (True, True), reply
    assert reply.get("qgaMountError") is None
    # The Java field "cache" chose the cache mode; queue reached the device
    fs = _filesystem(dom, "model-qwen")
    assert fs.find("binary/cache").get("mode") == "always"
    assert fs.find("driver").get("queue") == "1024"
    assert _filesystem(dom, "model-qwen", INACTIVE) is not None, "persistent too"
    assert await guest_run(dom, "cat", "/mnt/models/qwen/config.json") == (
        0, '{"model_type": "qwen2"}\n')

    # The in-guest mount fails: ZStack's current agent keeps the device and answers success
    # with qgaMountError (mkdir under /proc fails in any Linux guest)
    second = {**attach, "tag": "model-qwen-2", "mountPath": "/proc/models/qwen", "queue": 256}
    reply = await mn_async(agent, mn, "/virtiofs/attach", second, resource=vm.uuid)
    assert reply["success"] is True, reply
    assert (reply["qgaMountAttempted"], reply["qgaMountSuccess"]) == (True, False), reply
    assert reply["qgaMountError"] and "/proc/models/qwen" in reply["qgaMountError"], reply
    assert _filesystem(dom, "model-qwen-2") is not None, "the device stays attached"
    # queue reached QEMU's device, not only the XML
    qtree = libvirt_qemu.qemuMonitorCommand(dom, "info qtree",
                                            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    assert sorted(_virtiofs_queue_sizes(qtree)) == [256, 1024], qtree

    status = await mn_async(agent, mn, "/virtiofs/status", {"kvmHostAddons": ADDONS})
    assert status["virtiofsHotplugSupported"] is True

    for tag in ("model-qwen", "model-qwen-2"):
        reply = await mn_async(agent, mn, "/virtiofs/detach", {
            "vmInstanceUuid": vm.uuid, "tag": tag, "kvmHostAddons": ADDONS}, resource=vm.uuid,
            timeout=90)
        assert reply["success"] is True, reply
        assert _filesystem(dom, tag) is None and _filesystem(dom, tag, INACTIVE) is None
    assert shares_in_xml(dom.XMLDesc(0)) == []
    code, mounts = await guest_run(dom, "cat", "/proc/mounts")
    assert code == 0 and "/mnt/models/qwen" not in mounts, "unmounted in the guest first"


# -- ZBS vhost --------------------------------------------------------------------------------
PREPARE = "/zbs/primarystorage/vhost/target/prepareenv"
HEALTH = "/zbs/primarystorage/vhost/target/health"


@pytest.mark.docker
@pytest.mark.hugepages
async def test_zbs_vhost_prepareenv_as_the_mn_sends_it(make_agent, mn, real_pools,  # noqa: F811
                                                       dockerd_restored, tmp_path):  # noqa: F811
    agent = await make_agent(hugetlbfs_mount_point=tmp_path / "hp2m")
    reply = await mn_async(agent, mn, PREPARE, {"kvmHostAddons": ADDONS})
    assert reply["success"] is True, reply
    assert real_pool("2M").available >= 1024, "1024 free 2 MiB pages (ZStack's default)"
    assert reply["hugetlbfsMount"] in hugetlbfs_mounts(Path("/proc"), "2M")
    assert engine_version() is not None


@pytest.mark.docker
async def test_zbs_vhost_health_as_the_mn_sends_it(make_agent, mn, busybox_image,  # noqa: F811
                                                   short_dir):  # noqa: F811
    agent = await make_agent()
    ip = "192.0.2.9"  # the host's management IP, as the MN names the container after it
    client, container, control = start_target(busybox_image, short_dir, f"zbsvhost-{ip}")
    # controlSock is /var/zbsvhost/sockets/admin.sock on a ZStack host; a path of the test's
    # own here, so no test touches a real target's directory.
    body = {"containerName": f"zbsvhost-{ip}", "controlSock": str(short_dir / "admin.sock"),
            "kvmHostAddons": ADDONS}
    try:
        reply = await mn_async(agent, mn, HEALTH, body)
        assert (reply["success"], reply["targetRunning"]) == (True, True), reply

        control.close()  # the target stops answering on its control socket
        reply = await mn_async(agent, mn, HEALTH, body)
        assert (reply["success"], reply["targetRunning"]) == (True, False), reply
        assert "accepts no connection" in reply["reason"]

        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        (short_dir / "admin.sock").unlink()
        control.bind(str(short_dir / "admin.sock"))
        control.listen(4)
        container.kill()
        container.wait(timeout=30)
        reply = await mn_async(agent, mn, HEALTH, body)
        assert (reply["success"], reply["targetRunning"]) == (True, False), reply
        assert reply["reason"] == f"container zbsvhost-{ip} is exited"
    finally:
        stop_target(client, container, control)
    reply = await mn_async(agent, mn, HEALTH, body)
    assert (reply["success"], reply["targetRunning"]) == (True, False), reply
    assert reply["reason"] == f"container zbsvhost-{ip} does not exist"

    # A host managed over IPv6: docker names cannot hold ':', so no such target runs; the MN
    # gets targetRunning false, not an error
    reply = await mn_async(agent, mn, HEALTH, {**body, "containerName": "zbsvhost-fd00::9"})
    assert (reply["success"], reply["targetRunning"]) == (True, False), reply
