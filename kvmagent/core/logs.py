"""Logging set-up with secret masking.

Masking happens in a filter on the handler, so no code path (a handler's error text, an
exception message carrying a storage URL) can put a credential into a log line.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

MASK = "***"

# scheme://user:password@host and scheme://:password@host (redis). The password runs to the
# last '@' of the URL (unencoded passwords hold '/' and '@'); over-masking is the safe side.
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?!//)(?P<pw>[^\s]*)@")
_KEY_VALUE = re.compile(
    r"(?i)(?P<key>\b(?:password|passwd|secret|token|access[-_]?key|secret[-_]?key|authorization)"
    r"[\"']?\s*[:=]\s*[\"']?)(?P<val>(?:Bearer\s+)?[^\s,\"'&}]+)"
)


def mask_text(text: str) -> str:
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _KEY_VALUE.sub(lambda m: f"{m['key']}{MASK}", text)


def mask_data(data: Any, secret_keys: set[str] = frozenset()) -> Any:
    """A copy of JSON-like data with secret keys blanked and URL credentials masked."""
    if isinstance(data, dict):
        return {k: (MASK if k in secret_keys else mask_data(v, secret_keys)) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_data(v, secret_keys) for v in data]
    if isinstance(data, str):
        return mask_text(data)
    return data


class MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        if masked != message or record.args:
            record.msg, record.args = masked, ()
        return True


def read_tail(path: Path | str, size: int = 8192, since: int = 0) -> str | None:
    """At most ``size`` bytes from the end of a (log) file, nothing before offset ``since``;
    None when it cannot be read. Blocking: call it through the runner."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(since, fh.tell() - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return None


def setup_logging(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
