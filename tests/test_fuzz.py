"""Fuzz the request parsing of every installed command: any body gives 200 or 400, never 5xx.

Handlers are swapped for no-ops, so random bodies exercise the HTTP layer, JSON parsing and
the pydantic models without touching the machine (no VM, hugepage or mount is changed).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmagent.core.models import AgentResponse
from kvmagent.core.plugin import Plugin, discover_plugins
from kvmagent.core.server import create_app

from .conftest import agent_config


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


def test_any_body_to_any_command_is_200_or_400(tmp_path):
    plugins = inert_plugins()
    commands = [c for p in plugins for c in p.commands]
    assert len(commands) >= 5
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(create_app(agent_config(tmp_path), plugins)), loop=loop)
    loop.run_until_complete(client.start_server())

    bodies = st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.sampled_from(commands).flatmap(model_shaped).map(lambda v: json.dumps(v).encode()),
    )

    async def post(path: str, raw: bytes):
        resp = await client.post(path, data=raw)
        return resp.status, await resp.json()

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
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
