"""Shared fixtures: agents built in-process on real services, and a real MN stub server."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from kvmagent.core.config import AgentConfig
from kvmagent.core.plugin import discover_plugins
from kvmagent.core.server import CTX, create_app

from .mnstub import MNStub, make_mn_app
from .eip_world import eip_agent, world  # noqa: F401  (fixtures shared by the EIP tests)
from .vmkit import guest_image, lv, workdir  # noqa: F401  (fixtures shared by the VM-based tests)


class AgentClient:
    """A running in-process agent and a client for it."""

    def __init__(self, client: TestClient, config: AgentConfig):
        self.client = client
        self.config = config

    @property
    def app(self):
        return self.client.server.app

    @property
    def ctx(self):
        return self.app[CTX]

    async def post(self, path: str, body: Any = None, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        resp = await self.client.post(path, data=data, headers=headers or {})
        return resp.status, await resp.json()

    async def call(self, path: str, body: Any = None) -> dict[str, Any]:
        """Sync call, or async run inline (no callbackurl); asserts HTTP 200."""
        status, reply = await self.post(path, body)
        assert status == 200, (status, reply)
        return reply

    async def call_async(self, mn: MNStub, path: str, body: Any = None, timeout: float = 60,
                         taskuuid: str | None = None) -> dict[str, Any]:
        """Async call through a callback, as the MN does; returns the callback body."""
        taskuuid = taskuuid or uuid.uuid4().hex
        status, ack = await self.post(path, body, headers={
            "taskuuid": taskuuid, "callbackurl": mn.callback_url})
        assert (status, ack) == (200, {"success": True, "error": None}), (status, ack)
        return await mn.wait_callback(taskuuid, timeout)


def agent_config(tmp_path: Path, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = dict(
        listen="127.0.0.1:0", state_dir=tmp_path / "state", libvirt_uri="qemu:///system",
        domain_type="qemu", models_root=tmp_path / "models", delivery_initial_backoff=0.05,
        delivery_max_backoff=0.2, delivery_retry_window=10, libvirt_reconnect_interval=0.5,
        docker_daemon_json=tmp_path / "etc-docker" / "daemon.json",   # never the machine's
    )
    values.update(overrides)
    return AgentConfig(**values)


@pytest.fixture
async def mn(aiohttp_server) -> MNStub:
    stub = MNStub()
    server = await aiohttp_server(make_mn_app(stub))
    stub.base_url = str(server.make_url("")).rstrip("/")
    return stub


@pytest.fixture
def make_agent(aiohttp_client, tmp_path):
    """``await make_agent(plugins=None, **config)``: an agent on real services.

    The same ``state_dir`` may be passed to a second agent to simulate a restart.
    """
    async def factory(plugins=None, **overrides: Any) -> AgentClient:
        config = agent_config(tmp_path, **overrides)
        app = create_app(config, plugins if plugins is not None else discover_plugins(config.plugins))
        client = await aiohttp_client(app)
        return AgentClient(client, config)

    return factory


@pytest.fixture
async def agent(make_agent) -> AgentClient:
    return await make_agent()
