"""Agent -> MN reports (``POST <sendCommandUrl>`` with a ``commandpath`` header).

The MN's address and this host's uuid are learned from ``/host/connect`` and persisted, so
reports work right after a restart, before the MN reconnects.
"""
from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from .delivery import Outbox
from .state import StateStore, conforms

log = logging.getLogger(__name__)

HOST_DOC = "host"


class HostDoc(BaseModel):
    hostUuid: str | None = None
    sendCommandUrl: str | None = None


class HostIdentity:
    """hostUuid and sendCommandUrl, persisted in the ``host`` state document."""

    def __init__(self, state: StateStore):
        self._state = state
        doc = state.load(HOST_DOC, {}, check=conforms(HostDoc)) or {}
        self.host_uuid: str | None = doc.get("hostUuid")
        self.send_command_url: str | None = doc.get("sendCommandUrl")

    def update(self, host_uuid: str, send_command_url: str | None) -> None:
        self.host_uuid = host_uuid
        if send_command_url:
            self.send_command_url = send_command_url
        self._state.save(HOST_DOC, {"hostUuid": self.host_uuid, "sendCommandUrl": self.send_command_url})


class Reporter:
    def __init__(self, identity: HostIdentity, outbox: Outbox):
        self.identity = identity
        self.outbox = outbox

    def report(self, commandpath: str, body: dict[str, Any]) -> bool:
        """Queue a report; False (logged) when no MN is known yet."""
        url = self.identity.send_command_url
        body = {"hostUuid": self.identity.host_uuid, **body}
        if not url:
            self.outbox.metrics.deliveries_failed.labels("report").inc()
            log.warning("report %s not sent: no MN connected yet (no sendCommandUrl): %s",
                        commandpath, body)
            return False
        resource = body.get("vmUuid") or ",".join(body.get("psUuids") or [])
        self.outbox.submit("report", url, body, {"commandpath": commandpath},
                           stream=f"{commandpath} {resource}")
        log.info("report %s queued: %s", commandpath, body)
        return True
