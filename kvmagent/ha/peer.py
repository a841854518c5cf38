"""``/filesystem/check/vmstate``: is another host still writing its heartbeat on a storage?"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from .probe import StorageProbe, heartbeat_path

log = logging.getLogger(__name__)


@dataclass
class PeerVerdict:
    alive: bool
    vm_uuids: list[str] = field(default_factory=list)
    reason: str = ""


async def check_peer(probe: StorageProbe, mount_path: str, host_uuid: str, times: int,
                     interval: float, timeout: float) -> PeerVerdict:
    """Read the peer's heartbeat ``times`` times ``interval`` apart; alive if its time moved.

    ``probe`` is kept per mount path by the caller, so repeated checks of a hung storage wait
    for the one stuck reader instead of leaving a new one behind each time."""
    path = heartbeat_path(mount_path, host_uuid)
    seen: list[float] = []
    vm_uuids: list[str] = []
    errors = []
    for attempt in range(times):
        if attempt:
            await asyncio.sleep(interval)
        result = await probe.read(path, timeout)
        if not result.ok:
            errors.append(result.error)
            continue
        try:
            doc = json.loads(result.output)
            seen.append(float(doc["heartbeat_time"]))
            vm_uuids = [str(u) for u in doc.get("vm_uuids", [])]
        except (ValueError, KeyError, TypeError) as exc:
            errors.append(f"unreadable heartbeat: {exc}")
    if len(set(seen)) > 1:
        return PeerVerdict(True, vm_uuids, f"heartbeat advanced {seen[-1] - seen[0]:.1f}s in {times} reads")
    if not seen:
        reason = f"heartbeat {path} could not be read: {errors[-1] if errors else 'no reads'}"
    else:
        reason = f"heartbeat did not change in {len(seen)} reads over {interval * (times - 1):g}s"
    return PeerVerdict(False, vm_uuids, reason)
