"""Blocking netlink work of an EIP, through pyroute2 (run these in ``ctx.runner``).

Layout (root = the hypervisor's namespace, where the bridges live)::

    root ns                                      EIP ns  /run/netns/<prefix>-<hash>
    <publicBridgeName> --- <..>ph  ==veth==  <..>pn   vip/vipNetmask, default via vipGateway
    <vmBridgeName>     --- <..>vh  ==veth==  <..>vn   nicGateway/nicNetmask,
                                                      neighbour nicIp -> nicMac (permanent)

Every function converges: it looks at what exists, keeps what is right, replaces what is
wrong (a veth whose peer is gone, an address that should not be there) and creates what is
missing, so it can run any number of times. Each opens its own ``IPRoute`` objects and
closes them (an ``IPRoute(netns=...)`` forks a helper only to create its socket).

MACs are deterministic (:func:`naming.mac_for`): the namespace ends keep the MAC the client
and the VM have cached across a repair; the host ends start with ``fe:`` so a Linux bridge,
which takes the lowest port MAC as its own, never changes its MAC because of an EIP. Both
veths take the MTU of the bridge they join.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from ..core.errors import AgentError
from .naming import Names, Patterns, mac_for
from .spec import EipSpec

NETNS_DIR = "/run/netns"
IFF_UP = 0x1
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
IFA_F_NODAD = 0x02
_DEFAULT = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
ETH_P_ARP = 0x0806


class Aborted(AgentError):
    """The caller gave up (timeout); the work stopped between two steps."""


def _check(abort: threading.Event | None) -> None:
    if abort is not None and abort.is_set():
        raise Aborted("EIP operation aborted after its timeout")


def host_mac(eip_uuid: str, role: str) -> str:
    return "fe" + mac_for(eip_uuid, role)[2:]


def netns_path(name: str) -> str:
    return f"{NETNS_DIR}/{name}"


def netns_exists(name: str) -> bool:
    """True when /run/netns/<name> is a live namespace (not a stale, unmounted file)."""
    path = netns_path(name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        # A bound namespace is an nsfs inode; a leftover empty file is on the tmpfs.
        return os.fstat(fd).st_dev != os.stat(NETNS_DIR).st_dev
    finally:
        os.close(fd)


def _get_link(ipr: IPRoute, name: str) -> Any | None:
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _del_link(ipr: IPRoute, name: str) -> bool:
    link = _get_link(ipr, name)
    if link is None:
        return False
    try:
        ipr.link("del", index=link["index"])
    except NetlinkError as exc:
        if exc.code not in (errno.ENODEV, errno.ENOENT):
            raise
    return True


def bridge_index(ipr: IPRoute, name: str, field_name: str) -> int:
    return bridge_link(ipr, name, field_name)["index"]


def bridge_link(ipr: IPRoute, name: str, field_name: str) -> Any:
    link = _get_link(ipr, name)
    if link is None:
        raise AgentError(f"{field_name} {name!r}: no such bridge on this host")
    if _kind(link) != "bridge":
        raise AgentError(f"{field_name} {name!r} is a {_kind(link) or 'plain'} link, "
                         "not a Linux bridge")
    return link


def check_bridges(spec: EipSpec) -> None:
    with IPRoute() as ipr:
        bridge_index(ipr, spec.public_bridge_name, "publicBridgeName")
        bridge_index(ipr, spec.vm_bridge_name, "vmBridgeName")


def prepare(spec: EipSpec, names: Names, report: ApplyReport, *,
            abort: threading.Event | None = None) -> None:
    """Check both bridges exist (nothing is created otherwise), then ensure the namespace."""
    _check(abort)
    check_bridges(spec)
    _check(abort)
    report.created_netns = ensure_netns(names)


def ensure_netns(names: Names) -> bool:
    """Create the namespace if absent; True when this call created it."""
    if netns_exists(names.netns):
        return False
    if os.path.lexists(netns_path(names.netns)):  # a stale mount point file from a crash
        _remove_netns(names.netns)
    try:
        netns.create(names.netns)
    except OSError as exc:
        _remove_netns(names.netns)
        raise AgentError(f"cannot create network namespace {names.netns}: {exc}") from None
    return True


def _remove_netns(name: str) -> bool:
    path = netns_path(name)
    if not os.path.lexists(path):
        return False
    try:
        netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise AgentError(f"cannot remove network namespace {name}: {exc}") from None
    return True


def _nsid(ipr: IPRoute, name: str) -> int | None:
    fd = os.open(netns_path(name), os.O_RDONLY)
    try:
        answer = ipr.get_netnsid(fd=fd)
    finally:
        os.close(fd)
    nsid = answer.get("nsid") if answer else None
    return None if nsid is None or nsid < 0 else nsid


@dataclass
class ApplyReport:
    created_netns: bool = False
    created_pairs: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    arp_checked: bool = False


def _pair_ok(host: Any | None, peer: Any | None, nsid: int | None) -> bool:
    if host is None or peer is None or _kind(host) != "veth" or _kind(peer) != "veth":
        return False
    if host.get("link") != peer["index"] or peer.get("link") != host["index"]:
        return False
    return nsid is not None and host.get("link_netnsid") == nsid


def converge_links(spec: EipSpec, names: Names, report: ApplyReport, *, arp_timeout: float,
                   abort: threading.Event | None = None) -> ApplyReport:
    """Veths, bridge ports, addresses, neighbour and route of an existing EIP namespace.

    ``report`` is filled in as objects are created, so a caller whose call failed half-way
    still knows what to roll back. An EIP that is already right costs about ten netlink
    requests (pyroute2's per-request cost is Python CPU, so they are counted).
    """
    with IPRoute() as ipr, IPRoute(netns=names.netns, flags=0) as ns:
        bridges = {"p": bridge_link(ipr, spec.public_bridge_name, "publicBridgeName"),
                   "v": bridge_link(ipr, spec.vm_bridge_name, "vmBridgeName")}
        nsid = _nsid(ipr, names.netns)
        ns_links = {link.get("ifname"): link for link in ns.link("dump")}
        for side in ("p", "v"):
            _check(abort)
            host_name, ns_name = names.link(side + "h"), names.link(side + "n")
            host = _get_link(ipr, host_name)
            peer = ns_links.get(ns_name)
            bridge = bridges[side]
            mtu = bridge.get("mtu")    # the veths follow their bridge (jumbo frames too)
            if not _pair_ok(host, peer, nsid):
                # Half-built or foreign: remove every piece and build the pair again.
                if host is not None and _del_link(ipr, host_name):
                    report.removed.append(host_name)
                if _del_link(ipr, ns_name):                    # a peer left in the root ns
                    report.removed.append(ns_name)
                for name in (ns_name, host_name):              # gone with its peer, or stray
                    if name in ns_links and _del_link(ns, name):
                        report.removed.append(name)
                ipr.link("add", ifname=host_name, kind="veth", mtu=mtu,
                         address=host_mac(spec.eip_uuid, side + "h"),
                         peer={"ifname": ns_name, "address": mac_for(spec.eip_uuid, side + "n"),
                               "mtu": mtu, "net_ns_fd": names.netns})
                report.created_pairs.append(host_name)
                host, peer = _get_link(ipr, host_name), _get_link(ns, ns_name)
                if host is None or peer is None:
                    raise AgentError(f"veth {host_name}/{ns_name} vanished right after it was "
                                     "created; is something else managing these links?")
                nsid = _nsid(ipr, names.netns)
            if (host.get("master") != bridge["index"] or not host["flags"] & IFF_UP
                    or host.get("mtu") != mtu):
                ipr.link("set", index=host["index"], master=bridge["index"], mtu=mtu,
                         state="up")
            want_mac = mac_for(spec.eip_uuid, side + "n")
            if (peer.get("address") != want_mac or not peer["flags"] & IFF_UP
                    or peer.get("mtu") != mtu):
                ns.link("set", index=peer["index"], state="up", address=want_mac, mtu=mtu)
            ns_links[ns_name] = peer
        lo = ns_links.get("lo")
        if lo is not None and not lo["flags"] & IFF_UP:
            ns.link("set", index=lo["index"], state="up")

        pn = ns_links[names.pub_ns]["index"]
        vn = ns_links[names.vm_ns]["index"]
        family = socket.AF_INET if spec.ip_version == 4 else socket.AF_INET6
        want = {pn: (spec.vip, spec.vip_prefixlen), vn: (spec.nic_gateway, spec.nic_prefixlen)}
        have: dict[int, set[tuple[str, int]]] = {pn: set(), vn: set()}
        for addr in ns.addr("dump"):
            if addr["index"] in have and _routable(addr.get("address")):
                have[addr["index"]].add((addr.get("address"), addr["prefixlen"]))
        if want[pn] not in have[pn] and not spec.skip_arp_check and spec.ip_version == 4:
            # The VIP is not ours yet: make sure nobody else on the public network holds it
            # (before anything of the current configuration is taken away). IPv4 only, as in
            # ZStack (an IPv6 duplicate would need DAD, which is off: see nft.SYSCTLS6).
            _check(abort)
            arp_probe(names, spec.vip, ns_mac=mac_for(spec.eip_uuid, "pn"), timeout=arp_timeout)
            report.arp_checked = True
        _check(abort)
        for index, wanted in want.items():
            for address, plen in have[index] - {wanted}:
                ns.addr("del", index=index, address=address, prefixlen=plen)
                report.removed.append(f"{address}/{plen}")
        for index, (address, plen) in want.items():
            if (address, plen) not in have[index]:
                if spec.ip_version == 4:
                    net = ipaddress.IPv4Network(f"{address}/{plen}", strict=False)
                    ns.addr("add", index=index, address=address, prefixlen=plen,
                            broadcast=str(net.broadcast_address))
                else:
                    ns.addr("add", index=index, address=address, prefixlen=plen,
                            flags=IFA_F_NODAD)

        _check(abort)
        for fam in (socket.AF_INET, socket.AF_INET6):
            for neigh in ns.neigh("dump", family=fam, ifindex=vn):
                if neigh["state"] & NUD_PERMANENT and neigh.get("dst") != spec.nic_ip:
                    ns.neigh("del", dst=neigh.get("dst"), ifindex=vn, family=fam)
        ns.neigh("replace", dst=spec.nic_ip, lladdr=spec.nic_mac, ifindex=vn, state="permanent",
                 family=family)
        other = socket.AF_INET6 if family == socket.AF_INET else socket.AF_INET
        for route in ns.route("dump", family=other, table=254):
            if route["dst_len"] == 0:   # a default of the other IP version (re-apply 4 <-> 6)
                ns.route("del", dst=_DEFAULT[other], family=other)
        ns.route("replace", dst=_DEFAULT[family], gateway=spec.vip_gateway, oif=pn,
                 family=family)
    _check(abort)
    converge_fdb(spec, report)
    return report


def _routable(address: str | None) -> bool:
    """Addresses an EIP sets (not loopback, not IPv6 link-local: the kernel makes those)."""
    if not address:
        return False
    addr = ipaddress.ip_address(address)
    return not (addr.is_loopback or addr.is_link_local)


def fdb_mac(eip_uuid: str) -> str:
    """ZStack puts the MAC of the namespace's VM-side end (the one holding nicGateway) into
    the physical NIC's fdb, so a VF's traffic to the gateway reaches the namespace."""
    return mac_for(eip_uuid, "vn")


def converge_fdb(spec: EipSpec, report: ApplyReport) -> None:
    """With ``addfdb`` and ``physicalNic``: a permanent ``self`` fdb entry (the NIC's own
    forwarding table, as ``bridge fdb add <mac> dev <nic> self permanent``) for
    :func:`fdb_mac`; entries for that MAC on other NICs (the NIC changed) are removed."""
    mac = fdb_mac(spec.eip_uuid)
    with IPRoute() as ipr:
        want = None
        if spec.fdb_nic:
            link = _get_link(ipr, spec.fdb_nic)
            if link is None:
                raise AgentError(f"physicalNic {spec.fdb_nic!r}: no such link on this host")
            want = link["index"]
        for index in _fdb_holders(ipr, mac):
            if index != want:
                ipr.fdb("del", ifindex=index, lladdr=mac, flags=NTF_SELF)
                report.removed.append(f"fdb {mac}@{index}")
        if want is not None and want not in _fdb_holders(ipr, mac, want):
            try:
                ipr.fdb("add", ifindex=want, lladdr=mac, flags=NTF_SELF,
                        state=NUD_PERMANENT | NUD_NOARP)
            except NetlinkError as exc:
                raise AgentError(f"physicalNic {spec.fdb_nic}: cannot add the fdb entry "
                                 f"{mac}: {exc}") from None


def _fdb_holders(ipr: IPRoute, mac: str, ifindex: int | None = None) -> list[int]:
    """Indexes of the links whose own (``self``) fdb holds ``mac``."""
    found = []
    for entry in ipr.fdb("dump"):   # (a dump filtered by ifindex is EOPNOTSUPP on some links)
        if (entry.get("lladdr") == mac and entry["flags"] & NTF_SELF
                and ifindex in (None, entry["ifindex"]) and entry["ifindex"] not in found):
            found.append(entry["ifindex"])
    return found


def remove_fdb(eip_uuid: str) -> list[str]:
    """Remove the EIP's fdb entries wherever they are (absent is fine)."""
    mac = fdb_mac(eip_uuid)
    removed = []
    with IPRoute() as ipr:
        for index in _fdb_holders(ipr, mac):
            try:
                ipr.fdb("del", ifindex=index, lladdr=mac, flags=NTF_SELF)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ENODEV):
                    raise
            removed.append(f"fdb {mac}@{index}")
    return removed


def teardown(names: Names, *, abort: threading.Event | None = None) -> list[str]:
    """Remove every object of the EIP; what was there is returned. Absent is fine.

    ``abort`` is checked before each removal: a stopped teardown leaves a subset behind, which
    the next teardown (or apply) finds and handles."""
    removed = []
    with IPRoute() as ipr:
        for name in names.links:
            _check(abort)
            if _del_link(ipr, name):
                removed.append(name)
    _check(abort)
    if netns_exists(names.netns) or os.path.lexists(netns_path(names.netns)):
        _remove_netns(names.netns)
        removed.append(f"netns {names.netns}")
    return removed


def arp_probe(names: Names, vip: str, *, ns_mac: str, timeout: float) -> None:
    """RFC 5227 probe for ``vip`` on the public side; raises when another MAC answers."""
    sock = netns.create_socket(names.netns, socket.AF_PACKET, socket.SOCK_RAW,
                               socket.htons(ETH_P_ARP), flags=0)
    try:
        sock.bind((names.pub_ns, ETH_P_ARP))
        mac = bytes.fromhex(ns_mac.replace(":", ""))
        target = socket.inet_aton(vip)
        frame = (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
                 + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
                 + mac + b"\0\0\0\0" + b"\0" * 6 + target)
        deadline = time.monotonic() + timeout
        probes = [time.monotonic(), time.monotonic() + timeout / 2]
        while True:
            now = time.monotonic()
            while probes and probes[0] <= now:
                sock.send(frame)
                probes.pop(0)
            remaining = min([deadline] + probes) - now
            if now >= deadline:
                return
            ready, _, _ = select.select([sock], [], [], max(remaining, 0))
            if not ready:
                continue
            data = sock.recv(128)
            if len(data) < 42 or data[12:14] != b"\x08\x06":
                continue
            op = struct.unpack("!H", data[20:22])[0]
            sha, spa = data[22:28], data[28:32]
            if op == 2 and spa == target and sha != mac:
                owner = ":".join(f"{b:02x}" for b in sha)
                raise AgentError(f"vip {vip} is already in use on the public network by MAC "
                                 f"{owner}; release it or set skipArpCheck")
    finally:
        sock.close()


@dataclass
class Observed:
    """What exists of one EIP (for checks, sync and tests)."""

    netns: bool
    root_links: dict[str, dict]
    ns_links: dict[str, dict]
    addresses: list[str]
    neighbours: list[tuple[str, str]]
    default_routes: list[str]

    @property
    def empty(self) -> bool:
        return not self.netns and not self.root_links


def observe(names: Names) -> Observed:
    root_links: dict[str, dict] = {}
    ns_links: dict[str, dict] = {}
    addresses: list[str] = []
    neighbours: list[tuple[str, str]] = []
    routes: list[str] = []
    with IPRoute() as ipr:
        for name in names.links:
            link = _get_link(ipr, name)
            if link is not None:
                root_links[name] = {"index": link["index"], "kind": _kind(link),
                                    "master": link.get("master"), "peer": link.get("link"),
                                    "mtu": link.get("mtu"), "up": bool(link["flags"] & IFF_UP)}
    exists = netns_exists(names.netns)
    if exists:
        with IPRoute(netns=names.netns, flags=0) as ns:
            byindex = {}
            for link in ns.link("dump"):
                byindex[link["index"]] = link.get("ifname")
                ns_links[link.get("ifname")] = {"index": link["index"], "kind": _kind(link),
                                                "peer": link.get("link"),
                                                "mac": link.get("address"),
                                                "mtu": link.get("mtu"),
                                                "up": bool(link["flags"] & IFF_UP)}
            for addr in ns.addr("dump"):
                if addr["family"] == socket.AF_INET6 and not _routable(addr.get("address")):
                    continue
                addresses.append(f"{byindex.get(addr['index'])}:{addr.get('address')}/"
                                 f"{addr['prefixlen']}")
            for fam in (socket.AF_INET, socket.AF_INET6):
                for neigh in ns.neigh("dump", family=fam):
                    if neigh["state"] & NUD_PERMANENT:
                        neighbours.append((neigh.get("dst"), neigh.get("lladdr")))
                for route in ns.route("dump", family=fam, table=254):
                    if route["dst_len"] == 0 and route.get("gateway"):
                        routes.append(f"{route.get('gateway')}@{byindex.get(route.get('oif'))}")
    return Observed(exists, root_links, ns_links, sorted(addresses), sorted(neighbours),
                    sorted(routes))


def list_owned(patterns: Patterns) -> tuple[dict[str, str], dict[str, str]]:
    """Namespaces and root links named with this agent's prefix: ({name: hash}, {name: hash})."""
    spaces = {}
    for name in netns.listnetns():
        h = patterns.netns_hash(name)
        if h:
            spaces[name] = h
    links = {}
    with IPRoute() as ipr:
        for link in ipr.link("dump"):
            name = link.get("ifname")
            h = patterns.link_hash(name or "")
            if h:
                links[name] = h
    return spaces, links

