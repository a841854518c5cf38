"""EipManager: records, per-EIP serialisation, bounded parallel batches, rollback, restore.

Ordering and races
    Every operation on one EIP runs under ``ctx.locks.hold("eip", <netns name>)``. The key
    is the namespace name (derived from the uuid), not the uuid, so an orphan clean-up that
    only knows a name found on the host serialises with apply/delete of the EIP owning it.
    The lock is the first thing a handler awaits, and asyncio locks are FIFO, so operations
    on one EIP run in the order they reached the agent: a delete arriving while an apply is
    in flight waits for it and then removes everything. Work on different EIPs runs in
    parallel, bounded by one semaphore per agent (``parallel``), taken inside the lock.

Records (``ctx.state`` documents ``eips/<eipUuid>``)
    ``{"spec": {...}, "status": "applying"|"applied"|"deleting", "wasApplied": bool}``.
    The record is written *before* anything is built, so nothing this agent creates is ever
    unknown to it: after a crash, start-up finishes a ``deleting``, rolls back an ``applying``
    that was never applied, and re-converges (repairs) the rest, in the background.

Apply
    converge: check bridges -> namespace -> sysctls -> nftables (one transaction) -> veths,
    bridge ports, addresses, neighbour, route. Each step keeps what is right and replaces
    what is not, so apply is also "repair". A failed apply rolls back: a fresh EIP loses
    everything it created (record dropped); a re-apply of an applied EIP (new VIP, new NIC)
    converges back to the previously applied spec and keeps its record.

Timeouts
    Blocking steps run in ``ctx.runner`` with a timeout. A thread cannot be killed, so on a
    timeout (or a cancellation) the step is told to stop (prepare, converge and teardown check
    ``abort`` between netlink requests; a request in flight is bounded by netlink itself) and
    the operation waits, however long it takes, for the thread to return, logging an error
    every ``abort_grace`` seconds meanwhile. The EIP's lock is never released, and no rollback
    starts, while a thread still changes the EIP. A step given up like this
    (:class:`StepAbandoned`) is not rolled back: what it changed is unknown, so the record
    stays ``applying`` (or ``deleting``) and the next apply, delete, sync or start-up finishes
    the job from what it finds.

    Record writes (a small file and an fsync) run in ``ctx.runner`` too; the in-memory record
    is updated first, without an await, so the conflict check stays atomic.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.errors import AgentError, BlockingTimeout
from ..core.lazy import lazy_import
from . import nft
from .hostfw import HostFirewall
from .naming import DEFAULT_PREFIX, Names, Patterns, check_prefix
from .spec import EipSpec

if TYPE_CHECKING:
    from . import netlink
else:
    netlink = lazy_import(f"{__package__}.netlink")  # pyroute2: loaded on first EIP work

if TYPE_CHECKING:
    from ..core.context import AgentContext

log = logging.getLogger(__name__)

FOLDER = "eips"
LOCK_KIND = "eip"


@dataclass(frozen=True)
class EipSettings:
    prefix: str = DEFAULT_PREFIX       # names of namespaces and links (see naming.py)
    parallel: int = 8                  # EIPs worked on at once (batches, restore)
    netlink_timeout: float = 30.0      # one blocking netlink step
    process_timeout: float = 15.0      # nft / sysctl inside the namespace
    arp_timeout: float = 0.4           # how long the VIP duplicate probe listens
    abort_grace: float = 10.0          # after a timeout, log this often until the thread stops
    state_timeout: float = 15.0        # one record write (temp file, fsync, rename)
    host_firewall: bool = True         # accept rules in the host's FORWARD (see hostfw.py)
    firewall_check: float = 10.0       # how often those rules are checked (0: never)

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if self.parallel < 1:
            raise ValueError("parallel must be >= 1")


class StepAbandoned(BlockingTimeout):
    """A blocking step overran its timeout (or its task was cancelled). Its thread was told
    to stop and has returned, but what it changed is unknown: nothing is rolled back, the
    record keeps its ``applying``/``deleting`` status for the next settle or apply."""


@dataclass
class BatchFailure:
    eip_uuid: str
    error: str


class EipManager:
    def __init__(self, ctx: AgentContext, settings: EipSettings | None = None):
        self.ctx = ctx
        self.settings = settings or EipSettings()
        self.patterns = Patterns(self.settings.prefix)
        self.records: dict[str, dict[str, Any]] = {}
        self._by_hash: dict[str, str] = {}
        self._sem = asyncio.Semaphore(self.settings.parallel)
        self._seq = itertools.count(1)
        # Operations in the order they were serialised (seq), for debugging and tests.
        self.history: deque[dict[str, Any]] = deque(maxlen=4096)
        self.restored = asyncio.Event()
        self.firewall = HostFirewall(self.settings.prefix, timeout=self.settings.process_timeout,
                                     enabled=self.settings.host_firewall)

    # ----- names and records --------------------------------------------------------------
    def names(self, eip_uuid: str) -> Names:
        return Names.of(self.settings.prefix, eip_uuid)

    def load(self) -> None:
        for doc_name in self.ctx.state.names(FOLDER):
            doc = self.ctx.state.load(doc_name)
            try:
                spec = EipSpec.from_dict(doc["spec"])
                status = doc["status"]
            except (KeyError, TypeError, ValueError) as exc:
                log.error("EIP record %s is invalid (%s); ignored", doc_name, exc)
                continue
            self._remember(spec.eip_uuid, doc | {"status": status})
        log.info("EIP records loaded: %d", len(self.records))

    def _remember(self, eip_uuid: str, record: dict[str, Any]) -> None:
        self.records[eip_uuid] = record
        self._by_hash[self.names(eip_uuid).hash] = eip_uuid

    async def _write(self, eip_uuid: str, record: dict[str, Any] | None) -> None:
        """Write (or, for None, delete) the record file off the event loop."""
        doc = f"{FOLDER}/{eip_uuid}"
        if record is None:
            await self.ctx.runner.run(self.ctx.state.delete, doc,
                                      timeout=self.settings.state_timeout,
                                      what=f"delete EIP record {eip_uuid}")
        else:
            await self.ctx.runner.run(self.ctx.state.save, doc, record,
                                      timeout=self.settings.state_timeout,
                                      what=f"save EIP record {eip_uuid}")

    async def _save(self, spec: EipSpec, status: str, was_applied: bool) -> None:
        record = {"spec": spec.to_dict(), "status": status, "wasApplied": was_applied,
                  "netns": self.names(spec.eip_uuid).netns, "updated": time.time()}
        self._remember(spec.eip_uuid, record)   # in memory first: no await before it
        await self._write(spec.eip_uuid, record)

    async def _restore_record(self, eip_uuid: str, record: dict[str, Any]) -> None:
        self._remember(eip_uuid, record)
        await self._write(eip_uuid, record)

    async def _drop(self, eip_uuid: str) -> None:
        await self._write(eip_uuid, None)
        self.records.pop(eip_uuid, None)
        h = self.names(eip_uuid).hash
        if self._by_hash.get(h) == eip_uuid:
            del self._by_hash[h]

    def spec_of(self, eip_uuid: str) -> EipSpec | None:
        record = self.records.get(eip_uuid)
        return EipSpec.from_dict(record["spec"]) if record else None

    def applied(self) -> list[str]:
        return sorted(u for u, r in self.records.items() if r["status"] == "applied")

    # ----- serialisation --------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _op(self, op: str, eip_uuid: str) -> AsyncIterator[dict[str, Any]]:
        names = self.names(eip_uuid)
        async with self.ctx.locks.hold(LOCK_KIND, names.netns):
            entry: dict[str, Any] = {"seq": next(self._seq), "eip": eip_uuid, "op": op,
                                     "start": time.monotonic(), "ok": False}
            try:
                async with self._sem:
                    entry["began"] = time.monotonic()   # holds the lock and a work slot
                    yield entry
                entry["ok"] = True
            except BaseException as exc:
                entry["error"] = str(exc) or type(exc).__name__
                raise
            finally:
                entry["end"] = time.monotonic()
                self.history.append(entry)

    async def _blocking(self, fn: Callable[[threading.Event], Any], what: str) -> Any:
        """Run ``fn(abort)`` in the runner. On a timeout or a cancellation, set ``abort`` and
        wait until the thread has returned (never giving up), then raise
        :class:`StepAbandoned` (or re-raise the cancellation): the caller's lock is never
        released, nor a rollback started, while a thread still changes this EIP."""
        loop = asyncio.get_running_loop()
        abort = threading.Event()
        finished = asyncio.Event()
        gate = threading.Lock()
        phase = {"running": False, "given_up": False}

        def work() -> Any:
            with gate:
                if phase["given_up"]:   # queued behind other work and given up meanwhile
                    return None
                phase["running"] = True
            try:
                return fn(abort)
            finally:
                with contextlib.suppress(RuntimeError):   # the loop is gone (shutdown)
                    loop.call_soon_threadsafe(finished.set)

        timeout = self.settings.netlink_timeout
        try:
            return await self.ctx.runner.run(work, timeout=timeout, what=what)
        except (netlink.NetlinkError, OSError) as exc:   # one line a human can act on
            raise AgentError(f"{what}: {exc}") from exc
        except (BlockingTimeout, asyncio.CancelledError) as exc:
            abort.set()
            with gate:
                phase["given_up"] = True
                running = phase["running"]
            cancelled = isinstance(exc, asyncio.CancelledError)
            if running:
                cancelled = await self._wait_stopped(finished, what) or cancelled
            if cancelled:
                raise asyncio.CancelledError() from None
            raise StepAbandoned(f"{what} did not finish within {timeout:g}s and was stopped; "
                                "the EIP is left for the next apply or sync to finish") from None

    async def _wait_stopped(self, finished: asyncio.Event, what: str) -> bool:
        """Wait for an aborted step's thread to return, logging loudly meanwhile. True when
        this task was cancelled while waiting (the caller re-raises once the thread is done)."""
        cancelled = False
        waited = 0.0
        while not finished.is_set():
            try:
                await asyncio.wait_for(finished.wait(), self.settings.abort_grace)
            except TimeoutError:
                waited += self.settings.abort_grace
                log.error("%s: still running %gs after it was told to stop; the EIP stays "
                          "locked until it returns", what, waited)
            except asyncio.CancelledError:
                cancelled = True
        return cancelled

    # ----- apply / delete -------------------------------------------------------------------
    async def apply(self, spec: EipSpec, op: str = "apply") -> netlink.ApplyReport:
        async with self._op(op, spec.eip_uuid):
            return await self._apply_locked(spec)

    async def _apply_locked(self, spec: EipSpec) -> netlink.ApplyReport:
        names = self.names(spec.eip_uuid)
        owner = self._by_hash.get(names.hash)
        if owner is not None and owner != spec.eip_uuid:
            raise AgentError(f"eipUuid {spec.eip_uuid} maps to the same names ({names.netns}) "
                             f"as EIP {owner}; delete that EIP first")
        self._check_conflicts(spec)
        previous = self.records.get(spec.eip_uuid)
        was_applied = bool(previous and (previous["status"] == "applied"
                                         or previous.get("wasApplied")))
        report = netlink.ApplyReport()
        await self._save(spec, "applying", was_applied)
        try:
            await self._converge(spec, names, report, fresh=previous is None)
        except (StepAbandoned, asyncio.CancelledError) as exc:
            log.error("apply of EIP %s abandoned (%s); no rollback, the record stays "
                      "'applying' for the next apply or sync", spec.eip_uuid,
                      exc or type(exc).__name__)
            raise
        except BaseException as exc:
            log.warning("apply of EIP %s failed (%s); rolling back", spec.eip_uuid, exc)
            await self._rollback(spec, names, report, previous if was_applied else None)
            raise
        await self._save(spec, "applied", True)
        return report

    async def _converge(self, spec: EipSpec, names: Names, report: netlink.ApplyReport, *,
                        fresh: bool = False) -> None:
        await self._blocking(lambda abort: netlink.prepare(spec, names, report, abort=abort),
                             f"prepare namespace {names.netns}")
        await nft.set_sysctls(names, timeout=self.settings.process_timeout,
                              ip_version=spec.ip_version)
        await nft.apply_ruleset(names, nft.build_ruleset(spec, names),
                                timeout=self.settings.process_timeout)
        await self.firewall.add(spec, names, fresh=fresh)
        await self._blocking(
            lambda abort: netlink.converge_links(spec, names, report, abort=abort,
                                                 arp_timeout=self.settings.arp_timeout),
            f"links of {names.netns}")

    async def _teardown(self, eip_uuid: str, names: Names, spec: EipSpec | None) -> list[str]:
        """Remove everything of one EIP: host firewall rules, fdb entries, links, namespace."""
        await self.firewall.remove(eip_uuid, spec, names)

        def work(abort: threading.Event) -> list[str]:
            removed = netlink.teardown(names, abort=abort)
            if spec is None or spec.fdb_nic:   # without a record: look for it anyway
                removed += netlink.remove_fdb(eip_uuid)
            return removed

        return await self._blocking(work, f"remove {names.netns}")

    def _check_conflicts(self, spec: EipSpec) -> None:
        """One EIP per VIP and per NIC address on a VM bridge: two namespaces answering ARP
        for the same gateway to one NIC would send its replies through the wrong NAT. The
        check and the record written right after it run without an await in between, so two
        concurrent applies cannot both pass it."""
        for other_uuid, record in self.records.items():
            if other_uuid == spec.eip_uuid:
                continue
            other = record["spec"]
            if other["vip"] == spec.vip:
                raise AgentError(f"vip {spec.vip} is already used by EIP {other_uuid}")
            if (other["nic_ip"], other["vm_bridge_name"]) == (spec.nic_ip, spec.vm_bridge_name):
                raise AgentError(f"nicIp {spec.nic_ip} on {spec.vm_bridge_name} already has "
                                 f"EIP {other_uuid}; delete it first")

    async def _rollback(self, spec: EipSpec, names: Names, report: netlink.ApplyReport,
                        previous: dict[str, Any] | None) -> None:
        """Undo a failed apply. A fresh EIP: remove everything it created, drop the record.
        A re-apply of an applied EIP: converge back to the previous spec (the pieces this
        apply created are reused where they fit) and keep the previous record."""
        try:
            if previous is None:
                await self._teardown(spec.eip_uuid, names, spec)
            else:
                before = dataclasses.replace(EipSpec.from_dict(previous["spec"]),
                                             skip_arp_check=True)  # the old VIP was ours
                await self._converge(before, names, netlink.ApplyReport())
        except BaseException:
            log.exception("rollback of EIP %s failed; a repair (restart, sync) finishes it",
                          spec.eip_uuid)
            if previous is not None:
                await self._restore_record(spec.eip_uuid, previous)
            return   # a fresh EIP keeps its "applying" record: the next settle removes it
        if previous is not None:
            await self._restore_record(spec.eip_uuid, previous)
        else:
            await self._drop(spec.eip_uuid)

    async def delete(self, eip_uuid: str, op: str = "delete") -> list[str]:
        async with self._op(op, eip_uuid):
            return await self._delete_locked(eip_uuid)

    async def _delete_locked(self, eip_uuid: str) -> list[str]:
        names = self.names(eip_uuid)
        record = self.records.get(eip_uuid)
        if record is not None and record["status"] != "deleting":
            record = dict(record, status="deleting")
            await self._restore_record(eip_uuid, record)
        spec = EipSpec.from_dict(record["spec"]) if record is not None else None
        removed = await self._teardown(eip_uuid, names, spec)
        await self._drop(eip_uuid)
        return removed

    # ----- many at once ---------------------------------------------------------------------
    async def batch(self, op: str, items: list[Any]) -> list[BatchFailure]:
        """Apply (``items``: specs) or delete (``items``: uuids) in parallel; failures listed."""

        async def one(item: Any) -> BatchFailure | None:
            eip_uuid = item.eip_uuid if isinstance(item, EipSpec) else item
            try:
                if op == "apply":
                    await self.apply(item)
                else:
                    await self.delete(eip_uuid)
            except AgentError as exc:
                return BatchFailure(eip_uuid, str(exc))
            except Exception as exc:
                log.exception("%s of EIP %s failed unexpectedly", op, eip_uuid)
                return BatchFailure(eip_uuid, f"internal error: {type(exc).__name__}: {exc}")
            return None

        results = await asyncio.gather(*(one(item) for item in items))
        return [r for r in results if r is not None]

    async def delete_vms(self, vm_uuids: list[str]) -> list[str]:
        """Delete every EIP of these VMs (the self-fencer killed them); their uuids."""
        wanted = {u.lower() for u in vm_uuids}
        targets = sorted(u for u, r in self.records.items()
                         if r["spec"]["vm_uuid"] in wanted)
        failures = await self.batch("delete", targets)
        if failures:
            raise AgentError("; ".join(f"{f.eip_uuid}: {f.error}" for f in failures))
        if targets:
            log.info("deleted EIPs %s of killed VMs %s", targets, sorted(wanted))
        return targets

    # ----- restore and sync -----------------------------------------------------------------
    async def _settle(self, eip_uuid: str, op: str) -> str:
        """Bring one recorded EIP to a final state, deciding under its lock: finish an
        interrupted delete or a never-applied apply ("removed"), re-converge an applied one
        ("repaired" when something had to change, else "ok")."""
        async with self._op(op, eip_uuid):
            record = self.records.get(eip_uuid)
            if record is None:
                return "gone"
            if record["status"] == "deleting" or (
                    record["status"] == "applying" and not record.get("wasApplied")):
                await self._delete_locked(eip_uuid)
                return "removed"
            report = await self._apply_locked(EipSpec.from_dict(record["spec"]))
            return "repaired" if _changed(report) else "ok"

    async def _settle_all(self, op: str) -> tuple[dict[str, list[str]], list[BatchFailure]]:
        outcome: dict[str, list[str]] = {"repaired": [], "ok": [], "removed": [], "gone": []}
        failures: list[BatchFailure] = []

        async def one(eip_uuid: str) -> None:
            try:
                outcome[await self._settle(eip_uuid, op)].append(eip_uuid)
            except AgentError as exc:
                log.error("%s of EIP %s failed: %s", op, eip_uuid, exc)
                failures.append(BatchFailure(eip_uuid, str(exc) or type(exc).__name__))
            except Exception as exc:
                log.exception("%s of EIP %s failed unexpectedly", op, eip_uuid)
                failures.append(BatchFailure(eip_uuid, f"internal error: {type(exc).__name__}: "
                                                       f"{exc}"))

        await asyncio.gather(*(one(u) for u in sorted(self.records)))
        return outcome, failures

    async def restore(self) -> dict[str, list[str]]:
        """Start-up: finish interrupted work, repair recorded EIPs. Runs in the background."""
        try:
            outcome, failures = await self._settle_all("restore")
            outcome["failed"] = [f.eip_uuid for f in failures]
            await self.firewall.check(orphans=True)   # rules of EIPs deleted while down go
            log.info("EIP restore: %s", {k: len(v) for k, v in outcome.items()})
            return outcome
        finally:
            self.restored.set()

    async def sync(self, *, remove_orphans: bool = True, repair: bool = True) -> dict[str, Any]:
        """Remove namespaces/links named with our prefix that no record owns; settle the rest."""
        spaces, links = await self._blocking(lambda abort: netlink.list_owned(self.patterns),
                                             "list EIP namespaces")
        orphans: dict[str, list[str]] = {}
        for name, h in list(spaces.items()) + list(links.items()):
            if h not in self._by_hash:
                orphans.setdefault(h, []).append(name)
        removed: list[str] = []
        failed: list[BatchFailure] = []
        if remove_orphans:
            for h in sorted(orphans):
                names = Names(self.settings.prefix, h)
                async with self.ctx.locks.hold(LOCK_KIND, names.netns):
                    if h in self._by_hash:  # an apply claimed it meanwhile
                        continue
                    try:
                        removed += await self._blocking(
                            lambda abort, names=names: netlink.teardown(names, abort=abort),
                            f"remove orphan {names.netns}")
                    except AgentError as exc:
                        failed.append(BatchFailure(names.netns, str(exc)))
        repaired: list[str] = []
        if repair:
            outcome, failures = await self._settle_all("repair")
            repaired = sorted(outcome["repaired"])
            failed += failures
        await self.firewall.check(orphans=remove_orphans)
        return {"eips": self.applied(), "orphans_removed": sorted(removed),
                "repaired": repaired, "failed": failed}

    async def observe(self, eip_uuid: str) -> netlink.Observed:
        names = self.names(eip_uuid)
        return await self._blocking(lambda abort: netlink.observe(names), f"observe {names.netns}")


def _changed(report: netlink.ApplyReport) -> bool:
    return bool(report.created_netns or report.created_pairs or report.removed)
