"""VM lifecycle on libvirt, state reports and the per-VM HA flag.

Domains are named by the VM uuid and defined persistently while they run (virtiofs shares
are added to the definition too); stop and destroy undefine them, since the MN holds the
truth and the next start defines the domain afresh.

The HA flag lives in the domain's metadata (``kvmagent`` namespace, live and config), so it
survives agent restarts. A cache of the flags, built in one parallel pass and kept current by
our own writes and libvirt's metadata-change events, lets a reconcile over hundreds of VMs
touch only the domains whose flag changes.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import libvirt
import psutil

from ..core.context import AgentContext
from ..core.errors import AgentError, NotFoundError
from ..core.libvirt_conn import libvirt_message
from ..core.validate import confine
from . import states
from .config import HA_NAMESPACE, HA_PREFIX, Domain, ha_metadata_xml, parse_ha_metadata

log = logging.getLogger(__name__)

REPORT_PATH = "/kvm/reportvmstate"


def _lookup(conn: libvirt.virConnect, uuid: str, by_name: bool = False) -> libvirt.virDomain | None:
    """The domain, or None when it does not exist (our domains are named by their uuid)."""
    try:
        return conn.lookupByName(uuid) if by_name else conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _metadata_flags(dom: libvirt.virDomain) -> int:
    flags = 0
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    if dom.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return flags


def read_ha_flag(dom: libvirt.virDomain) -> bool:
    try:
        return parse_ha_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, HA_NAMESPACE, 0))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
            return False
        raise


def write_ha_flag(dom: libvirt.virDomain, enable: bool) -> None:
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ha_metadata_xml(enable), HA_PREFIX,
                    HA_NAMESPACE, _metadata_flags(dom))


def all_codes(conn: libvirt.virConnect) -> dict[str, int]:
    """name -> libvirt state code for every domain, in one round trip where the driver allows."""
    try:
        stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
        return {dom.name(): values.get("state.state", -1) for dom, values in stats}
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        return {dom.name(): dom.state()[0] for dom in conn.listAllDomains()}


def all_states(conn: libvirt.virConnect) -> dict[str, str]:
    """name -> KvmVmState for every domain."""
    return {name: states.state_name(code) for name, code in all_codes(conn).items()}


def chunks(items: list, count: int) -> list[list]:
    count = max(1, min(count, len(items)))
    return [items[i::count] for i in range(count)] if items else []


class VmService:
    def __init__(self, ctx: AgentContext):
        self.ctx = ctx
        self.config = ctx.config
        self._ha: dict[str, bool] | None = None
        self._ha_generation = 0
        self._known: dict[str, str] = {}  # the state the MN last learned, per VM
        self._debounce: dict[str, asyncio.TimerHandle] = {}
        self._domain_type: str | None = None
        self._synced = False  # first connection: learn states, report nothing

    # -- plumbing ---------------------------------------------------------------------------
    async def start(self) -> None:
        lv = self.ctx.libvirt
        lv.on_reconnect(self._after_reconnect)
        try:
            await lv.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle)
            await lv.subscribe(libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata)
            await self.call(all_states)  # opens the connection; _after_reconnect learns states
        except AgentError as exc:
            log.warning("VM events not subscribed yet (%s); will subscribe on reconnect", exc)

    async def close(self) -> None:
        for handle in self._debounce.values():
            handle.cancel()
        self._debounce.clear()

    def lock(self, uuid: str):
        return self.ctx.locks.hold("vm", uuid)

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        try:
            return await self.ctx.libvirt.call(fn, *args, timeout=timeout)
        except libvirt.libvirtError as exc:
            raise AgentError(f"libvirt: {libvirt_message(exc)}") from None

    async def domain_type(self) -> str:
        if self._domain_type is None:
            wanted = self.config.domain_type
            if wanted == "auto":
                caps = await self.call(lambda conn: conn.getCapabilities())
                usable = os.access("/dev/kvm", os.R_OK | os.W_OK) and "type='kvm'" in caps.replace('"', "'")
                wanted = "kvm" if usable else "qemu"
                log.info("domain type probed: %s", wanted)
            self._domain_type = wanted
        return self._domain_type

    def check_path(self, path: str, what: str, must_exist: bool = True) -> str:
        try:
            real = confine(path, self.config.vm_path_roots, what)
        except AgentError as exc:
            raise AgentError(f"{exc}; to allow it, add its primary storage directory to "
                             "vm_path_roots in the agent's configuration file") from None
        state = Path(os.path.realpath(self.config.state_dir))
        if real == state or state in real.parents:  # QEMU must never write the agent's state
            raise AgentError(f"{what}: {path} is inside the agent's state dir {state}")
        if must_exist and not real.exists():
            raise AgentError(f"{what}: {path} does not exist")
        return str(real)

    def check_block(self, path: str, what: str) -> str:
        """A block volume: named inside vm_block_roots, a block device, not mounted here."""
        if not any(Path(path) == root or Path(root) in Path(path).parents
                   for root in self.config.vm_block_roots):
            allowed = ", ".join(str(r) for r in self.config.vm_block_roots)
            raise AgentError(f"{what}: {path} is outside the block device roots ({allowed}); "
                             "add its directory to vm_block_roots in the agent's configuration")
        real = os.path.realpath(path)
        try:
            mode = os.stat(real).st_mode
        except OSError as exc:
            raise AgentError(f"{what}: {path}: {exc.strerror}") from None
        if not stat.S_ISBLK(mode):
            raise AgentError(f"{what}: {path} ({real}) is not a block device")
        for part in psutil.disk_partitions(all=True):
            if part.device.startswith("/") and os.path.realpath(part.device) == real:
                raise AgentError(f"{what}: {path} ({real}) is mounted on this host at "
                                 f"{part.mountpoint}; refusing to give it to a VM")
        return path

    def check_bridge(self, bridge: str) -> None:
        if not (Path(self.config.sysfs_root) / "class/net" / bridge / "bridge").is_dir():
            raise AgentError(f"nics: bridge {bridge} does not exist on this host")

    # -- lifecycle --------------------------------------------------------------------------
    async def start_vm(self, spec: Domain, paused: bool = False) -> tuple[str, str]:
        """(KvmVmState, live domain XML); a running domain is left alone (its HA flag set)."""
        async with self.lock(spec.name):
            xml = spec.to_xml()

            def start(conn: libvirt.virConnect) -> tuple[str, bool, str]:
                dom = _lookup(conn, spec.uuid)
                if dom is not None and dom.isActive():
                    if read_ha_flag(dom) != spec.enable_ha:
                        write_ha_flag(dom, spec.enable_ha)
                    return states.state_name(dom.state()[0]), False, dom.XMLDesc(0)
                dom = conn.defineXML(xml)
                try:
                    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
                except libvirt.libvirtError:
                    dom.undefine()  # a failed start leaves nothing behind
                    raise
                return states.state_name(dom.state()[0]), True, dom.XMLDesc(0)

            try:
                state, created, live = await self.call(
                    start, timeout=max(self.config.libvirt_call_timeout, 120))
            except AgentError as exc:
                if "hugetlbfs" in str(exc):  # libvirtd looks for hugetlbfs mounts when it starts
                    raise AgentError(
                        f"useHugePage: {exc}; libvirtd knows no hugetlbfs mount: mount one (e.g. "
                        "/dev/hugepages, as systemd does at boot) and restart libvirtd, or set "
                        "hugetlbfs_mount in /etc/libvirt/qemu.conf") from None
                raise
            self._set_known(spec.name, state)
            self._flag_changed(spec.name, spec.enable_ha)
            log.info("VM %s %s (%s)", spec.name, "started" if created else "already running", state)
            return state, live

    async def stop_vm(self, uuid: str, how: str, timeout: float) -> None:
        async with self.lock(uuid):
            dom = await self.call(_lookup, uuid)
            if dom is None:
                self._set_known(uuid, states.SHUTDOWN)
                return
            if how == "grace" and await self.call(lambda c: dom.isActive()):
                await self.call(lambda c: dom.shutdown())
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and await self.call(lambda c: dom.isActive()):
                    await asyncio.sleep(0.25)
                if await self.call(lambda c: dom.isActive()):
                    log.warning("VM %s did not shut down within %gs; destroying it", uuid, timeout)
            await self.call(self._destroy_and_undefine, dom)
            self._set_known(uuid, states.SHUTDOWN)

    async def destroy_vm(self, uuid: str) -> None:
        await self.stop_vm(uuid, "force", 0)

    @staticmethod
    def _destroy_and_undefine(conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                try:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                      | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                      | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                except libvirt.libvirtError:
                    dom.undefine()  # drivers without those flags (test:///)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:  # gone meanwhile: fine
                raise

    async def _running_domain(self, uuid: str) -> libvirt.virDomain:
        dom = await self.call(_lookup, uuid)
        if dom is None:
            raise NotFoundError(f"VM {uuid} does not exist on this host")
        return dom

    async def simple_op(self, uuid: str, op: str) -> str:
        """reboot, pause or resume; returns the state afterwards."""
        async with self.lock(uuid):
            dom = await self._running_domain(uuid)
            if not await self.call(lambda c: dom.isActive()):
                raise AgentError(f"cannot {op} VM {uuid}: it is not running")
            actions = {"reboot": lambda c: dom.reboot(0), "pause": lambda c: dom.suspend(),
                       "resume": lambda c: dom.resume()}
            await self.call(actions[op])
            state = states.state_name((await self.call(lambda c: dom.state()))[0])
            self._set_known(uuid, state if op != "reboot" else states.RUNNING)
            return state

    async def sync_states(self) -> tuple[dict[str, str], list[str]]:
        """(KvmVmState of every domain, the ones libvirt says are shutting down): vmsync."""
        codes = await self.call(all_codes)
        return ({name: states.state_name(code) for name, code in codes.items()},
                sorted(name for name, code in codes.items() if states.is_shutting_down(code)))

    async def states_of(self, uuids: Iterable[str] | None = None) -> dict[str, str]:
        """KvmVmState per VM; a VM with no domain here is Shutdown (what the MN expects)."""
        found = await self.call(all_states)
        if uuids is None:
            return found
        normal = {name.replace("-", "").lower(): state for name, state in found.items()}
        return {u: found.get(u) or normal.get(u.replace("-", "").lower(), states.SHUTDOWN) for u in uuids}

    # -- HA flag ----------------------------------------------------------------------------
    async def ha_flags(self) -> dict[str, bool]:
        """VM uuid -> enableHa for every domain on the host (network groups read this)."""
        while self._ha is None:
            # A flag written (by us or anyone: metadata event) while we read makes what we
            # read stale: then read again rather than cache an old value.
            generation = self._ha_generation
            names: list[str] = await self.call(lambda c: [d.name() for d in c.listAllDomains()])

            flags = await self._per_domain([(n, None) for n in names],
                                           lambda dom, _: read_ha_flag(dom))
            if generation == self._ha_generation:
                self._ha = flags
        return dict(self._ha)

    async def _per_domain(self, items: list[tuple[str, Any]],
                          op: Callable[[libvirt.virDomain, Any], Any]) -> dict[str, Any]:
        """``op(domain, arg)`` for each (name, arg), in parallel chunks over the libvirt pool
        (not one round trip after another); domains that vanished meanwhile are skipped."""
        def run(conn: libvirt.virConnect, part: list[tuple[str, Any]]) -> dict[str, Any]:
            results = {}
            for name, arg in part:
                try:
                    results[name] = op(conn.lookupByName(name), arg)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return results

        parts = await asyncio.gather(*(self.call(run, p) for p in
                                       chunks(items, self.config.libvirt_workers)))
        return {name: result for part in parts for name, result in part.items()}

    def _flag_changed(self, name: str, enable: bool | None) -> None:
        """Record a flag change (None: the domain is gone) in the cache and its generation."""
        self._ha_generation += 1
        if self._ha is not None:
            if enable is None:
                self._ha.pop(name, None)
            else:
                self._ha[name] = enable

    async def ha_enabled_vms(self) -> set[str]:
        return {uuid for uuid, on in (await self.ha_flags()).items() if on}

    async def set_ha(self, uuid: str, enable: bool) -> None:
        async with self.lock(uuid):
            dom = await self._running_domain(uuid)
            await self.call(lambda c: write_ha_flag(dom, enable))
            self._flag_changed(uuid, enable)

    async def reconcile_ha(self, wanted: set[str]) -> tuple[list[str], list[str], list[str]]:
        """Make exactly ``wanted`` HA-enabled; returns (enabled, disabled, missing)."""
        current = await self.ha_flags()
        missing = sorted(u for u in wanted if u not in current)
        changes = [(u, u in wanted) for u, on in current.items() if (u in wanted) != on]

        def write(dom: libvirt.virDomain, enable: bool) -> bool:
            write_ha_flag(dom, enable)
            return enable

        applied = list((await self._per_domain(changes, write)).items())
        for name, enable in applied:
            self._flag_changed(name, enable)
        return (sorted(u for u, on in applied if on), sorted(u for u, on in applied if not on),
                missing)

    # -- events and reports -----------------------------------------------------------------
    def _on_lifecycle(self, uuid: str, name: str, args: tuple) -> None:
        event = args[0] if args else None
        if event in (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED):
            self._ha_generation += 1
            self.ctx.spawn(self._refresh_flag(name), name=f"ha-flag {name}")
        self._schedule_check(name)

    def _on_metadata(self, uuid: str, name: str, args: tuple) -> None:
        self._ha_generation += 1
        self.ctx.spawn(self._refresh_flag(name), name=f"ha-flag {name}")

    async def _refresh_flag(self, name: str) -> None:
        def read(conn: libvirt.virConnect) -> bool | None:
            dom = _lookup(conn, name, by_name=True)
            return None if dom is None else read_ha_flag(dom)
        try:
            flag = await self.call(read)
        except AgentError:
            self._ha = None
            return
        self._flag_changed(name, flag)

    def _schedule_check(self, name: str) -> None:
        old = self._debounce.pop(name, None)
        if old:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._debounce[name] = loop.call_later(
            self.config.vm_state_report_debounce,
            lambda: self.ctx.spawn(self._check_and_report(name), name=f"vm-state {name}"))

    async def _check_and_report(self, name: str) -> None:
        self._debounce.pop(name, None)
        if self.ctx.locks.locked("vm", name):
            self._schedule_check(name)  # a command is working on it: look again afterwards
            return
        state = (await self.states_of([name]))[name]
        self._report_if_changed(name, state)

    def _report_if_changed(self, name: str, state: str) -> None:
        if self._known.get(name) == state:
            return
        self._known[name] = state
        self.ctx.reporter.report(REPORT_PATH, {"vmUuid": name, "vmState": state})

    def _set_known(self, name: str, state: str) -> None:
        self._known[name] = state

    async def _after_reconnect(self) -> None:
        """libvirtd came back: VMs may have changed while it was away; report differences."""
        self._ha = None
        try:
            current = await self.call(all_states)
        except AgentError:
            return
        if not self._synced:
            self._synced = True
            self._known = {**current, **self._known}
            return
        for name in set(self._known) | set(current):
            self._report_if_changed(name, current.get(name, states.SHUTDOWN))


