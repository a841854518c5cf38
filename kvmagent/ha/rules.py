"""Fencer rules: per fencer name, the VMs a fencer may kill (allow) and must spare (block).

The MN sends them with ``/add/vm/fencer/rule/to/host`` when a NeverStop HA VM starts and
``/remove/vm/fencer/rule/from/host`` before it stops (premium ``HaManagerImpl``). ZStack's agent
keeps them in memory and forgets them on a restart, until the MN happens to re-send them; here
they are persisted (atomically, under the state dir) and loaded before any fencer restarts, so a
fence right after an agent restart still knows whom to kill and whom to spare.

Unlike ZStack's agent, a uuid is kept once per list (ZStack appends duplicates and a single
remove takes out every copy, so the visible result is the same).
"""
from __future__ import annotations

import logging
import re

from ..core.state import StateStore

log = logging.getLogger(__name__)

STATE_DOC = "ha/fencerrules"
HOST_STORAGE_STATE = "hostStorageState"
HOST_BUSINESS_NIC = "hostBusinessNic"
FENCER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")

Rules = dict[str, list[str]]  # fencer name -> vm uuids


class FencerRules:
    def __init__(self, state: StateStore):
        self._state = state
        self.allow: Rules = {}
        self.block: Rules = {}

    def load(self) -> None:
        doc = self._state.load(STATE_DOC, {}) or {}
        self.allow, self.block = _rules(doc, "allowRules"), _rules(doc, "blockRules")
        if self.allow or self.block:
            log.info("fencer rules restored: allow %s, block %s", self.allow, self.block)

    def add(self, allow: Rules, block: Rules) -> None:
        for mine, theirs in ((self.allow, allow), (self.block, block)):
            for name, uuids in theirs.items():
                current = mine.setdefault(name, [])
                current.extend(u for u in dict.fromkeys(uuids) if u not in current)
        self._save()

    def remove(self, allow: Rules, block: Rules) -> None:
        for mine, theirs in ((self.allow, allow), (self.block, block)):
            for name, uuids in theirs.items():
                if name in mine:  # ZStack keeps an emptied list as "name": []
                    gone = set(uuids)
                    mine[name] = [u for u in mine[name] if u not in gone]
        self._save()

    def allowed(self, fencer: str) -> set[str]:
        return set(self.allow.get(fencer, ()))

    def blocked(self, fencer: str) -> set[str]:
        return set(self.block.get(fencer, ()))

    def _save(self) -> None:
        self._state.save(STATE_DOC, {"allowRules": self.allow, "blockRules": self.block})


def _rules(doc: object, key: str) -> Rules:
    """A persisted map, or {} (logged) when the document has another shape."""
    raw = doc.get(key, {}) if isinstance(doc, dict) else None
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(u, str) for u in v)
            for k, v in raw.items()):
        log.error("state document %s: %s has an unexpected shape; starting without those rules",
                  STATE_DOC, key)
        return {}
    return {k: list(v) for k, v in raw.items()}
