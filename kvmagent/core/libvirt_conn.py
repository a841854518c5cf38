"""The libvirt connection: opened lazily, reopened after libvirtd restarts, never on the loop.

Events: libvirt accepts one event implementation per process, for the life of the process. We
use libvirt's own thread-safe C implementation, run by one daemon thread, and hand every event
to the agent's loop with ``call_soon_threadsafe``. libvirt's asyncio implementation
(libvirtaio) is not usable here: libvirt calls into the event implementation from whichever
thread makes an API call, and every agent call runs in a worker thread by design; libvirtaio
then schedules timers with ``asyncio.ensure_future`` from that foreign thread, which neither
is thread-safe nor wakes its loop, so events (libvirt dispatches them from a zero-delay timer)
arrived seconds late in our measurements. One thread for the whole process also keeps any
number of agents (tests) and event loops in one process working.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, TypeVar

import libvirt

from .blocking import BlockingRunner
from .errors import AgentError, BlockingTimeout
from .metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# libvirt error codes meaning "the connection is gone", after which we reopen it.
_CONNECTION_LOST = {
    libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_RPC,
}

_event_thread_lock = threading.Lock()
_event_thread: threading.Thread | None = None


def ensure_event_impl() -> None:
    """Start the process-wide libvirt event thread (idempotent; before any connection opens)."""
    global _event_thread
    with _event_thread_lock:
        if _event_thread is not None:
            return
        # libvirt prints every error to stderr by default; we report them ourselves.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    log.error("libvirt event loop iteration failed")

        _event_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_thread.start()


def version_string(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


EventCallback = Callable[[str, str, tuple], None]  # (domain uuid, domain name, event args)



def libvirt_message(exc: libvirt.libvirtError) -> str:
    """libvirt's error message on one line (for a reply an operator can read)."""
    return " ".join((exc.get_error_message() or str(exc)).split())

class LibvirtManager:
    def __init__(self, uri: str, runner: BlockingRunner, metrics: Metrics, *,
                 call_timeout: float = 60.0, reconnect_interval: float = 5.0):
        self.uri = uri
        self.runner = runner
        self.metrics = metrics
        self.call_timeout = call_timeout
        self.reconnect_interval = reconnect_interval
        self.last_error: str | None = None
        self._conn: libvirt.virConnect | None = None
        self._open_lock = asyncio.Lock()
        self._listeners: dict[int, list[EventCallback]] = {}
        self._registered: dict[int, int] = {}  # event id -> libvirt callback id
        self._reconnect_hooks: list[Callable[[], Any]] = []
        self._hook_tasks: set[asyncio.Task] = set()  # async reconnect hooks still running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: asyncio.Task | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watcher = self._loop.create_task(self._watch())

    async def close(self) -> None:
        self._closed = True
        if self._watcher:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        for task in self._hook_tasks:  # a hook must not outlive the connection (or the loop)
            task.cancel()
        await asyncio.gather(*self._hook_tasks, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self.runner.run(self._close_conn, conn, timeout=5, pool="libvirt")
            except Exception as exc:  # closing a dead connection may fail; nothing to do
                log.debug("closing libvirt connection: %s", exc)
        self.metrics.libvirt_connected.set(0)

    @property
    def available(self) -> bool:
        return self._conn is not None

    # -- calls ------------------------------------------------------------------------------
    async def connection(self) -> libvirt.virConnect:
        if self._conn is not None:
            return self._conn
        async with self._open_lock:
            if self._conn is None:
                await self._open()
            assert self._conn is not None
            return self._conn

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                   what: str | None = None) -> T:
        """Run ``fn(conn, *args)`` in the libvirt pool; a lost connection is dropped and reported.

        ``timeout`` bounds the whole call, opening the connection included: a caller with a short
        deadline (the fencer) must not queue behind a reconnect to a wedged libvirtd."""
        timeout = timeout or self.call_timeout
        conn = self._conn  # the common case: no task and timer just to hand it over
        if conn is None:
            try:
                conn = await asyncio.wait_for(self.connection(), timeout)
            except TimeoutError:
                raise AgentError(f"libvirt did not answer: opening {self.uri} took over "
                                 f"{timeout:g}s") from None
        try:
            return await self.runner.run(fn, conn, *args, timeout=timeout,
                                         pool="libvirt", what=what or getattr(fn, "__name__", None))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in _CONNECTION_LOST and not self._alive(conn):
                self._drop(conn, f"libvirt connection lost: {exc}")
                raise AgentError(f"libvirt unavailable: {exc.get_error_message()}") from None
            raise
        except BlockingTimeout as exc:
            raise AgentError(f"libvirt did not answer: {exc}") from None

    async def versions(self) -> tuple[str, str]:
        """(libvirt version, hypervisor version), e.g. ("9.0.0", "7.2.22")."""
        def read(conn: libvirt.virConnect) -> tuple[str, str]:
            return version_string(conn.getLibVersion()), version_string(conn.getVersion())
        return await self.call(read)

    # -- events -----------------------------------------------------------------------------
    async def subscribe(self, event_id: int, callback: EventCallback) -> None:
        """Call ``callback(uuid, name, args)`` on the agent loop for each domain event."""
        self._listeners.setdefault(event_id, []).append(callback)
        if self._conn is not None and event_id not in self._registered:
            await self.runner.run(self._register_events, self._conn, [event_id],
                                  timeout=self.call_timeout, pool="libvirt")

    def on_reconnect(self, hook: Callable[[], Any]) -> None:
        """``hook()`` (sync or async) runs on the loop after every (re)connection."""
        self._reconnect_hooks.append(hook)

    # -- internals --------------------------------------------------------------------------
    async def _open(self) -> None:
        ensure_event_impl()
        try:
            conn = await self.runner.run(self._open_conn, timeout=self.call_timeout, pool="libvirt",
                                         what=f"opening {self.uri}")
        except (libvirt.libvirtError, BlockingTimeout) as exc:
            message = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
            if self.last_error != message:
                log.warning("libvirt %s unavailable: %s", self.uri, message)
            self.last_error = message
            raise AgentError(f"libvirt unavailable: {message}") from None
        self._conn = conn
        self.last_error = None
        self.metrics.libvirt_connected.set(1)
        log.info("libvirt connection to %s open", self.uri)
        for hook in self._reconnect_hooks:
            result = hook()
            if asyncio.iscoroutine(result):
                task = self._loop.create_task(result)
                self._hook_tasks.add(task)
                task.add_done_callback(self._hook_tasks.discard)

    def _open_conn(self) -> libvirt.virConnect:
        conn = libvirt.open(self.uri)
        try:
            conn.registerCloseCallback(self._closed_in_thread, None)
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError:
            pass  # drivers like test:/// have neither; the watcher's isAlive check covers them
        self._registered = {}
        self._register_events(conn, list(self._listeners))
        return conn

    def _register_events(self, conn: libvirt.virConnect, event_ids: list[int]) -> None:
        for event_id in event_ids:
            if event_id in self._registered:
                continue
            self._registered[event_id] = conn.domainEventRegisterAny(
                None, event_id, self._event_in_thread, event_id)

    @staticmethod
    def _close_conn(conn: libvirt.virConnect) -> None:
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        conn.close()

    def _event_in_thread(self, conn, dom, *rest) -> None:
        # Runs in the libvirt event thread: hand over to the agent loop.
        *args, event_id = rest
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            uuid, name = dom.UUIDString(), dom.name()
        except libvirt.libvirtError:
            return
        loop.call_soon_threadsafe(self._dispatch, event_id, uuid, name, tuple(args))

    def _dispatch(self, event_id: int, uuid: str, name: str, args: tuple) -> None:
        for callback in self._listeners.get(event_id, []):
            try:
                callback(uuid, name, args)
            except Exception:
                log.exception("libvirt event listener failed")

    def _closed_in_thread(self, conn, reason, opaque) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._drop, conn, f"libvirt closed the connection (reason {reason})")

    def _drop(self, conn: libvirt.virConnect, why: str) -> None:
        if self._conn is conn:
            self._conn = None
            self.metrics.libvirt_connected.set(0)
            self.last_error = why
            log.warning("%s; reconnecting every %gs", why, self.reconnect_interval)

    @staticmethod
    def _alive(conn: libvirt.virConnect) -> bool:
        try:
            return conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    async def _watch(self) -> None:
        """Keep the connection open while anyone listens for events; notice silent deaths."""
        while not self._closed:
            conn = self._conn
            try:
                if conn is not None:
                    alive = await self.runner.run(self._alive, conn, timeout=self.call_timeout,
                                                  pool="libvirt")
                    if not alive:
                        self._drop(conn, "libvirt connection is no longer alive")
                elif self._listeners:
                    await self.connection()
            except AgentError:
                pass  # logged once by _open
            except Exception:
                log.exception("libvirt watcher")
            await asyncio.sleep(self.reconnect_interval)
