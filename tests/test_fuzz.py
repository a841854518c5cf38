"""Fuzz the request parsing of every installed command: any body gives 200 or 400, never 5xx;
sent async (taskuuid + callbackurl, as the MN does), every taskuuid gets exactly one callback.

Handlers are swapped for no-ops, so random bodies exercise the HTTP layer, JSON parsing and
the pydantic models without touching the machine (no VM, hugepage or mount is changed).
Short by default; ``KVMAGENT_FUZZ_LONG=1`` runs 20 times as many examples.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import uuid

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmagent.core.models import AgentResponse
from kvmagent.core.plugin import Plugin, discover_plugins
from kvmagent.core.server import CTX, create_app

from .conftest import agent_config
from .mnstub import MNStub, make_mn_app

SCALE = 20 if os.environ.get("KVMAGENT_FUZZ_LONG") else 1


async def _noop(ctx, req) -> AgentResponse:
    return AgentResponse()


def inert_plugins() -> list[Plugin]:
    return [Plugin(p.name, commands=[dataclasses.replace(c, handler=_noop) for c in p.commands])
            for p in discover_plugins()]


scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | \
    st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def model_shaped(cmd) -> st.SearchStrategy:
    """Bodies with the model's own field names and values of any JSON type."""
    names = [f.alias or n for n, f in cmd.request.model_fields.items()]
    if not names:
        return st.dictionaries(st.text(max_size=10), json_values, max_size=3)
    return st.dictionaries(st.sampled_from(names), json_values, max_size=len(names))


def any_bodies(commands) -> st.SearchStrategy:
    return st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.sampled_from(commands).flatmap(model_shaped).map(lambda v: json.dumps(v).encode()),
        st.integers(60, 3000).map(lambda d: b"{\"x\": " + b"[" * d + b"]" * d + b"}"),
    )


def test_any_body_to_any_command_is_200_or_400(tmp_path):
    plugins = inert_plugins()
    commands = [c for p in plugins for c in p.commands]
    assert len(commands) >= 5
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(create_app(agent_config(tmp_path), plugins)), loop=loop)
    loop.run_until_complete(client.start_server())

    bodies = any_bodies(commands)

    async def post(path: str, raw: bytes):
        resp = await client.post(path, data=raw)
        return resp.status, await resp.json()

    @settings(max_examples=600 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cmd=st.sampled_from(commands), raw=bodies, slash=st.booleans())
    def check(cmd, raw, slash):
        status, reply = loop.run_until_complete(post(cmd.path + ("/" if slash else ""), raw))
        assert status in (200, 400), (cmd.path, raw, status, reply)
        assert isinstance(reply["success"], bool)
        if status == 400:
            assert reply["success"] is False and reply["error"]
            assert reply["error"].startswith(("field ", "body ")), reply["error"]

    try:
        check()
    finally:
        loop.run_until_complete(client.close())
        loop.close()


def test_any_body_sent_async_gets_exactly_one_callback(tmp_path):
    """Every command called as the MN calls it (RESTFacadeImpl.asyncJsonPost: headers
    taskuuid + callbackurl), some taskuuids sent twice, at once or after their callback:
    every acknowledgement is 200, every taskuuid is answered by exactly one callback, none
    says "internal error", and the agent still answers afterwards."""
    plugins = inert_plugins()
    commands = [c for p in plugins for c in p.commands]
    loop = asyncio.new_event_loop()
    stub = MNStub()
    mn = TestClient(TestServer(make_mn_app(stub)), loop=loop)
    loop.run_until_complete(mn.start_server())
    stub.base_url = str(mn.make_url("")).rstrip("/")
    client = TestClient(TestServer(create_app(agent_config(tmp_path), plugins)), loop=loop)
    loop.run_until_complete(client.start_server())
    sent: list[str] = []

    async def post(path: str, raw: bytes, taskuuid: str):
        resp = await client.post(path, data=raw, headers={
            "taskuuid": taskuuid, "callbackurl": stub.callback_url})
        return resp.status, await resp.json()

    async def post_all(path: str, raw: bytes, taskuuid: str, times: int):
        return list(await asyncio.gather(*(post(path, raw, taskuuid) for _ in range(times))))

    @settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cmd=st.sampled_from(commands), raw=any_bodies(commands),
           repeat=st.sampled_from(["once", "twice at once", "again later"]))
    def check(cmd, raw, repeat):
        taskuuid = uuid.uuid4().hex
        sent.append(taskuuid)
        times = 1 if repeat == "once" else 2
        replies = loop.run_until_complete(post_all(cmd.path, raw, taskuuid, times))
        if repeat == "again later":
            loop.run_until_complete(stub.wait_callback(taskuuid, 10))
            replies.append(loop.run_until_complete(post(cmd.path, raw, taskuuid)))
        for status, reply in replies:
            assert (status, reply) == (200, {"success": True, "error": None}), (cmd.path, raw)

    try:
        check()
        agent = client.server.app[CTX]
        assert loop.run_until_complete(agent.outbox.drain(30))
        loop.run_until_complete(asyncio.sleep(0.2))
        assert loop.run_until_complete(agent.outbox.drain(30))
        for taskuuid in sent:
            bodies = stub.callbacks_for(taskuuid)
            assert len(bodies) == 1, (taskuuid, bodies)
            assert "internal error" not in (bodies[0].get("error") or ""), bodies[0]
        status, reply = loop.run_until_complete(post("/host/echo", b"{}", "t-after"))
        assert status == 200
    finally:
        loop.run_until_complete(client.close())
        loop.run_until_complete(mn.close())
        loop.close()
