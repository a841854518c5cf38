"""The docker engine: reach it through the docker SDK, start it, install it; never hang.

Every SDK call runs in the ``docker`` thread pool with the client's socket timeout
(``docker_timeout``) and an outer bound a little longer, so an engine that accepts
connections and never answers costs one timeout, not a wedged agent.

Bringing the engine up (:meth:`DockerEngine.ensure_running`):

1. ping (``GET /version``): answered -> done.
2. only a local ``unix://`` engine can be started by us; a remote one is reported unreachable.
3. no ``dockerd`` binary -> ``apt-get install -y docker.io`` when ``docker_install_allowed``,
   else fail saying so.
4. a ``dockerd`` process already running -> do not start a second one; wait (bounded) for it
   to answer, it may be starting up.
5. otherwise start it: ``systemctl start docker`` when systemd is PID 1 (``/run/systemd/system``
   exists), else the configured ``docker_start_command`` (it must return once the engine is
   starting, e.g. ``["service", "docker", "start"]``), else spawn ``dockerd`` detached in its own
   session with its log in ``dockerd_log_file``; then wait up to ``docker_start_timeout``.

An engine the agent starts or installs itself does not manage iptables, as ZStack's agent
requires: a dockerd it spawns gets ``--iptables=false``; before ``systemctl start docker``, the
``docker_start_command`` or an install, the engine's config file (``docker_daemon_json``,
``/etc/docker/daemon.json``) gets ``"iptables": false`` (:func:`keep_off_iptables`; put back as
it was when the install fails). Either only when the config file says nothing about iptables (the
operator's choice is kept). Why: a dockerd managing iptables sets the FORWARD policy to DROP,
and with br_netfilter (which ZStack turns on for security groups) that drops every bridged VM
frame. The vhost target runs with host networking, so it needs no docker NAT. An engine that
already runs is the operator's and is left alone; EIPs cope with it (kvmagent/eip/hostfw.py).
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import psutil

from ..core.blocking import BlockingRunner, run_process
from ..core.config import AgentConfig
from ..core.errors import AgentError, BlockingTimeout
from ..core.lazy import lazy_import
from ..core.logs import read_tail

if TYPE_CHECKING:
    import docker
else:
    docker = lazy_import("docker")  # with requests and urllib3: loaded on first docker use
    requests = lazy_import("requests")

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_URL = "unix:///var/run/docker.sock"
SYSTEMD_MARKER = Path("/run/systemd/system")
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
INSTALL_TIMEOUT = 900.0
POLL_INTERVAL = 0.3
LOCAL_TIMEOUT = 30.0  # a /proc walk or PATH lookup; only a very sick host takes this long
POOL = "docker"


class DockerUnreachable(AgentError):
    """The engine did not answer; ``reason`` says how (no socket, refused, no answer...)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"docker engine unreachable at {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class StartPlan:
    method: str  # "systemd", "command" or "spawn"
    argv: list[str]


def plan_start(config: AgentConfig, dockerd: str, systemd: bool,
               iptables_flag: bool = False) -> StartPlan:
    """How this host starts its engine (pure, so the choice is testable anywhere).
    ``iptables_flag``: a spawned dockerd gets ``--iptables=false`` (when its daemon.json
    says nothing about iptables: dockerd refuses an option given both ways)."""
    if systemd:
        return StartPlan("systemd", ["systemctl", "start", "docker"])
    if config.docker_start_command:
        return StartPlan("command", list(config.docker_start_command))
    argv = [dockerd] + (["--iptables=false"] if iptables_flag else [])
    if config.docker_url.startswith("unix://") and config.docker_url != DEFAULT_URL:
        argv += ["--host", config.docker_url]
    return StartPlan("spawn", argv)


def describe_error(exc: BaseException, timeout: float) -> str:
    """One line for an SDK/requests failure, from the innermost cause that says something."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        for arg in getattr(cur, "args", ()):
            if isinstance(arg, BaseException) and arg not in seen:
                seen.append(arg)
                for inner in getattr(arg, "args", ()):
                    if isinstance(inner, BaseException):
                        seen.append(inner)
        cur = cur.__cause__ or cur.__context__
    for item in seen:
        if isinstance(item, (socket.timeout, TimeoutError, requests.exceptions.Timeout)) or \
                "timed out" in str(item).lower():
            return f"no answer within {timeout:g}s"
    for item in seen:
        if isinstance(item, FileNotFoundError):
            return "no socket there"
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, PermissionError):
            return "permission denied on the socket"
        if isinstance(item, OSError) and item.errno == errno.ENOTSOCK:
            return "not a socket"
    if isinstance(exc, docker.errors.APIError):
        return f"API error: {exc.explanation or exc}"
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


class DockerEngine:
    """One agent's view of the local docker engine (held in ``ctx.services``)."""

    def __init__(self, config: AgentConfig, runner: BlockingRunner, *,
                 systemd_marker: Path = SYSTEMD_MARKER):
        self.config = config
        self.runner = runner
        self.systemd_marker = systemd_marker
        self.daemon_json = Path(config.docker_daemon_json)
        self._api_version: str | None = None  # negotiated once, then reused
        self._lock = asyncio.Lock()
        self._spawned: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.config.docker_url

    # -- SDK calls -----------------------------------------------------------------------
    def _client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, version=self._api_version or "auto",
                                   timeout=self.config.docker_timeout)

    async def call(self, fn: Callable[[docker.DockerClient], T], what: str) -> T:
        """``fn(client)`` off the loop, bounded; connection failures -> :class:`DockerUnreachable`."""
        timeout = self.config.docker_timeout

        def work() -> T:
            client = self._client()
            try:
                if self._api_version is None:
                    self._api_version = client.api.api_version
                return fn(client)
            finally:
                client.close()

        try:
            return await self.runner.run(work, timeout=2 * timeout + 1, pool=POOL, what=what)
        except BlockingTimeout:
            raise DockerUnreachable(self.url, f"no answer within {2 * timeout + 1:g}s") from None
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError as exc:
            raise AgentError(f"docker {what} failed: {describe_error(exc, timeout)}") from None
        except (docker.errors.DockerException, requests.exceptions.RequestException,
                OSError) as exc:
            raise DockerUnreachable(self.url, describe_error(exc, timeout)) from None

    async def version(self) -> str:
        """The engine's version (e.g. "20.10.24+dfsg1"); :class:`DockerUnreachable` if none."""
        info = await self.call(lambda c: c.version(), "version")
        return str(info.get("Version") or "unknown")

    async def container_status(self, name: str) -> str | None:
        """"running", "exited", ... or None when there is no such container."""
        def status(client: docker.DockerClient) -> str | None:
            try:
                return client.containers.get(name).status
            except docker.errors.NotFound:
                return None
        return await self.call(status, "container inspect")

    # -- bringing the engine up ----------------------------------------------------------
    def find_dockerd(self) -> str | None:
        binary = self.config.dockerd_binary
        if os.sep in binary:
            return binary if os.access(binary, os.X_OK) and os.path.isfile(binary) else None
        path = os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_PATH])
        return shutil.which(binary, path=path)

    @staticmethod
    def dockerd_pids() -> list[int]:
        pids = []
        for proc in psutil.process_iter(["name", "status"]):
            try:
                if proc.info["name"] == "dockerd" and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    pids.append(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return pids

    def systemd_running(self) -> bool:
        return self.systemd_marker.is_dir()

    async def ensure_running(self) -> str:
        """The engine answers (started or installed first when needed); returns its version."""
        async with self._lock:
            try:
                return await self.version()
            except DockerUnreachable as exc:
                first = exc
            if not self.url.startswith("unix://"):
                raise first
            log.warning("%s; bringing the engine up", first)
            dockerd = await self._local(self.find_dockerd, "dockerd lookup")
            if dockerd is None:
                if not self.config.docker_install_allowed:
                    raise AgentError(
                        f"docker is not installed on this host ({self.config.dockerd_binary} not "
                        f"found); install docker.io, or set docker_install_allowed = true to let "
                        f"the agent install it")
                previous = await self._local(lambda: read_config(self.daemon_json),
                                             "daemon.json")
                await self._local(lambda: keep_off_iptables(self.daemon_json), "daemon.json")
                try:
                    await self.install()
                except Exception:   # nothing installed: the config file goes back as it was
                    await self._local(lambda: put_back(self.daemon_json, previous),
                                      "daemon.json")
                    raise
                dockerd = await self._local(self.find_dockerd, "dockerd lookup")
                if dockerd is None:
                    raise AgentError(f"installed docker.io but {self.config.dockerd_binary} is "
                                     f"still not found")
            # A walk over /proc (every process's stat/status): off the loop.
            running = await self._local(self.dockerd_pids, "dockerd process scan")
            if running:
                # Never a second daemon: this one may be starting, or listening elsewhere.
                return await self._wait(
                    f"dockerd (pid {', '.join(map(str, running))}) is running but does not "
                    f"answer there")
            systemd = await self._local(self.systemd_running, "systemd check")
            iptables_flag = False
            if systemd or self.config.docker_start_command:
                # An init system's unit/script takes no flags of ours: the config file must.
                await self._local(lambda: keep_off_iptables(self.daemon_json), "daemon.json")
            else:
                iptables_flag = not await self._local(
                    lambda: mentions_iptables(self.daemon_json), "daemon.json")
            plan = plan_start(self.config, dockerd, systemd, iptables_flag)
            await self._start(plan)
            return await self._wait(f"started dockerd ({plan.method}) but it did not answer "
                                    f"within {self.config.docker_start_timeout:g}s")

    async def _local(self, fn: Callable[[], T], what: str) -> T:
        """A local check (PATH lookup, /proc walk, stat) in the docker pool, bounded."""
        return await self.runner.run(fn, timeout=LOCAL_TIMEOUT, pool=POOL, what=what)

    async def _start(self, plan: StartPlan) -> None:
        log.info("starting the docker engine (%s): %s", plan.method, " ".join(plan.argv))
        if plan.method == "spawn":
            self._spawned = await self.runner.run(self._spawn, plan.argv, timeout=30, pool=POOL,
                                                  what="spawning dockerd")
            return
        result = await run_process(plan.argv, timeout=self.config.docker_start_timeout,
                                   env=_env())
        if not result.ok:
            raise AgentError(f"starting docker ({plan.method}) failed: {result.describe()}")

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        log_file = Path(self.config.dockerd_log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:
            # Own session: the daemon outlives the agent and no signal of ours reaches it.
            # The Popen object is kept only to notice an early exit; the stdlib reaps it.
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    close_fds=True, env=_env())

    async def _wait(self, what: str) -> str:
        deadline = time.monotonic() + self.config.docker_start_timeout
        while True:
            try:
                return await self.version()
            except DockerUnreachable as exc:
                last = exc
            spawned = self._spawned
            if spawned is not None and spawned.poll() is not None:
                self._spawned = None
                log_file = self.config.dockerd_log_file
                tail = await self.runner.run(_last_line, log_file, timeout=LOCAL_TIMEOUT,
                                             pool=POOL, what="dockerd log tail")
                raise AgentError(f"dockerd exited with code {spawned.returncode} right after "
                                 f"start: {tail} (log: {log_file})")
            if time.monotonic() >= deadline:
                raise AgentError(f"docker engine unreachable at {self.url}: {last.reason}; {what}")
            await asyncio.sleep(POLL_INTERVAL)

    async def install(self) -> None:
        apt = shutil.which("apt-get", path=os.pathsep.join(SYSTEM_PATH))
        if apt is None:
            raise AgentError("docker is not installed and this host has no apt-get to install "
                             "it with; install a docker engine by hand")
        log.warning("docker is not installed: installing docker.io with apt-get")
        argv = [apt, "install", "-y", "-q", "docker.io"]
        result = await run_process(argv, timeout=INSTALL_TIMEOUT, env=_env(apt=True))
        if not result.ok:  # a fresh host may have no package lists yet
            await run_process([apt, "update", "-q"], timeout=INSTALL_TIMEOUT, env=_env(apt=True))
            result = await run_process(argv, timeout=INSTALL_TIMEOUT, env=_env(apt=True))
        if not result.ok:
            raise AgentError(f"installing docker.io failed: {result.describe()}")


def mentions_iptables(path: Path) -> bool:
    """Does the engine's config file set ``iptables`` (either way)?"""
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(current, dict) and "iptables" in current


def keep_off_iptables(path: Path) -> str:
    """Make the engine's config say ``"iptables": false`` unless it says anything about
    iptables already (the operator's choice is kept). Returns what happened: "created",
    "added", "kept" or "unreadable" (not JSON: left alone, dockerd would refuse it anyway)."""
    try:
        current = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); not adding \"iptables\": false", path, exc)
        return "unreadable"
    if current is not None and not isinstance(current, dict):
        log.warning("%s is not a JSON object; not adding \"iptables\": false", path)
        return "unreadable"
    if current is not None and "iptables" in current:
        if current["iptables"] is not False:
            log.warning("%s sets \"iptables\": %s: docker will set the FORWARD policy to DROP "
                        "and, with br_netfilter, drop bridged VM traffic", path,
                        json.dumps(current["iptables"]))
        return "kept"
    outcome = "created" if current is None else "added"
    data = dict(current or {}, iptables=False)
    write_config(path, (json.dumps(data, indent=2) + "\n").encode())
    log.info("%s: \"iptables\": false %s (docker must not drop bridged VM traffic)", path,
             outcome)
    return outcome


def read_config(path: Path) -> bytes | None:
    """The config file's bytes (None: there is none), for :func:`put_back`."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def put_back(path: Path, previous: bytes | None) -> None:
    """Undo :func:`keep_off_iptables`: the file as :func:`read_config` saw it, or none."""
    if previous is None:
        Path(os.path.realpath(path)).unlink(missing_ok=True)
    else:
        write_config(path, previous)


def write_config(path: Path, data: bytes) -> None:
    """Replace the file atomically and durably (temp file and directory fsynced). A symlink
    stays one (its target is replaced), an existing file keeps its mode (new: 0644)."""
    target = Path(os.path.realpath(path))
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o644
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.kvmagent")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as fh:
        os.fchmod(fh.fileno(), mode)          # not narrowed by the umask
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _env(apt: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([p for p in env.get("PATH", "").split(os.pathsep) if p]
                                  + [p for p in SYSTEM_PATH])
    if apt:
        env["DEBIAN_FRONTEND"] = "noninteractive"
    return env


def _last_line(path: Path) -> str:
    text = read_tail(path, 4096)
    if text is None:
        return "(no log)"
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else "(empty log)"


def socket_problem(path: str) -> str | None:
    """Why ``path`` is not a usable unix socket, or None when it is one (follows symlinks)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"socket {path} missing"
    except OSError as exc:
        return f"socket {path} cannot be checked: {exc.strerror or exc}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"socket {path} is not a unix socket"
    return None


def control_socket_problem(path: str, timeout: float) -> str | None:
    """Why ``path`` is no live control socket (a unix stream socket that accepts a connection
    within ``timeout`` seconds, as ZStack's agent checks a vhost target's), or None. Blocking."""
    problem = socket_problem(path)
    if problem is not None:
        return problem
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:  # refused (nobody listens), timeout, wrong socket type
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            return f"control socket {path} accepts no connection: {why}"
    return None
