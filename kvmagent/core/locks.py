"""Keyed locks: work on one resource is serialised, different resources run in parallel."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, kind: str, key: str) -> AsyncIterator[None]:
        ident = (kind, key)
        lock, users = self._locks.get(ident, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[ident] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[ident]
            if users <= 1:
                del self._locks[ident]  # no waiters left: do not keep a lock per uuid forever
            else:
                self._locks[ident] = (lock, users - 1)

    def locked(self, kind: str, key: str) -> bool:
        entry = self._locks.get((kind, key))
        return bool(entry and entry[0].locked())
