"""The health watcher: probes every model-center mount, remounts dead or hung ones.

Timing (config keys):

=================================  ==========================================================
``modelcenter_health_interval``    I: pause between rounds (each mount probed once a round)
``modelcenter_probe_timeout``      T: a statfs that takes longer marks the mount hung
``modelcenter_remount_after``      N: consecutive failed probes before a remount
=================================  ==========================================================

A problem is noticed at most I + T after it starts; a remount starts at most
N * (I + T) after it starts. After a failed (or withheld) remount the next attempt waits
I, 2I, 4I, ... up to 5 minutes. A mount that running VMs share through virtiofs is not
remounted while its juicefs daemon is alive (it may only be slow; killing it would break
the shares for good): it stays marked unhealthy, with the reason, until it answers again.
Probes of different mounts run in parallel and are bounded, and repairs run as their own
tasks, so one hung mount delays neither the others nor the agent. Each round that finds a
mount healthy also has virtiofs export it again to shares still bound to an older mount of
it (after any remount: by the watcher, at start-up or by /modelcenter/mount).
"""
from __future__ import annotations

import asyncio
import logging
import time

from .service import ModelCenterService

log = logging.getLogger(__name__)


class MountWatcher:
    def __init__(self, service: ModelCenterService):
        self.service = service
        self.config = service.config
        self.rounds = 0

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                log.exception("model center watcher round failed")
            self.rounds += 1
            await asyncio.sleep(self.config.modelcenter_health_interval)

    async def check_all(self) -> None:
        records = self.service.records()
        await asyncio.gather(*(self.check_one(uuid) for uuid in records))

    async def check_one(self, uuid: str) -> None:
        svc = self.service
        if svc.busy(uuid):
            return  # being mounted, unmounted or repaired right now
        reason = await svc.check(uuid)
        if svc.busy(uuid) or svc.record(uuid) is None:
            return  # changed under us; the next round looks again
        health = svc._health(uuid)
        was_healthy = health.healthy
        svc._mark(uuid, reason)
        if reason is None:
            if health.failures:
                log.info("model center %s is healthy again", uuid)
            health.failures, health.noticed_at = 0, None
            health.repaired()
            svc.reexport_stale_shares(uuid)
            return
        health.failures += 1
        if health.noticed_at is None:
            health.noticed_at = time.monotonic()
        if was_healthy is not False or health.failures == 1:
            log.warning("model center %s mount %s is unhealthy: %s", uuid,
                        svc.mount_point(uuid), reason)
        if self.config.modelcenter_auto_remount and \
                health.failures >= self.config.modelcenter_remount_after and \
                (health.next_repair_at is None or time.monotonic() >= health.next_repair_at):
            svc.schedule_repair(uuid, reason)
