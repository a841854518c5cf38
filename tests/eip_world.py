"""A little network made of namespaces, for EIP tests and the EIP benchmark.

Root namespace (the "hypervisor"): two bridges, ``<tag>pb`` (public) and ``<tag>vb`` (VM
network), as on a real host; the agent attaches its veths to them. Around them::

    <tag>-client ns: <tag>c1 198.51.100.2/24 ==veth== <tag>c0 -> <tag>pb
    <tag>-vm<k>  ns: <tag>m<k>b 10.77.0.<10+k>/24, default via 10.77.0.1,
                     MAC 02:77:00:00:00:<k> ==veth== <tag>m<k>a -> <tag>vb

198.51.100.0/24 (TEST-NET-2) is the "public" network, 10.77.0.0/24 the VMs'. No address is
put on anything in the root namespace, so no packet can leave the machine. Everything is
named with a random tag (and the agent gets a random EIP prefix), and :meth:`World.destroy`
removes all of it, also after a failure.

IPv6 too: the client holds 2001:db8:51::2/64, VM k 2001:db8:77::<10+k>/64 (default via
2001:db8:77::1); VIPs are 2001:db8:51::<10+i> (:meth:`World.eip6`). Addresses are added
without DAD.

The world never touches the host firewall: on a host where docker runs, iptables' FORWARD
policy is DROP and br_netfilter sends bridged frames through it, and the agent has to cope
(see kvmagent/eip/hostfw.py). :func:`host_forward_drops` tells whether this host is such a
host (read only).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import secrets
import socket
import string
import struct
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from kvmagent.eip.hostfw import chain_name
from kvmagent.ha.scan import echo_request
from kvmagent.plugins import host as host_plugin
from kvmagent.plugins.eip import make_plugin
from kvmagent.eip.naming import Patterns

PUBLIC_NET = ipaddress.IPv4Network("198.51.100.0/24")
CLIENT_IP = "198.51.100.2"
VIP_GATEWAY = "198.51.100.1"
VM_NET = ipaddress.IPv4Network("10.77.0.0/24")
NIC_GATEWAY = "10.77.0.1"
PUBLIC_NET6 = ipaddress.IPv6Network("2001:db8:51::/64")
CLIENT_IP6 = "2001:db8:51::2"
VIP_GATEWAY6 = "2001:db8:51::1"
VM_NET6 = ipaddress.IPv6Network("2001:db8:77::/64")
NIC_GATEWAY6 = "2001:db8:77::1"
IFA_F_NODAD = 0x02
_ALNUM = string.ascii_lowercase + string.digits


def _rand(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


def vip_of(i: int) -> str:
    return str(PUBLIC_NET.network_address + 10 + i)


def nic_ip_of(k: int) -> str:
    return str(VM_NET.network_address + 10 + k)


def vip6_of(i: int) -> str:
    return str(PUBLIC_NET6.network_address + 0x10 + i)


def nic_ip6_of(k: int) -> str:
    return str(VM_NET6.network_address + 0x10 + k)


def nic_mac_of(k: int) -> str:
    return f"02:77:00:00:{k // 256:02x}:{k % 256:02x}"


def _run(argv: list[str], check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, timeout=30, input=input)


@dataclass
class World:
    tag: str = field(default_factory=lambda: "w" + _rand(4))
    # The EIP prefix of the agent under test: its namespaces/links are cleaned up too.
    prefix: str = field(default_factory=lambda: "t" + _rand(3))
    vms: dict[int, str] = field(default_factory=dict)

    @property
    def pub_br(self) -> str:
        return f"{self.tag}pb"

    @property
    def vm_br(self) -> str:
        return f"{self.tag}vb"

    @property
    def client_ns(self) -> str:
        return f"{self.tag}-client"

    def vm_ns(self, k: int) -> str:
        return f"{self.tag}-vm{k}"

    # ----- building ---------------------------------------------------------------------
    def build(self) -> World:
        with IPRoute() as ipr:
            for br in (self.pub_br, self.vm_br):
                ipr.link("add", ifname=br, kind="bridge")
                ipr.link("set", index=ipr.link_lookup(ifname=br)[0], state="up")
        self._veth_into(self.client_ns, f"{self.tag}c0", f"{self.tag}c1", self.pub_br,
                        f"{CLIENT_IP}/24", gateway=None, mac=None, cidr6=f"{CLIENT_IP6}/64")
        return self

    def add_vm(self, k: int) -> str:
        """A VM namespace holding nicIp ``nic_ip_of(k)`` on the VM bridge."""
        if k not in self.vms:
            self._veth_into(self.vm_ns(k), f"{self.tag}m{k}a", f"{self.tag}m{k}b", self.vm_br,
                            f"{nic_ip_of(k)}/24", gateway=NIC_GATEWAY, mac=nic_mac_of(k),
                            cidr6=f"{nic_ip6_of(k)}/64", gateway6=NIC_GATEWAY6)
            self.vms[k] = self.vm_ns(k)
        return self.vms[k]

    def add_nic(self, suffix: str) -> str:
        """A link in the root namespace standing in for a physical NIC (one end of a veth:
        this kernel has no dummy links; a veth keeps ``self`` fdb entries like a NIC)."""
        name = f"{self.tag}{suffix}"
        with IPRoute() as ipr:
            ipr.link("add", ifname=name, kind="veth", peer={"ifname": f"{name}p"})
        return name

    def _veth_into(self, ns_name: str, outer: str, inner: str, bridge: str, cidr: str,
                   gateway: str | None, mac: str | None, cidr6: str,
                   gateway6: str | None = None) -> None:
        netns.create(ns_name)
        # IPv6 on, no DAD, no router advertisements: the addresses are usable at once.
        for key, value in (("all/accept_dad", "0"), ("default/accept_dad", "0"),
                           ("all/disable_ipv6", "0"), ("default/disable_ipv6", "0")):
            ns_run(ns_name, "sysctl", "-q", "-w", f"net.ipv6.conf.{key.replace('/', '.')}={value}")
        with IPRoute() as ipr:
            peer: dict[str, Any] = {"ifname": inner, "net_ns_fd": ns_name}
            if mac:
                peer["address"] = mac
            ipr.link("add", ifname=outer, kind="veth", peer=peer)
            idx = ipr.link_lookup(ifname=outer)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname=bridge)[0], state="up")
        with IPRoute(netns=ns_name, flags=0) as ns:
            idx = ns.link_lookup(ifname=inner)[0]
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("set", index=idx, state="up")
            address, plen = cidr.split("/")
            ns.addr("add", index=idx, address=address, prefixlen=int(plen))
            address6, plen6 = cidr6.split("/")
            ns.addr("add", index=idx, address=address6, prefixlen=int(plen6), flags=IFA_F_NODAD)
            if gateway:
                ns.route("add", dst="0.0.0.0/0", gateway=gateway)
            if gateway6:
                ns.route("add", dst="::/0", gateway=gateway6, family=socket.AF_INET6)

    # ----- tearing down -----------------------------------------------------------------
    def destroy(self) -> None:
        """Remove everything of this world and of the agent prefix; never raises."""
        errors = []
        patterns = Patterns(self.prefix)
        try:
            with IPRoute() as ipr:
                for link in ipr.link("dump"):
                    name = link.get("ifname") or ""
                    if name.startswith(self.tag) or patterns.link_hash(name):
                        try:
                            ipr.link("del", index=link["index"])
                        except NetlinkError:
                            pass
        except (OSError, NetlinkError) as exc:  # pragma: no cover - best effort
            errors.append(exc)
        for name in netns.listnetns():
            if name.startswith(self.tag + "-") or patterns.netns_hash(name):
                try:
                    netns.remove(name)
                except OSError as exc:  # pragma: no cover
                    errors.append(exc)
        # After a failed test the agent under test may have left its host FORWARD chain
        # (its delete never ran): remove what carries this agent's own chain name only.
        chain = chain_name(self.prefix)
        for cmd in ("iptables", "ip6tables"):
            while _run([cmd, "-w", "10", "-D", "FORWARD", "-j", chain], check=False).returncode == 0:
                pass
            _run([cmd, "-w", "10", "-F", chain], check=False)
            _run([cmd, "-w", "10", "-X", chain], check=False)
        if errors:  # pragma: no cover
            print(f"world {self.tag}: clean-up errors: {errors}")

    # ----- EIP bodies -------------------------------------------------------------------
    def eip(self, i: int = 0, vm: int = 0, eip_uuid: str | None = None, **over: Any) -> dict:
        body = {
            "eipUuid": eip_uuid or secrets.token_hex(16), "vmUuid": f"{vm + 1:032x}",
            "vip": vip_of(i), "vipNetmask": "255.255.255.0", "vipGateway": VIP_GATEWAY,
            "publicBridgeName": self.pub_br, "nicUuid": f"{vm + 1:032x}"[::-1],
            "nicMac": nic_mac_of(vm), "nicIp": nic_ip_of(vm), "nicNetmask": "255.255.255.0",
            "nicGateway": NIC_GATEWAY, "vmBridgeName": self.vm_br, "skipArpCheck": True,
        }
        body.update(over)
        return body

    def eip6(self, i: int = 0, vm: int = 0, eip_uuid: str | None = None, **over: Any) -> dict:
        """An IPv6 EipTO as ZStack's FlatEipBackend.eipStructToEipTO fills it: ipVersion 6,
        prefix lengths, netmasks in ZStack's 8-group format."""
        mask = "ffff:ffff:ffff:ffff:0:0:0:0"
        body = self.eip(i, vm, eip_uuid, ipVersion=6, vip=vip6_of(i), vipNetmask=mask,
                        vipPrefixLen=64, vipGateway=VIP_GATEWAY6, nicIp=nic_ip6_of(vm),
                        nicNetmask=mask, nicPrefixLen=64, nicGateway=NIC_GATEWAY6)
        body.update(over)
        return body

    # ----- what is left -----------------------------------------------------------------
    def leftovers(self) -> dict[str, list[str]]:
        """Namespaces, root links and root nft rules that carry the agent's prefix."""
        patterns = Patterns(self.prefix)
        spaces = [n for n in netns.listnetns() if patterns.netns_hash(n)]
        with IPRoute() as ipr:
            links = [link.get("ifname") for link in ipr.link("dump")
                     if patterns.link_hash(link.get("ifname") or "")]
        ruleset = _run(["nft", "list", "ruleset"]).stdout.decode()
        # Match whole quoted interface names: a bare substring test flags docker's rules when
        # the random prefix is, say, "turn" (in "return").
        # iptables-nft shows the agent's host FORWARD rules here too ("xt match physdev"):
        # those are reported, per IP version, under "iptables" (from iptables -S).
        rules = [line.strip() for line in ruleset.splitlines()
                 if "xt match" not in line and ("198.51.100." in line or "2001:db8:" in line)
                 or any(patterns.link_hash(name) for name in re.findall(r'"([^"]+)"', line))]
        return {"netns": spaces, "links": links, "nft": rules,
                "iptables": host_chain_rules(self.prefix)}


def host_chain_rules(prefix: str) -> dict[int, list[str] | None]:
    """Read only: the rules of the agent's chain in the host's iptables/ip6tables (None when
    the chain does not exist), and whether FORWARD still jumps to it."""
    chain = chain_name(prefix)
    out: dict[int, list[str] | None] = {}
    for version, cmd in ((4, "iptables"), (6, "ip6tables")):
        listed = _run([cmd, "-w", "10", "-S", chain], check=False)
        if listed.returncode != 0:
            jumps = _run([cmd, "-w", "10", "-S", "FORWARD"]).stdout.decode()
            out[version] = None if f"-j {chain}" not in jumps else ["<jump without chain>"]
            continue
        out[version] = [line for line in listed.stdout.decode().splitlines()
                        if line.startswith("-A ")]
    return out


def host_forward_drops() -> bool:
    """Read only: does this host drop bridged IPv4 in its FORWARD chain (docker's policy)?"""
    try:
        with open("/proc/sys/net/bridge/bridge-nf-call-iptables") as fh:
            bridged = fh.read().strip() == "1"
    except FileNotFoundError:
        return False
    policy = _run(["iptables", "-w", "10", "-S", "FORWARD"]).stdout.decode().splitlines()
    return bridged and "-P FORWARD DROP" in policy


@dataclass
class FirewallLab:
    """A stand-in hypervisor *inside a namespace* (``<tag>-host``), for the host firewall
    rules on either iptables backend without touching the real host's firewall::

        <tag>-host: bridges pb, vb; FORWARD policy DROP (given backend); br_netfilter on
          pb: <tag>a0 <-> client ns a1 (client address)   <names.pub_host> <-> eip ns pn
          vb: <tag>v0 <-> vm ns v1 (nicIp, nicMac)          <names.vm_host>  <-> eip ns vn
        eip ns: pn holds the VIP and ``extra`` (an address the rules must not open),
                vn holds nicGateway

    The "eip" namespace just answers on those addresses (no NAT): what is tested is which
    bridged frames the lab host's FORWARD chain lets through."""

    body: dict
    names: Any
    backend: str                     # "legacy" | "nft"
    tag: str = field(default_factory=lambda: "f" + _rand(4))

    @property
    def host(self) -> str:
        return f"{self.tag}-host"

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def command(self, version: int) -> str:
        return f"{'iptables' if version == 4 else 'ip6tables'}-{self.backend}"

    @property
    def v6(self) -> bool:
        return self.body.get("ipVersion") == 6

    @property
    def client_ip(self) -> str:
        return CLIENT_IP6 if self.v6 else CLIENT_IP

    @property
    def extra(self) -> str:
        return vip6_of(99) if self.v6 else vip_of(99)

    def build(self) -> FirewallLab:
        b, plen = self.body, 64 if self.v6 else 24
        for name in (self.host, self.ns("client"), self.ns("eip"), self.ns("vm")):
            netns.create(name)
        with IPRoute(netns=self.host, flags=0) as h:
            for br in ("pb", "vb"):
                h.link("add", ifname=br, kind="bridge")
                h.link("set", index=h.link_lookup(ifname=br)[0], state="up")
        ns_run(self.host, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1",
               "net.bridge.bridge-nf-call-ip6tables=1")
        for version in (4, 6):
            ns_run(self.host, self.command(version), "-w", "10", "-P", "FORWARD", "DROP")
        self._port(f"{self.tag}a0", "pb", self.ns("client"), "a1", [self.client_ip], plen)
        self._port(self.names.pub_host, "pb", self.ns("eip"), "pn", [b["vip"], self.extra], plen)
        self._port(self.names.vm_host, "vb", self.ns("eip"), "vn", [b["nicGateway"]], plen)
        self._port(f"{self.tag}v0", "vb", self.ns("vm"), "v1", [b["nicIp"]], plen,
                   mac=b["nicMac"])
        return self

    def _port(self, outer: str, bridge: str, ns_name: str, inner: str, addrs: list[str],
              plen: int, mac: str | None = None) -> None:
        for name in (ns_name,):
            for key in ("all.accept_dad", "default.accept_dad"):
                ns_run(name, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}=0")
        with IPRoute(netns=self.host, flags=0) as h:
            peer: dict[str, Any] = {"ifname": inner, "net_ns_fd": ns_name}
            if mac:
                peer["address"] = mac
            h.link("add", ifname=outer, kind="veth", peer=peer)
            h.link("set", index=h.link_lookup(ifname=outer)[0],
                   master=h.link_lookup(ifname=bridge)[0], state="up")
        with IPRoute(netns=ns_name, flags=0) as ns:
            idx = ns.link_lookup(ifname=inner)[0]
            ns.link("set", index=idx, state="up")
            for address in addrs:
                ns.addr("add", index=idx, address=address, prefixlen=plen,
                        flags=IFA_F_NODAD if ":" in address else 0)

    def passes(self, server_role: str, server_ip: str, client_role: str, port: int) -> bool:
        """Does TCP from ``client_role`` to ``server_ip`` in ``server_role`` get through?"""
        try:
            tcp_exchange(self.ns(server_role), server_ip, self.ns(client_role), server_ip,
                         port, timeout=1.5)
        except OSError:
            return False
        return True

    def destroy(self) -> None:
        for name in (self.host, self.ns("client"), self.ns("eip"), self.ns("vm")):
            try:
                netns.remove(name)
            except OSError:
                pass


# ----- traffic, from sockets created inside the namespaces --------------------------------
def ns_socket(ns_name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    return netns.create_socket(ns_name, family, kind, proto, flags=0)


def tcp_exchange(server_ns: str, server_ip: str, client_ns: str, connect_ip: str,
                 port: int = 7777, timeout: float = 5.0) -> dict[str, str]:
    """A TCP server in ``server_ns`` answers with its namespace name and the peer it saw.

    Returns ``{"answered_by": <server ns>, "server_saw": <client address as seen by the
    server>, "client_local": <client's own address>}``.
    """
    family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
    server = ns_socket(server_ns, family, socket.SOCK_STREAM)
    client = ns_socket(client_ns, family, socket.SOCK_STREAM)
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((server_ip, port))
        server.listen(1)
        server.settimeout(timeout)
        client.settimeout(timeout)
        client.connect((connect_ip, port))
        conn, peer = server.accept()
        with conn:
            conn.sendall(json.dumps({"answered_by": server_ns, "server_saw": peer[0]}).encode())
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
        result = json.loads(reply)
        result["client_local"] = client.getsockname()[0]
        return result
    finally:
        client.close()
        server.close()


def ping_through(client_ns: str, vip: str, vm_ns: str, timeout: float = 3.0) -> dict[str, str]:
    """ICMP echo from the client to ``vip``; a raw listener in ``vm_ns`` sees the request.

    Returns ``{"reply_from": <source of the echo reply>, "vm_saw_dst": <destination of the
    echo request as it arrived in the VM namespace>, "vm_saw_src": <its source>}``; keys
    are missing for what did not happen within ``timeout``.
    """
    ident = secrets.randbits(16)
    listener = ns_socket(vm_ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    pinger = ns_socket(client_ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        listener.settimeout(timeout)
        pinger.settimeout(timeout)
        pinger.sendto(echo_request(ident, 1), (vip, 0))
        result: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        try:
            while "reply_from" not in result and time.monotonic() < deadline:
                data, addr = pinger.recvfrom(2048)
                ihl = (data[0] & 0x0F) * 4
                icmp_type, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if icmp_type == 0 and rid == ident:
                    result["reply_from"] = addr[0]
        except TimeoutError:
            pass
        try:
            while "vm_saw_dst" not in result and time.monotonic() < deadline:
                data = listener.recv(2048)
                ihl = (data[0] & 0x0F) * 4
                icmp_type, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if icmp_type == 8 and rid == ident:
                    result["vm_saw_src"] = socket.inet_ntoa(data[12:16])
                    result["vm_saw_dst"] = socket.inet_ntoa(data[16:20])
        except TimeoutError:
            pass
        return result
    finally:
        listener.close()
        pinger.close()


def arp_ask(ns_name: str, ifname: str, target_ip: str, timeout: float = 1.0) -> str | None:
    """Send an ARP request for ``target_ip`` from ``ifname`` in ``ns_name`` (with that
    interface's MAC and first IPv4 address); the MAC that answered, or None."""
    with IPRoute(netns=ns_name, flags=0) as ns:
        link = ns.link("get", ifname=ifname)[0]
        mac = bytes.fromhex(link.get("address").replace(":", ""))
        addrs = [a.get("address") for a in ns.addr("dump", family=socket.AF_INET,
                                                   index=link["index"])]
    sock = ns_socket(ns_name, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    try:
        sock.bind((ifname, 0x0806))
        sock.settimeout(timeout)
        target = socket.inet_aton(target_ip)
        sock.send(b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
                  + mac + socket.inet_aton(addrs[0]) + b"\0" * 6 + target)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(128)
            except TimeoutError:
                return None
            if (len(data) >= 42 and data[12:14] == b"\x08\x06"
                    and struct.unpack("!H", data[20:22])[0] == 2 and data[28:32] == target):
                return ":".join(f"{b:02x}" for b in data[22:28])
        return None
    finally:
        sock.close()


def ns_nft_rules(ns_name: str) -> list[dict]:
    """The rules of a namespace's ruleset (``nft -j list ruleset`` inside it)."""
    out = _run(["nsenter", f"--net=/run/netns/{ns_name}", "--", "nft", "-j", "list", "ruleset"])
    return [item["rule"] for item in json.loads(out.stdout)["nftables"] if "rule" in item]


def ns_run(ns_name: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["nsenter", f"--net=/run/netns/{ns_name}", "--", *argv], check=check)


def root_link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


async def async_wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """:func:`wait_for` on the event loop (the predicate reads the agent's own state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ----- fixtures shared by the EIP test modules (imported by name into each) ----------------
@pytest.fixture
def world():
    """A built test world with VM 0; destroyed whatever the test did."""
    w = World()
    try:
        w.build()
        w.add_vm(0)
        yield w
    finally:
        w.destroy()


@pytest.fixture
def eip_agent(make_agent, world):
    """``await eip_agent()``: an agent with the host and EIP plugins, EIP names prefixed with
    the world's random prefix. Called again in one test, it shares the state dir (restart)."""
    async def factory(**settings):
        return await make_agent(plugins=[host_plugin.plugin,
                                         make_plugin(prefix=world.prefix, **settings)])
    return factory


__all__ = [
    "eip_agent",
    "world",
    "async_wait_for",
    "CLIENT_IP",
    "CLIENT_IP6",
    "World",
    "nic_ip_of",
    "nic_mac_of",
    "ns_nft_rules",
    "ns_run",
    "ping_through",
    "tcp_exchange",
    "vip_of",
]
