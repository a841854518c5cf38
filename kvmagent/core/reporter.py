"""Agent -> MN reports (``POST <sendCommandUrl>`` with a ``commandpath`` header).

The MN's address and this host's uuid are learned from ``/host/connect`` and persisted, so
reports work right after a restart, before the MN reconnects. A report that must not be lost
(a fence) made before any MN was ever known is kept, persisted, and handed to the outbox in
order as soon as ``/host/connect`` tells the address.
"""
from __future__ import annotations

import logging
from typing import Any

from .delivery import Outbox
from .state import StateStore

log = logging.getLogger(__name__)

HOST_DOC = "host"
PENDING_DOC = "reports-waiting-for-mn"
MAX_WAITING = 1000


class HostIdentity:
    """hostUuid and sendCommandUrl, persisted in the ``host`` state document."""

    def __init__(self, state: StateStore):
        self._state = state
        doc = state.load(HOST_DOC, {}) or {}
        self.host_uuid: str | None = doc.get("hostUuid")
        self.send_command_url: str | None = doc.get("sendCommandUrl")
        self.on_update: list = []  # callables run after each update

    def update(self, host_uuid: str, send_command_url: str | None) -> None:
        self.host_uuid = host_uuid
        if send_command_url:
            self.send_command_url = send_command_url
        self._state.save(HOST_DOC, {"hostUuid": self.host_uuid, "sendCommandUrl": self.send_command_url})
        for fn in self.on_update:
            fn()


class Reporter:
    def __init__(self, identity: HostIdentity, outbox: Outbox):
        self.identity = identity
        self.outbox = outbox
        identity.on_update.append(self._flush_waiting)

    def report(self, commandpath: str, body: dict[str, Any], *, wait_for_mn: bool = False) -> bool:
        """Queue a report; False (logged) when no MN is known yet. Then it is dropped, or with
        ``wait_for_mn`` (a fence: the MN must hear of it) kept until an MN is known."""
        url = self.identity.send_command_url
        body = {**body, "hostUuid": body.get("hostUuid") or self.identity.host_uuid}
        if not url and not wait_for_mn:
            self.outbox.metrics.deliveries_failed.labels("report").inc()
            log.warning("report %s not sent: no MN connected yet (no sendCommandUrl): %s",
                        commandpath, body)
            return False
        if not url:
            waiting = self._waiting()[-(MAX_WAITING - 1):]
            waiting.append({"commandpath": commandpath, "body": body})
            try:
                self.outbox.store.save(PENDING_DOC, waiting)
            except OSError as exc:
                log.error("report %s not persisted while waiting for an MN: %s", commandpath, exc)
            log.warning("report %s waits for an MN (no sendCommandUrl yet): %s", commandpath, body)
            return False
        self._submit(url, commandpath, body)
        return True

    def _waiting(self) -> list[dict[str, Any]]:
        doc = self.outbox.store.load(PENDING_DOC, []) or []
        return [d for d in doc if isinstance(d, dict) and isinstance(d.get("body"), dict)] \
            if isinstance(doc, list) else []

    def _flush_waiting(self) -> None:
        url = self.identity.send_command_url
        waiting = self._waiting() if url else []
        for item in waiting:
            body = {**item["body"], "hostUuid": item["body"].get("hostUuid") or self.identity.host_uuid}
            self._submit(url, str(item["commandpath"]), body)
        if waiting:
            self.outbox.store.delete(PENDING_DOC)
            log.info("%d report(s) made before any MN was known handed to the outbox", len(waiting))

    def _submit(self, url: str, commandpath: str, body: dict[str, Any]) -> None:
        resource = body.get("vmUuid") or ",".join(body.get("psUuids") or [])
        self.outbox.submit("report", url, body, {"commandpath": commandpath},
                           stream=f"{commandpath} {resource}")
        log.info("report %s queued: %s", commandpath, body)
