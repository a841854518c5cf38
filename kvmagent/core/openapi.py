"""``/openapi.json``, generated from the registered commands' pydantic models."""
from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from .. import __version__
from .plugin import ASYNC, Registry


def build_openapi(registry: Registry) -> dict[str, Any]:
    models = {cmd.request for cmd in registry.commands.values()}
    models |= {cmd.response for cmd in registry.commands.values()}
    ordered = sorted(models, key=lambda m: (m.__module__, m.__qualname__))
    refs, schema = models_json_schema(
        [(m, "validation") for m in ordered], by_alias=True,
        ref_template="#/components/schemas/{model}")
    components = schema.get("$defs", {})

    def ref(model) -> dict[str, Any]:
        return refs[(model, "validation")]

    paths: dict[str, Any] = {}
    for path, cmd in sorted(registry.commands.items()):
        parameters = []
        if cmd.mode is ASYNC:
            parameters = [
                {"name": "taskuuid", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "with callbackurl: run asynchronously under this id"},
                {"name": "callbackurl", "in": "header", "required": False,
                 "schema": {"type": "string"},
                 "description": "POST the response object here when done; without it the "
                                "command runs inline"},
            ]
        envelope = {"content": {"application/json": {"schema": {
            "type": "object", "properties": {"success": {"type": "boolean"},
                                             "error": {"type": ["string", "null"]}}}}}}
        operation = {
            "operationId": path.strip("/").replace("/", "_"),
            "summary": cmd.summary,
            "tags": [cmd.plugin],
            "x-kvmagent-mode": cmd.mode.value,
            "parameters": parameters,
            "requestBody": {"required": False,
                            "content": {"application/json": {"schema": ref(cmd.request)}}},
            "responses": {
                "200": {"description": "the response object (async with callbackurl: the "
                                       "acknowledgement; the response object is the callback)",
                        "content": {"application/json": {"schema": ref(cmd.response)}}},
                "400": {"description": "body not JSON or invalid", **envelope},
            },
        }
        paths[path] = {m.lower(): operation for m in cmd.methods}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvmagent", "version": __version__,
                 "description": "KVM host agent; ZStack KVM agent wire protocol"},
        "paths": paths,
        "components": {"schemas": components},
    }
