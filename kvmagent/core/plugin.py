"""Plugins declare commands; the core runs them.

A plugin module exposes ``plugin = Plugin("name")`` and decorates handlers::

    @plugin.command("/host/echo", mode=SYNC, methods=("GET", "POST"))
    async def echo(ctx: AgentContext, req: EmptyRequest) -> AgentResponse: ...

The request and response models are taken from the handler's annotations. Plugins hold no
state of their own: per-agent objects go into ``ctx.services`` from an ``on_startup`` hook.
"""
from __future__ import annotations

import enum
import logging
import types
import typing
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from .models import AgentRequest, AgentResponse

if TYPE_CHECKING:
    from .context import AgentContext

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvmagent.plugins"


class Mode(str, enum.Enum):
    SYNC = "sync"
    ASYNC = "async"


SYNC = Mode.SYNC
ASYNC = Mode.ASYNC

Handler = Callable[["AgentContext", Any], Awaitable[AgentResponse | None]]
Hook = Callable[["AgentContext"], Awaitable[None]]


@dataclass(frozen=True)
class Command:
    path: str
    mode: Mode
    request: type[AgentRequest]
    response: type[AgentResponse]
    handler: Handler
    plugin: str
    methods: tuple[str, ...] = ("POST",)
    summary: str = ""


@dataclass
class Plugin:
    name: str
    description: str = ""
    commands: list[Command] = field(default_factory=list)
    startup_hooks: list[Hook] = field(default_factory=list)
    cleanup_hooks: list[Hook] = field(default_factory=list)

    def command(self, path: str, *, mode: Mode, methods: Iterable[str] = ("POST",)):
        def register(handler: Handler) -> Handler:
            hints = typing.get_type_hints(handler)
            params = [p for p in handler.__code__.co_varnames[: handler.__code__.co_argcount]]
            request = hints.get(params[1]) if len(params) > 1 else None
            response = hints.get("return")
            if typing.get_origin(response) in (typing.Union, types.UnionType):  # "Rsp | None"
                response = next(a for a in typing.get_args(response) if a is not type(None))
            if not (isinstance(request, type) and issubclass(request, AgentRequest)):
                raise TypeError(f"{handler.__qualname__}: second argument must be an AgentRequest")
            if not (isinstance(response, type) and issubclass(response, AgentResponse)):
                raise TypeError(f"{handler.__qualname__}: must return an AgentResponse subclass")
            doc = (handler.__doc__ or "").strip().splitlines()
            self.commands.append(
                Command(
                    path=normalize_path(path),
                    mode=Mode(mode),
                    request=request,
                    response=response,
                    handler=handler,
                    plugin=self.name,
                    methods=tuple(m.upper() for m in methods),
                    summary=doc[0] if doc else "",
                )
            )
            return handler

        return register

    def on_startup(self, hook: Hook) -> Hook:
        self.startup_hooks.append(hook)
        return hook

    def on_cleanup(self, hook: Hook) -> Hook:
        self.cleanup_hooks.append(hook)
        return hook


def normalize_path(path: str) -> str:
    path = "/" + path.strip("/")
    return path


class Registry:
    """path -> Command, built from a list of plugins; rejects a path declared twice."""

    def __init__(self, plugins: Iterable[Plugin]):
        self.plugins = list(plugins)
        self.commands: dict[str, Command] = {}
        for plugin in self.plugins:
            for cmd in plugin.commands:
                if cmd.path in self.commands:
                    other = self.commands[cmd.path].plugin
                    raise ValueError(f"{cmd.path} declared by both {other} and {plugin.name}")
                self.commands[cmd.path] = cmd

    def lookup(self, path: str) -> Command | None:
        return self.commands.get(normalize_path(path))


def discover_plugins(names: list[str] | None = None) -> list[Plugin]:
    """Load plugins from the ``kvmagent.plugins`` entry points (all, or the named ones)."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise ValueError(f"plugins not installed: {', '.join(missing)}; have {sorted(found)}")
        found = {n: found[n] for n in names}
    plugins = []
    for name in sorted(found):
        obj = found[name].load()
        if not isinstance(obj, Plugin):
            raise TypeError(f"entry point {name} is not a kvmagent Plugin")
        plugins.append(obj)
    log.debug("plugins loaded: %s", ", ".join(p.name for p in plugins))
    return plugins
