"""Persistent state: small JSON documents under the state dir, written atomically.

A document is written to a temp file in the same directory, fsynced, and renamed over the
old one, so a crash leaves either the old or the new document, never half of one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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

    def load(self, name: str, default: Any = None) -> Any:
        path = self._path(name)
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return default
        except (OSError, ValueError) as exc:
            # A corrupt document must not stop the agent; keep it aside for a human.
            log.error("state document %s unreadable (%s); moved aside", path, exc)
            os.replace(path, path.with_name(path.name + ".corrupt"))
            return default

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
