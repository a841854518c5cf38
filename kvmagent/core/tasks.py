"""Async commands: acknowledge at once, run, deliver exactly one callback per taskuuid.

The taskuuid is an idempotency key. An accepted task is journaled under ``tasks/`` (fsynced,
off the event loop, before the acknowledgement) until its result is in the outbox; then its
taskuuid goes into the done log (``tasks-done/<hour>.log``, one line per task, kept for
``task_idempotency_window`` seconds). A request whose taskuuid is running or done is
acknowledged like the first one and neither run nor called back again, also after a restart.

A journal entry found at start-up means the agent died mid-command: the MN gets a failure
callback saying so, instead of waiting for a callback that would never come.

The one case left at-least-once: the agent crashes after the MN received a callback but before
the agent saw its answer; the callback is still in the outbox and is sent again at start-up.
The MN answers 404 to a callback of a finished task, so this repeat changes nothing there.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

from pydantic import BaseModel

from .context import AgentContext
from .dispatch import execute, failure
from .errors import BlockingTimeout
from .plugin import Command

log = logging.getLogger(__name__)

JOURNAL = "tasks"
DONE = "tasks-done"
SEGMENT = 3600  # seconds per done-log file: the window is pruned a file at a time
JOURNAL_POOL = "tasks-journal"
JOURNAL_TIMEOUT = 30.0
_TASKUUID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # also a state document name


def valid_taskuuid(taskuuid: str) -> bool:
    return bool(_TASKUUID.match(taskuuid))


class JournalEntry(BaseModel):
    taskuuid: str
    path: str
    callbackurl: str
    accepted: float


class TaskRunner:
    def __init__(self, ctx: AgentContext):
        self.ctx = ctx
        self.window = ctx.config.task_idempotency_window
        self.running: dict[str, asyncio.Task] = {}
        # done-log segment number -> taskuuids finished in it
        self.done: dict[int, set[str]] = {}
        self.done_dir = Path(ctx.state.root) / DONE

    # -- the done log ---------------------------------------------------------------------

    def is_done(self, taskuuid: str) -> bool:
        return any(taskuuid in uuids for uuids in self.done.values())

    def _load_done(self) -> None:
        oldest = self._segment(time.time() - self.window)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        for path in self.done_dir.iterdir():
            number = int(path.stem) if path.suffix == ".log" and path.stem.isdigit() else None
            if number is None or number < oldest:
                path.unlink(missing_ok=True)  # outside the window, or not ours (a tmp file)
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                log.error("done log %s unreadable (%s); its tasks may run again if re-sent",
                          path, exc)
                continue
            self.done[number] = {line for line in text.split() if valid_taskuuid(line)}

    def _mark_done(self, taskuuid: str) -> None:
        if self.window <= 0:  # idempotency after the end switched off
            return
        now = self._segment(time.time())
        if now not in self.done:
            self.done[now] = set()
            self._prune(now)
        self.done[now].add(taskuuid)
        try:
            # Not fsynced: the outbox message written just before is not either; both
            # survive a crash of the agent, which is what the journal is for.
            with open(self.done_dir / f"{now}.log", "a", encoding="utf-8") as fh:
                fh.write(taskuuid + "\n")
        except OSError as exc:
            log.error("task %s not written to the done log (%s); a re-send after a restart "
                      "would run it again", taskuuid, exc)

    def _prune(self, now: int) -> None:
        oldest = self._segment(now * SEGMENT - self.window)
        for number in [n for n in self.done if n < oldest]:
            del self.done[number]
            (self.done_dir / f"{number}.log").unlink(missing_ok=True)

    @staticmethod
    def _segment(when: float) -> int:
        return int(when // SEGMENT)

    # -- tasks ----------------------------------------------------------------------------

    def restore(self) -> None:
        """Load the done log; send failure callbacks for tasks a previous run accepted but
        never finished."""
        self._load_done()
        delivered = self.ctx.outbox.pending_taskuuids()
        for name in self.ctx.state.names(JOURNAL):
            entry = self.ctx.state.load(name, check=JournalEntry.model_validate)
            if entry is None:
                continue
            taskuuid = entry.taskuuid
            if valid_taskuuid(taskuuid) and not self.is_done(taskuuid):
                if taskuuid not in delivered:
                    body = failure(
                        f"the agent restarted while running {entry.path} (accepted at "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(entry.accepted))}); "
                        "its outcome is unknown, retry the command").body
                    self.ctx.outbox.submit("callback", entry.callbackurl, body,
                                           {"taskuuid": taskuuid})
                    log.warning("task %s (%s) was interrupted by a restart; failure callback "
                                "queued", taskuuid, entry.path)
                self._mark_done(taskuuid)
            self.ctx.state.delete(name)

    async def accept(self, cmd: Command, raw: bytes, taskuuid: str, callbackurl: str,
                     resource: str | None = None) -> bool:
        """Journal and start the task; False when that taskuuid is running or done (it is
        acknowledged all the same, and neither run nor called back again)."""
        if taskuuid in self.running or self.is_done(taskuuid):
            state = "running" if taskuuid in self.running else "already done"
            log.info("%s task=%s %s; acknowledged, not run again", cmd.path, taskuuid, state)
            return False
        journaled = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(
            self._run(cmd, raw, taskuuid, callbackurl, resource, journaled),
            name=f"task {cmd.path} {taskuuid}")
        # Registered before the first await: a concurrent duplicate finds it.
        self.running[taskuuid] = task
        self.ctx.metrics.tasks_in_flight.set(len(self.running))
        entry = {"taskuuid": taskuuid, "path": cmd.path, "callbackurl": callbackurl,
                 "accepted": time.time()}
        try:
            # fsync: slow on a busy disk, so in a thread of its own pool, not on the event loop
            # (nor behind handlers' blocking work or DNS lookups in the shared executors)
            await self.ctx.runner.run(self.ctx.state.save, f"{JOURNAL}/{taskuuid}", entry,
                                      pool=JOURNAL_POOL, timeout=JOURNAL_TIMEOUT,
                                      what=f"journal of task {taskuuid}")
        except (OSError, BlockingTimeout) as exc:  # a full or hung disk: run it all the same
            log.error("task %s not journaled (%s); running it without a restart guarantee",
                      taskuuid, exc)
        finally:
            journaled.set_result(None)
        return True

    async def _run(self, cmd: Command, raw: bytes, taskuuid: str, callbackurl: str,
                   resource: str | None, journaled: asyncio.Future) -> None:
        try:
            await journaled  # a journal written after the task finished would outlive it
            outcome = await execute(self.ctx, cmd, raw, taskuuid, resource, called="async")
            self.ctx.outbox.submit("callback", callbackurl, outcome.body, {"taskuuid": taskuuid})
            self._mark_done(taskuuid)
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
