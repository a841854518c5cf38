"""Hugepage pools through sysfs, and hugetlbfs mounts.

Pages are counted and changed per page size and, when a NUMA node is given, per node:

    <sysfs>/kernel/mm/hugepages/hugepages-<kB>kB/{nr,free,resv,surplus}_hugepages   (host)
    <sysfs>/devices/system/node/node<N>/hugepages/hugepages-<kB>kB/{nr,free,surplus}_hugepages

``/proc/meminfo`` is never parsed for pages: it only knows the default page size.

Counting rules (the kernel's, spelled out):

- ``total`` is ``nr_hugepages``, ``free`` is ``free_hugepages``.
- ``reserved`` (``resv_hugepages``, host pool only; the kernel does not expose it per node) are
  free pages already promised to a mapping. They are not *available*:
  ``available = free - reserved``.
- A NUMA node pool has no reserved count of its own, and any of the host's reserved pages may
  be free pages of this node. So a node pool is counted conservatively:
  ``available = min(node free, host free - host reserved)`` (same page size), and the node's
  ``reserved`` is reported as ``node free - available``, the share of the host's reserved
  pages that may sit on this node.
- *ensure(count)* makes ``available >= count`` by growing the pool by the shortfall only. The
  kernel may give fewer pages than asked (fragmented memory, too little free memory): the pool
  is re-read, memory is compacted once and the write retried, and if pages are still missing the
  pool is set back to its old size and the call fails. Growth larger than the host's available
  memory is refused before anything is written.
- *release(count)* shrinks the pool by at most ``count`` and never by more than ``available``,
  so a page in use (or reserved) is never taken. (The kernel would keep an in-use page anyway,
  as a surplus page; we do not even ask it to.)

All functions here block (file I/O, subprocess-free); callers run them through
:class:`~kvmagent.blocking.BlockingRunner`. A :class:`HugePages` serialises its own changes with
a thread lock, so a caller whose wait timed out cannot overlap a change still running.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from ..core.blocking import BlockingRunner, run_process
from ..core.errors import AgentError

log = logging.getLogger(__name__)

# Page size labels of the wire protocol -> kB, the unit of the sysfs directory names.
PAGE_SIZES_KB: dict[str, int] = {"2M": 2048, "1G": 1024 * 1024}
# Upper bound of a count on the wire (2 TiB of 2M pages); the memory check below is the real one.
MAX_COUNT = 1024 * 1024

_NODE_DIR = re.compile(r"^node(\d+)$")
_SIZE = re.compile(r"^(\d+)([KMGkmg])?$")


class HugepageInputError(AgentError):
    """A request names something this host does not have (a NUMA node, a page size)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field


class HugepageError(AgentError):
    """The pool could not be brought to the asked state; nothing was left half done."""


@dataclass(frozen=True)
class PoolState:
    total: int
    free: int
    reserved: int = 0
    surplus: int = 0

    @property
    def available(self) -> int:
        return max(self.free - self.reserved, 0)

    @property
    def in_use(self) -> int:
        return self.total - self.free

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def size_kb(label: str) -> int:
    try:
        return PAGE_SIZES_KB[label]
    except KeyError:
        raise HugepageInputError("pageSize", f"must be one of {', '.join(PAGE_SIZES_KB)}, "
                                 f"got {label!r}") from None


def parse_size_kb(text: str) -> int:
    """"2M" -> 2048, "1024M" -> 1048576, "1G" -> 1048576, "2048k" -> 2048 (mount options)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r}")
    value, unit = int(match.group(1)), (match.group(2) or "K").upper()
    return value * {"K": 1, "M": 1024, "G": 1024 * 1024}[unit]


def _available_memory() -> int:
    return psutil.virtual_memory().available


class HugePages:
    """One host's hugepage pools under ``sysfs_root`` (``/sys``, or a fake tree in tests)."""

    def __init__(self, sysfs_root: Path, procfs_root: Path = Path("/proc"), *,
                 available_memory: Callable[[], int] = _available_memory):
        self.sysfs_root = Path(sysfs_root)
        self.procfs_root = Path(procfs_root)
        self.available_memory = available_memory
        self._lock = threading.Lock()

    # -- where ---------------------------------------------------------------------------
    def numa_nodes(self) -> list[int]:
        base = self.sysfs_root / "devices/system/node"
        nodes = []
        try:
            entries = list(base.iterdir())
        except OSError:
            return nodes
        for entry in entries:
            match = _NODE_DIR.match(entry.name)
            if match and entry.is_dir():
                nodes.append(int(match.group(1)))
        return sorted(nodes)

    def pool_dir(self, page_size: str, numa_node: int | None = None) -> Path:
        """The sysfs directory of one pool; :class:`HugepageInputError` if there is none."""
        kb = size_kb(page_size)
        if numa_node is None:
            base = self.sysfs_root / "kernel/mm/hugepages"
        else:
            node_dir = self.sysfs_root / f"devices/system/node/node{numa_node}"
            if numa_node < 0 or not node_dir.is_dir():
                have = ", ".join(map(str, self.numa_nodes())) or "none"
                raise HugepageInputError("numaNode", f"NUMA node {numa_node} does not exist on "
                                         f"this host (nodes: {have})")
            base = node_dir / "hugepages"
        pool = base / f"hugepages-{kb}kB"
        if not pool.is_dir():
            have = ", ".join(self.supported_sizes(numa_node)) or "none"
            where = "this host" if numa_node is None else f"NUMA node {numa_node}"
            raise HugepageInputError("pageSize", f"{page_size} pages are not supported on "
                                     f"{where} (supported: {have})")
        return pool

    def supported_sizes(self, numa_node: int | None = None) -> list[str]:
        base = (self.sysfs_root / "kernel/mm/hugepages" if numa_node is None else
                self.sysfs_root / f"devices/system/node/node{numa_node}/hugepages")
        return [label for label, kb in PAGE_SIZES_KB.items()
                if (base / f"hugepages-{kb}kB").is_dir()]

    def summary(self) -> dict[str, dict[str, int]]:
        """{"2M": {"total": n, "free": n}, ...}: the host-wide pools (``/host/fact``)."""
        return {size: {"total": state.total, "free": state.free}
                for size in self.supported_sizes() for state in [self.read(size)]}

    # -- reading and writing (one place, so tests can play the kernel) -------------------
    def _read_int(self, path: Path) -> int:
        return int(path.read_text().strip())

    def _write_int(self, path: Path, value: int) -> None:
        with open(path, "w") as fh:
            fh.write(f"{value}\n")

    def read(self, page_size: str, numa_node: int | None = None) -> PoolState:
        pool = self.pool_dir(page_size, numa_node)
        host = None if numa_node is None else self.pool_dir(page_size)
        return self._read_pool(pool, host)

    def _read_pool(self, pool: Path, host: Path | None = None) -> PoolState:
        """One pool; for a node pool, ``host`` is the host pool of the same page size, whose
        reserved pages bound what the node has available (see the module's counting rules)."""
        def optional(name: str) -> int:
            path = pool / name
            return self._read_int(path) if path.exists() else 0

        state = PoolState(total=self._read_int(pool / "nr_hugepages"),
                          free=self._read_int(pool / "free_hugepages"),
                          reserved=optional("resv_hugepages"),
                          surplus=optional("surplus_hugepages"))
        if host is None:
            return state
        host_state = self._read_pool(host)
        available = max(min(state.free - state.reserved, host_state.available), 0)
        return dataclasses.replace(state, reserved=state.free - available)

    def _set_total(self, pool: Path, value: int) -> OSError | None:
        try:
            self._write_int(pool / "nr_hugepages", value)
        except OSError as exc:  # e.g. ENOMEM/EINVAL: the kernel refused outright
            return exc
        return None

    def _compact(self) -> None:
        path = self.procfs_root / "sys/vm/compact_memory"
        if not path.exists():
            return
        try:
            self._write_int(path, 1)
        except OSError as exc:
            log.warning("memory compaction failed: %s", exc)

    # -- the operations ------------------------------------------------------------------
    def ensure(self, page_size: str, count: int, numa_node: int | None = None) -> PoolState:
        """At least ``count`` available pages; grows by the shortfall, or fails and rolls back."""
        _check_count(count)
        pool = self.pool_dir(page_size, numa_node)
        host = None if numa_node is None else self.pool_dir(page_size)
        where = _where(page_size, numa_node)
        with self._lock:
            before = self._read_pool(pool, host)
            if before.available >= count:
                return before
            shortfall = count - before.available
            need = shortfall * PAGE_SIZES_KB[page_size] * 1024
            have = self.available_memory()
            if need > have:
                raise HugepageError(
                    f"cannot add {shortfall} {where} hugepages ({_gib(need)}): only {_gib(have)} "
                    f"of memory is available; {before.total} pages ({before.available} "
                    f"available) left unchanged")
            target = before.total + shortfall
            log.info("hugepages %s: %d -> %d pages (want %d available, have %d)",
                     where, before.total, target, count, before.available)
            error = self._set_total(pool, target)
            after = self._read_pool(pool, host)
            if after.available < count and error is None:
                # Fragmented memory is the usual reason: compact once, then ask again.
                self._compact()
                error = self._set_total(pool, target)
                after = self._read_pool(pool, host)
            if after.available >= count:
                return after
            got = max(after.total - before.total, 0)
            rollback_error = self._set_total(pool, before.total)
            final = self._read_pool(pool, host)
            reason = (f"the kernel refused: {error.strerror or error}" if error is not None else
                      "memory is too fragmented or too little of it is free")
            rolled = (f"rolled back to {final.total} pages" if rollback_error is None else
                      f"rollback to {before.total} pages failed ({rollback_error}); pool is "
                      f"at {final.total}")
            log.warning("hugepages %s: wanted %d more, got %d; %s", where, shortfall, got, rolled)
            raise HugepageError(f"could not get {shortfall} more {where} hugepages (got {got}: "
                                f"{reason}); {rolled}")

    def release(self, page_size: str, count: int, numa_node: int | None = None) -> PoolState:
        """Give back up to ``count`` pages, only ones available (never one in use or reserved)."""
        _check_count(count)
        pool = self.pool_dir(page_size, numa_node)
        host = None if numa_node is None else self.pool_dir(page_size)
        with self._lock:
            before = self._read_pool(pool, host)
            take = min(count, before.available)
            if take <= 0:
                return before
            log.info("hugepages %s: %d -> %d pages (release %d of %d asked)",
                     _where(page_size, numa_node), before.total, before.total - take, take, count)
            error = self._set_total(pool, before.total - take)
            if error is not None:
                raise HugepageError(f"could not release {_where(page_size, numa_node)} hugepages: "
                                    f"{error.strerror or error}")
            return self._read_pool(pool, host)

    # -- the host-wide commands (/host/enable|disable/hugepage) ----------------------------
    def fill_memory_but(self, page_size: str, reserve: int) -> PoolState:
        """Every byte of memory but ``reserve`` as ``page_size`` pages (ZU's formula), pages in
        use counted; grows by the shortfall or fails leaving the pool as it was."""
        page = PAGE_SIZES_KB[page_size] * 1024
        target = (psutil.virtual_memory().total - reserve) // page
        return self.ensure(page_size, max(target - self.read(page_size).in_use, 0))

    def release_free(self, page_size: str) -> PoolState:
        """Give back every available page of the host pool (pages in use stay)."""
        return self.release(page_size, self.read(page_size).available)


def _check_count(count: int) -> None:
    if not 0 <= count <= MAX_COUNT:
        raise HugepageInputError("count", f"must be between 0 and {MAX_COUNT}, got {count}")


def _where(page_size: str, numa_node: int | None) -> str:
    return page_size if numa_node is None else f"{page_size} node{numa_node}"


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


# -- hugetlbfs mounts ------------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    options: tuple[str, ...]

    @property
    def page_size_kb(self) -> int | None:
        for opt in self.options:
            if opt.startswith("pagesize="):
                try:
                    return parse_size_kb(opt.partition("=")[2])
                except ValueError:
                    return None
        return None


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mounts(procfs_root: Path) -> list[Mount]:
    """Mounts of this mount namespace from ``<procfs>/self/mountinfo``."""
    mounts = []
    for line in (Path(procfs_root) / "self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 4:
            continue
        options = tuple(fields[5].split(",")) + tuple(fields[sep + 3].split(","))
        mounts.append(Mount(_unescape(fields[4]), fields[sep + 1], options))
    return mounts


def hugetlbfs_mounts(procfs_root: Path, page_size: str) -> list[str]:
    kb = size_kb(page_size)
    default_kb = _default_page_kb(procfs_root)
    found = []
    for mount in read_mounts(procfs_root):
        if mount.fstype != "hugetlbfs":
            continue
        if (mount.page_size_kb or default_kb) == kb:
            found.append(mount.mount_point)
    return found


def _default_page_kb(procfs_root: Path) -> int:
    """The default hugepage size, only used for a mount whose options omit ``pagesize``."""
    try:
        for line in (Path(procfs_root) / "meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return PAGE_SIZES_KB["2M"]


def _existing_or_prepare(procfs_root: Path, page_size: str, target: str) -> str | None:
    """Blocking half of :func:`ensure_hugetlbfs`: a usable existing mount, or None once
    ``target`` is ready to be mounted on (created if missing)."""
    existing = hugetlbfs_mounts(procfs_root, page_size)
    if target in existing:
        return target
    if existing:
        return existing[0]
    for mount in read_mounts(procfs_root):
        if mount.mount_point == target:
            raise AgentError(f"{target} is already a {mount.fstype} mount "
                             f"(pagesize {mount.page_size_kb or '?'}kB), not hugetlbfs with "
                             f"{page_size} pages; unmount it or set hugetlbfs_mount_point")
    try:
        os.makedirs(target, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise AgentError(f"cannot create hugetlbfs mount point {target}: {exc.strerror}") from None
    return None


async def ensure_hugetlbfs(procfs_root: Path, page_size: str, mount_point: Path, *,
                           runner: BlockingRunner, timeout: float = 30.0) -> str:
    """A hugetlbfs mount with ``page_size`` pages: an existing one, else one at ``mount_point``.

    An existing mount at ``mount_point`` itself is preferred; a mount point that holds some
    other file system (or hugetlbfs of another page size) is an error, never mounted over.
    The mount table reads and the ``makedirs`` (the mount point's parent may be on any file
    system) run in ``runner``, the mount in a killable child process, each within ``timeout``.
    """
    size_kb(page_size)
    target = os.path.normpath(str(mount_point))  # noqa: ASYNC240 (string operation, no I/O)
    found = await runner.run(_existing_or_prepare, procfs_root, page_size, target,
                             timeout=timeout, what=f"hugetlbfs lookup for {target}")
    if found is not None:
        return found
    result = await run_process(["mount", "-t", "hugetlbfs", "-o", f"pagesize={page_size}",
                                "nodev", target], timeout=timeout)
    if not result.ok:
        raise AgentError(f"mounting hugetlbfs ({page_size}) on {target} failed: "
                         f"{result.describe()}")
    mounted = await runner.run(hugetlbfs_mounts, procfs_root, page_size, timeout=timeout,
                               what="hugetlbfs mount check")
    if target not in mounted:
        raise AgentError(f"mounted hugetlbfs on {target} but it does not show {page_size} pages")
    log.info("mounted hugetlbfs pagesize=%s on %s", page_size, target)
    return target
