"""Logging set-up with secret masking.

Masking happens in a filter on the handler, so no code path (a handler's error text, an
exception message carrying a storage URL) can put a credential into a log line.
"""
from __future__ import annotations

import logging
import os
import re
import string
import sys
from pathlib import Path
from typing import Any

MASK = "***"

# scheme://user:password@host and scheme://:password@host (redis). The password runs to the
# last '@' of the URL (unencoded passwords hold '/' and '@'); over-masking is the safe side.
# Found by hand in one pass (a regex for it backtracks quadratically: 100 KB took seconds).
_SCHEME_CHARS = frozenset(string.ascii_letters + string.digits + "+.-")
_LETTERS = frozenset(string.ascii_letters)
_TOKEN = re.compile(r"\S+")
_USER = re.compile(r"[^:/@\s]*")
_KEY_VALUE = re.compile(
    r"(?i)(?P<key>\b(?:password|passwd|secret|token|access[-_]?key|secret[-_]?key|authorization)"
    r"[\"']?\s*[:=]\s*[\"']?)(?P<val>(?:Bearer\s+)?[^\s,\"'&}]+)"
)


def mask_text(text: str) -> str:
    """Credentials in URLs and ``key=value`` secrets replaced by ``***``; linear in the length."""
    if "://" in text and "@" in text:
        text = _mask_urls(text)
    return _KEY_VALUE.sub(lambda m: f"{m['key']}{MASK}", text)


def _mask_urls(text: str) -> str:
    parts: list[str] = []
    copied = 0
    for token in _TOKEN.finditer(text):  # a URL never holds whitespace
        start, end = token.span()
        last_at = text.rfind("@", start, end)
        if last_at < 0:
            continue
        cut = _credentials(text, start, last_at)
        if cut is not None:
            parts.append(text[copied:cut])
            parts.append(MASK)
            copied = last_at
    if not parts:
        return text
    parts.append(text[copied:])
    return "".join(parts)


def _credentials(text: str, start: int, last_at: int) -> int | None:
    """Where the password of the first ``scheme://user:`` in text[start:last_at] begins."""
    sep = text.find("://", start, last_at)
    while sep >= 0:
        # The scheme: the scheme characters before '://', from the first letter among them.
        # (Each character is looked at once: the run before the next '://' begins after this.)
        begin = sep
        while begin > start and text[begin - 1] in _SCHEME_CHARS:
            begin -= 1
        has_scheme = any(c in _LETTERS for c in text[begin:sep])
        user_end = _USER.match(text, sep + 3, last_at).end()
        if (has_scheme and user_end < last_at and text[user_end] == ":"
                and not text.startswith("//", user_end + 1)):
            return user_end + 1
        sep = text.find("://", max(user_end, sep + 3), last_at)
    return None




def mask_data(data: Any, secret_keys: set[str] = frozenset()) -> Any:
    """A copy of JSON-like data with secret keys blanked and URL credentials masked."""
    if isinstance(data, dict):
        return {k: (MASK if k in secret_keys else mask_data(v, secret_keys)) for k, v in data.items()}
    if isinstance(data, list):
        return [mask_data(v, secret_keys) for v in data]
    if isinstance(data, str):
        return mask_text(data)
    return data


# ``extra=PREMASKED`` on a log call whose arguments were masked already (the command line:
# its error text went through mask_text for the reply): the filter does not mask it twice.
PREMASKED = {"kvmagent_masked": True}


class MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "kvmagent_masked", False) and not record.exc_info:
            return True
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
