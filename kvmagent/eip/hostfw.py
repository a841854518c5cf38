"""The host's FORWARD hook: an EIP's bridged traffic passes whatever policy the host has.

Why this exists
    With br_netfilter loaded and ``bridge-nf-call-iptables=1`` (ZStack sets it for security
    groups; docker loads the module) every IP frame bridged between two ports of a bridge
    passes the host's IP FORWARD hook, including the frames between the public (or VM)
    network and the EIP namespace's veths. Docker sets iptables' FORWARD policy to DROP. A
    packet must be accepted by *every* base chain at a hook, so an accept in a table of our
    own cannot help, and a per-bridge ``nf_call_iptables`` of 0 cannot switch the global 1
    off (the kernel ORs them) on bridges that are ZStack's anyway. The accept has to be in
    the chain that drops: iptables' ``filter FORWARD``, in whatever backend the host's
    ``iptables`` command uses, the command docker and firewalld use too.

What is added (per IP version, only while that version has EIPs)
    A chain ``KVMAGENT-<PREFIX>`` jumped to from the top of ``FORWARD``, holding for each
    EIP only the EIP's own traffic, matched by its bridge ports and addresses::

        -m physdev --physdev-out <ph> -d <vip>    -j ACCEPT    public network -> EIP
        -m physdev --physdev-in  <ph> -s <vip>    -j ACCEPT    EIP -> public network
        -m physdev --physdev-out <vh> -s <nicIp>  -j ACCEPT    VM -> EIP namespace
        -m physdev --physdev-in  <vh> -d <nicIp>  -j ACCEPT    EIP namespace -> VM
        IPv6 also, into and out of <ph>/<vh>, the neighbour discovery the address rules miss
        (link-local or unspecified sources): solicitations to solicited-node multicast
        (ff02::1:ff00:0/104), advertisements to link-local addresses or all-nodes (ff02::1)

    Rules are argv lists made from validated values (no shell, no text template), run with
    ``-w`` (the xtables lock docker takes too).

Keeping them there
    apply adds an EIP's rules (those not listed by ``-S`` yet, so twice is one copy), delete
    removes them, and the last delete of a version removes the jump and the chain.
    :meth:`HostFirewall.check` (after the start-up restore, at sync, and every ``interval``
    seconds) compares the jump and the chain's rules, as ``-S`` prints them, with what they
    should be and rebuilds the chain when someone rewrote the firewall (docker restarted,
    firewalld reloaded, ``iptables -F``).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from dataclasses import dataclass

from ..core.blocking import run_process
from ..core.errors import AgentError
from .naming import Names
from .spec import EipSpec

log = logging.getLogger(__name__)

COMMANDS = {4: "iptables", 6: "ip6tables"}
# ICMPv6 types (as -S prints them) and the destinations they may go to through a port.
ND_SOLICIT, ND_ADVERT = 135, 136
ND_RULES = ((ND_SOLICIT, "ff02::1:ff00:0/104"), (ND_ADVERT, "fe80::/10"),
            (ND_ADVERT, "ff02::1/128"))


def chain_name(prefix: str) -> str:
    return f"KVMAGENT-{prefix.upper()}"


@dataclass(frozen=True)
class Rule:
    """One accept rule: a bridge port (in or out) and an address (source or destination),
    or, with ``nd``, an ICMPv6 neighbour discovery type through the port."""

    port: str
    port_dir: str             # "in" | "out"
    addr: str | None = None   # an address or a network
    addr_dir: str = "d"       # "s" | "d"
    nd: int | None = None     # ICMPv6 type (IPv6 only)

    def argv(self, version: int) -> list[str]:
        out: list[str] = []
        if self.addr is not None:
            # Written as -S prints it (compressed, with its length), so lines compare.
            out += [f"-{self.addr_dir}", str(ipaddress.ip_network(self.addr, strict=False))]
        if self.nd is not None:
            out += ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", str(self.nd)]
        out += ["-m", "physdev", f"--physdev-{self.port_dir}", self.port, "-j", "ACCEPT"]
        return out

    def line(self, version: int, chain: str) -> str:
        """The rule as ``iptables -S`` lists it (on either backend)."""
        return " ".join(["-A", chain, *self.argv(version)])


def rules_for(spec: EipSpec, names: Names) -> list[Rule]:
    ph, vh = names.pub_host, names.vm_host
    rules = [Rule(ph, "out", spec.vip, "d"), Rule(ph, "in", spec.vip, "s"),
             Rule(vh, "out", spec.nic_ip, "s"), Rule(vh, "in", spec.nic_ip, "d")]
    if spec.ip_version == 6:
        rules += [Rule(port, way, dest, "d", nd) for port in (ph, vh) for way in ("out", "in")
                  for nd, dest in ND_RULES]
    return rules


class HostFirewall:
    """The accept rules of one agent's EIPs in the host's iptables/ip6tables FORWARD."""

    def __init__(self, prefix: str, *, timeout: float = 15.0, enabled: bool = True,
                 commands: dict[int, str] | None = None, netns: str | None = None):
        """``commands``/``netns`` (tests): other iptables commands (iptables-legacy), run
        inside another network namespace than the host's."""
        self.chain = chain_name(prefix)
        self.commands = dict(commands or COMMANDS)
        self._enter = ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []
        self.timeout = timeout
        self.enabled = enabled
        self.wanted: dict[int, dict[str, list[Rule]]] = {4: {}, 6: {}}
        self._lock = asyncio.Lock()
        self._missing_logged: set[int] = set()
        self.rebuilds = 0        # times check() found the firewall rewritten (for tests/logs)
        # Chain and jump known to be there (set by _ensure_base, cleared when they are
        # removed or check() finds them changed): saves two commands per apply.
        self._base_ok: set[int] = set()

    def _command(self, version: int) -> str | None:
        cmd = shutil.which(self.commands[version])
        if cmd is None and version not in self._missing_logged:
            self._missing_logged.add(version)
            log.warning("no %s command on this host: EIP traffic is not let through the "
                        "host's FORWARD chain (nothing to let through if there is none)",
                        self.commands[version])
        return cmd

    def _argv(self, cmd: str, *args: str) -> list[str]:
        return [*self._enter, cmd, "-w", "10", *args]

    async def _run(self, version: int, *args: str) -> bool:
        cmd = self._command(version)
        if cmd is None:
            return True
        result = await run_process(self._argv(cmd, *args), timeout=self.timeout)
        return result.ok

    async def _must(self, version: int, *args: str) -> None:
        cmd = self._command(version)
        if cmd is None:
            return
        result = await run_process(self._argv(cmd, *args), timeout=self.timeout)
        if not result.ok:
            raise AgentError(f"host firewall ({self.commands[version]} {' '.join(args[:2])}): "
                             f"{result.describe()}")

    # ----- per EIP ----------------------------------------------------------------------
    async def add(self, spec: EipSpec, names: Names, *, fresh: bool = False) -> None:
        """Let this EIP's traffic through (idempotent); its rules in the other IP version
        (a re-apply that changed ipVersion) go. ``fresh``: the EIP is new to this agent, so
        its rules are appended without looking for them first (a copy left by an agent that
        lost its state makes the count wrong, and :meth:`check` rebuilds the chain)."""
        if not self.enabled:
            return
        version = spec.ip_version
        rules = rules_for(spec, names)
        async with self._lock:
            other = 6 if version == 4 else 4
            if spec.eip_uuid in self.wanted[other]:
                await self._remove_locked(other, spec.eip_uuid)
            old = self.wanted[version].get(spec.eip_uuid)
            self.wanted[version][spec.eip_uuid] = rules
            await self._ensure_base(version)
            gone = [rule for rule in old or [] if rule not in rules]
            if gone:
                await self._delete_rules(version, gone)
            listed = set() if fresh else set(await self._listed(version))
            missing = [rule for rule in rules if rule.line(version, self.chain) not in listed]
            if missing and not await self._restore(version, [["-A", self.chain, *r.argv(version)]
                                                             for r in missing]):
                for rule in missing:       # one by one: remakes a chain deleted meanwhile
                    await self._append(version, rule)

    async def _append(self, version: int, rule: Rule) -> None:
        """Append one rule; when that fails the cached "chain is there" may be stale (a
        firewalld reload or ``iptables -F; -X`` since the last check), so the chain and jump
        are made again and the append tried once more."""
        try:
            await self._must(version, "-A", self.chain, *rule.argv(version))
        except AgentError as exc:
            if version not in self._base_ok:
                raise
            log.warning("%s; making the chain and its jump again", exc)
            self._base_ok.discard(version)
            await self._ensure_base(version)
            await self._must(version, "-A", self.chain, *rule.argv(version))

    async def remove(self, eip_uuid: str, spec: EipSpec | None = None,
                     names: Names | None = None) -> None:
        """Take this EIP's rules out; with ``spec``, also rules this agent has no memory of
        (a record lost, rules left from before a restart)."""
        if not self.enabled:
            return
        async with self._lock:
            for version in (4, 6):
                if spec is not None and names is not None and spec.ip_version == version:
                    self.wanted[version].setdefault(eip_uuid, rules_for(spec, names))
                if eip_uuid in self.wanted[version]:
                    await self._remove_locked(version, eip_uuid)

    async def _remove_locked(self, version: int, eip_uuid: str) -> None:
        rules = self.wanted[version].pop(eip_uuid)
        if not self.wanted[version]:
            await self._drop_base(version)       # the chain goes with all its rules
        else:
            await self._delete_rules(version, rules)

    async def _delete_rules(self, version: int, rules: list[Rule]) -> None:
        # One copy each; a second one (left by a crash) is found by check(), which rebuilds.
        if await self._restore(version, [["-D", self.chain, *r.argv(version)] for r in rules]):
            return
        for rule in rules:       # some were missing (the batch is all or nothing): one by one
            await self._run(version, "-D", self.chain, *rule.argv(version))

    async def _restore(self, version: int, lines: list[list[str]]) -> bool:
        """Run rule commands in one ``iptables-restore --noflush`` transaction (one process
        instead of one per rule); False when it failed (nothing of it applied) or there is no
        restore command. The argv lists hold validated names and addresses only (no blanks,
        no quotes), so joining them with spaces is the restore format."""
        cmd = self._command(version)
        restore = shutil.which(f"{self.commands[version]}-restore")
        if cmd is None or restore is None:
            return False
        text = "\n".join(["*filter", *(" ".join(line) for line in lines), "COMMIT", ""])
        result = await run_process([*self._enter, restore, "--noflush", "-w", "10"],
                                   timeout=self.timeout, input=text.encode())
        return result.ok

    # ----- chain and jump ---------------------------------------------------------------
    async def _ensure_base(self, version: int) -> None:
        if version in self._base_ok:
            return
        if not await self._run(version, "-n", "-L", self.chain):
            await self._must(version, "-N", self.chain)
        if not await self._run(version, "-C", "FORWARD", "-j", self.chain):
            await self._must(version, "-I", "FORWARD", "1", "-j", self.chain)
        self._base_ok.add(version)

    async def _drop_base(self, version: int) -> None:
        self._base_ok.discard(version)
        for _ in range(8):
            if not await self._run(version, "-D", "FORWARD", "-j", self.chain):
                break
        if await self._run(version, "-n", "-L", self.chain):
            await self._run(version, "-F", self.chain)
            await self._run(version, "-X", self.chain)

    # ----- keeping it there -------------------------------------------------------------
    async def check(self, *, orphans: bool = False) -> list[int]:
        """Rebuild what someone else removed or changed; the IP versions rebuilt. With
        ``orphans`` (start-up, sync) the chain of a version without EIPs (left by a lost
        state directory) is removed too."""
        if not self.enabled:
            return []
        rebuilt = []
        async with self._lock:
            for version, eips in self.wanted.items():
                if self._command(version) is None:
                    continue
                if not eips:
                    if orphans and await self._run(version, "-n", "-L", self.chain):
                        log.warning("removing the %s chain %s: no EIP of this agent needs "
                                    "it", self.commands[version], self.chain)
                        await self._drop_base(version)
                    continue
                if await self._intact(version, eips):
                    continue
                self._base_ok.discard(version)
                log.warning("EIP rules in the host's %s FORWARD chain were changed by someone "
                            "else (docker restarted? firewall reloaded?); putting them back",
                            self.commands[version])
                await self._rebuild(version, eips)
                rebuilt.append(version)
                self.rebuilds += 1
        return rebuilt

    async def _listed(self, version: int) -> list[str]:
        """The chain's rules as ``-S`` prints them (empty: no chain, or no command)."""
        cmd = self._command(version)
        if cmd is None:
            return []
        listed = await run_process(self._argv(cmd, "-S", self.chain), timeout=self.timeout)
        if not listed.ok:
            return []
        return [line for line in listed.stdout.decode().splitlines() if line.startswith("-A ")]

    async def _intact(self, version: int, eips: dict[str, list[Rule]]) -> bool:
        """The jump is in FORWARD and the chain holds exactly the wanted rules, once each."""
        if not await self._run(version, "-C", "FORWARD", "-j", self.chain):
            return False
        listed = await self._listed(version)
        wanted = [rule.line(version, self.chain) for rules in eips.values() for rule in rules]
        return sorted(listed) == sorted(wanted)

    async def _rebuild(self, version: int, eips: dict[str, list[Rule]]) -> None:
        await self._ensure_base(version)
        rules = [rule for wanted in eips.values() for rule in wanted]
        if await self._restore(version, [["-F", self.chain]] +
                               [["-A", self.chain, *r.argv(version)] for r in rules]):
            return
        await self._must(version, "-F", self.chain)
        for rule in rules:
            await self._must(version, "-A", self.chain, *rule.argv(version))

    async def watch(self, interval: float, ready: asyncio.Event | None = None) -> None:
        """Run :meth:`check` every ``interval`` seconds, forever (a background task), from
        when ``ready`` is set: before the start-up restore has put every recorded EIP back
        into ``wanted``, the chain (still holding the last run's rules) would look changed
        and be rebuilt without the EIPs not restored yet, dropping their traffic."""
        if ready is not None:
            await ready.wait()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception:   # logged, tried again next round
                log.exception("checking the EIP rules in the host firewall failed")

    async def clear(self) -> None:
        """Remove the chain and its jumps whatever they hold (start-up: the records decide
        what comes back)."""
        if not self.enabled:
            return
        async with self._lock:
            for version in (4, 6):
                if self._command(version) is not None:
                    await self._drop_base(version)
