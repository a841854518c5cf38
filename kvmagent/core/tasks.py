"""Async commands: acknowledge at once, run, deliver exactly one callback per taskuuid.

An accepted task is journaled under ``tasks/`` until its result is in the outbox. A journal
entry found at start-up means the agent died mid-command: the MN gets a failure callback
saying so, instead of waiting for a callback that would never come.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time

from .context import AgentContext
from .dispatch import execute, failure
from .plugin import Command

log = logging.getLogger(__name__)

JOURNAL = "tasks"
_TASKUUID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # also a state document name


def valid_taskuuid(taskuuid: str) -> bool:
    return bool(_TASKUUID.match(taskuuid))


class TaskRunner:
    def __init__(self, ctx: AgentContext):
        self.ctx = ctx
        self.running: dict[str, asyncio.Task] = {}

    def restore(self) -> None:
        """Send failure callbacks for tasks a previous run accepted but never finished."""
        delivered = self.ctx.outbox.pending_taskuuids()
        for name in self.ctx.state.names(JOURNAL):
            doc = self.ctx.state.load(name) or {}
            taskuuid = doc.get("taskuuid", "")
            if taskuuid and taskuuid not in delivered and doc.get("callbackurl"):
                body = failure(
                    f"the agent restarted while running {doc.get('path')} (accepted at "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(doc.get('accepted', 0)))}); "
                    "its outcome is unknown, retry the command").body
                self.ctx.outbox.submit("callback", doc["callbackurl"], body, {"taskuuid": taskuuid})
                log.warning("task %s (%s) was interrupted by a restart; failure callback queued",
                            taskuuid, doc.get("path"))
            self.ctx.state.delete(name)

    def accept(self, cmd: Command, raw: bytes, taskuuid: str, callbackurl: str,
               resource: str | None = None) -> bool:
        """Start the task; False when that taskuuid is already running (not run twice)."""
        if taskuuid in self.running:
            log.info("%s task=%s already running; acknowledged, not run again", cmd.path, taskuuid)
            return False
        self.ctx.state.save(f"{JOURNAL}/{taskuuid}", {
            "taskuuid": taskuuid, "path": cmd.path, "callbackurl": callbackurl,
            "accepted": time.time()})
        task = asyncio.get_running_loop().create_task(
            self._run(cmd, raw, taskuuid, callbackurl, resource), name=f"task {cmd.path} {taskuuid}")
        self.running[taskuuid] = task
        self.ctx.metrics.tasks_in_flight.set(len(self.running))
        return True

    async def _run(self, cmd: Command, raw: bytes, taskuuid: str, callbackurl: str,
                   resource: str | None) -> None:
        try:
            outcome = await execute(self.ctx, cmd, raw, taskuuid, resource, called="async")
            self.ctx.outbox.submit("callback", callbackurl, outcome.body, {"taskuuid": taskuuid})
            self.ctx.state.delete(f"{JOURNAL}/{taskuuid}")
        finally:
            # Cancelled at shutdown: the journal entry stays, the next start reports it.
            self.running.pop(taskuuid, None)
            self.ctx.metrics.tasks_in_flight.set(len(self.running))

    async def close(self, grace: float = 5.0) -> None:
        tasks = list(self.running.values())
        if tasks:
            log.info("waiting up to %gs for %d running task(s)", grace, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
