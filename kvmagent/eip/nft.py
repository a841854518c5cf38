"""The nftables ruleset of one EIP namespace, built as a JSON document and applied atomically.

The namespace belongs to one EIP, so its whole ruleset is ours: a single ``nft -j -f -``
transaction flushes it and adds everything below, run inside the namespace with
``nsenter --net=/run/netns/<ns>`` (an argv, no shell). Either all of it applies or none does,
and applying it twice leaves exactly one copy.

``table ip <T>`` (T = "eip"; ``table ip6 <T>`` with the same chains for an IPv6 EIP, whose
input chain also drops what comes from another MAC than the VM's on the VM side and lets
neighbour discovery in; there is no arp table then)::

    prerouting  nat    dstnat  iifname <pn> ip daddr <vip>    counter dnat to <nicIp>
    postrouting nat    srcnat  oifname <pn> ip saddr <nicIp>  counter snat to <vip>
    forward     filter policy drop:
                       ct state established,related accept
                       iifname <pn> oifname <vn> ip daddr <nicIp> counter accept   (after DNAT)
                       iifname <vn> oifname <pn> ip saddr <nicIp> counter accept
    input       filter policy drop:
                       iifname lo accept; ct state established,related accept
                       iifname <vn> ip saddr <nicIp> icmp type echo-request accept  (ping gateway)

``table arp <T>arp``: the namespace answers ARP for the NIC's gateway to the VM only and for the
VIP only on the public side, so it never claims other addresses on either bridge::

    input  iifname <vn> arp saddr ether != <nicMac> drop
           iifname <pn> arp operation request arp daddr ip != <vip> drop
    output oifname <vn> arp daddr ip != <nicIp> drop

Only values from a validated :class:`~kvmagent.eip.spec.EipSpec` and :class:`Names` go in;
JSON encoding does the quoting, there is no text template.
"""
from __future__ import annotations

import json
from typing import Any

from ..core.blocking import run_process
from ..core.errors import AgentError
from .naming import Names
from .spec import EipSpec

TABLE = "eip"
ARP_TABLE = "eiparp"
NETNS_DIR = "/run/netns"


def _match(left: dict, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _ct_established() -> dict:
    return _match({"ct": {"key": "state"}}, ["established", "related"], "in")


def build_ruleset(spec: EipSpec, names: Names) -> dict:
    """The namespace's whole ruleset: ``table ip`` (IPv4 EIP) or ``table ip6`` (IPv6 EIP)."""
    pn, vn = names.pub_ns, names.vm_ns
    fam = "ip" if spec.ip_version == 4 else "ip6"
    icmp = "icmp" if fam == "ip" else "icmpv6"
    cmds: list[dict] = [
        {"metainfo": {"json_schema_version": 1}},
        {"flush": {"ruleset": None}},
        {"add": {"table": {"family": fam, "name": TABLE}}},
    ]

    def chain(family: str, table: str, name: str, kind: str, hook: str, prio: int,
              policy: str = "accept") -> None:
        cmds.append({"add": {"chain": {"family": family, "table": table, "name": name,
                                       "type": kind, "hook": hook, "prio": prio,
                                       "policy": policy}}})

    def rule(family: str, table: str, chain_name: str, *expr: dict) -> None:
        cmds.append({"add": {"rule": {"family": family, "table": table, "chain": chain_name,
                                      "expr": list(expr)}}})

    chain(fam, TABLE, "prerouting", "nat", "prerouting", -100)
    rule(fam, TABLE, "prerouting", _match(_meta("iifname"), pn),
         _match(_payload(fam, "daddr"), spec.vip), {"counter": None},
         {"dnat": {"addr": spec.nic_ip}})
    chain(fam, TABLE, "postrouting", "nat", "postrouting", 100)
    rule(fam, TABLE, "postrouting", _match(_meta("oifname"), pn),
         _match(_payload(fam, "saddr"), spec.nic_ip), {"counter": None},
         {"snat": {"addr": spec.vip}})
    chain(fam, TABLE, "forward", "filter", "forward", 0, "drop")
    rule(fam, TABLE, "forward", _ct_established(), {"accept": None})
    rule(fam, TABLE, "forward", _match(_meta("iifname"), pn), _match(_meta("oifname"), vn),
         _match(_payload(fam, "daddr"), spec.nic_ip), {"counter": None}, {"accept": None})
    rule(fam, TABLE, "forward", _match(_meta("iifname"), vn), _match(_meta("oifname"), pn),
         _match(_payload(fam, "saddr"), spec.nic_ip), {"counter": None}, {"accept": None})
    chain(fam, TABLE, "input", "filter", "input", 0, "drop")
    rule(fam, TABLE, "input", _match(_meta("iifname"), "lo"), {"accept": None})
    if fam == "ip6":
        # Neighbour discovery is ARP's job in IPv6: on the VM side answer only the VM (several
        # EIP namespaces on one VM bridge hold the same gateway address), then let ND in.
        rule(fam, TABLE, "input", _match(_meta("iifname"), vn),
             _match(_payload("ether", "saddr"), spec.nic_mac, "!="), {"drop": None})
        rule(fam, TABLE, "input", _match(_payload(icmp, "type"),
                                         {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]}),
             {"accept": None})
    rule(fam, TABLE, "input", _ct_established(), {"accept": None})
    rule(fam, TABLE, "input", _match(_meta("iifname"), vn),
         _match(_payload(fam, "saddr"), spec.nic_ip),
         _match(_payload(icmp, "type"), "echo-request"), {"accept": None})
    if fam == "ip6":
        return {"nftables": cmds}

    cmds.append({"add": {"table": {"family": "arp", "name": ARP_TABLE}}})
    chain("arp", ARP_TABLE, "input", "filter", "input", 0)
    rule("arp", ARP_TABLE, "input", _match(_meta("iifname"), vn),
         _match(_payload("arp", "saddr ether"), spec.nic_mac, "!="), {"drop": None})
    rule("arp", ARP_TABLE, "input", _match(_meta("iifname"), pn),
         _match(_payload("arp", "operation"), "request"),
         _match(_payload("arp", "daddr ip"), spec.vip, "!="), {"drop": None})
    chain("arp", ARP_TABLE, "output", "filter", "output", 0)
    rule("arp", ARP_TABLE, "output", _match(_meta("oifname"), vn),
         _match(_payload("arp", "daddr ip"), spec.nic_ip, "!="), {"drop": None})
    return {"nftables": cmds}


def nsenter_argv(netns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net={NETNS_DIR}/{netns}", "--", *argv]


async def apply_ruleset(names: Names, document: dict, *, timeout: float) -> None:
    """One atomic transaction inside the EIP namespace."""
    result = await run_process(nsenter_argv(names.netns, "nft", "-j", "-f", "-"),
                               input=json.dumps(document).encode(), timeout=timeout)
    if not result.ok:
        raise AgentError(f"nftables in namespace {names.netns}: {result.describe()}")


def rule_count(ruleset: dict) -> int:
    """Rules in a listed ruleset (``{"rule": ..}``) or in a document (``{"add": {"rule": ..}}``)."""
    return sum(1 for item in ruleset.get("nftables", [])
               if "rule" in item or "rule" in item.get("add", {}))


# IPv4 EIP: forwarding on, IPv6 off (no link-local chatter on the bridges). On a host booted
# with ipv6.disable=1 there is no net.ipv6 at all: nothing to turn off, so unknown keys are
# ignored (``sysctl -e``); a key that exists and cannot be written still fails.
SYSCTLS = ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.disable_ipv6=1",
           "net.ipv6.conf.default.disable_ipv6=1")
# IPv6 EIP: IPv6 on and forwarding; no DAD (the addresses are the MN's, and DAD would keep
# them "tentative" for a second after every apply); no router advertisements taken.
SYSCTLS6 = ("net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
            "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.forwarding=1",
            "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0")


def sysctls_for(ip_version: int) -> tuple[str, ...]:
    return SYSCTLS if ip_version == 4 else SYSCTLS6


async def set_sysctls(names: Names, *, timeout: float, ip_version: int = 4) -> None:
    """Apply :func:`sysctls_for` the EIP's IP version inside the EIP namespace (an IPv6 EIP
    on a host without IPv6 fails here, naming the key)."""
    keys = sysctls_for(ip_version)
    flags = ("-e", "-q") if ip_version == 4 else ("-q",)
    result = await run_process(nsenter_argv(names.netns, "sysctl", *flags, "-w", *keys),
                               timeout=timeout)
    if not result.ok:
        raise AgentError(f"sysctl in namespace {names.netns}: {result.describe()}")
