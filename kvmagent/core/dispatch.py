"""Running one command: parse and validate the body, call the handler, build the envelope."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .context import AgentContext
from .errors import AgentError
from .logs import PREMASKED, mask_data, mask_text
from .models import secret_field_names
from .plugin import Command

log = logging.getLogger("kvmagent.command")


class BadRequest(Exception):
    """The body is not JSON or does not validate: HTTP 400 (sync) or a failed callback."""


@dataclass
class Outcome:
    body: dict[str, Any]
    status: int = 200

    @property
    def label(self) -> str:
        if self.status == 400:
            return "invalid"
        return "ok" if self.body.get("success") else "failed"


def failure(message: str, status: int = 200) -> Outcome:
    return Outcome({"success": False, "error": message}, status)


MAX_DEPTH = 64  # ZStack's deepest command (a VM start) nests under 10 levels


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"body nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
    if _too_deep(data):
        # Deeper documents would reach recursive code (validation, log masking) at its limit.
        raise BadRequest(f"body nests deeper than {MAX_DEPTH} levels")
    return data


def _too_deep(data: Any) -> bool:
    """Iterative (a recursive walk would fail on the very input it guards against)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)


async def execute(ctx: AgentContext, cmd: Command, raw: bytes, taskuuid: str | None,
                  resource: str | None = None, *, called: str = "sync") -> Outcome:
    """Run ``cmd`` on ``raw``; never raises (except cancellation), always one envelope."""
    started = time.monotonic()
    try:
        data = parse_body(raw)
        try:
            request = cmd.request.model_validate(data)
        except ValidationError as exc:
            raise BadRequest(describe_validation_error(exc)) from None
        response = await cmd.handler(ctx, request)
        if response is None:
            response = cmd.response()
        outcome = Outcome(response.model_dump(mode="json", by_alias=True))
    except BadRequest as exc:
        outcome = failure(mask_text(str(exc)), 400)
    except AgentError as exc:
        outcome = failure(mask_text(_one_line(str(exc))) or type(exc).__name__)
    except Exception as exc:
        log.exception("%s failed unexpectedly", cmd.path)
        outcome = failure(mask_text(f"internal error: {type(exc).__name__}: {_one_line(str(exc))}"))
    elapsed = time.monotonic() - started
    ctx.metrics.command_done(cmd.path, outcome.label, elapsed)
    _log_line(called, cmd, taskuuid, resource, elapsed, outcome, raw)
    return outcome


def _printable(header: str | None, limit: int = 64) -> str:
    """A header value fit for one log line (the MN sends a uuid; anyone else anything)."""
    if not header:
        return "-"
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in header[:limit])


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _log_line(called: str, cmd: Command, taskuuid: str | None, resource: str | None, elapsed: float,
              outcome: Outcome, raw: bytes) -> None:
    level = logging.INFO if outcome.label == "ok" else logging.WARNING
    if not log.isEnabledFor(level):
        return
    extra = "" if outcome.label == "ok" else f" error={outcome.body.get('error')!r}"
    # X-Resource-UUID: the host or resource the MN sent this for (a name to grep at 3 a.m.)
    log.log(level, "%s %s task=%s resource=%s %s %.1fms%s", called, cmd.path,
            _printable(taskuuid, 128), _printable(resource), outcome.label, elapsed * 1000, extra,
            extra=PREMASKED)  # the error was masked for the reply: not masked twice
    if log.isEnabledFor(logging.DEBUG):
        try:
            body = mask_data(json.loads(raw or b"{}"), secret_field_names(cmd.request))
        except ValueError:
            body = "<not JSON>"
        log.debug("%s request body: %s", cmd.path, body)

