"""KVM module parameters the MN's ConnectCmd asks for (``ignoreMsrs``,
``pageTableExtensionDisabled``), through ``<sysfs_root>/module/*/parameters``.

Blocking (sysfs I/O): callers run these in an executor.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..core.errors import AgentError

log = logging.getLogger(__name__)


def _param(sysfs_root: Path, module: str, name: str) -> Path:
    return sysfs_root / "module" / module / "parameters" / name


def check_ept(sysfs_root: Path, disabled: bool) -> None:
    """The MN asks EPT off when the host has no ``eptFlag`` or is tagged so. Reloading
    kvm_intel (what ZU does) needs every VM stopped; this agent never reloads kernel modules,
    it refuses a mismatch so the operator can act (README)."""
    path = _param(sysfs_root, "kvm_intel", "ept")
    try:
        current = path.read_text().strip().upper() in ("Y", "1")
    except OSError:
        return  # no kvm_intel (AMD, TCG): nothing to do, as in ZU
    if current == (not disabled):
        return
    want = "disabled" if disabled else "enabled"
    raise AgentError(
        f"pageTableExtensionDisabled: the MN wants EPT {want} but kvm_intel has ept="
        f"{'Y' if current else 'N'}; this agent does not reload kernel modules: set "
        f"'options kvm_intel ept={0 if disabled else 1}' in /etc/modprobe.d and reload kvm_intel "
        "with no VM running (or change the host's pageTableExtensionDisabled tag)")


def set_ignore_msrs(sysfs_root: Path, on: bool) -> None:
    path = _param(sysfs_root, "kvm", "ignore_msrs")
    try:
        current = path.read_text().strip().upper() in ("Y", "1")
    except OSError:
        log.info("ignoreMsrs: %s not present (kvm not loaded); nothing to set", path)
        return
    if current != on:
        try:
            path.write_text("Y\n" if on else "N\n")
        except OSError as exc:
            raise AgentError(f"ignoreMsrs: cannot set {path} to {'Y' if on else 'N'}: "
                             f"{exc.strerror}") from None
        log.info("ignoreMsrs: %s set to %s", path, "Y" if on else "N")
