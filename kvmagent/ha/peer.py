"""``/filesystem/check/vmstate``: is another host still writing its heartbeat on a storage?

ZStack's agent (ZU ``file_system_check_vmstate``): no heartbeat file at the start means not
alive, at once. Otherwise a first good read is the reference, then up to ``times``+1 more reads,
each ``interval + storageCheckerTimeout`` after the previous one: the first whose time differs
from the reference means alive, with the VM uuids that read lists. Same here, except:
- times are compared as written (floats), not truncated to whole seconds, so two beats less
  than a second apart still count as a change;
- every read runs in a killable child bounded by ``storageCheckerTimeout`` (ZStack's plain
  ``open()`` hangs with the storage), and an unreadable, empty or vanished file counts as one
  failed read instead of failing the whole command;
- both heartbeat formats are understood: ZStack's (``vm_uuids`` a comma-joined string or null)
  and the list an older kvmagent wrote.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from .probe import StorageProbe, heartbeat_path, parse_heartbeat

log = logging.getLogger(__name__)


@dataclass
class PeerVerdict:
    alive: bool
    vm_uuids: list[str] = field(default_factory=list)
    reason: str = ""


async def check_peer(probe: StorageProbe, mount_path: str, host_uuid: str, times: int,
                     interval: float, timeout: float) -> PeerVerdict:
    """``probe`` is kept per mount path by the caller, so repeated checks of a hung storage
    wait for the one stuck reader instead of leaving a new one behind each time."""
    path = heartbeat_path(mount_path, host_uuid)
    first: float | None = None
    failures, reads = 0, 0
    last_error = ""
    while failures < times + 1:
        if first is not None:
            await asyncio.sleep(interval + timeout)
        result = await probe.read(path, timeout)
        reads += 1
        if result.missing and first is None and reads == 1:
            return PeerVerdict(False, [], f"no heartbeat file {path}")
        beat = parse_heartbeat(result.output) if result.ok else None
        if beat is None:
            failures += 1
            last_error = result.error if not result.ok else "empty or unreadable heartbeat"
            continue
        if first is None:
            first = beat[0]
        elif beat[0] != first:
            return PeerVerdict(True, beat[1], f"heartbeat advanced {beat[0] - first:.1f}s "
                                              f"in {reads} reads")
        else:
            failures += 1
            last_error = "heartbeat did not change"
    if first is None:
        return PeerVerdict(False, [], f"heartbeat {path} could not be read: {last_error}")
    return PeerVerdict(False, [], f"heartbeat did not change in {reads} reads over "
                                  f"{(reads - 1) * (interval + timeout):g}s")
