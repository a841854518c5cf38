"""libvirt domain states in the MN's words: ZStack's ``KvmVmState`` enum.

The MN parses every state it gets from this agent (vmsync, checkstate, /kvm/reportvmstate)
with ``KvmVmState.valueOf`` (ZS plugin/kvm/.../KVMConstant.java), so only these six names
may ever go on the wire; anything else (e.g. "Stopped") makes the MN throw.
"""
from __future__ import annotations

import libvirt

NOSTATE, RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED = (
    "NoState", "Running", "Paused", "Shutdown", "Crashed", "Suspended")
KVM_VM_STATES = (NOSTATE, RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED)

# The reference agent's mapping (ZU vm_plugin.py), except VIR_DOMAIN_SHUTDOWN: a domain that
# is shutting down still runs (and an in-guest reboot passes through it), so it is Running,
# which is also what the reference agent's vmsync reports for it.
_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: RUNNING,
    libvirt.VIR_DOMAIN_SHUTOFF: SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: SUSPENDED,
}


def state_name(code: int) -> str:
    return _NAMES.get(code, NOSTATE)


def is_shutting_down(code: int) -> bool:
    """libvirt says the guest is shutting down (the MN's ``vmInShutdowns``)."""
    return code == libvirt.VIR_DOMAIN_SHUTDOWN
