"""``/ha/scanhost``: is a sibling host reachable? (premium ``HaKvmHostSiblingChecker``)

ZStack's agent (ZU ``scan_host``) pings with ``nmap -sP -PI --disable-arp-ping`` (ICMP echo,
10 s host timeout). Phase 1: up to ``times`` probes ``interval`` apart; as soon as the successes
reach ``successTimes`` the answer is "success"; none at all is "failure". Otherwise phase 2:
``successTimes`` probes ``successInterval`` apart: all up "success", none "failure", else
"unstable".

Here the same phases, without nmap: one probe is an ICMP echo from a raw socket (we run as
root), and, when raw sockets are not allowed, a TCP connect to port 22 where an answer of any
kind (accepted or refused) proves the host is up. A probe waits ``PROBE_TIMEOUT`` for the
echo (nmap's 10 s host timeout is an upper bound it seldom reaches for one echo).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0
TCP_PORT = 22
SUCCESS, FAILURE, UNSTABLE = "success", "failure", "unstable"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int) -> bytes:
    payload = b"kvmagent-scanhost"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload


async def icmp_echo(ip: str, timeout: float) -> bool:
    """One ICMP echo through a raw socket; PermissionError when raw sockets are not allowed."""
    loop = asyncio.get_running_loop()
    ident, seq = os.getpid() & 0xFFFF, int(time.monotonic() * 1000) & 0xFFFF
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.setblocking(False)
        target = ip
        try:
            await loop.sock_sendto(sock, echo_request(ident, seq), (target, 0))
        except OSError as exc:  # no route, network unreachable: down
            log.debug("scanhost: echo to %s not sent: %s", ip, exc)
            return False
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    data, addr = await loop.sock_recvfrom(sock, 2048)
            except TimeoutError:
                return False
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if addr[0] == target and kind == 0 and (rid, rseq) == (ident, seq):
                return True
        return False


async def tcp_answer(ip: str, timeout: float, port: int = TCP_PORT) -> bool:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(ip, port)
        writer.close()
        return True
    except ConnectionRefusedError:
        return True  # a RST comes from a live kernel
    except OSError as exc:
        return exc.errno == errno.ECONNREFUSED
    except TimeoutError:
        return False


async def probe(ip: str, timeout: float = PROBE_TIMEOUT) -> bool:
    if ":" in ip:  # IPv6: no ICMPv6 echo here
        return await tcp_answer(ip, timeout)
    try:
        return await icmp_echo(ip, timeout)
    except PermissionError:
        return await tcp_answer(ip, timeout)


async def scan_host(ip: str, interval: float, times: int, success_interval: float,
                    success_times: int, probe_fn=probe) -> str:
    successes = 0
    for _ in range(times):
        successes += bool(await probe_fn(ip))
        if successes == success_times:
            return SUCCESS
        await asyncio.sleep(interval)
    if successes == 0:
        return FAILURE
    ups = 0
    for _ in range(success_times):
        ups += bool(await probe_fn(ip))
        await asyncio.sleep(success_interval)
    return SUCCESS if ups == success_times else FAILURE if ups == 0 else UNSTABLE
