"""Fixtures of the compatibility suite."""
from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

HUGEPAGES_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


@pytest.fixture
def hugepage_lock():
    """Hugepage counts are machine-global: serialise with the other worktrees' tests."""
    with open("/tmp/kvmagent-hugepages.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        before = int((HUGEPAGES_2M / "nr_hugepages").read_text())
        try:
            yield
        finally:
            (HUGEPAGES_2M / "nr_hugepages").write_text(f"{before}\n")
            fcntl.flock(fh, fcntl.LOCK_UN)
