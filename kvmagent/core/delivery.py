"""Delivery of callbacks and reports to the MN: persisted, retried with backoff, bounded.

Every message goes through an outbox under the state dir before the first attempt, so a
result survives an agent restart and an MN outage. Reports of one stream (one VM's states, one
storage's status) are delivered in order, so a VM's Stopped never overtakes its Running, while
a report the MN keeps refusing holds up only its own stream; callbacks are independent.
A message that cannot be delivered within the retry window is logged, counted and kept under
``undelivered/`` for a human; a 4xx answer is final (retrying would not change it).

Destinations are isolated: each (host, port, scheme) has its own pool of connections, so a
dead or hung callback URL delays only the messages addressed to it, never the live MN's.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic import TypeAdapter

from .logs import mask_data, mask_text
from .state import StateStore

if TYPE_CHECKING:
    from .config import AgentConfig
    from .metrics import Metrics

log = logging.getLogger(__name__)

OUTBOX = "outbox"
UNDELIVERED = "undelivered"
# Connections to one destination at a time; there is no cap over all destinations, which
# would let a hung one hold every connection (head-of-line blocking).
PER_DESTINATION = 32


@dataclass
class Message:
    kind: str  # "callback" or "report"
    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    stream: str | None = None  # messages of one stream are delivered in order
    created: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}")

    @property
    def taskuuid(self) -> str | None:
        return self.headers.get("taskuuid")


_MESSAGE = TypeAdapter(Message)


def stored_message(doc: Any) -> Message:
    """A message from its outbox document; ValueError when it has another shape."""
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k != "ordered"}  # written by an older agent
    return _MESSAGE.validate_python(doc)


class Outbox:
    def __init__(self, config: AgentConfig, state: StateStore, metrics: Metrics):
        self.config = config
        # Atomic against a crash of the agent; not fsynced, callbacks are hot-path.
        self.store = StateStore(state.root, fsync=False)
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._queues: dict[str, asyncio.Queue[Message]] = {}
        self._workers: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.delivery_timeout),
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=PER_DESTINATION,
                                           ssl=self._tls()),
        )
        restored = 0
        for name in self.store.names(OUTBOX):
            msg = self.store.load(name, check=stored_message)
            if msg is None:
                continue
            self._dispatch(msg)
            restored += 1
        if restored:
            log.info("outbox: %d message(s) left by the previous run, delivering", restored)

    def _tls(self) -> ssl.SSLContext | bool:
        if not self.config.delivery_tls_verify:
            return False
        cafile = str(self.config.delivery_ca_file) if self.config.delivery_ca_file else None
        return ssl.create_default_context(cafile=cafile)

    async def close(self) -> None:
        for task in list(self._workers):
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def pending_taskuuids(self) -> set[str]:
        result = set()
        for name in self.store.names(OUTBOX):
            msg = self.store.load(name, check=stored_message)
            tid = msg.taskuuid if msg is not None else None
            if tid:
                result.add(tid)
        return result

    def submit(self, kind: str, url: str, body: dict[str, Any], headers: dict[str, str],
               stream: str | None = None) -> Message:
        msg = Message(kind=kind, url=url, headers=headers, body=body, stream=stream)
        try:
            self.store.save(f"{OUTBOX}/{msg.id}", asdict(msg))
        except OSError as exc:  # e.g. a full disk: deliver from memory rather than not at all
            log.error("%s not persisted (%s); delivering it without a restart guarantee", kind, exc)
        self._dispatch(msg)
        return msg

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is pending (tests and shutdown)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    @property
    def pending(self) -> int:
        return self._pending

    def _dispatch(self, msg: Message) -> None:
        self._pending += 1
        self._idle.clear()
        self.metrics.deliveries_pending.set(self._pending)
        if msg.stream is None:
            self._spawn(self._deliver_one(msg))
            return
        key = f"{msg.url} {msg.stream}"
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            self._spawn(self._ordered_worker(key, queue))
        queue.put_nowait(msg)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    async def _ordered_worker(self, key: str, queue: asyncio.Queue[Message]) -> None:
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), timeout=60)
                except TimeoutError:
                    if queue.empty():
                        return
                    continue
                await self._deliver_one(msg)
        finally:
            # Messages still queued at shutdown stay in the outbox for the next start.
            if self._queues.get(key) is queue:
                del self._queues[key]

    async def _deliver_one(self, msg: Message) -> None:
        try:
            delivered = await self._attempt_until_deadline(msg)
            if not delivered:
                self.metrics.deliveries_failed.labels(msg.kind).inc()
                self.store.save(f"{UNDELIVERED}/{msg.id}", asdict(msg))
                log.error(
                    "%s to %s given up after %.0fs (kept in %s/%s): %s", msg.kind,
                    mask_text(msg.url), time.time() - msg.created, UNDELIVERED, msg.id,
                    mask_data(msg.body))
            self.store.delete(f"{OUTBOX}/{msg.id}")
        finally:
            self._pending -= 1
            self.metrics.deliveries_pending.set(self._pending)
            if self._pending == 0:
                self._idle.set()

    async def _attempt_until_deadline(self, msg: Message) -> bool:
        deadline = msg.created + self.config.delivery_retry_window
        backoff = self.config.delivery_initial_backoff
        attempt = 0
        while True:
            attempt += 1
            outcome = await self._attempt(msg)
            if outcome == "ok":
                return True
            if outcome == "final":
                return False
            if time.time() + backoff > deadline:
                return False
            self.metrics.deliveries_retried.labels(msg.kind).inc()
            log.warning("%s %s to %s: attempt %d failed (%s), retrying in %.1fs", msg.kind,
                        msg.taskuuid or msg.headers.get("commandpath", ""), mask_text(msg.url),
                        attempt, outcome, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.delivery_max_backoff)

    async def _attempt(self, msg: Message) -> str:
        assert self._session is not None
        try:
            async with self._session.post(msg.url, json=msg.body, headers=msg.headers) as resp:
                await resp.read()
                if resp.status < 300:
                    return "ok"
                if 400 <= resp.status < 500:
                    log.error("%s to %s refused with HTTP %d; not retried", msg.kind,
                              mask_text(msg.url), resp.status)
                    return "final"
                return f"HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except ValueError as exc:  # malformed URL
            log.error("%s to %r impossible: %s", msg.kind, mask_text(msg.url), exc)
            return "final"
