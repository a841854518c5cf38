"""The validated description of one EIP, and the field checks the wire model uses.

Every value that reaches netlink, nftables or a file name passes one of these checks first;
the nftables renderer takes only an :class:`EipSpec`, never raw request text.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..core import validate


def _pattern(wire_type: Any) -> re.Pattern[str]:
    """The regular expression of one of :mod:`kvmagent.validate`'s constrained str types, so
    the wire types and these checks (which also normalise, and re-check stored records) share
    one definition."""
    for item in getattr(wire_type, "__metadata__", ()):
        if getattr(item, "pattern", None):
            return re.compile(item.pattern)
    raise TypeError(f"{wire_type!r} carries no pattern")


_UUID = _pattern(validate.Uuid)     # matched after lower-casing
_MAC = _pattern(validate.Mac)       # matched after lower-casing and '-' -> ':'
# Linux accepts almost any byte in an ifname; a host bridge we attach to must be plain.
_IFNAME = _pattern(validate.IfName)


def check_uuid(value: str) -> str:
    value = value.lower()
    if not _UUID.fullmatch(value):
        raise ValueError("must be a uuid: 32 hex digits, or 8-4-4-4-12 hex digits with dashes")
    return value


def check_ipv4(value: str) -> str:
    return check_ip(value, 4)


def check_ip(value: str, version: int) -> str:
    """A usable unicast address of IP ``version`` (4 or 6), normalised (IPv6 compressed)."""
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    try:
        addr = cls(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv{version} address") from None
    if (addr.is_unspecified or addr.is_multicast or addr.is_loopback
            or addr == ipaddress.IPv4Address("255.255.255.255")
            or (version == 6 and addr.is_link_local)):
        raise ValueError(f"{value} is not a usable unicast IPv{version} address")
    return str(addr)


def check_ip_version(value: Any) -> int:
    if value is None:
        return 4
    if isinstance(value, bool) or value not in (4, 6):
        raise ValueError(f"must be 4 or 6, got {value!r}")
    return int(value)


def check_netmask(value: str) -> str:
    """A dotted netmask (255.255.255.0); a prefix length ("24") is accepted and normalised."""
    text = str(value)
    try:
        if text.isdigit():
            net = ipaddress.IPv4Network(f"0.0.0.0/{text}")
        else:
            ipaddress.IPv4Address(text)
            net = ipaddress.IPv4Network(f"0.0.0.0/{text}")
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 netmask (contiguous, e.g. 255.255.255.0)") from None
    if net.prefixlen < 1 or net.prefixlen > 30:
        raise ValueError(f"netmask {text} leaves no room for a gateway and a host (/1 to /30)")
    return str(net.netmask)


def check_prefix6(value: Any) -> str:
    """An IPv6 prefix length (64, "64") or an IPv6 netmask as ZStack writes it
    (``ffff:ffff:ffff:ffff:0:0:0:0``), normalised to the prefix length as a string."""
    text = str(value)
    if text.isdigit():
        plen = int(text)
    else:
        try:
            bits = int(ipaddress.IPv6Address(text))
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv6 prefix length or netmask") from None
        plen = bin(bits).count("1")
        if bits != ((1 << 128) - 1) ^ ((1 << (128 - plen)) - 1):
            raise ValueError(f"{text!r} is not a contiguous IPv6 netmask") from None
    if plen < 1 or plen > 127:
        raise ValueError(f"prefix length {text} leaves no room for a gateway and a host "
                         "(/1 to /127)")
    return str(plen)


def check_mac(value: str) -> str:
    value = value.lower().replace("-", ":")
    if not _MAC.fullmatch(value):
        raise ValueError(f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    if int(value[:2], 16) & 1:
        raise ValueError(f"{value} is a multicast MAC, not a NIC's")
    if value == "00:00:00:00:00:00":
        raise ValueError("the all-zero MAC is not a NIC's")
    return value


def check_ifname(value: str) -> str:
    if not _IFNAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a bridge name: 1-15 characters of [A-Za-z0-9_.-], "
                         "starting with a letter or digit")
    return value


def check_nic_name(value: str) -> str:
    if not _IFNAME.fullmatch(value):
        raise ValueError(f"{value!r} is not an interface name: 1-15 characters of "
                         "[A-Za-z0-9_.-], starting with a letter or digit")
    return value


def prefixlen(netmask: str, version: int = 4) -> int:
    if version == 6:
        return int(netmask)
    return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen


def network(ip: str, netmask: str, version: int = 4) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(f"{ip}/{prefixlen(netmask, version)}", strict=False)


def check_consistency(spec: EipSpec) -> None:
    """Cross-field checks; the message names the field that is wrong."""
    v = spec.ip_version
    pairs = ((spec.vip, spec.vip_netmask, spec.vip_gateway, "vip", "vipGateway"),
             (spec.nic_ip, spec.nic_netmask, spec.nic_gateway, "nicIp", "nicGateway"))
    for ip, mask, gw, ip_field, gw_field in pairs:
        net = network(ip, mask, v)
        if ipaddress.ip_address(gw) not in net:
            raise ValueError(f"{gw_field} {gw} is not in the subnet {net} of {ip_field}")
        special = {net.network_address} | ({net.broadcast_address} if v == 4 else set())
        for field_name, value in ((ip_field, ip), (gw_field, gw)):
            if ipaddress.ip_address(value) in special:
                what = "network or broadcast" if v == 4 else "subnet-router anycast"
                raise ValueError(f"{field_name} {value} is the {what} address of {net}")
        if ip == gw:
            raise ValueError(f"{gw_field} must differ from {ip_field} ({ip})")
    if spec.public_bridge_name == spec.vm_bridge_name:
        raise ValueError("vmBridgeName must differ from publicBridgeName "
                         f"({spec.vm_bridge_name}): the EIP routes between two bridges")


@dataclass(frozen=True)
class EipSpec:
    """One EIP. ``vip_netmask``/``nic_netmask``: IPv4 a dotted netmask, IPv6 the prefix
    length as a string (ZStack's IPv6 path uses the prefix lengths, its IPv4 path the masks).
    ``addfdb``/``physical_nic``: an fdb entry for the namespace's VM-side MAC on that NIC
    (SR-IOV VF NICs, whose traffic does not pass the Linux bridge)."""

    eip_uuid: str
    vm_uuid: str
    vip: str
    vip_netmask: str
    vip_gateway: str
    public_bridge_name: str
    nic_uuid: str
    nic_mac: str
    nic_ip: str
    nic_netmask: str
    nic_gateway: str
    vm_bridge_name: str
    skip_arp_check: bool = False
    ip_version: int = 4
    addfdb: bool = False
    physical_nic: str | None = None

    @property
    def vip_prefixlen(self) -> int:
        return prefixlen(self.vip_netmask, self.ip_version)

    @property
    def nic_prefixlen(self) -> int:
        return prefixlen(self.nic_netmask, self.ip_version)

    @property
    def fdb_nic(self) -> str | None:
        """The NIC that gets the fdb entry, or None (ZStack: only with addfdb and a NIC)."""
        return self.physical_nic if self.addfdb and self.physical_nic else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EipSpec:
        """Re-validate a stored spec (a state file is input too)."""
        v = check_ip_version(data.get("ip_version", 4))
        mask = check_netmask if v == 4 else check_prefix6
        nic = data.get("physical_nic")
        spec = cls(
            eip_uuid=check_uuid(data["eip_uuid"]), vm_uuid=check_uuid(data["vm_uuid"]),
            vip=check_ip(data["vip"], v), vip_netmask=mask(data["vip_netmask"]),
            vip_gateway=check_ip(data["vip_gateway"], v),
            public_bridge_name=check_ifname(data["public_bridge_name"]),
            nic_uuid=check_uuid(data["nic_uuid"]), nic_mac=check_mac(data["nic_mac"]),
            nic_ip=check_ip(data["nic_ip"], v), nic_netmask=mask(data["nic_netmask"]),
            nic_gateway=check_ip(data["nic_gateway"], v),
            vm_bridge_name=check_ifname(data["vm_bridge_name"]),
            skip_arp_check=bool(data.get("skip_arp_check", False)),
            ip_version=v, addfdb=bool(data.get("addfdb", False)),
            physical_nic=check_nic_name(nic) if nic else None,
        )
        check_consistency(spec)
        return spec
