"""The MN's TCP liveness channel (ConnectCmd ``tcpServerPort``, default 7123).

With ``kvm.host.tcp.connection.check`` on, the MN listens on that port and pings a host at
once when its connection closes or stays silent for 5 s (ZS KVMHostFactory.startTcpServer);
the reference agent connects after ``/host/connect`` and writes a counter every 2 s
(ZU host_plugin.py ``start_write_to_server``). Like it, a broken connection is not retried
until the next connect: the MN's regular pings still run, this only speeds detection up.
"""
from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

INTERVAL = 2.0
CONNECT_TIMEOUT = 5.0


async def write_counter(host: str, port: int, interval: float = INTERVAL) -> None:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        log.info("MN liveness channel %s:%d not opened (%s); pings still work", host, port, exc)
        return
    log.info("MN liveness channel open to %s:%d", host, port)
    counter = 0
    try:
        while True:
            writer.write(str(counter).encode())
            await writer.drain()
            counter += 1
            await asyncio.sleep(interval)
    except OSError as exc:
        log.info("MN liveness channel %s:%d closed (%s)", host, port, exc)
    finally:
        writer.close()


def mn_host(send_command_url: str | None) -> str | None:
    return urlsplit(send_command_url).hostname if send_command_url else None
