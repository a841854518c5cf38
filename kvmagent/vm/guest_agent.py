"""The QEMU guest agent (QGA): commands the agent inside a VM runs for the host.

A :data:`Send` takes one QGA command (``{"execute": ..., "arguments": ...}``) and returns its
``return`` value; :func:`libvirt_sender` makes one that talks through libvirt
(``qemuAgentCommand``, bounded). Any feature may use it: in-guest mounts, password resets,
file-system freezes. Commands run without a shell (argument lists).
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
import xml.etree.ElementTree as ET
from typing import Any, Awaitable, Callable

import libvirt

from ..core.context import AgentContext
from ..core.errors import AgentError
from ..core.libvirt_conn import libvirt_message

QGA_CHANNEL = "org.qemu.guest_agent.0"


class GuestAgentError(Exception):
    pass


Send = Callable[[dict[str, Any]], Awaitable[Any]]


def has_guest_agent_channel(xml: str) -> bool:
    """Whether the domain has the virtio-serial port its guest agent listens on."""
    return any(t.get("name") == QGA_CHANNEL for t in ET.fromstring(xml).findall(
        "./devices/channel/target"))


async def guest_exec(send: Send, path: str, args: list[str], timeout: float) -> tuple[int, str]:
    """Run ``path args`` in the guest (no shell); (exit code, stdout+stderr)."""
    started = await send({"execute": "guest-exec", "arguments": {
        "path": path, "arg": args, "capture-output": True}})
    pid = started["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = await send({"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if status.get("exited"):
            out = b"".join(base64.b64decode(status.get(k) or "") for k in ("out-data", "err-data"))
            code = status.get("exitcode")
            if code is None:
                code = 128 + int(status.get("signal") or 0)
            return code, out.decode(errors="replace").strip()
        if time.monotonic() > deadline:
            raise GuestAgentError(f"{path} did not finish in the guest within {timeout:g}s")
        await asyncio.sleep(0.1)



def libvirt_sender(ctx: AgentContext, dom: libvirt.virDomain, timeout: float) -> Send:
    """A :data:`Send` for ``dom``'s guest agent; each command waits at most ``timeout`` s."""
    import libvirt_qemu

    async def send(cmd: dict[str, Any]) -> Any:
        def run(conn: libvirt.virConnect) -> str:
            return libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), timeout, 0)
        try:
            out = await ctx.libvirt.call(run, timeout=timeout + 5, what="guest agent")
        except libvirt.libvirtError as exc:
            raise GuestAgentError(libvirt_message(exc)) from None
        except AgentError as exc:
            raise GuestAgentError(str(exc)) from None
        try:
            return json.loads(out).get("return")
        except (ValueError, AttributeError) as exc:
            raise GuestAgentError(f"unreadable answer: {exc}") from None

    return send
