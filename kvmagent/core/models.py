"""Base models of the wire protocol: camelCase on the wire, unknown fields ignored."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


def secret(**kwargs: Any) -> Any:
    """A field whose value never reaches a log line."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["x-secret"] = True
    return Field(json_schema_extra=extra, **kwargs)


class WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        str_strip_whitespace=False,
    )


class AgentRequest(WireModel):
    """Base of every command body."""


class EmptyRequest(AgentRequest):
    pass


class AgentResponse(WireModel):
    """Envelope every reply carries beside the command's own fields."""

    success: bool = True
    error: str | None = None


def secret_field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("x-secret"):
            names.add(field.alias or name)
            names.add(name)
    return names
