"""libvirt domain states in the MN's words."""
from __future__ import annotations

import libvirt

RUNNING, PAUSED, STOPPED, CRASHED, NOSTATE = "Running", "Paused", "Stopped", "Crashed", "NoState"

_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: RUNNING,  # shutting down, still running
    libvirt.VIR_DOMAIN_SHUTOFF: STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PAUSED,
}


def state_name(code: int) -> str:
    return _NAMES.get(code, NOSTATE)
