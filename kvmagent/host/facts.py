"""Host facts from psutil, procfs/sysfs files and libvirt (no command output is parsed)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil


def cpuinfo(procfs_root: Path) -> tuple[str, str]:
    """(model name, hvm flag "vmx"/"svm"/"") from the first processor of /proc/cpuinfo."""
    model, flags = "", set()
    try:
        text = (procfs_root / "cpuinfo").read_text()
    except OSError:
        return model, ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model and flags:
            break
    hvm = "vmx" if "vmx" in flags else "svm" if "svm" in flags else ""
    return model, hvm


def cpu_speed_mhz() -> int:
    freq = psutil.cpu_freq()
    return int(freq.max or freq.current) if freq else 0


def cpu_sockets(sysfs_root: Path) -> int:
    ids = set()
    for cpu in (sysfs_root / "devices/system/cpu").glob("cpu[0-9]*"):
        try:
            ids.add((cpu / "topology/physical_package_id").read_text().strip())
        except OSError:
            continue
    return max(len(ids), 1)


def os_release() -> tuple[str, str]:
    try:
        info = platform.freedesktop_os_release()
    except OSError:
        return platform.system(), ""
    return info.get("ID", ""), info.get("VERSION_ID", "")


def memory() -> tuple[int, int]:
    """(total, used) bytes; used excludes reclaimable cache, as the MN's capacity math expects."""
    vm = psutil.virtual_memory()
    return vm.total, vm.total - vm.available


def kernel_version() -> str:
    return os.uname().release
