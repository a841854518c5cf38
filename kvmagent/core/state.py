"""Persistent state: small JSON documents under the state dir, written atomically.

A document is written to a temp file in the same directory, fsynced, and renamed over the
old one, so a crash leaves either the old or the new document, never half of one.

Reading survives any file content: a document that is not JSON, or (given ``check``) JSON of
the wrong shape, is moved aside as ``<name>.json.corrupt`` with an error line naming it, and the
caller gets its default, so start-up goes on.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from pydantic import TypeAdapter

log = logging.getLogger(__name__)


def conforms(shape: Any) -> Callable[[Any], Any]:
    """A ``check`` for :meth:`StateStore.load`: the document must validate as ``shape`` (any
    type pydantic knows: a model, a dataclass, ``list[SomeDataclass]``); it is returned as is."""
    adapter = TypeAdapter(shape)

    def check(data: Any) -> Any:
        adapter.validate_python(data)
        return data

    return check

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


class StateStore:
    def __init__(self, root: Path, *, fsync: bool = True):
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if not all(_NAME.match(p) for p in parts):
            raise ValueError(f"invalid state document name {name!r}")
        return self.root.joinpath(*parts[:-1], parts[-1] + ".json")  # "job.1" stays "job.1.json"

    def load(self, name: str, default: Any = None, *,
             check: Callable[[Any], Any] | None = None) -> Any:
        """The document (``check(document)`` when given), or ``default`` when it is absent.

        ``check`` validates the shape (a pydantic ``model_validate``, a dataclass, a function
        raising ValueError/TypeError/KeyError); a document it refuses is quarantined."""
        path = self._path(name)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return default
        except (OSError, ValueError, RecursionError) as exc:
            # A corrupt document must not stop the agent; keep it aside for a human.
            self.quarantine(name, f"unreadable: {exc}")
            return default
        if check is None:
            return data
        try:
            return check(data)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            # pydantic's ValidationError is a ValueError
            self.quarantine(name, f"wrong shape: {' '.join(str(exc).split())[:300]}")
            return default

    def quarantine(self, name: str, reason: str) -> None:
        """Move a document aside (``.corrupt``) with a log line naming it and why."""
        path = self._path(name)
        log.error("state document %s %s; moved aside to %s.corrupt", path, reason, path.name)
        try:
            os.replace(path, path.with_name(path.name + ".corrupt"))
        except FileNotFoundError:
            pass

    def save(self, name: str, data: Any) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            if self.fsync:
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass

    def names(self, folder: str) -> list[str]:
        """Names of the documents in ``folder`` (as ``folder/<name>``), sorted."""
        directory = self.root / folder
        if not directory.is_dir():
            return []
        return sorted(f"{folder}/{p.name[:-5]}" for p in directory.glob("*.json"))
