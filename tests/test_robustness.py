"""Issue 14: exactly one callback per taskuuid, state files of any content, hostile input.

Async requests are sent as ZStack's RESTFacadeImpl.asyncJsonPost sends them: headers
``taskuuid`` and ``callbackurl``, the command as the JSON body (see ZSTACK-WIRE.md).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import socket
import struct
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmagent.core.lazy import lazy_import
from kvmagent.core.logs import _KEY_VALUE, mask_text
from kvmagent.core.server import AgentRunner, create_app

from .conftest import agent_config
from .test_daemon import free_port
from .test_framework import make_test_plugin
from .test_vhost import HEALTH


@pytest.fixture
def runs() -> list[str]:
    return []


def headers(mn, taskuuid: str) -> dict[str, str]:
    return {"taskuuid": taskuuid, "callbackurl": mn.callback_url}


ACK = (200, {"success": True, "error": None})


# -- item 5: taskuuid is an idempotency key ---------------------------------------------------
async def test_twenty_concurrent_sends_of_one_taskuuid_run_once_and_call_back_once(
        make_agent, mn, runs):
    gate = asyncio.Event()
    agent = await make_agent(plugins=[make_test_plugin(runs, gate)])
    replies = await asyncio.gather(*(
        agent.post("/test/async", {"vmInstanceUuid": "once"}, headers=headers(mn, "t-20"))
        for _ in range(20)))
    assert replies == [ACK] * 20
    gate.set()
    assert (await mn.wait_callback("t-20"))["vmInstanceUuid"] == "once"
    assert await agent.ctx.outbox.drain(5)
    assert runs == ["once"]
    assert len(mn.callbacks_for("t-20")) == 1


async def test_a_resend_after_completion_is_acknowledged_but_neither_run_nor_answered(
        make_agent, mn, runs, caplog):
    caplog.set_level(logging.INFO)
    agent = await make_agent(plugins=[make_test_plugin(runs)])
    assert (await agent.call_async(mn, "/test/async", {"vmInstanceUuid": "a"},
                                   taskuuid="t-again"))["success"]
    assert await agent.ctx.outbox.drain(5)
    assert await agent.post("/test/async", {"vmInstanceUuid": "a"},
                            headers=headers(mn, "t-again")) == ACK
    await asyncio.sleep(0.2)
    assert await agent.ctx.outbox.drain(5)
    assert runs == ["a"] and len(mn.callbacks_for("t-again")) == 1
    assert any("t-again already done; acknowledged, not run again" in r.getMessage()
               for r in caplog.records)

    # The done log outlives the agent.
    await agent.client.close()
    restarted = await make_agent(plugins=[make_test_plugin(runs)])
    assert await restarted.post("/test/async", {"vmInstanceUuid": "a"},
                                headers=headers(mn, "t-again")) == ACK
    await asyncio.sleep(0.2)
    assert await restarted.ctx.outbox.drain(5)
    assert runs == ["a"] and len(mn.callbacks_for("t-again")) == 1


async def test_a_task_cut_by_a_restart_is_answered_once_and_a_resend_does_not_run_it(
        make_agent, mn, runs):
    gate = asyncio.Event()  # never set: the task is running when the agent stops
    first = await make_agent(plugins=[make_test_plugin(runs, gate)])
    assert await first.post("/test/async", {"vmInstanceUuid": "cut"},
                            headers=headers(mn, "t-cut")) == ACK
    await asyncio.sleep(0.1)
    await first.client.close()

    second = await make_agent(plugins=[make_test_plugin(runs)])
    assert "agent restarted" in (await mn.wait_callback("t-cut"))["error"]
    assert await second.post("/test/async", {"vmInstanceUuid": "cut"},
                             headers=headers(mn, "t-cut")) == ACK
    await asyncio.sleep(0.2)
    assert await second.ctx.outbox.drain(5)
    assert runs == ["cut"] and len(mn.callbacks_for("t-cut")) == 1

    # A third start finds neither a journal entry nor a reason to answer again.
    await second.client.close()
    third = await make_agent(plugins=[make_test_plugin(runs)])
    await asyncio.sleep(0.2)
    assert await third.ctx.outbox.drain(5)
    assert len(mn.callbacks_for("t-cut")) == 1


async def test_done_taskuuids_older_than_the_window_are_pruned(make_agent, mn, runs, tmp_path):
    done = tmp_path / "state" / "tasks-done"
    done.mkdir(parents=True)
    hour = int(time.time() // 3600)
    (done / f"{hour - 3}.log").write_text("t-old\n")   # outside a 2 h window
    (done / f"{hour - 1}.log").write_text("t-recent\n")
    agent = await make_agent(plugins=[make_test_plugin(runs)], task_idempotency_window=7200)
    assert sorted(p.name for p in done.iterdir()) == [f"{hour - 1}.log"]
    assert (await agent.call_async(mn, "/test/async", {"vmInstanceUuid": "old"},
                                   taskuuid="t-old"))["success"]
    assert await agent.post("/test/async", {"vmInstanceUuid": "recent"},
                            headers=headers(mn, "t-recent")) == ACK
    await asyncio.sleep(0.2)
    assert runs == ["old"]
    assert mn.callbacks_for("t-recent") == []


# -- item 6: state files of any content ---------------------------------------------------------
WRONG_SHAPES = ["[1, 2]", '"text"', "42", "null", '{"unexpected": true}', "{not json"]


@pytest.mark.parametrize("doc", ["outbox/00000000000000000001-aaaaaaaa", "tasks/t-x",
                                 "ha/networkgroups", "ha/selffencers"])
@pytest.mark.parametrize("content", WRONG_SHAPES)
async def test_a_state_document_of_the_wrong_shape_is_moved_aside_and_the_agent_starts(
        make_agent, mn, tmp_path, caplog, doc, content):
    state = tmp_path / "state"
    path = state / f"{doc}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    # A pending callback too: restoring the outbox must not be held up by the bad document.
    (state / "outbox").mkdir(exist_ok=True)
    (state / "outbox" / "00000000000000000000-bbbbbbbb.json").write_text(json.dumps({
        "kind": "callback", "url": mn.callback_url, "headers": {"taskuuid": "t-pending"},
        "body": {"success": True, "error": None}, "stream": None, "created": time.time(),
        "id": "00000000000000000000-bbbbbbbb"}))
    from kvmagent.core.plugin import discover_plugins
    agent = await make_agent(plugins=[p for p in discover_plugins() if p.name in ("host", "ha")],
                             libvirt_uri="test:///default")
    assert (await agent.call("/host/echo"))["success"]
    assert (await mn.wait_callback("t-pending"))["success"] is True
    if content == "null" and doc.startswith("ha/"):
        return  # "nothing configured" is a fine reading of null
    assert not path.exists()
    assert path.with_name(path.name + ".corrupt").read_text() == content
    assert any(str(path) in r.getMessage() and "moved aside" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("doc", ["eips/0d6f3a2b9c8e4f1a8b7c6d5e4f3a2b1c",
                                 "modelcenter/5e1c9a7b3d2f4e6a8b0c1d2e3f4a5b6c",
                                 "virtiofs/2fd5a9c1e8b04f6e9d3c7a1b5e2f8d40"])
@pytest.mark.parametrize("content", WRONG_SHAPES)
async def test_a_capability_record_of_the_wrong_shape_is_moved_aside_and_the_agent_starts(
        make_agent, tmp_path, caplog, doc, content):
    """EIP, model-center and virtiofs records load through the same shape check."""
    path = tmp_path / "state" / f"{doc}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    from kvmagent.core.plugin import discover_plugins
    wanted = {"eips": ("host", "eip"), "modelcenter": ("host", "modelcenter"),
              "virtiofs": ("host", "modelcenter", "virtiofs")}[doc.split("/")[0]]
    agent = await make_agent(plugins=[p for p in discover_plugins() if p.name in wanted],
                             libvirt_uri="test:///default", models_root=tmp_path / "models")
    assert (await agent.call("/host/echo"))["success"]
    if doc.startswith("modelcenter/"):  # read when the model center is first looked at
        assert (await agent.call("/modelcenter/list"))["success"]
    if doc.startswith("virtiofs/") and content == "null":
        return  # "no shares" is a fine reading of null
    assert not path.exists()
    assert path.with_name(path.name + ".corrupt").read_text() == content
    assert any(str(path) in r.getMessage() and "moved aside" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


# -- item 7: bad input is bad input -------------------------------------------------------------
@pytest.fixture
async def tagent(make_agent, runs):
    return await make_agent(plugins=[make_test_plugin(runs)])


@pytest.mark.parametrize("depth", [65, 5000, 200_000])
async def test_deeply_nested_json_is_400_naming_the_limit(tagent, runs, depth):
    raw = b'{"vmInstanceUuid": "v", "fail": ' + b"[" * depth + b"]" * depth + b"}"
    status, body = await tagent.post("/test/sync", raw=raw)
    assert (status, body) == (400, {"success": False, "error": "body nests deeper than 64 levels"})
    assert runs == []


async def test_nesting_within_the_limit_is_accepted(tagent):
    raw = b'{"vmInstanceUuid": "v", "extra": ' + b"[" * 60 + b"]" * 60 + b"}"
    status, body = await tagent.post("/test/sync", raw=raw)
    assert (status, body["success"]) == (200, True)


@pytest.mark.parametrize("url, fragment", [
    ("file:///etc/passwd", "must be an http:// or https:// URL"),
    ("ftp://10.0.0.1/callback", "must be an http:// or https:// URL"),
    ("not a url", "must be an http:// or https:// URL"),
    ("http://", "has no host"),
    ("http://[::1/cb", "is not a URL"),
])
async def test_an_unusable_callback_url_is_refused_at_once(tagent, runs, url, fragment):
    status, body = await tagent.post("/test/async", {"vmInstanceUuid": "x"},
                                     headers={"taskuuid": "t-bad-url", "callbackurl": url})
    assert status == 400 and body["success"] is False
    assert body["error"].startswith("header 'callbackurl' ") and fragment in body["error"], body
    await asyncio.sleep(0.1)
    assert runs == [] and tagent.ctx.outbox.pending == 0


async def test_a_client_hanging_up_mid_body_leaves_no_traceback(tmp_path, runs, caplog):
    # A site as `kvmagent serve` runs it (aiohttp's test client reads bodies differently).
    runner = AgentRunner(create_app(agent_config(tmp_path), [make_test_plugin(runs)]),
                         access_log=None, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for n in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /test/sync HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                         b"Content-Type: application/json\r\n\r\n" + b'{"vmInstanceUuid": "' +
                         b"a" * 1000)
            await writer.drain()
            await asyncio.sleep(0.1)  # the agent is reading the body now
            if n % 2:  # half of them with a reset rather than a close
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/test/sync",
                                    json={"vmInstanceUuid": "after"}) as resp:
                assert (resp.status, (await resp.json())["success"]) == (200, True)
    finally:
        await runner.cleanup()
    assert runs == ["after"]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], \
        [r.getMessage() for r in caplog.records]


# -- item 2: log masking in one pass ------------------------------------------------------------
# The former masker, a regex that backtracks quadratically, is the reference for *what* is masked.
_REFERENCE_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?!//)(?P<pw>[^\s]*)@")


def _reference_mask(text: str) -> str:
    text = _REFERENCE_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _KEY_VALUE.sub(lambda m: f"{m['key']}***", text)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(["a", "Z", "7", "+", ".", "-", ":", "/", "@", " ", "://", "//",
                                 "redis", "password=", "\t", "é", "(", "x:"]), max_size=30))
def test_the_linear_masker_masks_what_the_regex_masked(pieces):
    text = "".join(pieces)
    assert mask_text(text) == _reference_mask(text)


# -- item 3: lazy imports under concurrency -----------------------------------------------------
def test_a_lazy_module_is_whole_for_every_thread_that_touches_it_first(tmp_path, monkeypatch):
    """A slow package whose submodule is set at the end of its import, like docker.errors."""
    package = tmp_path / "slowpkg_k14"
    package.mkdir()
    (package / "__init__.py").write_text("import time\ntime.sleep(0.3)\nfrom . import errors\n")
    (package / "errors.py").write_text("class NotFound(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy = lazy_import("slowpkg_k14")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        found = list(pool.map(lambda _: lazy.errors.NotFound.__name__, range(16)))
    assert found == ["NotFound"] * 16


@pytest.mark.docker
async def test_sixteen_first_docker_health_checks_at_once_after_a_start(tmp_path):
    """The real `kvmagent serve`, fresh: its first docker SDK use comes from 16 requests at
    once. HealthCheckCmd {containerName, socketPath} as tests/test_vhost.py sends it."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmagent.cli", "serve", "--listen", f"127.0.0.1:{port}",
        "--state-dir", str(tmp_path / "state"), "--libvirt-uri", "test:///default",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.post(f"{base}/host/echo", json={}) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            body = {"containerName": f"k14-none-{uuid.uuid4().hex[:8]}",
                    "socketPath": "/run/k14-none.sock"}

            async def health() -> dict:
                async with session.post(f"{base}{HEALTH}", json=body) as resp:
                    assert resp.status == 200
                    return await resp.json()
            replies = await asyncio.gather(*(health() for _ in range(16)))
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    reasons = {r.get("reason") or r.get("error") for r in replies}
    assert reasons == {f"container {body['containerName']} does not exist"}, reasons
    assert all(r["success"] is True and r["healthy"] is False for r in replies), replies


# -- item 4: delivery isolated per destination ---------------------------------------------------
@pytest.fixture
async def hung_url():
    """An HTTP destination that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the agent gives up

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/callback"
    for writer in held:
        writer.close()
    server.close()


async def test_callbacks_stuck_on_a_hung_url_do_not_delay_the_live_mn(make_agent, mn, runs,
                                                                       hung_url):
    agent = await make_agent(plugins=[make_test_plugin(runs)], delivery_timeout=120,
                             delivery_retry_window=300)
    for n in range(100):
        assert await agent.post("/test/async", {"vmInstanceUuid": f"h{n}"},
                                headers={"taskuuid": f"t-hung-{n}", "callbackurl": hung_url}) == ACK
    await asyncio.sleep(0.5)
    assert agent.ctx.outbox.pending == 100
    # The live MN's callback arrives while all 100 are still waiting for the hung one (an
    # attempt lasts 120 s: had it queued behind them, it would not arrive within 30 s).
    body = await agent.call_async(mn, "/test/async", {"vmInstanceUuid": "live"}, timeout=30)
    assert body["vmInstanceUuid"] == "live"
    assert agent.ctx.outbox.pending == 100


@pytest.mark.parametrize("request_head, fragment", [
    (b"POST /test/sync HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
     "Got more than 8190 bytes"),
    (b"POST /test/sync HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % n for n in range(200)) + b"\r\n", "Too many headers"),
    (b"POST /test/sync HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", "Content-Length"),
])
async def test_requests_aiohttp_refuses_get_the_envelope(tmp_path, runs, caplog, request_head,
                                                          fragment):
    runner = AgentRunner(create_app(agent_config(tmp_path), [make_test_plugin(runs)]),
                         access_log=None, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_head)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    finally:
        await runner.cleanup()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", head), answer[:300]
    assert b"Content-Type: application/json" in head, head
    reply = json.loads(body)
    assert reply["success"] is False and reply["error"].startswith("bad HTTP request: ")
    assert fragment in reply["error"], reply
    assert runs == []
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
