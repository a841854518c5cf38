"""Virtiofs shares into the real tiny guest (TCG) through the agent: a JuiceFS model mounted
by /modelcenter/mount, attached live, seen and read by the guest, detached again."""
from __future__ import annotations

import asyncio
import errno
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import psutil
import pytest

from kvmagent.core import mounttable
from kvmagent.core.plugin import discover_plugins
from kvmagent.virtiofs.domain_xml import shares_in_xml
from kvmagent.virtiofs.guest import guest_mount, guest_umount
from kvmagent.vm.config import VirtiofsShare
from kvmagent.vm.guest_agent import GuestAgentError

from .guest.domain import tiny_domain_xml
from .juicefs_kit import daemons, mount_cleanup, signal_all, volume  # noqa: F401
from .vmkit import boot_vm, guest_run, wait_guest_agent

INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


def uid() -> str:
    return uuidlib.uuid4().hex


def virtiofsd_for(export: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if cmd and "virtiofsd" in cmd[0] and any(f"source={export}" in a for a in cmd):
            found.append(proc)
    return found


def stable_xml(dom: libvirt.virDomain, flags: int = 0) -> str:
    """The domain XML without what changes by itself (the guest agent channel's state)."""
    root = ET.fromstring(dom.XMLDesc(flags))
    for target in root.findall("./devices/channel/target"):
        target.attrib.pop("state", None)
    return ET.tostring(root, encoding="unicode")


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        await asyncio.sleep(0.2)


# -- no VM needed ---------------------------------------------------------------------------
def test_share_xml_is_built_by_elementtree_and_parsed_back():
    share = VirtiofsShare(source_dir="/m/a", tag="t.1_-", binary="/usr/lib/qemu/virtiofsd",
                          readonly=True, cache="always", export_dir='/ro/"><x', readonly_in_xml=False)
    xml = share.to_xml()
    assert 'dir="/ro/&quot;&gt;&lt;x"' in xml, "values are escaped by the XML library"
    assert "<readonly" not in xml and 'mode="always"' in xml
    parsed = VirtiofsShare.from_element(ET.fromstring(xml))
    assert (parsed.tag, parsed.source_dir, parsed.cache) == ("t.1_-", '/ro/"><x', "always")
    auto = VirtiofsShare(source_dir="/m/x", tag="t", readonly=False).to_xml()
    assert "<cache" not in auto, "libvirt 9 knows only none/always; auto is virtiofsd's default"
    assert "<readonly" in VirtiofsShare(source_dir="/m/x", tag="t").to_xml(), "old API unchanged"
    small = VirtiofsShare(source_dir="/m/x", tag="t", queue=256)
    assert ET.fromstring(small.to_xml()).find("driver").get("queue") == "256"
    assert VirtiofsShare.from_element(ET.fromstring(small.to_xml())).queue == 256


@pytest.mark.parametrize("extra, cache, queue", [
    ({}, "none", 1024),  # ZStack's current defaults
    ({"cache": "always", "queue": 1024}, "always", 1024),  # the MN's Java field names
    ({"cacheMode": "auto", "cache": "always"}, "auto", 1024),  # cacheMode wins
    ({"cache": None, "queue": 0}, "none", 1024),  # null / an unset Java int
    ({"queue": 64, "mountPath": ""}, "none", 64),
])
def test_attach_fields_as_zstack_sends_them(extra, cache, queue):
    from plugins.virtiofs import AttachCmd
    cmd = AttachCmd.model_validate({"vmInstanceUuid": uid(), "tag": "t", "sourcePath": "/m/x",
                                    **extra})
    assert (cmd.cache_mode, cmd.queue) == (cache, queue)
    assert cmd.mount_path is None


@pytest.mark.parametrize("extra, field", [
    ({"cache": "writeback"}, "cache"), ({"cacheMode": "fast"}, "cacheMode"),
    ({"queue": 1000}, "queue"), ({"queue": 2048}, "queue"), ({"queue": -1}, "queue"),
    ({"queue": "many"}, "queue"), ({"queue": True}, "queue"),
])
def test_attach_fields_refused_naming_the_field(extra, field):
    from pydantic import ValidationError

    from plugins.virtiofs import AttachCmd
    with pytest.raises(ValidationError) as err:
        AttachCmd.model_validate({"vmInstanceUuid": uid(), "tag": "t", "sourcePath": "/m/x",
                                  **extra})
    assert [e["loc"] for e in err.value.errors()] == [(field,)], err.value.errors()


async def test_guest_mount_through_the_guest_agent_protocol():
    calls = []
    mounted = {"yes": False}

    async def send(cmd):
        calls.append(cmd)
        name = cmd["execute"]
        if name == "guest-ping":
            return {}
        if name == "guest-exec":
            calls[-1] = (cmd["arguments"]["path"], cmd["arguments"]["arg"])
            if cmd["arguments"]["path"] == "mount":
                mounted["yes"] = True
            return {"pid": len(calls)}
        if name == "guest-exec-status":
            import base64
            out = base64.b64encode(b"llama /data/m\\040x virtiofs ro 0 0\n" if mounted["yes"]
                                   else b"proc /proc proc rw 0 0\n").decode()
            return {"exited": True, "exitcode": 0, "out-data": out}
        raise AssertionError(cmd)

    result = await guest_mount(send, "llama", "/data/m x", True, 5, 5)
    assert (result.attempted, result.success, result.error) == (True, True, None)
    execs = [c for c in calls if isinstance(c, tuple)]
    assert execs == [("cat", ["/proc/mounts"]), ("mkdir", ["-p", "--", "/data/m x"]),
                     ("mount", ["-t", "virtiofs", "-o", "ro", "--", "llama", "/data/m x"])]
    calls.clear()
    again = await guest_mount(send, "llama", "/data/m x", True, 5, 5)
    assert again.success and [c for c in calls if isinstance(c, tuple)] == [
        ("cat", ["/proc/mounts"])], "already mounted: nothing more to do"

    async def absent(cmd):
        raise GuestAgentError("QEMU guest agent is not connected")

    result = await guest_mount(absent, "llama", "/m", True, 5, 5)
    # ZStack's agent reports a guest agent that does not answer as an attempted mount
    assert (result.attempted, result.success) == (True, False)
    assert result.error.startswith("QGA not connected for VM, unable to mount virtiofs source")


def _guest(mount_failures: int):
    """A guest agent whose ``mount`` fails (as before the hot-plugged device is probed)
    ``mount_failures`` times, then succeeds."""
    import base64
    mounts = {"n": 0}

    async def send(cmd):
        args = cmd.get("arguments", {})
        if cmd["execute"] == "guest-exec":
            if args["path"] == "mount":
                mounts["n"] += 1
            return {"pid": mounts["n"] if args["path"] == "mount" else 0}
        if cmd["execute"] == "guest-exec-status":
            if args["pid"] == 0:  # cat /proc/mounts, mkdir
                return {"exited": True, "exitcode": 0, "out-data": ""}
            ok = args["pid"] > mount_failures
            err = base64.b64encode(b"mount: mounting t on /m failed: Invalid argument").decode()
            return {"exited": True, "exitcode": 0 if ok else 255, "err-data": "" if ok else err}
        return {}
    return send, mounts


async def test_guest_mount_is_retried_while_the_guest_probes_the_device():
    send, mounts = _guest(mount_failures=2)
    result = await guest_mount(send, "t", "/m", True, 5, wait=10)
    assert (result.attempted, result.success, result.error) == (True, True, None)
    assert mounts["n"] == 3
    send, mounts = _guest(mount_failures=1000)
    result = await guest_mount(send, "t", "/m", True, 5, wait=0.6)
    assert (result.attempted, result.success) == (True, False)
    assert result.error == ("Failed to mount virtiofs source in VM (tried for 0.6s): mount: "
                            "mounting t on /m failed: Invalid argument"), result
    assert 2 <= mounts["n"] <= 3, "retried at its pace, then gave up"


async def test_guest_umount_undoes_every_mount_of_the_tag_and_never_raises():
    import base64
    table = ("t /models/t virtiofs ro 0 0\nother /o virtiofs ro 0 0\n"
             "t /data/my\\040t virtiofs rw 0 0\nt /busy virtiofs rw 0 0\n")
    ran = []

    async def send(cmd):
        args = cmd.get("arguments", {})
        if cmd["execute"] == "guest-exec":
            ran.append((args["path"], args["arg"]))
            return {"pid": len(ran)}
        path, argv = ran[args["pid"] - 1]
        if path == "cat":
            return {"exited": True, "exitcode": 0, "out-data": base64.b64encode(
                table.encode()).decode()}
        failed = argv[-1] == "/busy"
        return {"exited": True, "exitcode": 1 if failed else 0,
                "err-data": base64.b64encode(b"umount: busy").decode() if failed else ""}

    result = await guest_umount(send, "t", 5)
    assert result.paths == ["/models/t", "/data/my t"]
    assert result.outcome == "in-guest unmount failed at /busy: umount: busy"
    assert (result.attempted, result.ok) == (True, False)
    assert [argv for path, argv in ran if path == "umount"] == [
        ["-l", "--", "/models/t"], ["-l", "--", "/data/my t"], ["-l", "--", "/busy"]]

    async def gone(cmd):
        raise GuestAgentError("QEMU guest agent is not connected")

    result = await guest_umount(gone, "t", 5)
    assert result.paths == [] and "not connected" in result.outcome
    assert (result.attempted, result.ok) == (False, False), "no agent: not attempted"


# -- with the tiny guest ----------------------------------------------------------------------
def _plugins():
    return discover_plugins(["host", "vm", "modelcenter", "virtiofs"])


@pytest.fixture
async def vfs_agent(make_agent, mount_cleanup, workdir, guest_image, tmp_path):  # noqa: F811
    return await make_agent(plugins=_plugins(), vm_path_roots=[workdir, guest_image.kernel.parent],
                            juicefs_cache_dir=tmp_path / "jfscache",
                            modelcenter_file_roots=[tmp_path, workdir])


@pytest.mark.libvirt
@pytest.mark.guest
@pytest.mark.juicefs
async def test_juicefs_model_is_shared_live_read_in_the_guest_and_detached(
        vfs_agent, make_agent, mn, lv, guest_image, workdir, volume, tmp_path):  # noqa: F811
    agent = vfs_agent
    mc = uid()
    reply = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": volume.storage_url}, timeout=90)
    assert reply["success"], reply
    model = Path(reply["mountPoint"]) / "llama-7b"
    model.mkdir()
    (model / "README.txt").write_text("llama weights v1\n")

    vm = await boot_vm(agent, mn, lv, guest_image, workdir, memory_backing="memfd-shared")
    dom = lv[0].lookupByUUIDString(vm.uuid)
    await wait_guest_agent(vm, dom)
    body = {"vmInstanceUuid": vm.uuid, "tag": "llama", "sourcePath": str(model),
            "mountPath": "/models/llama"}
    started = time.monotonic()
    reply = await agent.call_async(mn, "/virtiofs/attach", body, timeout=60)
    assert reply == {"success": True, "error": None, "qgaMountAttempted": True,
                     "qgaMountSuccess": True, "qgaMountError": None}, reply
    # The guest's own qemu-ga mounted the tag at mountPath, read-only, and the file reads.
    assert await guest_run(dom, "cat", "/models/llama/README.txt") == (0, "llama weights v1\n")
    code, mounts = await guest_run(dom, "cat", "/proc/mounts")
    assert code == 0 and "llama /models/llama virtiofs ro" in mounts, mounts
    await vm.console.wait_for("VIRTIOFS-MOUNTED llama", timeout=60)
    await vm.console.wait_for("VIRTIOFS-READ llama README.txt llama weights v1", timeout=30)
    print(f"attach to read in the guest: {time.monotonic() - started:.2f}s")

    live = shares_in_xml(dom.XMLDesc(0))
    assert [s.tag for s in live] == ["llama"]
    assert [s.tag for s in shares_in_xml(dom.XMLDesc(INACTIVE))] == ["llama"], \
        "attached to the persistent definition too"
    export = live[0].source_dir
    assert mounttable.mount_at(export).readonly
    with pytest.raises(OSError) as err:
        (Path(export) / "evil.txt").write_text("x")
    assert err.value.errno == errno.EROFS, "the share is read-only on the host side"
    assert virtiofsd_for(export), "libvirt started virtiofsd for the share"

    status = await agent.call("/virtiofs/status", {"vmInstanceUuid": vm.uuid})
    assert status["supported"] is True and status["libvirtVersion"] and status["virtiofsdFound"]
    assert status["virtiofsHotplugSupported"] is True  # libvirt 9.0 here
    assert status["shares"] == [{"vmInstanceUuid": vm.uuid, "tag": "llama",
                                 "sourcePath": str(model), "readonly": True, "cacheMode": "none",
                                 "queue": 1024,
                                 "deviceAlias": live[0].alias, "problem": None}]

    # Same tag and source again: a no-op. Same tag, other source: refused.
    assert (await agent.call_async(mn, "/virtiofs/attach", body))["success"] is True
    assert len(shares_in_xml(dom.XMLDesc(0))) == 1
    (model.parent / "other").mkdir()
    other = await agent.call_async(mn, "/virtiofs/attach", {**body,
                                                             "sourcePath": str(model.parent / "other")})
    assert other["success"] is False and "already shares tag llama from" in other["error"]

    # A restarted agent still knows what the share is, and refuses to unmount under it.
    await agent.client.close()
    agent = await make_agent(plugins=_plugins(), vm_path_roots=[workdir, guest_image.kernel.parent],
                             juicefs_cache_dir=tmp_path / "jfscache")
    status = await agent.call("/virtiofs/status")
    assert {"vmInstanceUuid": vm.uuid, "tag": "llama", "sourcePath": str(model)}.items() <= \
        next(s for s in status["shares"] if s["vmInstanceUuid"] == vm.uuid).items()
    refused = await agent.call_async(mn, "/modelcenter/umount", {"modelCenterUuid": mc})
    assert refused["success"] is False and "still shared" in refused["error"]
    assert vm.uuid in refused["error"] and mounttable.mount_at(model.parent) is not None

    procs = virtiofsd_for(export)
    started = time.monotonic()
    reply = await agent.call_async(mn, "/virtiofs/detach", {"vmInstanceUuid": vm.uuid,
                                                             "tag": "llama"}, timeout=90)
    assert reply == {"success": True, "error": None, "qgaMountAttempted": True,
                     "qgaMountSuccess": True, "qgaMountError": None}, reply
    print(f"detach: {time.monotonic() - started:.2f}s")
    assert shares_in_xml(dom.XMLDesc(0)) == [] and shares_in_xml(dom.XMLDesc(INACTIVE)) == []
    gone, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive, "virtiofsd exited"
    await vm.console.wait_for("VIRTIOFS-GONE llama", timeout=30)
    code, mounts = await guest_run(dom, "cat", "/proc/mounts")
    assert code == 0 and "virtiofs" not in mounts, "detach unmounted it in the guest too"
    assert mounttable.mount_at(export) is None, "the read-only bind mount is gone"
    assert agent.ctx.state.names("virtiofs") == []
    assert (await agent.call_async(mn, "/virtiofs/detach", {"vmInstanceUuid": vm.uuid,
                                                             "tag": "llama"}))["success"]
    assert (await agent.call_async(mn, "/modelcenter/umount", {"modelCenterUuid": mc}))["success"]


@pytest.mark.libvirt
@pytest.mark.guest
@pytest.mark.juicefs
async def test_dead_juicefs_is_remounted_and_exported_again_into_the_guest(
        make_agent, mount_cleanup, mn, lv, guest_image, workdir, volume, tmp_path,  # noqa: F811
        caplog):
    """The juicefs daemon of a shared model center dies: the watcher remounts it, and the share
    is plugged in again from the new mount and remounted in the guest where it was mounted.
    A share whose source became a symlink meanwhile is not re-exported (nor redirected)."""
    import signal

    agent = await make_agent(plugins=_plugins(), vm_path_roots=[workdir, guest_image.kernel.parent],
                             juicefs_cache_dir=tmp_path / "jfscache",
                             modelcenter_health_interval=0.3, modelcenter_probe_timeout=1.0,
                             modelcenter_remount_after=1)
    mc = uid()
    reply = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": volume.storage_url}, timeout=90)
    point = Path(reply["mountPoint"])
    (point / "m").mkdir()
    (point / "m" / "v1.txt").write_text("version one\n")
    # The guest's init leaves the tag alone: every mount of it below is the agent's or ours.
    vm = await boot_vm(agent, mn, lv, guest_image, workdir, memory_backing="memfd-shared",
                       vfs_discover=False)
    dom = lv[0].lookupByUUIDString(vm.uuid)
    await wait_guest_agent(vm, dom)
    body = {"vmInstanceUuid": vm.uuid, "tag": "m", "sourcePath": str(point / "m"),
            "mountPath": "/models/m"}
    reply = await agent.call_async(mn, "/virtiofs/attach", body, timeout=60)
    assert reply["qgaMountSuccess"] is True, reply
    assert await guest_run(dom, "cat", "/models/m/v1.txt") == (0, "version one\n")
    # A second mount made in the guest by its own user: it must come back too.
    assert await guest_run(dom, "mkdir", "-p", "/data/extra") == (0, "")
    assert await guest_run(dom, "mount", "-t", "virtiofs", "m", "/data/extra") == (0, "")
    # A second share, whose source is then swapped for a symlink to the first one's.
    (point / "w" / "sub").mkdir(parents=True)
    reply = await agent.call_async(mn, "/virtiofs/attach", {
        "vmInstanceUuid": vm.uuid, "tag": "w", "sourcePath": str(point / "w" / "sub")})
    assert reply["success"] is True, reply
    (point / "w" / "sub").rename(point / "w" / "old")
    (point / "w" / "sub").symlink_to("../m")
    export = shares_in_xml(dom.XMLDesc(0))[0].source_dir
    old_virtiofsd = {p.pid for p in virtiofsd_for(export)}
    assert old_virtiofsd

    signal_all(daemons(point), signal.SIGKILL)
    health = agent.ctx.services["modelcenter"].health
    await wait_for(lambda: health[mc].remounts >= 1, 60, "the remount")
    (point / "m" / "v2.txt").write_text("version two\n")  # only the new mount has it

    deadline = time.monotonic() + 90
    seen = None
    while seen != (0, "version two\n"):
        assert time.monotonic() < deadline, f"the guest never read the new mount: {seen}"
        await asyncio.sleep(0.5)
        try:
            seen = await guest_run(dom, "cat", "/models/m/v2.txt")
        except libvirt.libvirtError as exc:  # its agent may be busy while the device moves
            seen = exc
    assert await guest_run(dom, "cat", "/models/m/v1.txt") == (0, "version one\n")
    # The re-export mounts the tag again where it was mounted, one path after the other: the
    # guest may read /models/m before /data/extra is back.
    deadline = time.monotonic() + 60
    while True:
        code, mounts = await guest_run(dom, "cat", "/proc/mounts")
        if "m /data/extra virtiofs" in mounts or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert mounts.count("m /models/m virtiofs ro") == 1, mounts
    assert mounts.count("m /data/extra virtiofs") == 1, mounts
    assert mounts.count(" virtiofs ") == 2, mounts
    assert await guest_run(dom, "cat", "/data/extra/v2.txt") == (0, "version two\n")
    new_virtiofsd = {p.pid for p in virtiofsd_for(export)}
    assert new_virtiofsd and not new_virtiofsd & old_virtiofsd, "a fresh virtiofsd serves it"
    assert sorted(s.tag for s in shares_in_xml(dom.XMLDesc(0))) == ["m", "w"]
    assert sorted(s.tag for s in shares_in_xml(dom.XMLDesc(INACTIVE))) == ["m", "w"], \
        "the persistent definition still has the shares"
    await wait_for(lambda: "virtiofs tag w was not exported again" in caplog.text, 30,
                   "the refused re-export of w")
    assert f"its source {point}/w/sub now resolves to {point}/m" in caplog.text
    status = await agent.call("/virtiofs/status", {"vmInstanceUuid": vm.uuid})
    problems = {s["tag"]: s["problem"] for s in status["shares"]}
    assert problems["m"] is None, problems
    assert problems["w"].startswith("not exported again after a remount: its source ") and \
        "a symbolic link was put in its path" in problems["w"], problems
    w_export = next(s for s in shares_in_xml(dom.XMLDesc(0)) if s.tag == "w").source_dir
    assert mounttable.mount_at(w_export).root == "/w/old", \
        "w still exports the directory it did (renamed), not the symlink's target"
    assert agent.ctx.services["virtiofs"].registry.load(vm.uuid)["m"]["mountPath"] == "/models/m"


@pytest.mark.libvirt
@pytest.mark.guest
async def test_bad_attach_requests_fail_clearly_and_change_nothing(
        vfs_agent, mn, lv, guest_image, workdir, tmp_path):  # noqa: F811
    agent = vfs_agent
    models = Path(agent.config.models_root)
    local = tmp_path / "local-models"
    (local / "m").mkdir(parents=True)
    (local / "weights.bin").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (local / "escape").symlink_to(outside)
    (local / "m" / "up").symlink_to("../../../outside")
    reply = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": uid(), "storageUrl": f"file://{local}"})
    assert reply["success"], reply
    mc1 = Path(reply["mountPoint"])
    (models / "mc2" / "m").mkdir(parents=True)  # a directory, not a mounted model center
    vm = await boot_vm(agent, mn, lv, guest_image, workdir, memory_backing="memfd-shared",
                       guest_agent=False)
    dom = lv[0].lookupByUUIDString(vm.uuid)
    before = (stable_xml(dom), stable_xml(dom, INACTIVE))
    good = {"vmInstanceUuid": vm.uuid, "tag": "m", "sourcePath": str(mc1 / "m"),
            "mountPath": "/models/m"}

    async def attach(**changes):
        return await agent.post("/virtiofs/attach", {**good, **changes})

    invalid = [  # HTTP 400 naming the field
        ({"sourcePath": f"{mc1}/../../outside"}, "sourcePath"),
        ({"sourcePath": "models/mc1/m"}, "sourcePath"),
        ({"tag": 'x"/><source dir="/etc'}, "tag"), ({"tag": "<tag>"}, "tag"),
        ({"tag": "a" * 37}, "tag"), ({"tag": "a b"}, "tag"), ({"tag": ""}, "tag"),
        ({"tag": "-oremount"}, "tag"), ({"tag": "--bind"}, "tag"),
        ({"mountPath": "relative"}, "mountPath"), ({"cacheMode": "writeback"}, "cacheMode"),
        ({"vmInstanceUuid": "../etc"}, "vmInstanceUuid"),
    ]
    for change, field in invalid:
        status, reply = await attach(**change)
        assert status == 400 and f"field '{field}'" in reply["error"], (change, reply)
    failing = [  # run, and fail with a clear message
        ({"sourcePath": str(mc1 / "escape")}, "outside the models root"),
        ({"sourcePath": str(mc1 / "m" / "up")}, "outside the models root"),
        ({"sourcePath": str(mc1 / "nope")}, "does not exist"),
        ({"sourcePath": str(mc1 / "weights.bin")}, "is not a directory"),
        ({"sourcePath": str(models / "mc2" / "m")}, "not inside a mounted model center"),
        ({"sourcePath": str(models)}, "the models root itself"),
        ({"vmInstanceUuid": uid()}, "does not exist on this host"),
    ]
    for change, message in failing:
        status, reply = await attach(**change)
        assert status == 200 and reply["success"] is False and message in reply["error"], \
            (change, reply)

    # A symlink swapped in after the checks (TOCTOU) is not followed by the export, read-only
    # or read-write: the agent binds what a no-follow walk opened.
    svc = agent.ctx.services["virtiofs"]
    checked = svc._resolve_source

    async def racy(source):
        found = await checked(source)
        (local / "swap").rename(local / f"swap-{time.monotonic_ns()}")
        (local / "swap").symlink_to(outside)
        return found

    svc._resolve_source = racy
    for readonly in (True, False):
        (local / "swap").unlink(missing_ok=True)
        (local / "swap").mkdir()
        status, reply = await attach(sourcePath=str(mc1 / "swap"), tag="swap", readonly=readonly)
        assert status == 200 and reply["success"] is False, reply
        assert "symbolic link" in reply["error"], reply
    del svc._resolve_source
    assert (stable_xml(dom), stable_xml(dom, INACTIVE)) == before, "nothing changed"
    assert agent.ctx.state.names("virtiofs") == []
    ro_root = str(agent.config.state_dir / "virtiofs-ro")
    assert not [e for e in mounttable.read_mounts() if e.mount_point.startswith(ro_root)]

    # A guest without a running guest agent gets the share (the device is kept); the reply
    # says the in-guest mount failed, and why, as ZStack's agent reports it.
    reply = await agent.call_async(mn, "/virtiofs/attach", good, timeout=60)
    assert reply["success"] is True and reply["qgaMountAttempted"] is True, reply
    assert reply["qgaMountSuccess"] is False
    assert reply["qgaMountError"].startswith("QGA not connected for VM"), reply
    await vm.console.wait_for("VIRTIOFS-MOUNTED m", timeout=60)
    detach = {"vmInstanceUuid": vm.uuid, "tag": "m"}
    assert await agent.call_async(mn, "/virtiofs/detach", detach, timeout=60) == \
        {"success": True, "error": None, "qgaMountAttempted": False,
         "qgaMountSuccess": False, "qgaMountError": None}
    assert shares_in_xml(dom.XMLDesc(0)) == []
    # Detaching a tag that is not there succeeds.
    reply = await agent.call_async(mn, "/virtiofs/detach", detach)
    assert reply == {"success": True, "error": None, "qgaMountAttempted": False,
         "qgaMountSuccess": False, "qgaMountError": None}


@pytest.mark.libvirt
async def test_umount_is_refused_while_a_share_is_unplugged_for_its_re_export(
        vfs_agent, mn, tmp_path):
    """Between the unplug and the plug of a re-export the share is in no domain's XML; it
    still counts as a share, so a plain umount cannot pull the mount from under it."""
    agent = vfs_agent
    local = tmp_path / "local-models"
    (local / "m").mkdir(parents=True)
    mc = uid()
    reply = await agent.call_async(mn, "/modelcenter/mount", {"modelCenterUuid": mc,
                                                               "storageUrl": f"file://{local}"})
    source = str(Path(reply["mountPoint"]) / "m")
    vfs = agent.ctx.services["virtiofs"]
    vm = uid()
    await vfs.registry.put(vm, "m", {"vmInstanceUuid": vm, "sourcePath": source,
                                     "exportDir": str(vfs.bind_path(vm, "m")), "readonly": True,
                                     "cacheMode": "auto", "mountPath": None})
    vfs._reexporting.add((vm, "m"))  # what reexport_stale marks while reshare() runs
    refused = await agent.call_async(mn, "/modelcenter/umount", {"modelCenterUuid": mc})
    assert refused["success"] is False and f"VM {vm} tag m" in refused["error"], refused
    status = await agent.call("/virtiofs/status", {"vmInstanceUuid": vm})
    assert [(s["tag"], s["problem"]) for s in status["shares"]] == [
        ("m", "being exported again after a remount")]
    vfs._reexporting.clear()
    assert (await agent.call("/virtiofs/status", {"vmInstanceUuid": vm}))["shares"] == []
    assert (await agent.call_async(mn, "/modelcenter/umount", {"modelCenterUuid": mc}))["success"]


@pytest.mark.libvirt
@pytest.mark.guest
async def test_vm_without_shared_memory_or_not_running_is_refused(
        vfs_agent, mn, lv, guest_image, workdir):  # noqa: F811
    agent = vfs_agent
    source = Path(agent.config.models_root) / "mc" / "m"
    source.mkdir(parents=True)
    vm = await boot_vm(agent, mn, lv, guest_image, workdir)  # default memory backing
    dom = lv[0].lookupByUUIDString(vm.uuid)
    before = stable_xml(dom)
    body = {"vmInstanceUuid": vm.uuid, "tag": "m", "sourcePath": str(source)}
    reply = await agent.call_async(mn, "/virtiofs/attach", body)
    assert reply == {"success": False, "error": f"VM {vm.uuid} has no shared memory backing "
                     f"(start it with memoryBacking memfd-shared or hugepages)"}
    assert stable_xml(dom) == before

    assert (await agent.call_async(mn, "/vm/stop", {"uuid": vm.uuid, "type": "force"}))["success"]
    reply = await agent.call_async(mn, "/virtiofs/attach", body)
    assert reply == {"success": False, "error": f"VM {vm.uuid} does not exist on this host"}

    # Defined but not running (made outside the agent).
    uuid = str(uuidlib.uuid4())
    lv[1].append(uuid)
    defined = lv[0].defineXML(tiny_domain_xml(f"vfs-{uuid[:8]}", uuid, guest_image,
                                              str(workdir / "off.log")))
    before = defined.XMLDesc(INACTIVE)
    reply = await agent.call_async(mn, "/virtiofs/attach", {**body, "vmInstanceUuid": uuid})
    assert reply["success"] is False
    assert reply["error"].startswith(f"VM {uuid} is not running")
    assert defined.XMLDesc(INACTIVE) == before
    assert agent.ctx.state.names("virtiofs") == []


@pytest.mark.libvirt
@pytest.mark.guest
async def test_unanswered_detach_times_out_clearly_and_umount_needs_force_while_shared(
        make_agent, mount_cleanup, mn, lv, guest_image, workdir, tmp_path):  # noqa: F811
    # The models root is reached through a symlink: shares are recorded by real path, and the
    # umount check must still see them.
    (tmp_path / "models-real").mkdir()
    (tmp_path / "models-link").symlink_to(tmp_path / "models-real")
    agent = await make_agent(plugins=_plugins(), vm_path_roots=[workdir, guest_image.kernel.parent],
                             virtiofs_detach_timeout=3, models_root=tmp_path / "models-link",
                             modelcenter_file_roots=[workdir])
    local = workdir / "local-models"
    (local / "m").mkdir(parents=True)
    (local / "m" / "a.txt").write_text("alpha\n")
    mc = uid()
    reply = await agent.call_async(mn, "/modelcenter/mount", {"modelCenterUuid": mc,
                                                               "storageUrl": f"file://{local}"})
    assert reply["mountPoint"] == str(tmp_path / "models-real" / mc), reply
    source = tmp_path / "models-link" / mc / "m"
    real_source = Path(reply["mountPoint"]) / "m"
    vm = await boot_vm(agent, mn, lv, guest_image, workdir, memory_backing="memfd-shared")
    dom = lv[0].lookupByUUIDString(vm.uuid)
    body = {"vmInstanceUuid": vm.uuid, "tag": "slow", "sourcePath": str(source),
            "readonly": False, "cacheMode": "none"}
    assert (await agent.call_async(mn, "/virtiofs/attach", body))["success"]
    await vm.console.wait_for("VIRTIOFS-READ slow a.txt alpha", timeout=60)
    share = shares_in_xml(dom.XMLDesc(0))[0]
    assert share.source_dir != str(real_source) and share.cache == "none"
    bind = mounttable.mount_at(share.source_dir)
    assert bind is not None and not bind.readonly, "read-write shares export an agent bind too"
    assert bind.root == str(local / "m")
    status = await agent.call("/virtiofs/status", {"vmInstanceUuid": vm.uuid})
    assert status["shares"][0]["sourcePath"] == str(real_source)

    dom.suspend()  # a paused guest cannot answer the unplug request
    try:
        reply = await agent.call_async(mn, "/virtiofs/detach", {"vmInstanceUuid": vm.uuid,
                                                                 "tag": "slow"}, timeout=60)
        assert reply["success"] is False
        assert f"VM {vm.uuid} did not release virtiofs tag slow" in reply["error"]
        assert "within 3s" in reply["error"]
        assert [s.tag for s in shares_in_xml(dom.XMLDesc(0))] == ["slow"]
        assert shares_in_xml(dom.XMLDesc(INACTIVE)) == []
    finally:
        dom.resume()
    await vm.console.wait_for("VIRTIOFS-GONE slow", timeout=60)
    await wait_for(lambda: not shares_in_xml(dom.XMLDesc(0)), 30, "device removal")
    reply = await agent.call_async(mn, "/virtiofs/detach", {"vmInstanceUuid": vm.uuid,
                                                             "tag": "slow"})
    assert reply["success"] is True and reply["error"] is None, reply
    assert agent.ctx.state.names("virtiofs") == []

    # Shared again: umount is refused, unless forced.
    assert (await agent.call_async(mn, "/virtiofs/attach", body))["success"]
    refused = await agent.call_async(mn, "/modelcenter/umount", {"modelCenterUuid": mc})
    assert refused["success"] is False and f"VM {vm.uuid} tag slow" in refused["error"]
    forced = await agent.call_async(mn, "/modelcenter/umount", {"modelCenterUuid": mc,
                                                                 "force": True})
    assert forced == {"success": True, "error": None}
    assert mounttable.mount_at(real_source.parent) is None
    assert (local / "m" / "a.txt").exists()
