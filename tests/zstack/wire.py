"""How the ZStack MN puts a command on the wire (core/.../rest/RESTFacadeImpl.java)."""
from __future__ import annotations

import json
import uuid
from typing import Any

from ..conftest import AgentClient
from ..mnstub import MNStub

JSON = "application/json; charset=utf-8"


async def mn_async(agent: AgentClient, mn: MNStub, path: str, body: dict[str, Any],
                   resource: str | None = None, timeout: float = 60) -> dict[str, Any]:
    """asyncJsonPost: ack ignored (must be 2xx), result from the callback with our taskuuid."""
    taskuuid = uuid.uuid4().hex
    headers = {"taskuuid": taskuuid, "callbackurl": mn.callback_url, "Content-Type": JSON}
    if resource is not None:
        headers["X-Resource-UUID"] = resource
    resp = await agent.client.post(path, data=json.dumps(body).encode(), headers=headers)
    assert 200 <= resp.status < 300, (resp.status, await resp.text())
    return await mn.wait_callback(taskuuid, timeout)


async def mn_sync(agent: AgentClient, path: str, body: dict[str, Any] | str) -> dict[str, Any]:
    """syncJsonPost: status 200/201/202, the body parsed into the response class."""
    data = body if isinstance(body, str) else json.dumps(body)
    resp = await agent.client.post(path, data=data.encode(), headers={"Content-Type": JSON})
    assert resp.status in (200, 201, 202), (resp.status, await resp.text())
    return await resp.json()
