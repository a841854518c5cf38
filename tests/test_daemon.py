"""The real daemon process: systemd notification and watchdog, TLS with client certificates."""
from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from kvmagent.core.plugin import discover_plugins
from kvmagent.core.server import create_app, ssl_context

from .conftest import agent_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_notifies_systemd_and_pets_the_watchdog(tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(15)
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmagent.cli", "serve", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(tmp_path / "state"), "--libvirt-uri", "test:///default"],
        env=env, stderr=subprocess.PIPE)
    try:
        messages = []
        deadline = time.monotonic() + 15
        while messages.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            messages.append(sock.recv(256).decode())
        assert messages[0] == "READY=1", messages
        assert messages.count("WATCHDOG=1") >= 3, "the event loop must keep petting the watchdog"
        # READY means it answers.
        import urllib.request
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/host/echo", data=b"{}", method="POST"), timeout=5) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
        sock.close()
    assert proc.returncode == 0, err.decode()[-2000:]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


async def test_tls_with_client_certificates(tmp_path, pki):
    config = agent_config(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                          tls_client_ca=pki / "ca.pem", libvirt_uri="test:///default")
    plugins = [p for p in discover_plugins() if p.name == "host"]
    runner = web.AppRunner(create_app(config, plugins))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context(config)).start()
    url = f"https://127.0.0.1:{port}/host/echo"
    try:
        with_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with_cert.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=b"{}", ssl=with_cert) as resp:
                assert (resp.status, await resp.json()) == (200, {"success": True, "error": None})
            without = ssl.create_default_context(cafile=str(pki / "ca.pem"))
            with pytest.raises(aiohttp.ClientError):
                async with session.post(url, data=b"{}", ssl=without) as resp:
                    await resp.read()
            with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
                async with session.post(url.replace("https", "http"), data=b"{}") as resp:
                    await resp.read()
    finally:
        await runner.cleanup()


async def test_callbacks_to_an_https_mn_verify_its_certificate(make_agent, pki):
    from .mnstub import MNStub, make_mn_app

    stub = MNStub()
    runner = web.AppRunner(make_mn_app(stub))
    await runner.setup()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_tls).start()
    stub.base_url = f"https://127.0.0.1:{port}"
    try:
        trusting = await make_agent(delivery_ca_file=pki / "ca.pem", libvirt_uri="test:///default")
        assert (await trusting.call_async(stub, "/host/ping"))["success"] is True

        untrusting = await make_agent(delivery_retry_window=1, libvirt_uri="test:///default")
        status, _ = await untrusting.post("/host/ping", headers={
            "taskuuid": "t-untrusted", "callbackurl": stub.callback_url})
        assert status == 200
        assert await untrusting.ctx.outbox.drain(10)
        assert stub.callbacks_for("t-untrusted") == [], "a callback went to an unverified MN"
    finally:
        await runner.cleanup()


def test_serve_starts_whatever_the_state_documents_hold(tmp_path):
    """Every state document the framework and HA restore, of the wrong shape, at once (and a
    pending callback): the real serve moves them aside, names them and listens."""
    state = tmp_path / "state"
    bad = {"outbox/00000000000000000001-aaaaaaaa": "[1, 2]", "tasks/t-x": '{"taskuuid": 7}',
           "ha/networkgroups": '{"groups": "all"}', "ha/selffencers": '[{"psUuid": 1}]',
           "host": '"h1"'}
    for name, content in bad.items():
        (state / name).parent.mkdir(parents=True, exist_ok=True)
        (state / f"{name}.json").write_text(content)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmagent.cli", "serve", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(state), "--libvirt-uri", "test:///default"],
        stderr=subprocess.PIPE)
    try:
        import urllib.request
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(urllib.request.Request(
                        f"http://127.0.0.1:{port}/host/echo", data=b"{}", method="POST"),
                        timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "never listened"
                time.sleep(0.1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    log = err.decode()
    for name, content in bad.items():
        path = state / f"{name}.json"
        assert not path.exists() and (state / f"{name}.json.corrupt").read_text() == content
        assert f"state document {path} " in log and "moved aside" in log, log[-3000:]
    assert proc.returncode == 0, log[-3000:]


def test_serve_that_cannot_start_exits_saying_why(tmp_path):
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state directory should be")
    proc = subprocess.run(
        [sys.executable, "-m", "kvmagent.cli", "serve", "--listen", f"127.0.0.1:{free_port()}",
         "--state-dir", str(not_a_dir), "--libvirt-uri", "test:///default"],
        capture_output=True, timeout=60)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert f"start-up failed: FileExistsError: [Errno 17] File exists: '{not_a_dir}'" in err, err


FAILING_PLUGIN_LAUNCHER = """
import sys
from kvmagent import cli
from kvmagent.core import server
from kvmagent.core.plugin import Plugin

broken = Plugin("broken")

@broken.on_startup
async def start(ctx):
    raise RuntimeError("the broken plugin cannot start")

discover = server.discover_plugins
server.discover_plugins = lambda names=None: discover(names) + [broken]
sys.exit(cli.main())
"""


def test_serve_whose_plugin_fails_to_start_exits_saying_why(tmp_path):
    """A start-up hook that raises, with a callback pending for an MN that never answers
    (the case that once left a process up, not listening, silent)."""
    state = tmp_path / "state"
    (state / "outbox").mkdir(parents=True)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    (state / "outbox" / "00000000000000000000-bbbbbbbb.json").write_text(json.dumps({
        "kind": "callback", "url": f"http://127.0.0.1:{hung.getsockname()[1]}/callback",
        "headers": {"taskuuid": "t-pending"}, "body": {"success": True, "error": None},
        "stream": None, "created": time.time(), "id": "00000000000000000000-bbbbbbbb"}))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", FAILING_PLUGIN_LAUNCHER, "serve", "--listen",
             f"127.0.0.1:{free_port()}", "--state-dir", str(state),
             "--libvirt-uri", "test:///default"], capture_output=True, timeout=60)
    finally:
        hung.close()
    err = proc.stderr.decode()
    assert proc.returncode == 1, err[-3000:]
    assert "start-up failed: RuntimeError: the broken plugin cannot start" in err, err[-3000:]
    # The pending callback stays for the next start.
    assert (state / "outbox" / "00000000000000000000-bbbbbbbb.json").exists()
