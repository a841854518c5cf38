"""Vhost target environment against a real dockerd and this machine's hugepages.

Tests that stop dockerd (to see the agent start it) always leave it running
(``dockerd_restored``); hugepage pools and hugetlbfs mounts are put back (``real_pools``).
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

import docker
import docker.errors
import psutil
import pytest
import requests.exceptions

from kvmagent.core.config import AgentConfig
from kvmagent.host.docker_engine import DEFAULT_URL, plan_start
from kvmagent.host.hugepages import HugePages, hugetlbfs_mounts

from .test_hugepages import pools_restored, real_pool, real_totals

IMAGE = "local/busybox:test"
PREPARE = "/zbs/primarystorage/vhost/target/prepareenv"
HEALTH = "/zbs/primarystorage/vhost/target/health"
DOCKERD_LOG = "/var/log/dockerd.log"
# busybox has no nc -U; its syslogd binds a unix socket at /dev/log, following a symlink.
SYSLOGD_SOCKET = "ln -sf /vhost/vhost.sock /dev/log && exec syslogd -n -O /dev/null"


# --------------------------------------------------------------------------------------------
# dockerd helpers
# --------------------------------------------------------------------------------------------
def engine_version(timeout: float = 5) -> str | None:
    try:
        client = docker.DockerClient(base_url=DEFAULT_URL, timeout=timeout)
        try:
            return client.version()["Version"]
        finally:
            client.close()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
        return None


def dockerd_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name", "status"])
            if p.info["name"] == "dockerd" and p.info["status"] != psutil.STATUS_ZOMBIE]


def wait_engine(timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = engine_version(2)
        if version:
            return version
        time.sleep(0.3)
    return None


def ensure_dockerd() -> str:
    """The engine answers at the default socket; started here (as CI does) if it is down."""
    version = engine_version()
    if version:
        return version
    if not dockerd_pids():
        dockerd = shutil.which("dockerd", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")
        assert dockerd, "dockerd is not installed"
        with open(DOCKERD_LOG, "ab") as log:
            subprocess.Popen([dockerd], stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    version = wait_engine(60)
    assert version, f"dockerd did not come up; see {DOCKERD_LOG}"
    return version


def stop_dockerd() -> None:
    pids = dockerd_pids()
    procs = [psutil.Process(p) for p in pids]
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=30)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=10)
    assert engine_version(2) is None, "dockerd still answers after being stopped"


@pytest.fixture
def real_pools():
    with pools_restored() as before:
        yield before


@pytest.fixture
def dockerd_restored():
    """dockerd runs before the test, and runs again after it, whatever the test did."""
    ensure_dockerd()
    try:
        yield
    finally:
        ensure_dockerd()


@pytest.fixture(scope="session")
def busybox_image() -> str:
    """``local/busybox:test``, imported from the host's static busybox when missing."""
    ensure_dockerd()
    client = docker.DockerClient(base_url=DEFAULT_URL, timeout=60)
    try:
        client.images.get(IMAGE)
        return IMAGE
    except docker.errors.ImageNotFound:
        pass
    busybox = shutil.which("busybox") or "/bin/busybox"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "vhost"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for applet in ("sh", "ln", "ls", "sleep", "syslogd"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    repo, tag = IMAGE.split(":")
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag)
    client.close()
    return IMAGE


@pytest.fixture
def short_dir():
    """A short directory path (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kvh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def silent_socket(short_dir):
    """A unix socket that accepts connections and never answers."""
    path = short_dir / "silent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)  # read nothing, answer nothing

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"unix://{path}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def start_target(busybox_image, short_dir: Path, name: str | None = None):
    """A running container whose busybox syslogd binds a unix (datagram) socket at a
    bind-mounted path (syslogd follows the /dev/log symlink to /vhost/vhost.sock =
    <short_dir>/vhost.sock), and the target's control socket <short_dir>/admin.sock: a unix
    stream socket that accepts connections, as SPDK's JSON-RPC socket does (busybox has
    nothing that listens on one, so the test process does)."""
    client = docker.DockerClient(base_url=DEFAULT_URL, timeout=30)
    name = name or f"kvmagent-vhost-test-{uuid.uuid4().hex[:8]}"
    try:
        client.containers.get(name).remove(force=True)
    except docker.errors.NotFound:
        pass
    container = client.containers.run(
        busybox_image, ["/bin/sh", "-c", SYSLOGD_SOCKET],
        name=name, detach=True, volumes={str(short_dir): {"bind": "/vhost", "mode": "rw"}})
    sock = short_dir / "vhost.sock"
    deadline = time.monotonic() + 15
    while not sock.is_socket():
        assert time.monotonic() < deadline, f"container made no socket: {container.logs()!r}"
        time.sleep(0.1)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(short_dir / "admin.sock"))
    control.listen(16)
    return client, container, control


def stop_target(client, container, control) -> None:
    control.close()
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    client.close()


@pytest.fixture
def target(busybox_image, short_dir):
    client, container, control = start_target(busybox_image, short_dir)
    yield container, str(short_dir / "admin.sock")
    stop_target(client, container, control)


def mount_point(tmp_path: Path) -> Path:
    return tmp_path / "hp2m"


# --------------------------------------------------------------------------------------------
# unit: how the engine gets started
# --------------------------------------------------------------------------------------------
def test_start_plan_choices():
    config = AgentConfig()
    assert plan_start(config, "/usr/sbin/dockerd", systemd=True).argv == \
        ["systemctl", "start", "docker"]
    assert plan_start(config, "/usr/sbin/dockerd", systemd=False).argv == ["/usr/sbin/dockerd"]
    custom = AgentConfig(docker_url="unix:///run/other.sock")
    assert plan_start(custom, "/x/dockerd", systemd=False).argv == \
        ["/x/dockerd", "--host", "unix:///run/other.sock"]
    cmd = AgentConfig(docker_start_command=["service", "docker", "start"])
    plan = plan_start(cmd, "/x/dockerd", systemd=False)
    assert (plan.method, plan.argv) == ("command", ["service", "docker", "start"])
    assert plan_start(cmd, "/x/dockerd", systemd=True).method == "systemd"


# --------------------------------------------------------------------------------------------
# prepareenv
# --------------------------------------------------------------------------------------------
@pytest.mark.docker
@pytest.mark.hugepages
async def test_prepare_with_engine_running(make_agent, real_pools, dockerd_restored, tmp_path):
    agent = await make_agent(hugetlbfs_mount_point=mount_point(tmp_path))
    start = real_pool("2M")
    reply = await agent.call(PREPARE, {})  # default: 1024 pages = 2 GiB
    assert reply["success"], reply
    assert set(reply) == {"success", "error", "hugepagesTotal", "hugepagesFree",
                          "hugetlbfsMount", "dockerVersion"}
    assert reply["dockerVersion"] == engine_version()
    now = real_pool("2M")
    assert (reply["hugepagesTotal"], reply["hugepagesFree"]) == (now.total, now.free)
    assert now.available >= 1024
    assert now.total == start.total + max(1024 - start.available, 0)
    assert reply["hugetlbfsMount"] in hugetlbfs_mounts(Path("/proc"), "2M")
    # Replayed by the MN: nothing more allocated, the same mount.
    again = await agent.call(PREPARE, {"hugepageNr": 1024})
    assert again["success"] and again["hugepagesTotal"] == now.total
    assert again["hugetlbfsMount"] == reply["hugetlbfsMount"]


@pytest.mark.docker
@pytest.mark.hugepages
async def test_prepare_through_callback_on_numa_node(make_agent, mn, real_pools,
                                                     dockerd_restored, tmp_path):
    agent = await make_agent(hugetlbfs_mount_point=mount_point(tmp_path))
    node = HugePages(Path("/sys")).numa_nodes()[0]
    start = real_pool("2M", node)
    body = await agent.call_async(mn, PREPARE, {"hugepageNr": start.free + 16, "numaNode": node})
    assert body["success"], body
    assert body["hugepagesTotal"] == start.total + 16 == real_pool("2M", node).total
    assert body["dockerVersion"] and body["hugetlbfsMount"]


@pytest.mark.docker
@pytest.mark.hugepages
async def test_concurrent_prepares_allocate_once(make_agent, real_pools, dockerd_restored,
                                                 tmp_path):
    agent = await make_agent(hugetlbfs_mount_point=mount_point(tmp_path))
    start = real_pool("2M")
    body = {"hugepageNr": start.available + 64}
    replies = await asyncio.gather(*(agent.call(PREPARE, body) for _ in range(5)))
    assert all(r["success"] for r in replies), replies
    assert real_pool("2M").total == start.total + 64
    assert len({r["hugetlbfsMount"] for r in replies}) == 1
    assert len([m for m in hugetlbfs_mounts(Path("/proc"), "2M")
                if m == replies[0]["hugetlbfsMount"]]) == 1  # mounted once


@pytest.mark.docker
@pytest.mark.hugepages
@pytest.mark.parametrize("how", ["spawn", "command"])
async def test_prepare_starts_a_stopped_engine(make_agent, real_pools, dockerd_restored,
                                               tmp_path, how):
    overrides = {}
    if how == "command":
        overrides["docker_start_command"] = ["sh", "-c", f"dockerd >>{DOCKERD_LOG} 2>&1 &"]
    agent = await make_agent(hugetlbfs_mount_point=mount_point(tmp_path), docker_timeout=5,
                             docker_start_timeout=60, **overrides)
    stop_dockerd()
    started = time.monotonic()
    reply = await agent.call(PREPARE, {"hugepageNr": 8})
    elapsed = time.monotonic() - started
    assert reply["success"], reply
    assert reply["dockerVersion"] and engine_version() == reply["dockerVersion"]
    assert dockerd_pids(), "no dockerd running after prepare"
    assert elapsed < 70


@pytest.mark.docker
@pytest.mark.hugepages
async def test_prepare_engine_socket_missing_fails_fast(make_agent, real_pools, dockerd_restored,
                                                        tmp_path, short_dir):
    url = f"unix://{short_dir}/nothing.sock"
    agent = await make_agent(hugetlbfs_mount_point=mount_point(tmp_path), docker_url=url,
                             docker_timeout=1, docker_start_timeout=2)
    started = time.monotonic()
    reply = await agent.call(PREPARE, {"hugepageNr": 8})
    assert time.monotonic() - started < 15
    assert reply["success"] is False
    assert reply["error"].startswith(f"docker engine unreachable at {url}: no socket there")
    assert "is running but does not answer there" in reply["error"]  # no second dockerd
    assert real_totals() == real_pools  # docker is checked before pages are taken
    assert len(dockerd_pids()) == 1


@pytest.mark.docker
@pytest.mark.hugepages
async def test_prepare_engine_never_answers_is_bounded(make_agent, real_pools, dockerd_restored,
                                                       tmp_path, silent_socket):
    agent = await make_agent(hugetlbfs_mount_point=mount_point(tmp_path), docker_url=silent_socket,
                             docker_timeout=1, docker_start_timeout=2)
    started = time.monotonic()
    reply = await agent.call(PREPARE, {"hugepageNr": 8})
    assert time.monotonic() - started < 15
    assert reply["success"] is False
    assert f"docker engine unreachable at {silent_socket}: no answer within 1s" in reply["error"]
    assert real_totals() == real_pools
    # The agent still answers other commands meanwhile and after.
    assert (await agent.call("/host/echo"))["success"]


@pytest.mark.docker
async def test_prepare_docker_not_installed(make_agent, short_dir):
    agent = await make_agent(docker_url=f"unix://{short_dir}/nothing.sock",
                             dockerd_binary="/nonexistent/dockerd", docker_timeout=1)
    reply = await agent.call(PREPARE, {"hugepageNr": 0})
    assert reply["success"] is False
    assert "docker is not installed on this host (/nonexistent/dockerd not found)" in reply["error"]
    assert "docker_install_allowed" in reply["error"]


@pytest.mark.docker
async def test_prepare_installs_docker_when_allowed(make_agent, short_dir, dockerd_restored,
                                                    monkeypatch):
    """The install branch, with a stand-in apt-get (the real one would change the machine):
    the agent runs ``apt-get install -y docker.io``, finds dockerd afterwards, and since a
    dockerd already runs it starts no second one and reports the unreachable URL."""
    import kvmagent.host.docker_engine as engine_mod

    bin_dir = short_dir / "bin"
    bin_dir.mkdir()
    calls = short_dir / "apt-calls"
    fake = bin_dir / "apt-get"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                    f"printf '#!/bin/sh\\nexit 0\\n' > {bin_dir}/dockerd-kvh-fake\n"
                    f"chmod +x {bin_dir}/dockerd-kvh-fake\n")
    fake.chmod(0o755)
    monkeypatch.setattr(engine_mod, "SYSTEM_PATH", (str(bin_dir), "/usr/bin", "/bin"))
    url = f"unix://{short_dir}/nothing.sock"
    agent = await make_agent(docker_url=url, dockerd_binary="dockerd-kvh-fake",
                             docker_install_allowed=True, docker_timeout=1,
                             docker_start_timeout=1)
    real = machine_daemon_json()
    reply = await agent.call(PREPARE, {"hugepageNr": 0})
    assert calls.read_text().split() == ["install", "-y", "-q", "docker.io"]
    assert reply["success"] is False
    assert "is running but does not answer there" in reply["error"], reply
    # The configured file (not the machine's) said "iptables": false before the install.
    assert json.loads(agent.config.docker_daemon_json.read_text()) == {"iptables": False}
    assert machine_daemon_json() == real


@pytest.mark.docker
async def test_failed_install_leaves_the_engine_config_as_it_was(make_agent, short_dir,
                                                                 monkeypatch):
    """apt-get fails (twice: before and after an update): the error says so, and the
    engine's config file, given "iptables": false for the install, is as it was before:
    absent stays absent, an operator's file keeps its bytes."""
    import kvmagent.host.docker_engine as engine_mod

    bin_dir = short_dir / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: no network' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setattr(engine_mod, "SYSTEM_PATH", (str(bin_dir), "/usr/bin", "/bin"))
    real = machine_daemon_json()
    for before in (None, b'{"log-driver": "journald"}'):
        daemon_json = short_dir / f"daemon-{before is None}.json"
        if before is not None:
            daemon_json.write_bytes(before)
        agent = await make_agent(docker_url=f"unix://{short_dir}/nothing.sock",
                                 dockerd_binary="dockerd-kvh-absent", docker_timeout=1,
                                 docker_install_allowed=True, docker_daemon_json=daemon_json)
        reply = await agent.call(PREPARE, {"hugepageNr": 0})
        assert reply["success"] is False
        assert "installing docker.io failed" in reply["error"], reply
        assert (daemon_json.read_bytes() if daemon_json.exists() else None) == before
        await agent.client.close()
    assert machine_daemon_json() == real


def machine_daemon_json() -> bytes | None:
    """The machine's own docker config file, which no test may change."""
    try:
        return Path("/etc/docker/daemon.json").read_bytes()
    except FileNotFoundError:
        return None


@pytest.mark.hugepages
@pytest.mark.parametrize("body, field", [
    ({"hugepageNr": -1}, "hugepageNr"),
    ({"hugepageNr": 10**8}, "hugepageNr"),
    ({"hugepageNr": "lots"}, "hugepageNr"),
    ({"numaNode": -2}, "numaNode"),
    ({"numaNode": 77}, "numaNode"),
])
async def test_prepare_bad_input_is_400_and_changes_nothing(make_agent, real_pools, tmp_path,
                                                           body, field):
    agent = await make_agent(hugetlbfs_mount_point=mount_point(tmp_path))
    status, reply = await agent.post(PREPARE, body)
    assert status == 400, reply
    assert f"'{field}'" in reply["error"], reply
    assert real_totals() == real_pools
    assert not mount_point(tmp_path).exists()


# --------------------------------------------------------------------------------------------
# health
# --------------------------------------------------------------------------------------------
@pytest.mark.docker
async def test_health_of_a_real_target(agent, target, short_dir):
    container, sock = target
    reply = await agent.call(HEALTH, {"containerName": container.name, "controlSock": sock})
    assert reply == {"success": True, "error": None, "targetRunning": True, "healthy": True,
                     "reason": None, "containerStatus": "running"}
    # socketPath, the older name of the field, is still understood
    reply = await agent.call(HEALTH, {"containerName": container.name, "socketPath": sock})
    assert reply["targetRunning"] is True

    missing = str(short_dir / "other.sock")
    reply = await agent.call(HEALTH, {"containerName": container.name, "socketPath": missing})
    assert (reply["healthy"], reply["reason"]) == (False, f"socket {missing} missing")
    assert reply["targetRunning"] is False

    # A socket file nobody listens on any more (the target died, its socket stayed), and a
    # datagram socket, are no control socket: ZStack's agent connects, so does this one.
    stale = short_dir / "stale.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(stale))
    left.close()
    dgram = str(short_dir / "vhost.sock")
    for path in (str(stale), dgram):
        reply = await agent.call(HEALTH, {"containerName": container.name, "controlSock": path})
        assert reply["targetRunning"] is False, reply
        assert reply["reason"].startswith(f"control socket {path} accepts no connection: "), \
            reply

    regular = short_dir / "plain"
    regular.write_text("not a socket")
    reply = await agent.call(HEALTH, {"containerName": container.name,
                                      "socketPath": str(regular)})
    assert (reply["healthy"], reply["reason"]) == (False, f"socket {regular} is not a unix socket")

    container.kill()
    container.wait(timeout=30)
    reply = await agent.call(HEALTH, {"containerName": container.name, "socketPath": sock})
    assert (reply["healthy"], reply["reason"]) == (False, f"container {container.name} is exited")
    assert reply["containerStatus"] == "exited"

    container.remove(force=True)
    reply = await agent.call(HEALTH, {"containerName": container.name, "socketPath": sock})
    assert (reply["healthy"], reply["reason"]) == \
        (False, f"container {container.name} does not exist")


@pytest.mark.docker
async def test_health_as_zstack_agent_accepts_it_without_socket_or_name(agent, target):
    """ZStack's agent (zbs_storage_plugin.py _control_sock) checks zbs_vhost_target.py's
    DEFAULT_CONTROL_SOCK when controlSock is empty or absent, and answers targetRunning false
    for an absent containerName (it looks up a container named "None"): never a 400."""
    from plugins.vhost import DEFAULT_CONTROL_SOCK
    assert DEFAULT_CONTROL_SOCK == "/var/tmp/vhost-sockets/vhost.sock"
    container, _ = target
    assert not os.path.exists(DEFAULT_CONTROL_SOCK), "this host runs no ZStack vhost target"
    for body in ({"containerName": container.name},
                 {"containerName": container.name, "controlSock": ""},
                 {"containerName": container.name, "controlSock": None}):
        reply = await agent.call(HEALTH, body)
        assert reply["success"] is True and reply["containerStatus"] == "running", reply
        # our target runs, its socket is elsewhere: the default was checked
        assert reply["targetRunning"] is False
        assert reply["reason"] == f"socket {DEFAULT_CONTROL_SOCK} missing", reply
    for body in ({"controlSock": "/var/zbsvhost/sockets/admin.sock"},
                 {"containerName": "", "controlSock": "/var/zbsvhost/sockets/admin.sock"},
                 {"containerName": None}):
        status, reply = await agent.post(HEALTH, body)
        assert status == 200, reply
        assert reply["success"] is True and reply["targetRunning"] is False, reply
        assert reply["reason"] == "no containerName given: no target to check", reply


@pytest.mark.docker
async def test_health_engine_unreachable(make_agent, short_dir, silent_socket):
    for url in (f"unix://{short_dir}/nothing.sock", silent_socket):
        agent = await make_agent(docker_url=url, docker_timeout=1)
        started = time.monotonic()
        reply = await agent.call(HEALTH, {"containerName": "vhost-target",
                                          "socketPath": "/run/vhost.sock"})
        assert time.monotonic() - started < 10
        assert reply["success"] is True and reply["healthy"] is False
        assert reply["targetRunning"] is False
        assert reply["reason"].startswith("docker engine unreachable: "), reply


async def test_engine_start_checks_run_off_the_loop(short_dir, monkeypatch):
    """The PATH lookup, the /proc walk for a running dockerd and the systemd check of
    ensure_running run in the docker pool, never on the event loop's thread."""
    from kvmagent.core.blocking import BlockingRunner
    from kvmagent.host.docker_engine import DockerEngine

    threads: dict[str, str] = {}

    def noting(name, result):
        def fn(*_args):
            threads[name] = threading.current_thread().name
            return result
        return fn

    config = AgentConfig(docker_url=f"unix://{short_dir}/nothing.sock", docker_timeout=1,
                         docker_start_timeout=0.3, docker_daemon_json=short_dir / "daemon.json")
    runner = BlockingRunner({"default": 2})
    engine = DockerEngine(config, runner)
    monkeypatch.setattr(engine, "find_dockerd", noting("find", "/usr/bin/dockerd"))
    monkeypatch.setattr(engine, "dockerd_pids", noting("pids", [4242]))
    try:
        with pytest.raises(Exception, match=r"dockerd \(pid 4242\) is running"):
            await engine.ensure_running()
        monkeypatch.setattr(engine, "dockerd_pids", noting("pids", []))
        monkeypatch.setattr(engine, "systemd_running", noting("systemd", False))
        monkeypatch.setattr(engine, "_start", lambda plan: asyncio.sleep(0))
        with pytest.raises(Exception, match="did not answer"):
            await engine.ensure_running()
    finally:
        runner.shutdown()
    assert sorted(threads) == ["find", "pids", "systemd"], threads
    assert all(t.startswith("kvmagent-docker") for t in threads.values()), threads


@pytest.mark.parametrize("body, field", [
    ({"containerName": "bad name", "socketPath": "/run/x.sock"}, "containerName"),
    ({"containerName": "-leading", "socketPath": "/run/x.sock"}, "containerName"),
    ({"containerName": "x", "socketPath": "/run/x.sock"}, "containerName"),
    ({"containerName": "a/b", "socketPath": "/run/x.sock"}, "containerName"),
    ({"containerName": "target", "socketPath": "run/x.sock"}, "socketPath"),
    ({"containerName": "target", "socketPath": "/run/../etc/x.sock"}, "socketPath"),
    ({"containerName": "target", "socketPath": "/run//x.sock"}, "socketPath"),
    ({"containerName": "target", "socketPath": "/run/x/"}, "socketPath"),
    ({"containerName": "target", "socketPath": "/run/\u0000x"}, "socketPath"),
    ({"containerName": "target", "socketPath": "//run/x.sock"}, "socketPath"),
    ({"containerName": "target", "socketPath": "/"}, "socketPath"),
    ({"containerName": "target", "socketPath": "/run/./x.sock"}, "socketPath"),
    ({"containerName": "target", "controlSock": "/run/../x.sock"}, "controlSock"),
    ({"containerName": "zbsvhost-not-an-ip:", "controlSock": "/run/x.sock"}, "containerName"),
    ({"containerName": "zbsvhost-1.2.3.4:5", "controlSock": "/run/x.sock"}, "containerName"),
])
async def test_health_bad_input_is_400(agent, body, field):
    status, reply = await agent.post(HEALTH, body)
    assert status == 400, reply
    assert reply["success"] is False and f"'{field}'" in reply["error"], reply
