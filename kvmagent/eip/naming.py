"""Deterministic names of everything an EIP creates.

Every name is derived from the EIP's uuid and an agent-wide prefix, so an apply, a retry, a
delete and a restarted agent all find the same objects without asking the kernel which is
which, and a name found on the host tells which prefix (agent) owns it::

    hash   = base32(sha256(eipUuid))[:9]          9 chars of [a-z2-7] (45 bits)
    netns  = f"{prefix}-{hash}"                   /run/netns/<netns>
    links  = f"{prefix}{hash}{role}"              role: ph/pn (public host/ns end),
                                                        vh/vn (VM-bridge host/ns end)

The prefix is 1-4 characters of [a-z0-9] starting with a letter, so a link name is at most
4 + 9 + 2 = 15 characters, the kernel's IFNAMSIZ - 1.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

HASH_LEN = 9
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,3}$")
ROLES = ("ph", "pn", "vh", "vn")
DEFAULT_PREFIX = "eip"


def check_prefix(prefix: str) -> str:
    if not _PREFIX.match(prefix):
        raise ValueError(f"EIP name prefix must be 1-4 characters of [a-z0-9] starting with a "
                         f"letter, got {prefix!r}")
    return prefix


def eip_hash(eip_uuid: str) -> str:
    digest = hashlib.sha256(eip_uuid.lower().encode()).digest()
    return base64.b32encode(digest).decode().lower()[:HASH_LEN]


def mac_for(eip_uuid: str, role: str) -> str:
    """A stable, locally administered unicast MAC per EIP and link role.

    Stable MACs mean a repaired or re-created EIP keeps the MAC that the client's and the VM's
    ARP caches already hold, so traffic resumes at once instead of after an ARP timeout.
    """
    digest = hashlib.sha256(f"{eip_uuid.lower()}/{role}".encode()).digest()
    octets = [0x02 | (digest[0] & 0xFC)] + list(digest[1:6])
    return ":".join(f"{o:02x}" for o in octets)


@dataclass(frozen=True)
class Names:
    prefix: str
    hash: str

    @classmethod
    def of(cls, prefix: str, eip_uuid: str) -> Names:
        return cls(check_prefix(prefix), eip_hash(eip_uuid))

    @property
    def netns(self) -> str:
        return f"{self.prefix}-{self.hash}"

    def link(self, role: str) -> str:
        assert role in ROLES
        return f"{self.prefix}{self.hash}{role}"

    @property
    def pub_host(self) -> str:
        return self.link("ph")

    @property
    def pub_ns(self) -> str:
        return self.link("pn")

    @property
    def vm_host(self) -> str:
        return self.link("vh")

    @property
    def vm_ns(self) -> str:
        return self.link("vn")

    @property
    def links(self) -> tuple[str, ...]:
        return tuple(self.link(r) for r in ROLES)


class Patterns:
    """Recognise names an agent with ``prefix`` created (for orphan clean-up)."""

    def __init__(self, prefix: str):
        check_prefix(prefix)
        self.prefix = prefix
        self._netns = re.compile(rf"^{prefix}-([a-z2-7]{{{HASH_LEN}}})$")
        self._link = re.compile(rf"^{prefix}([a-z2-7]{{{HASH_LEN}}})(?:ph|pn|vh|vn)$")

    def netns_hash(self, name: str) -> str | None:
        m = self._netns.match(name)
        return m.group(1) if m else None

    def link_hash(self, name: str) -> str | None:
        m = self._link.match(name)
        return m.group(1) if m else None
