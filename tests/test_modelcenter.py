"""Model-center mounts: URL/option parsing, argv construction, and real JuiceFS and bind
mounts through the agent (restore after restart, hung-mount watcher, credential masking)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError

from kvmagent.core import mounttable
from kvmagent.core.blocking import BlockingRunner
from kvmagent.modelcenter import MountOptions, StorageUrlError, parse_storage_url
from kvmagent.modelcenter.backends import FileBackend, JuicefsBackend, NfsBackend, find_mount_nfs
from kvmagent.modelcenter.urls import juicefs_option_args, nfs_option_string

from .conftest import agent_config
from .juicefs_kit import alive, daemons, mount_cleanup, signal_all, volume  # noqa: F401

SECRET = "s3cr3t-Pa55"


def uid() -> str:
    return uuidlib.uuid4().hex


# -- parsing (no mounts) -------------------------------------------------------------------
@pytest.mark.parametrize("url, kind, meta, password", [
    ("juicefs://sqlite3:///var/lib/x.db", "juicefs", "sqlite3:///var/lib/x.db", None),
    ("zdfs://redis://host:6379/1", "juicefs", "redis://host:6379/1", None),
    (f"zdfs://redis://:{SECRET}@host:6379/1", "juicefs", "redis://host:6379/1", SECRET),
    (f"juicefs://mysql://user:{SECRET}@(db:3306)/jfs", "juicefs", "mysql://user@(db:3306)/jfs",
     SECRET),
    ("juicefs://redis://:p%40ss@h/2", "juicefs", "redis://h/2", "p@ss"),
    ("juicefs://mysql://u:p@ss@(h)/db", "juicefs", "mysql://u@(h)/db", "p@ss"),
    ("zdfs://redis://:p/ss@h:6379/1", "juicefs", "redis://h:6379/1", "p/ss"),
    ("nfs://filer.example.com/export/models", "nfs", None, None),
    ("file:///srv/models", "file", None, None),
])
def test_storage_urls_that_parse(url, kind, meta, password):
    parsed = parse_storage_url(url)
    assert parsed.kind == kind
    assert parsed.meta_url == meta and parsed.meta_password == password
    assert SECRET not in parsed.masked and SECRET not in repr(parsed)


@pytest.mark.parametrize("url", [
    "", "s3://bucket/x", "juicefs://", "juicefs://-o=allow_other", "juicefs://--help",
    "juicefs://redis://h/1 --writeback", "juicefs://redis://h/1\n", "juicefs://ftp://h/1",
    "juicefs://sqlite3://relative.db", "juicefs://sqlite3:///a/../b.db", "juicefs://redis://-x",
    f"juicefs://nope://u:{SECRET}@h", "nfs://host", "nfs://-o/export", "nfs://host/a/../b",
    "nfs://u:p@host/x", "nfs://host:99999/x", "nfs://host/ex port", "file://relative/dir",
    "file:///a/../etc", "file:///", "FILE:///x/./y",
])
def test_storage_urls_refused_without_echoing_them(url):
    with pytest.raises(StorageUrlError) as err:
        parse_storage_url(url)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("url, masked", [
    (f"juicefs://mysql://u:{SECRET}@x@(h)/db", "juicefs://mysql://u:***@(h)/db"),
    (f"zdfs://redis://:{SECRET}/x@h:6379/1", "zdfs://redis://:***@h:6379/1"),
    (f"zdfs://redis://:{SECRET}@@h:6379/1", "zdfs://redis://:***@h:6379/1"),
    (f"redis://:{SECRET}/x@h:6379/1", "redis://:***@h:6379/1"),
    (f"postgres://u:{SECRET}@x@/db?host=/run/pg", "postgres://u:***@/db?host=/run/pg"),
])
def test_masked_url_holds_no_part_of_a_password_with_at_or_slash(url, masked):
    parsed = parse_storage_url(url)
    assert parsed.masked == masked
    for part in (SECRET, "x@", "/x", "a/", "@b"):
        assert part not in parsed.masked and part not in parsed.meta_url
    assert SECRET in parsed.meta_password


@pytest.mark.parametrize("url, masked", [
    # juicefs' etcd driver reads the password only from the URL; its query-parameter
    # credentials too (pkg/meta/tkv_etcd.go, sql.go): legitimate, kept in argv, masked.
    (f"etcd://u:a/{SECRET}@b@h1,h2/jfs", "etcd://u:***@h1,h2/jfs"),
    (f"juicefs://postgres://u@h/db?sslmode=disable&password={SECRET}",
     "juicefs://postgres://u@h/db?sslmode=disable&password=***"),
    (f"sqlite3:///var/x.db?_auth_user=a&_auth_pass={SECRET}",
     "sqlite3:///var/x.db?_auth_user=***&_auth_pass=***"),
])
def test_credentials_juicefs_reads_only_from_the_url_stay_in_it_but_never_in_logs(url, masked):
    parsed = parse_storage_url(url)
    assert parsed.masked == masked and SECRET in parsed.meta_url
    assert parsed.meta_password is None and any(SECRET in s for s in parsed.argv_secrets)
    assert SECRET not in parsed.scrub(f"juicefs said: cannot reach {parsed.meta_url}")


@pytest.mark.parametrize("url, meta, password", [
    # ZStack's storageUrl: the raw JuiceFS metadata URL, every engine juicefs documents
    # (juicefs docs/en/reference/how_to_set_up_metadata_engine.md).
    (f"redis://:{SECRET}@10.0.0.5:6379/1", "redis://10.0.0.5:6379/1", SECRET),
    (f"rediss://u:{SECRET}@h:6380/2?tls-cert-file=/c.crt&tls-key-file=/c.key",
     "rediss://u@h:6380/2?tls-cert-file=/c.crt&tls-key-file=/c.key", SECRET),
    (f"unix://:{SECRET}@/run/redis.sock?db=1", "unix:///run/redis.sock?db=1", SECRET),
    ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1", None),
    (f"redis://:{SECRET}@master,10.0.0.1,10.0.0.2:26379/2",
     "redis://master,10.0.0.1,10.0.0.2:26379/2", SECRET),
    (f"mysql://u:{SECRET}@(db:3306)/jfs?tls=true", "mysql://u@(db:3306)/jfs?tls=true", SECRET),
    (f"mysql://u:{SECRET}@unix(/run/mysqld.sock)/jfs", "mysql://u@unix(/run/mysqld.sock)/jfs",
     SECRET),
    (f"postgres://u:{SECRET}@db:5432/jfs?sslmode=disable",
     "postgres://u@db:5432/jfs?sslmode=disable", SECRET),
    (f"postgres://u:{SECRET}@/jfs?host=/run/postgresql", "postgres://u@/jfs?host=/run/postgresql",
     SECRET),
    # juicefs inserts META_PASSWORD before the '@' of mysql/postgres URLs: it must stay
    (f"postgres://:{SECRET}@db/jfs", "postgres://@db/jfs", SECRET),
    ("sqlite3:///var/lib/jfs.db?cache=shared&_busy_timeout=5000",
     "sqlite3:///var/lib/jfs.db?cache=shared&_busy_timeout=5000", None),
    ("tikv://h1:2379,h2:2379,h3:2379/jfs?ca=/ca.pem&cert=/c.pem&key=/k.pem",
     "tikv://h1:2379,h2:2379,h3:2379/jfs?ca=/ca.pem&cert=/c.pem&key=/k.pem", None),
    ("etcd://h1:2379,h2:2379/jfs", "etcd://h1:2379,h2:2379/jfs", None),
    ("badger:///var/lib/badger", "badger:///var/lib/badger", None),
    ("fdb:///etc/foundationdb/fdb.cluster?prefix=jfs",
     "fdb:///etc/foundationdb/fdb.cluster?prefix=jfs", None),
])
def test_raw_metadata_urls_as_zstack_sends_them(url, meta, password):
    parsed = parse_storage_url(url)
    assert parsed.kind == "juicefs" and parsed.raw_meta
    assert (parsed.meta_url, parsed.meta_password) == (meta, password)
    assert SECRET not in parsed.masked and SECRET not in parsed.meta_url


@pytest.mark.parametrize("url, why", [
    ("sqlite3://relative.db", "absolute"), ("badger://data", "absolute"),
    ("memkv://x", "memory"), ("REDIS://h/1", "unsupported"), ("redis://", "no address"),
    ("redis:///x", "no valid address"),
])
def test_raw_metadata_urls_refused_with_a_reason(url, why):
    with pytest.raises(StorageUrlError, match=why):
        parse_storage_url(url)


def test_nfs_urls_keep_host_port_and_ipv6():
    url = parse_storage_url("nfs://[fd00::5]:2049/vol/models")
    assert (url.host, url.port, url.export, url.nfs_source) == (
        "fd00::5", 2049, "/vol/models", "[fd00::5]:/vol/models")


def test_mount_options_accept_objects_and_lists_of_known_names_only():
    a = MountOptions.model_validate({"cacheSize": 1024, "read-only": True, "attr_cache": 2})
    b = MountOptions.model_validate(["--cache-size=1024", "--read-only", "attrCache=2"])
    assert a.given() == b.given() == {"cache_size": 1024, "read_only": True, "attr_cache": 2.0}
    assert juicefs_option_args(a) == ["--read-only", "--cache-size", "1024", "--attr-cache", "2s"]
    for bad in ({"cacheDir": "/etc"}, ["-o allow_other"], ["--foo=1"], {"subdir": "../x"},
                {"subdir": "-x"}, {"cacheSize": -1}, {"vers": "5"}, ["--cache-size=1;rm"]):
        with pytest.raises(ValidationError):
            MountOptions.model_validate(bad)
    with pytest.raises(ValueError, match="cacheSize do not apply to nfs"):
        MountOptions(cache_size=1).check_for("nfs")
    nfs = MountOptions.model_validate({"vers": "4.1", "readOnly": True, "nconnect": 4})
    assert nfs_option_string(nfs, 2049) == "ro,vers=4.1,nconnect=4,port=2049"


def test_juicefs_argv_has_no_password_and_options_come_before_positionals(tmp_path):
    config = agent_config(tmp_path, juicefs_cache_dir=tmp_path / "cache")
    backend = JuicefsBackend(config, BlockingRunner({"default": 2}))
    url = parse_storage_url(f"zdfs://redis://admin:{SECRET}@10.0.0.1:6379/1")
    point = tmp_path / "models" / "mc"
    argv, env = backend.mount_argv(url, point, MountOptions(cache_size=10, writeback=True), "mc")
    assert SECRET not in " ".join(argv) and env == {"META_PASSWORD": SECRET}
    assert argv[-2:] == ["redis://admin@10.0.0.1:6379/1", str(point)]
    for flag in ("--no-agent", "--no-usage-report", "--no-syslog", "-d", "--log",
                 "--cache-size", "--writeback"):
        assert flag in argv[:-2]
    assert argv[argv.index("--cache-dir") + 1] == str(tmp_path / "cache" / "mc")


def test_raw_meta_urls_mount_as_zstack_does_unless_options_say_otherwise(tmp_path):
    from kvmagent.modelcenter.service import zstack_defaults
    config = agent_config(tmp_path)
    backend = JuicefsBackend(config, BlockingRunner({"default": 2}))
    raw = parse_storage_url(f"mysql://jfs:{SECRET}@(db:3306)/models")
    options = zstack_defaults(raw, MountOptions(), config)
    argv, env = backend.mount_argv(raw, tmp_path / "mc", options, "mc")
    assert argv[argv.index("--subdir") + 1] == "/models" and "--read-only" in argv
    assert argv[-2] == "mysql://jfs@(db:3306)/models" and env == {"META_PASSWORD": SECRET}
    mine = zstack_defaults(raw, MountOptions(read_only=False, subdir="llm"), config)
    assert mine.given() == {"read_only": False, "subdir": "/llm"}
    whole = zstack_defaults(raw, MountOptions(), agent_config(tmp_path,
                                                              modelcenter_meta_url_subdir=""))
    assert whole.given() == {"read_only": True}
    wrapped = parse_storage_url("juicefs://sqlite3:///var/x.db")
    assert zstack_defaults(wrapped, MountOptions(), config).given() == {}, "extension: as given"


def test_nfs_and_bind_argv(tmp_path):
    config = agent_config(tmp_path)
    runner = BlockingRunner({"default": 2})
    url = parse_storage_url("nfs://filer:2049/export/models")
    argv = NfsBackend(config, runner).mount_argv(url, Path("/m/x"),
                                                 MountOptions(read_only=True, vers="4.2"))
    assert argv == ["mount", "-t", "nfs", "-o", "ro,vers=4.2,port=2049", "filer:/export/models",
                    "/m/x"]
    argv = FileBackend(config, runner).mount_argv("/srv/m", Path("/m/y"), MountOptions(read_only=True))
    assert argv == ["mount", "--bind", "-o", "ro", "--", "/srv/m", "/m/y"]


# -- through the agent ---------------------------------------------------------------------
async def test_bad_mount_requests_are_400_and_never_echo_the_url(make_agent):
    agent = await make_agent(plugins=_plugins())
    status, reply = await agent.post("/modelcenter/mount", {
        "modelCenterUuid": uid(), "storageUrl": f"juicefs://bogus://u:{SECRET}@h/1"})
    assert status == 400 and "storageUrl" in reply["error"] and SECRET not in reply["error"]
    status, reply = await agent.post("/modelcenter/mount", {
        "modelCenterUuid": uid(), "storageUrl": "juicefs://sqlite3:///x.db",
        "mountOptions": {"cacheDir": "/etc"}})
    assert status == 400 and "mountOptions.cacheDir" in reply["error"]
    status, reply = await agent.post("/modelcenter/mount", {
        "modelCenterUuid": "../../etc", "storageUrl": "file:///srv"})
    assert status == 400 and "modelCenterUuid" in reply["error"]
    reply = await agent.call("/modelcenter/mount", {
        "modelCenterUuid": uid(), "storageUrl": "nfs://filer/export",
        "mountOptions": {"cacheSize": 5}})
    assert reply == {"success": False, "error": "mountOptions cacheSize do not apply to nfs "
                                                "storage"}


@pytest.mark.skipif(find_mount_nfs() is not None, reason="mount.nfs is installed here")
async def test_nfs_without_mount_nfs_is_a_clear_error(make_agent, mn):
    agent = await make_agent(plugins=_plugins())
    mc = uid()
    reply = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": "nfs://filer.example.com/export/models"})
    assert reply["success"] is False
    assert "mount.nfs is not installed" in reply["error"] and "nfs-common" in reply["error"]
    assert (await agent.call("/modelcenter/list"))["mounts"] == []


async def test_file_url_is_a_bind_mount_read_only_on_request(make_agent, mn, tmp_path,
                                                             mount_cleanup):  # noqa: F811
    agent = await make_agent(plugins=_plugins(), modelcenter_file_roots=[tmp_path])
    src = tmp_path / "local-models"
    (src / "m1").mkdir(parents=True)
    (src / "m1" / "weights.bin").write_text("w")
    mc = uid()
    body = {"modelCenterUuid": mc, "storageUrl": f"file://{src}",
            "mountOptions": {"readOnly": True}}
    reply = await agent.call_async(mn, "/modelcenter/mount", body)
    point = Path(agent.config.models_root) / mc
    assert reply == {"success": True, "error": None, "mountPoint": str(point)}
    assert (point / "m1" / "weights.bin").read_text() == "w"
    entry = mounttable.mount_at(point)
    assert entry is not None and entry.readonly
    with pytest.raises(OSError):
        (point / "new").write_text("x")
    assert (await agent.call_async(mn, "/modelcenter/mount", body))["success"]
    assert mounttable.mounts_at(point) == 1, "a second mount must reuse the first"
    # The models root cannot be bind-mounted into itself.
    reply = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": uid(), "storageUrl": f"file://{point}"})
    assert reply["success"] is False and "overlaps the models root" in reply["error"]
    assert (await agent.call_async(mn, "/modelcenter/umount", {"modelCenterUuid": mc}))["success"]
    assert mounttable.mount_at(point) is None and not point.exists()
    assert (src / "m1" / "weights.bin").exists()


async def test_file_urls_only_from_the_configured_roots_and_never_proc_sys_dev(
        make_agent, mn, tmp_path, mount_cleanup):  # noqa: F811
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    (allowed / "m").mkdir(parents=True)
    other.mkdir()
    (allowed / "sneaky").symlink_to(other)

    async def mount(agent, path):
        return await agent.call_async(mn, "/modelcenter/mount", {
            "modelCenterUuid": uid(), "storageUrl": f"file://{path}"})

    default = await make_agent(plugins=_plugins())
    reply = await mount(default, allowed / "m")
    assert reply["success"] is False and "modelcenter_file_roots" in reply["error"]
    await default.client.close()

    agent = await make_agent(plugins=_plugins(), modelcenter_file_roots=[allowed])
    for path in (other, allowed / "sneaky"):
        reply = await mount(agent, path)
        assert reply["success"] is False and "outside the directories allowed" in reply["error"]
    await agent.client.close()

    everything = await make_agent(plugins=_plugins(), modelcenter_file_roots=[Path("/")])
    for path in ("/proc/self", "/sys/kernel", "/dev", "/dev/shm"):
        reply = await mount(everything, path)
        assert reply["success"] is False and "may never be bind-mounted" in reply["error"], path
    assert not [e for e in mounttable.read_mounts()
                if e.mount_point.startswith(str(everything.config.models_root))]
    assert (await mount(everything, allowed / "m"))["success"]


def _plugins():
    from kvmagent.core.plugin import discover_plugins

    return discover_plugins(["host", "modelcenter", "virtiofs"])


@pytest.mark.juicefs
async def test_juicefs_mount_list_reuse_conflict_umount(make_agent, mn, tmp_path, mount_cleanup,  # noqa: F811
                                                        volume):  # noqa: F811
    agent = await make_agent(plugins=_plugins(), juicefs_cache_dir=tmp_path / "jfscache")
    mc = uid()
    body = {"modelCenterUuid": mc, "storageUrl": volume.storage_url,
            "mountOptions": ["--attr-cache=1"]}
    reply = await agent.call_async(mn, "/modelcenter/mount", body, timeout=90)
    point = Path(agent.config.models_root) / mc
    assert reply == {"success": True, "error": None, "mountPoint": str(point)}
    entry = mounttable.mount_at(point)
    assert entry.fstype == "fuse.juicefs"
    (point / "llama").mkdir()
    (point / "llama" / "config.json").write_text('{"layers": 32}\n')
    pids = sorted(p.pid for p in daemons(point))
    assert pids, "juicefs runs detached"
    assert (agent.config.state_dir / "juicefs-logs" / f"{mc}.log").exists()

    listed = await agent.call("/modelcenter/list")
    assert listed["mounts"] == [{
        "modelCenterUuid": mc, "mountPoint": str(point), "isMounted": True, "healthy": True, "reason": None,
        "kind": "juicefs", "storageUrl": volume.storage_url, "remounts": 0}]

    again = await agent.call_async(mn, "/modelcenter/mount", body, timeout=90)
    assert again == reply
    assert mounttable.mounts_at(point) == 1 and sorted(p.pid for p in daemons(point)) == pids

    other = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": "juicefs://sqlite3:///elsewhere.db"})
    assert other["success"] is False and "already mounted" in other["error"]

    reply = await agent.call_async(mn, "/modelcenter/umount", {"modelCenterUuid": mc}, timeout=60)
    assert reply == {"success": True, "error": None}
    assert mounttable.mount_at(point) is None and not point.exists()
    await asyncio.sleep(0.5)
    assert not any(alive(pid) for pid in pids), "juicefs exited"
    assert (await agent.call("/modelcenter/list"))["mounts"] == []
    assert (await agent.call_async(mn, "/modelcenter/umount", {"modelCenterUuid": mc}))["success"]

    # Mount again: the data written before is still in the volume.
    assert (await agent.call_async(mn, "/modelcenter/mount", body, timeout=90))["success"]
    assert (point / "llama" / "config.json").read_text() == '{"layers": 32}\n'


@pytest.mark.juicefs
async def test_credentials_never_reach_logs_replies_or_argv(make_agent, mn, tmp_path, caplog,
                                                           mount_cleanup):  # noqa: F811
    agent = await make_agent(plugins=_plugins(), modelcenter_mount_timeout=4)
    caplog.set_level(logging.DEBUG)
    mc = uid()
    point = Path(agent.config.models_root) / mc
    seen_argv: list[list[str]] = []

    log = agent.config.state_dir / "juicefs-logs" / f"{mc}.log"

    async def spy() -> None:
        while True:
            seen_argv.extend(p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                             if str(log) in " ".join(p.info["cmdline"] or []))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(spy())
    try:
        reply = await agent.call_async(mn, "/modelcenter/mount", {
            "modelCenterUuid": mc, "storageUrl": f"zdfs://redis://admin:{SECRET}@127.0.0.1:1/1"},
            timeout=60)
    finally:
        watcher.cancel()
    assert reply["success"] is False, reply
    assert "did not finish within 4s" in reply["error"]
    assert "redis://admin:***@127.0.0.1:1/1" in reply["error"]
    assert SECRET not in str(reply) and SECRET not in caplog.text
    assert seen_argv and not any(SECRET in " ".join(a) for a in seen_argv)
    await asyncio.sleep(0.5)
    assert not mounttable.fuse_daemons(point, needles=(f"--log {log}",)), \
        "a timed-out mount leaves no juicefs behind"
    assert agent.ctx.state.names("modelcenter") == []


@pytest.mark.juicefs
async def test_mounts_come_back_after_an_agent_restart(make_agent, mn, tmp_path, mount_cleanup,  # noqa: F811
                                                       volume):  # noqa: F811
    opts = dict(plugins=_plugins(), juicefs_cache_dir=tmp_path / "jfscache",
                modelcenter_health_interval=0.5, modelcenter_probe_timeout=3)
    first = await make_agent(**opts)
    mc = uid()
    reply = await first.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": volume.storage_url}, timeout=90)
    point = Path(reply["mountPoint"])
    (point / "model.txt").write_text("v1\n")
    pids = sorted(p.pid for p in daemons(point))
    await first.client.close()
    assert mounttable.mount_at(point) is not None, "the mount outlives the agent"

    second = await make_agent(**opts)
    listed = await second.call("/modelcenter/list")
    assert [(m["modelCenterUuid"], m["healthy"]) for m in listed["mounts"]] == [(mc, True)]
    await asyncio.sleep(1.5)  # restore and a watcher round ran: nothing to do
    assert sorted(p.pid for p in daemons(point)) == pids and mounttable.mounts_at(point) == 1
    await second.client.close()

    # Unmounted while no agent ran: the next start mounts it again, in the background.
    subprocess.run([str(Path(os.sys.executable).with_name("juicefs")), "umount", str(point)],
                   check=True, capture_output=True, timeout=30)
    assert mounttable.mount_at(point) is None
    started = time.monotonic()
    third = await make_agent(**opts)
    ping_after = time.monotonic() - started
    assert (await third.call("/host/ping"))["success"]
    deadline = time.monotonic() + 60
    while mounttable.mount_at(point) is None:
        assert time.monotonic() < deadline, "mount not restored"
        await asyncio.sleep(0.2)
    assert (point / "model.txt").read_text() == "v1\n"
    listed = await third.call("/modelcenter/list")
    assert listed["mounts"][0]["healthy"] is True
    assert ping_after < 5, "start-up must not wait for the remount"


async def _ping_latencies(agent, stop: asyncio.Event) -> list[float]:
    latencies = []
    while not stop.is_set():
        t0 = time.monotonic()
        reply = await agent.call("/host/ping")
        assert reply["success"]
        latencies.append(time.monotonic() - t0)
        await asyncio.sleep(0.05)
    return latencies


@pytest.mark.juicefs
async def test_hung_juicefs_is_noticed_in_bounded_time_and_ping_keeps_answering(
        make_agent, mn, tmp_path, mount_cleanup, volume):  # noqa: F811
    interval, probe = 0.5, 1.5
    agent = await make_agent(plugins=_plugins(), juicefs_cache_dir=tmp_path / "jfscache",
                             modelcenter_health_interval=interval,
                             modelcenter_probe_timeout=probe, modelcenter_auto_remount=False)
    mc = uid()
    reply = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": volume.storage_url}, timeout=90)
    point = Path(reply["mountPoint"])
    health = agent.ctx.services["modelcenter"].health
    procs = daemons(point)
    stop = asyncio.Event()
    pinger = asyncio.create_task(_ping_latencies(agent, stop))
    try:
        signal_all(procs, signal.SIGSTOP)
        hung_at = time.monotonic()
        bound = interval + probe + 2.0  # + scheduling slack on a busy 2-core machine
        while health[mc].noticed_at is None:
            assert time.monotonic() - hung_at < bound + 5, "watcher did not notice the hang"
            await asyncio.sleep(0.05)
        noticed = health[mc].noticed_at - hung_at
        t0 = time.monotonic()
        listed = await agent.call("/modelcenter/list")
        list_time = time.monotonic() - t0
        assert listed["mounts"][0]["healthy"] is False
        assert "hung" in listed["mounts"][0]["reason"]
        assert list_time < probe + 1.5
    finally:
        signal_all(procs, signal.SIGCONT)
        stop.set()
    latencies = await pinger
    print(f"hang noticed after {noticed:.2f}s (bound {interval + probe:.1f}s); "
          f"ping max {max(latencies) * 1000:.0f}ms over {len(latencies)} pings")
    assert noticed < bound
    assert len(latencies) > 10 and max(latencies) < 1.0
    deadline = time.monotonic() + 30
    while not health[mc].healthy:
        assert time.monotonic() < deadline, "not healthy again after SIGCONT"
        await asyncio.sleep(0.1)
    assert health[mc].remounts == 0 and sorted(p.pid for p in daemons(point)) == sorted(
        p.pid for p in procs), "auto_remount off: the same daemon serves again"


@pytest.mark.juicefs
async def test_hung_juicefs_is_killed_and_remounted(make_agent, mn, tmp_path, mount_cleanup,  # noqa: F811
                                                    volume):  # noqa: F811
    interval, probe, after = 0.5, 1.5, 2
    agent = await make_agent(plugins=_plugins(), juicefs_cache_dir=tmp_path / "jfscache",
                             modelcenter_health_interval=interval,
                             modelcenter_probe_timeout=probe, modelcenter_remount_after=after)
    mc = uid()
    reply = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": volume.storage_url}, timeout=90)
    point = Path(reply["mountPoint"])
    (point / "weights.txt").write_text("w1\n")
    health = agent.ctx.services["modelcenter"].health
    procs = daemons(point)
    old = sorted(p.pid for p in procs)
    stop = asyncio.Event()
    pinger = asyncio.create_task(_ping_latencies(agent, stop))
    try:
        signal_all(procs, signal.SIGSTOP)
        hung_at = time.monotonic()
        deadline = hung_at + after * (interval + probe) + 60
        while health[mc].remounts < 1 or not health[mc].healthy:
            assert time.monotonic() < deadline, f"not remounted: {health[mc]}"
            await asyncio.sleep(0.1)
        repaired = time.monotonic() - hung_at
    finally:
        signal_all(procs, signal.SIGCONT)  # no-op if killed, as they should be
        stop.set()
    latencies = await pinger
    print(f"hung mount remounted after {repaired:.2f}s; ping max {max(latencies) * 1000:.0f}ms")
    assert max(latencies) < 1.0
    new = sorted(p.pid for p in daemons(point))
    assert new and not set(new) & set(old), "the stuck juicefs was replaced"
    assert not any(alive(pid) for pid in old)
    assert mounttable.mounts_at(point) == 1
    assert (point / "weights.txt").read_text() == "w1\n"
    listed = await agent.call("/modelcenter/list")
    assert listed["mounts"][0]["healthy"] is True and listed["mounts"][0]["remounts"] == 1


def _pretend_shared(agent, point: Path) -> None:
    """The model center looks shared with a running VM (no VM needed)."""
    from kvmagent.virtiofs import Share

    async def shares_using(uuid):
        return [Share("vm-1", "models", str(point / "m"), "/var/x/tag-models", True, "auto")]

    agent.ctx.services["modelcenter"].shares_using = shares_using


@pytest.mark.juicefs
async def test_hung_juicefs_shared_with_vms_is_not_killed_but_marked_unhealthy(
        make_agent, mn, tmp_path, mount_cleanup, volume, caplog):  # noqa: F811
    interval, probe = 0.3, 1.0
    agent = await make_agent(plugins=_plugins(), juicefs_cache_dir=tmp_path / "jfscache",
                             modelcenter_health_interval=interval,
                             modelcenter_probe_timeout=probe, modelcenter_remount_after=1)
    mc = uid()
    reply = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": volume.storage_url}, timeout=90)
    point = Path(reply["mountPoint"])
    _pretend_shared(agent, point)
    health = agent.ctx.services["modelcenter"].health
    procs = daemons(point)
    pids = sorted(p.pid for p in procs)
    try:
        signal_all(procs, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while "not remounted" not in (health[mc].reason or ""):
            assert time.monotonic() < deadline, f"no withheld remount: {health[mc]}"
            await asyncio.sleep(0.1)
        assert "shared with running VMs (vm-1/models)" in health[mc].reason
        assert "juicefs pid" in health[mc].reason and "still alive" in health[mc].reason
        assert health[mc].next_repair_at is not None and health[mc].repair_failures >= 1
        await asyncio.sleep(3)
        assert all(alive(pid) for pid in pids), "a slow, shared juicefs is never killed"
        assert health[mc].remounts == 0 and mounttable.mounts_at(point) == 1
        # Backoff: attempts at I, 2I, 4I, ... apart, not every round.
        assert health[mc].repair_failures <= 5, health[mc]
        assert "NOT remounted" in caplog.text
    finally:
        signal_all(procs, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while not health[mc].healthy:
        assert time.monotonic() < deadline, "not healthy again after SIGCONT"
        await asyncio.sleep(0.1)
    assert sorted(p.pid for p in daemons(point)) == pids and health[mc].repair_failures == 0


def test_repair_backoff_doubles_up_to_the_cap():
    from kvmagent.modelcenter.service import REPAIR_BACKOFF_CAP, Health

    health = Health()
    delays = [health.repair_failed(10, REPAIR_BACKOFF_CAP) for _ in range(8)]
    assert delays == [10, 20, 40, 80, 160, 300, 300, 300]
    health.repaired()
    assert (health.repair_failures, health.next_repair_at) == (0, None)


def _fake_juicefs(tmp_path: Path) -> subprocess.Popen:
    """A process named juicefs in its own session (like a juicefs of another mount)."""
    fake = tmp_path / "bin" / "juicefs"
    fake.parent.mkdir(exist_ok=True)
    if not fake.exists():
        fake.symlink_to("/bin/sleep")
    return subprocess.Popen([str(fake), "60"], start_new_session=True)


def test_stored_daemon_ids_are_trusted_only_with_the_same_boot_and_start_time(tmp_path):
    proc = _fake_juicefs(tmp_path)
    try:
        started = psutil.Process(proc.pid).create_time()
        mine = {"pid": proc.pid, "ppid": None, "sid": proc.pid, "bootId": mounttable.boot_id(),
                "started": {str(proc.pid): started}}
        point = tmp_path / "models" / "mc"
        for stale in ({**mine, "bootId": "another-boot"},
                      {**mine, "started": {str(proc.pid): started - 100}},
                      {"pid": proc.pid, "ppid": None, "sid": proc.pid},  # an old record
                      None):
            assert mounttable.trusted_ids(stale) == ([], None), stale
            assert mounttable.kill_daemons(point, "juicefs", stale) == []
            assert proc.poll() is None, f"killed a process not tied to the mount: {stale}"
        assert mounttable.trusted_ids(mine) == ([proc.pid], proc.pid)
        assert mounttable.kill_daemons(point, "juicefs", mine) == [proc.pid]
        proc.wait(5)  # (reaped already by kill_daemons' wait: no status to check)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.juicefs
async def test_dead_juicefs_is_remounted(make_agent, mn, tmp_path, mount_cleanup, volume):  # noqa: F811
    agent = await make_agent(plugins=_plugins(), juicefs_cache_dir=tmp_path / "jfscache",
                             modelcenter_health_interval=0.5, modelcenter_probe_timeout=2,
                             modelcenter_remount_after=1)
    mc = uid()
    reply = await agent.call_async(mn, "/modelcenter/mount", {
        "modelCenterUuid": mc, "storageUrl": volume.storage_url}, timeout=90)
    point = Path(reply["mountPoint"])
    _pretend_shared(agent, point)  # shared, but nothing serves it any more: remount anyway
    (point / "a.txt").write_text("a\n")
    old = [p.pid for p in daemons(point)]
    signal_all(daemons(point), signal.SIGKILL)  # supervisor and worker: the mount is dead
    health = agent.ctx.services["modelcenter"].health
    deadline = time.monotonic() + 60
    while health[mc].remounts < 1 or not health[mc].healthy:
        assert time.monotonic() < deadline, f"not remounted: {health[mc]}"
        await asyncio.sleep(0.1)
    # A FUSE mount whose daemon died answers ENOTCONN, or ECONNABORTED when a request was in
    # flight as it died (seen once in CI): either way the problem names the dead connection.
    assert health[mc].last_problem in ("Transport endpoint is not connected",
                                       "Software caused connection abort"), health[mc]
    assert (point / "a.txt").read_text() == "a\n"
    assert mounttable.mounts_at(point) == 1 and not any(alive(pid) for pid in old)
