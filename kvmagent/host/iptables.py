"""ConnectCmd ``iptablesRules``: the operator's own host rules, set in the MN's
zstack.properties (``KvmHost.iptables.rule.N = -A INPUT ... -j ACCEPT``), applied at each connect.

The reference agent (ZU host_plugin.py ``apply_iptables_rules``) runs each string through
bash as ``iptables -w <rule>`` unless ``iptables -C`` finds it. Here a rule is split into
arguments (shlex, never a shell) and must *add* something: ``-A``/``-I <chain>`` or ``-N <chain>``,
optionally after ``-t <table>``. Rules that delete, flush or change policies are refused, every
rule is checked before any is applied, and an existing rule is not added twice.
"""
from __future__ import annotations

import logging
import re
import shlex

from ..core.blocking import run_process
from ..core.errors import AgentError

log = logging.getLogger(__name__)

TABLES = ("filter", "nat", "mangle", "raw")
_CHAIN = re.compile(r"^[A-Za-z0-9_.-]{1,28}$")
TIMEOUT = 10.0


def plan(rules: list[str]) -> list[tuple[list[str], list[str]]]:
    """(check argv, add argv) per rule; an AgentError naming the first rule refused."""
    steps = []
    for i, rule in enumerate(rules):
        what = f"iptablesRules.{i} ({rule!r})"
        try:
            args = shlex.split(rule)
        except ValueError as exc:
            raise AgentError(f"{what}: {exc}") from None
        table: list[str] = []
        if args[:1] == ["-t"]:
            if len(args) < 2 or args[1] not in TABLES:
                raise AgentError(f"{what}: table must be one of {', '.join(TABLES)}")
            table, args = args[:2], args[2:]
        if len(args) < 2 or args[0] not in ("-A", "-I", "-N") or not _CHAIN.match(args[1]):
            raise AgentError(f"{what}: only rules that add (-A or -I <chain> ..., -N <chain>) "
                             "are applied; put other changes in the host's own firewall")
        op, chain, rest = args[0], args[1], args[2:]
        if op == "-N":
            if rest:
                raise AgentError(f"{what}: -N takes only a chain name")
            check = [*table, "-S", chain]
        else:
            if op == "-I" and rest[:1] and rest[0].isdigit():
                rest = rest[1:]  # -C takes no position
            check = [*table, "-C", chain, *rest]
        steps.append((check, [*table, *args]))
    return steps


async def apply(command: list[str], rules: list[str]) -> int:
    """Apply the rules missing; returns how many were added."""
    added = 0
    for check, add in plan(rules):
        found = await run_process([*command, "-w", *check], timeout=TIMEOUT)
        if found.ok:
            continue
        if found.returncode != 1:  # 1: no such rule; anything else: the check itself failed
            raise AgentError(f"iptablesRules: checking '{shlex.join(check)}' failed: "
                             f"{found.describe()}")
        result = await run_process([*command, "-w", *add], timeout=TIMEOUT)
        if not result.ok:
            raise AgentError(f"iptablesRules: '{shlex.join(add)}' failed: {result.describe()}")
        log.info("iptables rule added: %s", shlex.join(add))
        added += 1
    return added
