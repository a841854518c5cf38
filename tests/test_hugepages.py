"""Hugepages: ensure/release logic on a fake sysfs tree, then on this machine's real sysfs.

Real tests change the machine's pools and always put them back (``real_pools`` fixture).
"""
from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kvmagent.core.blocking import BlockingRunner, run_process
from kvmagent.core.errors import AgentError
from kvmagent.host.hugepages import (
    HugepageError,
    HugepageInputError,
    HugePages,
    PoolState,
    ensure_hugetlbfs,
    hugetlbfs_mounts,
    parse_size_kb,
    read_mounts,
)

SYSFS = Path("/sys")
KB = {"2M": 2048, "1G": 1048576}


# --------------------------------------------------------------------------------------------
# A fake sysfs tree, and a HugePages whose writes behave like the kernel's.
# --------------------------------------------------------------------------------------------
def make_tree(root: Path, pools: dict[str, tuple[int, int]], *, resv: int = 0,
              nodes: int = 1) -> tuple[Path, Path]:
    """sysfs + procfs under ``root``; ``pools``: size -> (nr, free) of the host pool."""
    sysfs, procfs = root / "sys", root / "proc"
    for size, (nr, free) in pools.items():
        pool = sysfs / f"kernel/mm/hugepages/hugepages-{KB[size]}kB"
        pool.mkdir(parents=True)
        for name, value in (("nr_hugepages", nr), ("free_hugepages", free),
                            ("resv_hugepages", resv), ("surplus_hugepages", 0)):
            (pool / name).write_text(f"{value}\n")
        for n in range(nodes):
            npool = sysfs / f"devices/system/node/node{n}/hugepages/hugepages-{KB[size]}kB"
            npool.mkdir(parents=True)
            for name, value in (("nr_hugepages", nr), ("free_hugepages", free),
                                ("surplus_hugepages", 0)):
                (npool / name).write_text(f"{value}\n")
    (procfs / "sys/vm").mkdir(parents=True)
    (procfs / "sys/vm/compact_memory").write_text("")
    return sysfs, procfs


class FakeKernel(HugePages):
    """Writes to nr_hugepages act like the kernel: growth limited to ``capacity`` pages (more
    after compaction), pages in use never freed, free_hugepages kept consistent."""

    def __init__(self, sysfs: Path, procfs: Path, *, capacity: int = 10**6,
                 after_compaction: int | None = None, refuse: OSError | None = None,
                 memory: int = 64 << 30):
        super().__init__(sysfs, procfs, available_memory=lambda: memory)
        self.capacity = capacity
        self.after_compaction = after_compaction
        self.refuse = refuse
        self.writes: list[tuple[str, int]] = []
        self.compactions = 0

    def _write_int(self, path: Path, value: int) -> None:
        if path.name == "compact_memory":
            self.compactions += 1
            if self.after_compaction is not None:
                self.capacity = self.after_compaction
            return
        self.writes.append((str(path.parent.name), value))
        if self.refuse is not None and value > self._read_int(path):
            raise self.refuse
        pool = path.parent
        nr, free = self._read_int(pool / "nr_hugepages"), self._read_int(pool / "free_hugepages")
        in_use = nr - free
        new = max(min(value, self.capacity), in_use)
        super()._write_int(pool / "nr_hugepages", new)
        super()._write_int(pool / "free_hugepages", new - in_use)
        if pool.parent.name == "hugepages" and pool.parent.parent.name.startswith("node"):
            # A node pool's pages are the host pool's too.
            host = self.sysfs_root / "kernel/mm/hugepages" / pool.name
            for name in ("nr_hugepages", "free_hugepages"):
                super()._write_int(host / name, self._read_int(host / name) + new - nr)


def pool_of(sysfs: Path, size: str = "2M") -> PoolState:
    return HugePages(sysfs)._read_pool(sysfs / f"kernel/mm/hugepages/hugepages-{KB[size]}kB")


def test_ensure_grows_by_shortfall_only(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"2M": (10, 4)})
    hp = FakeKernel(sysfs, procfs)
    state = hp.ensure("2M", 6)
    assert (state.total, state.free) == (12, 6)
    assert hp.writes == [("hugepages-2048kB", 12)]
    # Already enough: nothing written.
    assert hp.ensure("2M", 5) == state
    assert hp.ensure("2M", 0) == state
    assert len(hp.writes) == 1


def test_ensure_counts_reserved_pages_as_taken(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"2M": (10, 4)}, resv=3)
    hp = FakeKernel(sysfs, procfs)
    state = hp.ensure("2M", 4)  # available 1: three more
    assert (state.total, state.free, state.available) == (13, 7, 4)


def test_ensure_compacts_then_retries(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"2M": (0, 0)})
    hp = FakeKernel(sysfs, procfs, capacity=5, after_compaction=100)
    state = hp.ensure("2M", 8)
    assert (state.total, state.free) == (8, 8)
    assert hp.compactions == 1
    assert hp.writes == [("hugepages-2048kB", 8), ("hugepages-2048kB", 8)]


def test_ensure_rolls_back_when_kernel_gives_too_few(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"2M": (10, 2)})
    hp = FakeKernel(sysfs, procfs, capacity=13)
    with pytest.raises(HugepageError) as err:
        hp.ensure("2M", 20)  # needs 28, the kernel stops at 13
    msg = str(err.value)
    assert "could not get 18 more 2M hugepages (got 3" in msg
    assert "rolled back to 10 pages" in msg
    assert hp.compactions == 1
    assert hp.writes[-1] == ("hugepages-2048kB", 10)
    assert (pool_of(sysfs).total, pool_of(sysfs).free) == (10, 2)


def test_ensure_rolls_back_when_kernel_refuses(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"1G": (1, 1)})
    hp = FakeKernel(sysfs, procfs, refuse=OSError(12, "Cannot allocate memory"))
    with pytest.raises(HugepageError, match="the kernel refused: Cannot allocate memory"):
        hp.ensure("1G", 4)
    assert (pool_of(sysfs, "1G").total, pool_of(sysfs, "1G").free) == (1, 1)


def test_ensure_refuses_more_than_available_memory_without_writing(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"1G": (0, 0)})
    hp = FakeKernel(sysfs, procfs, memory=8 << 30)
    with pytest.raises(HugepageError, match=r"cannot add 100 1G hugepages \(100.0 GiB\): only "
                                            r"8.0 GiB of memory is available"):
        hp.ensure("1G", 100)
    assert hp.writes == []


def test_release_never_takes_pages_in_use(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"2M": (10, 3)})
    hp = FakeKernel(sysfs, procfs)
    state = hp.release("2M", 5)
    assert (state.total, state.free) == (7, 0)  # the 7 in use stay
    assert hp.writes == [("hugepages-2048kB", 7)]  # asked only for the free ones
    assert hp.release("2M", 5) == state  # nothing free: nothing written
    assert len(hp.writes) == 1


def test_release_at_most_count_and_not_reserved(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"2M": (10, 8)}, resv=2)
    hp = FakeKernel(sysfs, procfs)
    assert hp.release("2M", 3).total == 7
    state = hp.release("2M", 100)  # free 5, 2 of them reserved
    assert (state.total, state.free) == (4, 2)


def test_numa_node_and_page_size_lookups(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"2M": (4, 4)}, nodes=2)
    hp = FakeKernel(sysfs, procfs)
    assert hp.numa_nodes() == [0, 1]
    assert hp.ensure("2M", 6, numa_node=1).total == 6
    assert len(hp.writes) == 1  # the node's file; the fake kernel grows the host pool with it
    assert pool_of(sysfs).total == 6
    with pytest.raises(HugepageInputError, match=r"field 'numaNode': NUMA node 5 does not exist "
                                                 r"on this host \(nodes: 0, 1\)"):
        hp.ensure("2M", 1, numa_node=5)
    with pytest.raises(HugepageInputError, match=r"field 'pageSize': 1G pages are not supported"):
        hp.ensure("1G", 1)
    with pytest.raises(HugepageInputError, match="field 'pageSize': must be one of 2M, 1G"):
        hp.ensure("4M", 1)
    with pytest.raises(HugepageInputError, match="field 'count'"):
        hp.release("2M", -1)


def set_pool(sysfs: Path, size: str, node: int | None, **values: int) -> None:
    base = (sysfs / "kernel/mm/hugepages" if node is None else
            sysfs / f"devices/system/node/node{node}/hugepages")
    for name, value in values.items():
        (base / f"hugepages-{KB[size]}kB" / f"{name}_hugepages").write_text(f"{value}\n")


def test_node_pool_counts_host_reserved_pages_as_taken(tmp_path):
    """The kernel has no per-node resv_hugepages: a node pool may hold every reserved page of
    the host, so its available pages are min(node free, host free - host reserved)."""
    sysfs, procfs = make_tree(tmp_path, {"2M": (10, 8)}, resv=6, nodes=2)
    set_pool(sysfs, "2M", 0, nr=10, free=8)      # all the host's pages are on node 0
    set_pool(sysfs, "2M", 1, nr=0, free=0)
    hp = FakeKernel(sysfs, procfs)
    node0 = hp.read("2M", 0)
    assert (node0.total, node0.free, node0.available) == (10, 8, 2)
    assert node0.reserved == 6
    # ensure: 2 available, 4 wanted -> grows by 2 (not "already enough": 8 free).
    state = hp.ensure("2M", 4, numa_node=0)
    assert hp.writes == [("hugepages-2048kB", 12)]
    assert (state.total, state.free, state.available) == (12, 10, 4)
    assert hp.ensure("2M", 4, numa_node=0) == state and len(hp.writes) == 1
    # release: never more than the available ones, whatever is asked.
    state = hp.release("2M", 100, numa_node=0)
    assert hp.writes[-1] == ("hugepages-2048kB", 8)
    assert (state.total, state.free, state.available) == (8, 6, 0)
    assert pool_of(sysfs).free - pool_of(sysfs).reserved == 0   # host: reserved pages kept
    assert hp.release("2M", 100, numa_node=0) == state and len(hp.writes) == 2
    # The other node's pool, fully free and unreserved by the bound: both pools count.
    set_pool(sysfs, "2M", 1, nr=4, free=4)
    set_pool(sysfs, "2M", None, nr=12, free=10)
    assert hp.read("2M", 1).available == 4


def test_concurrent_ensures_allocate_once(tmp_path):
    sysfs, procfs = make_tree(tmp_path, {"2M": (0, 0)})
    hp = FakeKernel(sysfs, procfs)
    barrier = threading.Barrier(8)

    def one():
        barrier.wait()
        hp.ensure("2M", 64)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool_of(sysfs).total == 64
    assert hp.writes == [("hugepages-2048kB", 64)]


def test_mountinfo_parsing(tmp_path):
    (tmp_path / "self").mkdir()
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\nHugepagesize:       2048 kB\n")
    (tmp_path / "self/mountinfo").write_text(
        "22 1 0:21 / / rw,relatime - ext4 /dev/vda1 rw\n"
        "30 22 0:30 / /dev/hugepages rw,relatime shared:12 - hugetlbfs hugetlbfs rw,pagesize=2M\n"
        "31 22 0:31 / /mnt/huge\\0401g rw,relatime - hugetlbfs nodev rw,pagesize=1024M\n"
        "32 22 0:32 / /mnt/nosize rw - hugetlbfs nodev rw\n")
    mounts = read_mounts(tmp_path)
    assert [m.mount_point for m in mounts] == ["/", "/dev/hugepages", "/mnt/huge 1g", "/mnt/nosize"]
    assert mounts[2].page_size_kb == 1048576
    assert hugetlbfs_mounts(tmp_path, "2M") == ["/dev/hugepages", "/mnt/nosize"]
    assert hugetlbfs_mounts(tmp_path, "1G") == ["/mnt/huge 1g"]
    assert parse_size_kb("2M") == 2048 and parse_size_kb("1G") == parse_size_kb("1024M")


class RecordingRunner(BlockingRunner):
    """A runner that notes what ran in it (and on which thread)."""

    def __init__(self):
        super().__init__({"default": 2})
        self.calls: list[tuple[str, str]] = []

    async def run(self, fn, *args, timeout, pool="default", what=None, **kwargs):
        def traced(*a, **kw):
            self.calls.append((what or fn.__name__, threading.current_thread().name))
            return fn(*a, **kw)
        return await super().run(traced, *args, timeout=timeout, pool=pool, what=what, **kwargs)


async def test_ensure_hugetlbfs_reads_mounts_off_the_loop(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("Hugepagesize:       2048 kB\n")
    target = tmp_path / "hp"
    (proc / "self/mountinfo").write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda1 rw\n"
        "30 22 0:30 / /dev/hugepages rw - hugetlbfs hugetlbfs rw,pagesize=2M\n"
        f"31 22 0:31 / {target} rw - hugetlbfs nodev rw,pagesize=1024M\n")
    runner = RecordingRunner()
    try:
        assert await ensure_hugetlbfs(proc, "2M", target, runner=runner) == "/dev/hugepages"
        assert runner.calls and all(t.startswith("kvmagent-") for _, t in runner.calls)
        # No 2M mount, and the mount point holds a 1G one: refused, nothing mounted.
        (proc / "self/mountinfo").write_text(
            "22 1 0:21 / / rw - ext4 /dev/vda1 rw\n"
            f"31 22 0:31 / {target} rw - hugetlbfs nodev rw,pagesize=1024M\n")
        with pytest.raises(AgentError, match="not hugetlbfs with 2M pages"):
            await ensure_hugetlbfs(proc, "2M", target, runner=runner)
        assert len(runner.calls) == 2
    finally:
        runner.shutdown()


# --------------------------------------------------------------------------------------------
# The real machine.
# --------------------------------------------------------------------------------------------
def real_pool(size: str, node: int | None = None) -> PoolState:
    return HugePages(SYSFS).read(size, node)


def set_real_total(size: str, value: int) -> None:
    Path(f"/sys/kernel/mm/hugepages/hugepages-{KB[size]}kB/nr_hugepages").write_text(f"{value}\n")


def real_totals() -> dict[str, int]:
    return {size: real_pool(size).total for size in KB}


@contextlib.contextmanager
def pools_restored() -> Iterator[dict[str, int]]:
    """Record this machine's pools and hugetlbfs mounts; put both back whatever happens."""
    before = real_totals()
    mounts_before = {m.mount_point for m in read_mounts(Path("/proc")) if m.fstype == "hugetlbfs"}
    try:
        yield before
    finally:
        for m in read_mounts(Path("/proc")):
            if m.fstype == "hugetlbfs" and m.mount_point not in mounts_before:
                subprocess.run(["umount", m.mount_point], check=False, timeout=30)
        for size, value in before.items():
            set_real_total(size, value)
    assert real_totals() == before, "hugepage pools not restored"


@pytest.fixture
def real_pools():
    with pools_restored() as before:
        yield before




@pytest.mark.hugepages
async def test_real_ensure_and_release_2m(agent, real_pools):
    start = real_pool("2M")
    want = start.available + 16
    reply = await agent.call("/host/hugepages/ensure", {"pageSize": "2M", "count": want})
    assert reply["success"], reply
    now = real_pool("2M")
    assert (reply["total"], reply["free"]) == (now.total, now.free)
    assert now.total == start.total + 16 and now.available >= want
    # Again: idempotent, nothing more allocated.
    reply = await agent.call("/host/hugepages/ensure", {"pageSize": "2M", "count": want})
    assert reply["success"] and real_pool("2M").total == start.total + 16
    reply = await agent.call("/host/hugepages/release", {"pageSize": "2M", "count": 16})
    assert reply["success"], reply
    assert reply["total"] == start.total == real_pool("2M").total


@pytest.mark.hugepages
async def test_real_ensure_numa_node_and_1g(agent, real_pools):
    node = HugePages(SYSFS).numa_nodes()[0]
    start = real_pool("2M", node)
    reply = await agent.call("/host/hugepages/ensure",
                             {"pageSize": "2M", "count": start.free + 8, "numaNode": node})
    assert reply["success"], reply
    assert real_pool("2M", node).total == start.total + 8 == reply["total"]
    reply = await agent.call("/host/hugepages/ensure", {"pageSize": "1G", "count": 1})
    if reply["success"]:
        assert real_pool("1G").free >= 1 and reply["free"] >= 1
    else:  # a machine whose memory has no free 1G block: a clear error, nothing kept
        assert "could not get" in reply["error"] and "rolled back" in reply["error"]
        assert real_pool("1G").total == real_pools["1G"]


@pytest.mark.hugepages
async def test_real_more_than_the_machine_has_fails_unchanged(agent, real_pools):
    reply = await agent.call("/host/hugepages/ensure", {"pageSize": "1G", "count": 100})
    assert reply["success"] is False
    assert "cannot add" in reply["error"] and "1G hugepages" in reply["error"]
    assert real_totals() == real_pools


@pytest.mark.hugepages
async def test_real_kernel_shortfall_is_rolled_back(agent, real_pools):
    """Ask for 1G pages within available memory: a kernel that cannot find that many
    contiguous gigabytes (the usual case) gives fewer; the agent must give them back."""
    avail_gib = psutil.virtual_memory().available >> 30
    count = min(avail_gib - 4, 16)
    if count < 2:
        pytest.skip("too little free memory to try")
    reply = await agent.call("/host/hugepages/ensure", {"pageSize": "1G", "count": count})
    if reply["success"]:  # an unfragmented machine: fine too, give them back
        assert real_pool("1G").available >= count
        await agent.call("/host/hugepages/release", {"pageSize": "1G", "count": count})
    else:
        assert "could not get" in reply["error"], reply
        assert f"rolled back to {real_pools['1G']} pages" in reply["error"], reply
    assert real_pool("1G").total == real_pools["1G"]


@pytest.mark.hugepages
async def test_real_release_never_takes_pages_in_use(agent, real_pools, tmp_path):
    start = real_pool("2M")
    reply = await agent.call("/host/hugepages/ensure", {"pageSize": "2M",
                                                        "count": start.available + 8})
    assert reply["success"], reply
    mnt = tmp_path / "huge"
    mnt.mkdir()
    await run_process(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev", str(mnt)],
                      timeout=30, check=True)
    try:
        fd = os.open(mnt / "pinned", os.O_CREAT | os.O_RDWR, 0o600)
        size = 4 * 2 * 1024 * 1024
        os.ftruncate(fd, size)
        area = mmap.mmap(fd, size)
        for off in range(0, size, 2 * 1024 * 1024):
            area[off] = 1  # fault the page in: now it is in use
        in_use = real_pool("2M").in_use
        assert in_use >= 4
        reply = await agent.call("/host/hugepages/release", {"pageSize": "2M", "count": 100000})
        assert reply["success"], reply
        after = real_pool("2M")
        assert after.total >= in_use and after.in_use == in_use and after.available == 0
        assert area[0] == 1  # the mapping still works
        area.close()
        os.close(fd)
    finally:
        await run_process(["umount", str(mnt)], timeout=30)


@pytest.mark.hugepages
async def test_real_concurrent_ensures_allocate_once(agent, real_pools):
    start = real_pool("2M")
    body = {"pageSize": "2M", "count": start.available + 32}
    replies = await asyncio.gather(*(agent.call("/host/hugepages/ensure", body)
                                     for _ in range(6)))
    assert all(r["success"] for r in replies), replies
    assert real_pool("2M").total == start.total + 32


@pytest.mark.hugepages
async def test_real_ensure_through_callback(agent, mn, real_pools):
    start = real_pool("2M")
    body = await agent.call_async(mn, "/host/hugepages/ensure",
                                  {"pageSize": "2M", "count": start.available + 4})
    assert body["success"], body
    assert body["total"] == start.total + 4 == real_pool("2M").total
    body = await agent.call_async(mn, "/host/hugepages/release",
                                  {"pageSize": "2M", "count": 4, "unknownField": 1})
    assert body["success"] and body["total"] == start.total


@pytest.mark.hugepages
@pytest.mark.parametrize("path", ["/host/hugepages/ensure", "/host/hugepages/release"])
@pytest.mark.parametrize("body, field", [
    ({"pageSize": "4M", "count": 1}, "pageSize"),
    ({"count": 1}, "pageSize"),
    ({"pageSize": "2M"}, "count"),
    ({"pageSize": "2M", "count": -1}, "count"),
    ({"pageSize": "2M", "count": 10**9}, "count"),
    ({"pageSize": "2M", "count": "many"}, "count"),
    ({"pageSize": "2M", "count": 1, "numaNode": -1}, "numaNode"),
    ({"pageSize": "2M", "count": 1, "numaNode": 999}, "numaNode"),
])
async def test_bad_input_is_400_and_changes_nothing(agent, real_pools, path, body, field):
    status, reply = await agent.post(path, body)
    assert status == 400, reply
    assert reply["success"] is False and f"'{field}'" in reply["error"], reply
    assert real_totals() == real_pools


@pytest.mark.hugepages
async def test_missing_numa_node_fails_callback_naming_field(agent, mn, real_pools):
    body = await agent.call_async(mn, "/host/hugepages/ensure",
                                  {"pageSize": "2M", "count": 1, "numaNode": 63})
    assert body["success"] is False and "numaNode" in body["error"]
    assert "does not exist" in body["error"]
    assert real_totals() == real_pools


@pytest.mark.hugepages
async def test_real_hugetlbfs_mount_created_then_reused(real_pools, tmp_path):
    proc = Path("/proc")
    existing = hugetlbfs_mounts(proc, "2M")
    target = tmp_path / "hp2m"
    runner = BlockingRunner({"default": 2})
    got = await ensure_hugetlbfs(proc, "2M", target, runner=runner)
    if existing:
        assert got in existing  # an existing 2M mount is reused, no second one
    else:
        assert got == str(target) and got in hugetlbfs_mounts(proc, "2M")
    assert await ensure_hugetlbfs(proc, "2M", target, runner=runner) == got  # idempotent
    # A mount point holding a 1G hugetlbfs is never mounted over.
    if not existing:
        await run_process(["umount", got], timeout=30, check=True)
        if "1G" in HugePages(SYSFS).supported_sizes():
            await run_process(["mount", "-t", "hugetlbfs", "-o", "pagesize=1G", "nodev",
                               str(target)], timeout=30, check=True)
            with pytest.raises(Exception, match="not hugetlbfs with 2M pages"):
                await ensure_hugetlbfs(proc, "2M", target, runner=runner)
    runner.shutdown()
