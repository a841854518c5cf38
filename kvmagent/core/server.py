"""The HTTP server: an aiohttp app built by :func:`create_app`, no module-level state."""
from __future__ import annotations

import hmac
import json
import logging
import ssl
from typing import Iterable

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from .config import AgentConfig
from .context import AgentContext
from .dispatch import execute, failure
from .metrics import CONTENT_TYPE_LATEST
from .openapi import build_openapi
from .plugin import Plugin, Registry, discover_plugins, normalize_path
from .tasks import TaskRunner, valid_taskuuid

log = logging.getLogger(__name__)

CTX = web.AppKey("ctx", AgentContext)
REGISTRY = web.AppKey("registry", Registry)
TASKS = web.AppKey("tasks", TaskRunner)

# The schema is public even with a token: it holds no host data.
PUBLIC_PATHS = {"/openapi.json"}


def reply(body: dict, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def create_app(config: AgentConfig, plugins: Iterable[Plugin] | None = None) -> web.Application:
    """Build an agent. ``plugins`` defaults to the installed entry points (config may filter)."""
    if plugins is None:
        plugins = discover_plugins(config.plugins)
    registry = Registry(plugins)
    ctx = AgentContext.create(config)
    tasks = TaskRunner(ctx)

    middlewares = [envelope_errors]
    if config.auth_token:
        middlewares.insert(0, bearer_auth(config.auth_token))
    app = web.Application(middlewares=middlewares, client_max_size=16 * 1024 * 1024)
    app[CTX] = ctx
    app[REGISTRY] = registry
    app[TASKS] = tasks
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_route("*", "/{path:.*}", command_handler)
    app.cleanup_ctx.append(lifecycle)
    return app


async def lifecycle(app: web.Application):
    ctx, registry, tasks = app[CTX], app[REGISTRY], app[TASKS]
    await ctx.outbox.start()
    tasks.restore()
    await ctx.libvirt.start()
    started = []
    try:
        for plugin in registry.plugins:
            for hook in plugin.startup_hooks:
                await hook(ctx)
            started.append(plugin)
        log.info("kvmagent ready: %d commands from plugins %s", len(registry.commands),
                 ", ".join(p.name for p in registry.plugins))
        yield
    finally:
        await tasks.close()
        for plugin in reversed(started):
            for hook in reversed(plugin.cleanup_hooks):
                try:
                    await hook(ctx)
                except Exception:
                    log.exception("cleanup of plugin %s failed", plugin.name)
        await ctx.cancel_background()
        await ctx.libvirt.close()
        await ctx.outbox.close()
        ctx.runner.shutdown()


async def command_handler(request: web.Request) -> web.Response:
    app = request.app
    ctx, registry, tasks = app[CTX], app[REGISTRY], app[TASKS]
    path = normalize_path(request.match_info["path"])
    cmd = registry.lookup(path)
    if cmd is None:
        ctx.metrics.requests.labels("unknown", "not_found").inc()
        return reply(failure(f"no such command: {path}").body, 404)
    if request.method not in cmd.methods:
        return reply(failure(f"{path} takes {'/'.join(cmd.methods)}, not {request.method}").body, 405)
    try:
        raw = await request.read()
    except (ConnectionError, aiohttp.ClientPayloadError,
            aiohttp.http_exceptions.HttpProcessingError) as exc:
        # The client hung up mid-body: nothing to run and nobody to answer; no traceback.
        log.info("%s: request body not received (%s: %s); ignored", path, type(exc).__name__, exc)
        raise ClientGone() from None
    taskuuid = request.headers.get("taskuuid")
    callbackurl = request.headers.get("callbackurl")

    # The MN decides how it calls a path, not us: with a callback URL the answer is a
    # callback, whatever mode the command was declared with (the mode is our default for curl).
    if callbackurl:
        if not taskuuid or not valid_taskuuid(taskuuid):
            return reply(failure("header 'taskuuid' is required with 'callbackurl' and must be "
                                 "1-128 characters of [A-Za-z0-9._-]").body, 400)
        problem = callback_url_problem(callbackurl)
        if problem:  # refused now, rather than retried for the whole delivery window
            return reply(failure(f"header 'callbackurl' {problem}").body, 400)
        await tasks.accept(cmd, raw, taskuuid, callbackurl,
                           resource=request.headers.get("X-Resource-UUID"))
        return reply({"success": True, "error": None})

    outcome = await execute(ctx, cmd, raw, taskuuid, request.headers.get("X-Resource-UUID"))
    return reply(outcome.body, outcome.status)


class ClientGone(Exception):
    """The client went away before its request was complete."""


def callback_url_problem(url: str) -> str | None:
    """Why ``url`` cannot take a callback, or None (an absolute http(s) URL with a host)."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        return f"is not a URL ({exc})"
    if parsed.scheme not in ("http", "https"):
        return f"must be an http:// or https:// URL, not {url[:80]!r}"
    if not parsed.host:
        return f"has no host: {url[:80]!r}"
    return None


async def openapi_handler(request: web.Request) -> web.Response:
    return reply(build_openapi(request.app[REGISTRY]))


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[CTX].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def envelope_errors(request: web.Request, handler):
    """Every error the framework itself raises still answers with the JSON envelope."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return reply(failure(exc.reason or "error").body, exc.status)
    except ClientGone:
        return web.Response(status=400)  # aiohttp cannot send it: the connection is gone
    except Exception:
        log.exception("unhandled error serving %s", request.path)
        return reply(failure("internal error; see the agent log").body, 500)


def bearer_auth(token: str):
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return reply(failure("missing or wrong bearer token (header 'Authorization')").body, 401)
        return await handler(request)

    return check


class _EnvelopeRequestHandler(RequestHandler):
    """aiohttp answers a request it cannot parse (a header line too long, a bad request line)
    by itself, in plain text, logging a traceback: this gives that answer the JSON envelope
    and one log line."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        reason = getattr(exc, "message", None) or message or str(exc or "") or "bad request"
        reason = " ".join(str(reason).split())[:300]
        log.info("bad HTTP request from %s answered %d: %s", request.remote, status, reason)
        resp = reply(failure(f"bad HTTP request: {reason}").body, status)
        resp.force_close()
        return resp


class _EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class AgentRunner(web.AppRunner):
    """The runner of an agent app: errors aiohttp answers itself carry the envelope too."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _EnvelopeServer  # same layout; only how connections are handled
        return server


def ssl_context(config: AgentConfig) -> ssl.SSLContext | None:
    if not config.tls_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(config.tls_cert), str(config.tls_key) if config.tls_key else None)
    if config.tls_client_ca:
        context.load_verify_locations(cafile=str(config.tls_client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
