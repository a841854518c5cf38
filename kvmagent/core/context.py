"""AgentContext: the per-agent services a handler may use. One per app; never global."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .blocking import BlockingRunner
from .config import AgentConfig
from .delivery import Outbox
from .libvirt_conn import LibvirtManager
from .locks import KeyedLocks
from .metrics import Metrics
from .reporter import HostIdentity, Reporter
from .state import StateStore

log = logging.getLogger(__name__)

HookFn = Callable[..., Awaitable[Any]]


@dataclass
class AgentContext:
    config: AgentConfig
    state: StateStore
    metrics: Metrics
    runner: BlockingRunner
    locks: KeyedLocks
    outbox: Outbox
    identity: HostIdentity
    reporter: Reporter
    libvirt: LibvirtManager
    # Per-agent objects plugins create in their startup hooks (e.g. "ha.fencers").
    services: dict[str, Any] = field(default_factory=dict)
    # Named extension points, e.g. "selffencer.vms_killed" -> [async fn(ctx, vm_uuids)].
    hooks: dict[str, list[HookFn]] = field(default_factory=dict)
    _background: set[asyncio.Task] = field(default_factory=set)

    @classmethod
    def create(cls, config: AgentConfig) -> AgentContext:
        state = StateStore(config.state_dir)
        metrics = Metrics()
        runner = BlockingRunner({"default": config.executor_workers,
                                 "libvirt": config.libvirt_workers,
                                 "tasks-journal": 8})  # fsyncs of accepted async tasks
        outbox = Outbox(config, state, metrics)
        identity = HostIdentity(state)
        return cls(
            config=config, state=state, metrics=metrics, runner=runner, locks=KeyedLocks(),
            outbox=outbox, identity=identity, reporter=Reporter(identity, outbox),
            libvirt=LibvirtManager(config.libvirt_uri, runner, metrics,
                                   call_timeout=config.libvirt_call_timeout,
                                   reconnect_interval=config.libvirt_reconnect_interval),
        )

    def add_hook(self, name: str, fn: HookFn) -> None:
        self.hooks.setdefault(name, []).append(fn)

    async def run_hooks(self, name: str, *args: Any) -> list[str]:
        """Run every hook of ``name``; a failing hook is logged and does not stop the others."""
        errors = []
        for fn in self.hooks.get(name, []):
            try:
                await fn(self, *args)
            except Exception as exc:
                log.exception("hook %s (%s) failed", name, getattr(fn, "__qualname__", fn))
                errors.append(f"{getattr(fn, '__qualname__', fn)}: {exc}")
        return errors

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        """A background task owned by the agent: cancelled at shutdown, failures logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s died: %r", name, t.exception(),
                          exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def cancel_background(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
