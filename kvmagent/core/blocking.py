"""Run blocking work off the event loop: bounded thread pools and killable subprocesses.

Threads cannot be killed, so a call that times out keeps its thread until it returns; pools
are separate per purpose so a wedged libvirtd cannot starve docker or sysfs work. Work that
may hang forever (I/O on a hung NFS/FUSE mount) belongs in :func:`run_process`, which kills.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from .errors import BlockingTimeout

log = logging.getLogger(__name__)
T = TypeVar("T")
# Strong references to reaper tasks of killed children (the loop only keeps weak ones).
_REAPERS: set[asyncio.Future] = set()


class BlockingRunner:
    def __init__(self, pool_sizes: dict[str, int]):
        self._sizes = dict(pool_sizes)
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}

    def _pool(self, name: str) -> concurrent.futures.ThreadPoolExecutor:
        pool = self._pools.get(name)
        if pool is None:
            size = self._sizes.get(name, self._sizes.get("default", 16))
            pool = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix=f"kvmagent-{name}")
            self._pools[name] = pool
        return pool

    async def run(
        self, fn: Callable[..., T], *args: Any, timeout: float, pool: str = "default",
        what: str | None = None, **kwargs: Any,
    ) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool(pool), functools.partial(fn, *args, **kwargs))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            label = what or getattr(fn, "__name__", "blocking call")
            raise BlockingTimeout(f"{label} did not finish within {timeout:g}s") from None

    def shutdown(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()


@dataclass
class ProcessResult:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        tail = (self.stderr or self.stdout).decode(errors="replace").strip().splitlines()
        return f"{os.path.basename(self.argv[0])} exited {self.returncode}: {tail[-1] if tail else ''}"


async def run_process(
    argv: Sequence[str], *, timeout: float, input: bytes | None = None,
    env: dict[str, str] | None = None, check: bool = False,
) -> ProcessResult:
    """Run ``argv`` (never through a shell), killing its whole process group on timeout."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        kill_group(proc.pid)
        reap_later(proc)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise BlockingTimeout(f"{os.path.basename(argv[0])} did not finish within {timeout:g}s") from None
    result = ProcessResult(list(argv), proc.returncode or 0, out or b"", err or b"")
    if check and not result.ok:
        from .errors import AgentError

        raise AgentError(result.describe())
    return result


def reap_later(proc: asyncio.subprocess.Process) -> None:
    """Reap a killed child in the background: one stuck in the kernel (D state on hung
    storage) may take long to die, and must not be waited for here."""
    reaper = asyncio.ensure_future(proc.wait())
    _REAPERS.add(reaper)
    reaper.add_done_callback(_REAPERS.discard)


def kill_group(pid: int) -> None:
    """SIGKILL a child started with ``start_new_session`` and everything it spawned."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError as exc:  # pragma: no cover - we run as root
        log.warning("cannot kill process group %s: %s", pid, exc)
