"""``kvmagent serve`` runs the agent; ``kvmagent call`` posts a command to a running one."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from . import __version__

log = logging.getLogger("kvmagent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmagent", description="KVM host agent")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the agent in the foreground")
    serve.add_argument("--config", type=Path, help="TOML file (default /etc/kvmagent/kvmagent.toml)")
    serve.add_argument("--listen", help="HOST:PORT (default 0.0.0.0:7070)")
    serve.add_argument("--state-dir", type=Path, help="default /var/lib/kvmagent")
    serve.add_argument("--libvirt-uri", help="default qemu:///system")
    serve.add_argument("--domain-type", choices=["kvm", "qemu", "auto"])
    serve.add_argument("--log-level")

    call = sub.add_parser("call", help="POST a command to a running agent and print the reply")
    call.add_argument("path", help="e.g. /host/fact")
    call.add_argument("body", nargs="?", default="{}", help="JSON body (default {}); - reads stdin")
    call.add_argument("--url", default=os.environ.get("KVMAGENT_URL", "http://127.0.0.1:7070"))
    call.add_argument("--token", default=os.environ.get("KVMAGENT_TOKEN"))
    call.add_argument("--taskuuid", help="send as an async command with this taskuuid (no callback)")
    call.add_argument("--timeout", type=float, default=600)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_main(args)
    return call_main(args)


def serve_main(args: argparse.Namespace) -> int:
    from .core.config import load_config
    from .core.logs import setup_logging

    try:
        config = load_config(args.config, {
            "listen": args.listen, "state_dir": args.state_dir, "libvirt_uri": args.libvirt_uri,
            "domain_type": args.domain_type, "log_level": args.log_level})
    except Exception as exc:
        print(f"kvmagent: bad configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    except StartupFailed as exc:
        print(f"kvmagent: start-up failed: {exc}", file=sys.stderr)
        return 1
    return 0


class StartupFailed(Exception):
    """The agent could not start serving; the message says why."""


def _exit_if_stuck(seconds: float) -> None:
    """After a failed start-up, asyncio.run still waits for executor threads; one stuck in a
    system call would keep a process up that never listens. Exit regardless after a while."""
    timer = threading.Timer(seconds, os._exit, (1,))
    timer.daemon = True
    timer.start()


async def serve(config) -> None:
    from aiohttp import web

    from .core import sdnotify
    from .core.server import AgentRunner, create_app, ssl_context

    runner = None
    try:
        app = create_app(config)
        runner = AgentRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, config.listen_host, config.listen_port,
                           ssl_context=ssl_context(config), reuse_address=True)
        await site.start()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        log.critical("start-up failed, exiting: %s", reason, exc_info=True)
        sdnotify.notify(f"STATUS=start-up failed: {reason}")
        _exit_if_stuck(STARTUP_FAILURE_GRACE)
        if runner is not None and runner.server is not None:  # set up, then e.g. port in use
            try:
                await asyncio.wait_for(runner.cleanup(), STARTUP_FAILURE_GRACE / 2)
            except Exception:
                log.exception("clean-up after the failed start-up failed")
        raise StartupFailed(reason) from None
    log.info("listening on %s://%s (state %s, libvirt %s)",
             "https" if config.tls_enabled else "http", config.listen, config.state_dir,
             config.libvirt_uri)
    sdnotify.notify("READY=1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    isolate_forked_children()
    watchdog = None
    interval = sdnotify.watchdog_interval()
    if interval:
        watchdog = loop.create_task(sdnotify.pet_watchdog(interval))
    await stop.wait()
    log.info("stopping")
    sdnotify.notify("STOPPING=1")
    if watchdog:
        watchdog.cancel()
    await runner.cleanup()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STARTUP_FAILURE_GRACE = 15.0
_fork_hook_installed = False


def isolate_forked_children() -> None:
    """A child forked from the agent (pyroute2's netns helper forks to create a socket in a
    namespace) must not stop the agent. It inherits the event loop's signal handling: the C
    handler writes the signal number into the wakeup socket, which is the *agent's*, so a
    SIGTERM sent to stop the helper reads as one sent to the agent. The child gets default
    signal handling and no wakeup fd the moment it exists."""
    global _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_forget_agent_signals)
        _fork_hook_installed = True


def _forget_agent_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def call_main(args: argparse.Namespace) -> int:
    body = sys.stdin.read() if args.body == "-" else args.body
    try:
        json.loads(body)
    except ValueError as exc:
        print(f"kvmagent call: body is not JSON: {exc}", file=sys.stderr)
        return 2
    path = "/" + args.path.strip("/")
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    if args.taskuuid:
        headers["taskuuid"] = args.taskuuid
    req = urllib.request.Request(args.url.rstrip("/") + path, data=body.encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        print(f"kvmagent call: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 3
    try:
        reply = json.loads(text)
    except ValueError:
        print(text)
        return 1
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("success") else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
