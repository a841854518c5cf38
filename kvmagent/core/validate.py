"""Validated wire types and path confinement shared by the plugins.

Request models use these ``Annotated`` types so a bad value is a 400 naming the field, before
any handler runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Iterable

from pydantic import AfterValidator, StringConstraints

from .errors import AgentError

Uuid = Annotated[str, StringConstraints(
    pattern=r"^(?:[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$")]
Mac = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")]
# Linux interface names: at most 15 bytes, no '/', ':' or whitespace; we also refuse quotes.
IfName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")]


def _absolute_clean(value: str) -> str:
    """An absolute, normalized path; a trailing '/' is dropped (MNs send both forms)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    value = value.rstrip("/") or "/"
    if value.startswith("//") or os.path.normpath(value) != value:
        raise ValueError("must be a normalized path (no '..', '.', or '//')")
    return value


AbsPath = Annotated[str, StringConstraints(min_length=1, max_length=4096), AfterValidator(_absolute_clean)]


def confine(path: str, roots: Iterable[Path], what: str) -> Path:
    """realpath(path), which must lie inside one of ``roots`` (symlinks resolved first)."""
    real = Path(os.path.realpath(path))
    for root in roots:
        root_real = Path(os.path.realpath(root))
        if real == root_real or root_real in real.parents:
            return real
    allowed = ", ".join(str(r) for r in roots)
    raise AgentError(f"{what}: {path} resolves to {real}, outside the allowed roots ({allowed})")
