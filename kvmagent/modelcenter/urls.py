"""Strict parsing of model-center storage URLs and mount options.

A storage URL names where the models live:

=========================================  ==========================================
``redis://[user:pw@]host:6379/1``,         ZStack's form: a raw JuiceFS metadata URL
``mysql://u:pw@(host:3306)/db``, ...       (any engine juicefs knows, see META_SCHEMES),
                                           mounted read-only with ``--subdir models``
``juicefs://<meta-url>``                   extension: a JuiceFS volume mounted as given
``zdfs://<meta-url>``                      extension: the same (ZStack never parses zdfs)
``nfs://host[:port]/export``               extension: NFS export (mount.nfs)
``file:///dir``                            extension: a local directory, bind-mounted
=========================================  ==========================================

Every value that later becomes a command-line argument is checked here, so nothing can be
read as an option (``-x``) or smuggle whitespace. A password in the user-info of an engine
whose juicefs driver reads ``META_PASSWORD`` (redis, rediss, unix, mysql, postgres) is split
off and reaches juicefs through that variable, never its argv. juicefs takes credentials of
other engines (etcd user-info, query parameters such as ``?password=``) only from the URL
itself: such URLs are accepted (they are legitimate) and passed verbatim; the agent logs a
warning that the credential is in the mount's argv. The user-info ends at the last ``@``, so a
password may hold ``@`` or ``/``; an ``@`` in a query value must be percent-encoded. Error
messages never repeat the URL, :attr:`StorageUrl.masked` is rebuilt from the parsed parts with
``***`` for every credential, and :meth:`StorageUrl.scrub` removes them from any text.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from ..core.logs import MASK, mask_text

MAX_URL = 4096

# JuiceFS metadata engines (juicefs docs "How to Set Up Metadata Engine"; pkg/meta Register
# calls). fdb exists only in juicefs builds with FoundationDB: the binary says if it has it.
META_SCHEMES = frozenset({
    "redis", "rediss", "unix", "mysql", "postgres", "sqlite3", "tikv", "etcd", "badger", "fdb",
})
# juicefs drivers that take the password from META_PASSWORD (pkg/meta: redis.go reads it when
# the URL has none; NewClient puts it into mysql/postgres URLs).
ENV_PASSWORD_ENGINES = frozenset({"redis", "rediss", "unix", "mysql", "postgres"})
# ... and mysql/postgres need the '@' kept (NewClient inserts ':<pw>' before it).
_KEEP_AT = frozenset({"mysql", "postgres"})
# Engines whose URL is a local path: sqlite3:///abs/file.db, badger:///abs/dir,
# fdb:///etc/foundationdb/fdb.cluster?prefix=jfs (fdb may omit the cluster file).
_PATH_ENGINES = frozenset({"sqlite3", "badger", "fdb"})
# Engines reached through a socket path rather than a host (unix:///run/redis.sock?db=1,
# postgres://u@/db?host=/run/postgresql).
_SOCKET_ADDRESS = frozenset({"unix", "postgres"})

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.S)
_USER = re.compile(r"^[^:@/?#]*$")
# Query parameters that carry a credential (postgres ?password=, sqlite3 ?_auth_pass=, ...).
_SECRET_PARAM = re.compile(r"(?i)(pass|pwd|secret|token|credential|auth)")
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_EXPORT_CHARS = re.compile(r"^/[A-Za-z0-9._~/@+=%-]*$")


class StorageUrlError(ValueError):
    """A storage URL that cannot be used; the message never contains the URL."""


@dataclass(frozen=True)
class StorageUrl:
    kind: Literal["juicefs", "nfs", "file"]
    scheme: str  # as written: juicefs, zdfs, nfs, file, or the engine of a raw meta URL
    # juicefs/zdfs/raw meta URL
    meta_url: str | None = None  # the juicefs argv value (no password of an env engine)
    meta_password: str | None = field(default=None, repr=False)
    masked_text: str | None = field(default=None, repr=False, compare=False)
    # credentials juicefs can only read from its argv (etcd user-info, query parameters)
    argv_secrets: tuple[str, ...] = field(default=(), repr=False, compare=False)
    # nfs
    host: str | None = None
    port: int | None = None
    export: str | None = None
    # file
    path: str | None = None
    original: str = field(default="", repr=False, compare=False)

    @property
    def raw_meta(self) -> bool:
        """ZStack's form: the metadata URL itself, not wrapped in juicefs:// or zdfs://."""
        return self.kind == "juicefs" and self.scheme in META_SCHEMES

    @property
    def masked(self) -> str:
        """The URL with any credential masked, fit for logs and replies.

        Built from the parsed parts (each credential replaced by ``***``), so no part of a
        password with unusual characters (``@``, ``/``) can survive a pattern match."""
        if self.kind == "juicefs":
            return self.masked_text or ""
        return mask_text(self.original)

    def secrets(self) -> list[str]:
        found = [s for s in (self.meta_password, *self.argv_secrets) if s]
        # also the percent-encoded spellings, as juicefs may print them
        return sorted({*found, *(_quoted(s) for s in found)}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """``text`` (a juicefs error, a log line) with every credential of this URL masked."""
        for secret in self.secrets():
            text = text.replace(secret, MASK)
        return mask_text(text)

    @property
    def nfs_source(self) -> str:
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.export}"


def _quoted(text: str) -> str:
    return quote(text, safe="")


def _check_text(url: str) -> None:
    if not isinstance(url, str) or not url:
        raise StorageUrlError("must be a non-empty string")
    if len(url) > MAX_URL:
        raise StorageUrlError(f"longer than {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7f for c in url):
        raise StorageUrlError("must not contain whitespace or control characters")


def _clean_abs_path(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise StorageUrlError(f"{what} must be an absolute path")
    if os.path.normpath(path) != (path.rstrip("/") or "/"):
        raise StorageUrlError(f"{what} must be a normalized path (no '..', '.' or '//')")
    return path.rstrip("/") or "/"


def _split_userinfo(rest: str) -> tuple[str | None, str | None, str]:
    """(user, password, address) of ``[user[:password]@]address``.

    The user-info ends at the LAST ``@``, so a password may itself hold ``@`` or ``/``
    (``mysql://u:p@ss@(h)/db`` has password ``p@ss``). An ``@`` after the host, in a query
    value, must be percent-encoded.
    """
    at = rest.rfind("@")
    if at < 0:
        return None, None, rest
    userinfo, address = rest[:at], rest[at + 1:]
    user, colon, password = userinfo.partition(":")
    if not _USER.match(user):
        if not colon and ("/" in userinfo or "?" in userinfo):
            return None, None, rest  # no user-info: the '@' is in a path or query
        raise StorageUrlError("the metadata URL has an invalid user name")
    return user, (password if colon else None), address


def _query_secrets(query: str) -> tuple[str, list[str]]:
    """(query with credential values masked, the credential values as written)."""
    shown, secrets = [], []
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if eq and value and _SECRET_PARAM.search(unquote(key)):
            secrets += [value, unquote(value)]
            shown.append(f"{key}={MASK}")
        else:
            shown.append(item)
    return "&".join(shown), secrets


def parse_meta_url(meta: str) -> tuple[str, str | None]:
    """(meta URL for juicefs' argv, password for META_PASSWORD or None)."""
    parsed = _parse_meta(meta)
    return parsed[0], parsed[1]


def _parse_meta(meta: str) -> tuple[str, str | None, str, tuple[str, ...]]:
    """(argv meta URL, META_PASSWORD or None, masked meta URL, credentials left in argv)."""
    if meta.startswith("-"):
        raise StorageUrlError("the metadata URL must not start with '-'")
    m = _SCHEME.match(meta)
    if not m:
        raise StorageUrlError("the metadata URL must look like <engine>://...")
    engine, rest = m["scheme"], m["rest"]
    if engine == "memkv":
        raise StorageUrlError("the memkv metadata engine lives in one juicefs process's "
                              "memory: there is no volume to mount; use a persistent engine")
    if engine not in META_SCHEMES:
        raise StorageUrlError(f"unsupported JuiceFS metadata engine {engine!r}; "
                              f"one of {', '.join(sorted(META_SCHEMES))}")
    if not rest and engine != "fdb":
        raise StorageUrlError(f"the {engine} metadata URL has no address")
    if engine in _PATH_ENGINES:
        path, q, query = rest.partition("?")
        if path or engine != "fdb":  # fdb://?prefix=jfs uses the default cluster file
            if not path.startswith("/"):
                raise StorageUrlError(f"the {engine} path must be absolute: {engine}:///dir/"
                                      f"file (a relative one would depend on the agent's "
                                      f"working directory)")
            _clean_abs_path(path, f"the {engine} path")
            if path == "/":
                raise StorageUrlError(f"the {engine} path must name a file or directory")
        shown, secrets = _query_secrets(query) if q else ("", [])
        return meta, None, f"{engine}://{path}{q}{shown}", tuple(secrets)
    user, pw, address = _split_userinfo(rest)
    head, q, query = address.partition("?")
    shown_query, query_secrets = _query_secrets(query) if q else ("", [])
    socket_ok = engine in _SOCKET_ADDRESS
    if not address or head.startswith(("-", "@")) or \
            (not head or head.startswith("/")) and not socket_ok:
        raise StorageUrlError(f"the {engine} metadata URL has no valid address")
    shown_address = f"{head}{q}{shown_query}"
    if pw is not None and engine not in ENV_PASSWORD_ENGINES:
        # juicefs reads this engine's password only from the URL (etcd): keep it there.
        masked = f"{engine}://{user or ''}:{MASK}@{shown_address}"
        return meta, None, masked, tuple(s for s in (pw, unquote(pw), *query_secrets) if s)
    password = (unquote(pw) or None) if pw is not None else None
    keep_at = user or (password is not None and engine in _KEEP_AT)
    plain = f"{user or ''}@{address}" if keep_at else address
    if password is not None:
        shown = f"{user or ''}:{MASK}@{shown_address}"
    else:
        shown = f"{user or ''}@{shown_address}" if keep_at else shown_address
    return f"{engine}://{plain}", password, f"{engine}://{shown}", tuple(query_secrets)


def parse_storage_url(url: str) -> StorageUrl:
    _check_text(url)
    m = _SCHEME.match(url)
    if not m:
        raise StorageUrlError("must be a JuiceFS metadata URL (redis://..., mysql://..., "
                              "sqlite3:///...), or juicefs://<meta-url>, zdfs://<meta-url>, "
                              "nfs://host/export or file:///dir")
    scheme, rest = m["scheme"].lower(), m["rest"]
    if scheme in ("juicefs", "zdfs"):
        meta, password, masked, secrets = _parse_meta(rest)
        return StorageUrl("juicefs", scheme, meta_url=meta, meta_password=password,
                          masked_text=f"{scheme}://{masked}", argv_secrets=secrets,
                          original=url)
    if scheme in META_SCHEMES or scheme == "memkv":
        # ZStack's MN sends the metadata URL itself, for juicefs verbatim.
        meta, password, masked, secrets = _parse_meta(m["scheme"] + "://" + rest)
        return StorageUrl("juicefs", scheme, meta_url=meta, meta_password=password,
                          masked_text=masked, argv_secrets=secrets, original=url)
    if scheme == "nfs":
        return _parse_nfs(rest, url)
    if scheme == "file":
        if not rest.startswith("/"):
            raise StorageUrlError("file:// URLs take an absolute local path: file:///dir")
        path = _clean_abs_path(unquote(rest), "the file:// path")
        if path == "/":
            raise StorageUrlError("the file:// path must not be /")
        return StorageUrl("file", scheme, path=path, original=url)
    raise StorageUrlError(f"unsupported scheme {scheme!r}; a JuiceFS metadata engine "
                          f"({', '.join(sorted(META_SCHEMES))}), juicefs, zdfs, nfs or file")


def _parse_nfs(rest: str, url: str) -> StorageUrl:
    if "@" in rest or "?" in rest or "#" in rest:
        raise StorageUrlError("nfs:// URLs take no credentials, query or fragment")
    authority, slash, path = rest.partition("/")
    if not slash:
        raise StorageUrlError("nfs:// URLs need an export path: nfs://host/export")
    port = None
    if authority.startswith("["):
        host, _, tail = authority[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise StorageUrlError("invalid IPv6 address in the nfs:// URL") from None
        if tail:
            if not tail.startswith(":"):
                raise StorageUrlError("invalid nfs:// host")
            port = tail[1:]
    else:
        host, _, port_text = authority.partition(":")
        port = port_text if _ else None
        if not _HOST.match(host):
            raise StorageUrlError("invalid host in the nfs:// URL")
    if port is not None:
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise StorageUrlError("invalid port in the nfs:// URL")
        port = int(port)
    export = "/" + path
    if not _EXPORT_CHARS.match(export):
        raise StorageUrlError("the nfs export path has unsupported characters")
    export = _clean_abs_path(export, "the nfs export path")
    return StorageUrl("nfs", "nfs", host=host, port=port, export=export, original=url)


# -- mount options ------------------------------------------------------------------------
JUICEFS_OPTIONS = {
    # field: (juicefs flag, kind) -- kind: bool flag, "int", "float-seconds", "mib"
    "read_only": ("--read-only", "bool"),
    "subdir": ("--subdir", "str"),
    "cache_size": ("--cache-size", "int"),
    "buffer_size": ("--buffer-size", "int"),
    "attr_cache": ("--attr-cache", "seconds"),
    "entry_cache": ("--entry-cache", "seconds"),
    "dir_entry_cache": ("--dir-entry-cache", "seconds"),
    "open_cache": ("--open-cache", "seconds"),
    "prefetch": ("--prefetch", "int"),
    "max_uploads": ("--max-uploads", "int"),
    "max_downloads": ("--max-downloads", "int"),
    "upload_limit": ("--upload-limit", "int"),
    "download_limit": ("--download-limit", "int"),
    "get_timeout": ("--get-timeout", "seconds"),
    "put_timeout": ("--put-timeout", "seconds"),
    "io_retries": ("--io-retries", "int"),
    "writeback": ("--writeback", "bool"),
    "enable_xattr": ("--enable-xattr", "bool"),
    "backup_meta": ("--backup-meta", "seconds"),
    "no_bgjob": ("--no-bgjob", "bool"),
}
NFS_OPTIONS = {"read_only", "vers", "nconnect", "timeo", "retrans", "soft"}
FILE_OPTIONS = {"read_only"}


class MountOptions(BaseModel):
    """Known mount options only (an unknown key is a 400 naming it).

    Accepted on the wire as an object (``{"cacheSize": 1024}``, keys camelCase, snake_case
    or the juicefs flag name ``cache-size``) or as a list of ``key=value`` / ``--key=value`` /
    ``--flag`` strings.
    """

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    read_only: bool | None = Field(None, description="mount read-only (all schemes)")
    # juicefs
    subdir: str | None = Field(None, max_length=1024, description="juicefs: mount this "
                               "sub-directory of the volume")
    cache_size: int | None = Field(None, ge=0, le=2**31, description="juicefs: MiB")
    buffer_size: int | None = Field(None, ge=1, le=2**20, description="juicefs: MiB")
    attr_cache: float | None = Field(None, ge=0, le=86400, description="juicefs: seconds")
    entry_cache: float | None = Field(None, ge=0, le=86400, description="juicefs: seconds")
    dir_entry_cache: float | None = Field(None, ge=0, le=86400, description="juicefs: seconds")
    open_cache: float | None = Field(None, ge=0, le=86400, description="juicefs: seconds")
    prefetch: int | None = Field(None, ge=0, le=256, description="juicefs: blocks")
    max_uploads: int | None = Field(None, ge=1, le=4096)
    max_downloads: int | None = Field(None, ge=1, le=4096)
    upload_limit: int | None = Field(None, ge=0, description="juicefs: Mbps")
    download_limit: int | None = Field(None, ge=0, description="juicefs: Mbps")
    get_timeout: float | None = Field(None, gt=0, le=3600, description="juicefs: seconds")
    put_timeout: float | None = Field(None, gt=0, le=3600, description="juicefs: seconds")
    io_retries: int | None = Field(None, ge=0, le=1000)
    writeback: bool | None = None
    enable_xattr: bool | None = None
    backup_meta: float | None = Field(None, ge=0, description="juicefs: seconds, 0 = off")
    no_bgjob: bool | None = None
    # nfs
    vers: Literal["3", "4", "4.0", "4.1", "4.2"] | None = Field(None, description="nfs version")
    nconnect: int | None = Field(None, ge=1, le=16)
    timeo: int | None = Field(None, ge=1, le=6000, description="nfs: deciseconds")
    retrans: int | None = Field(None, ge=0, le=100)
    soft: bool | None = None

    @field_validator("subdir")
    @classmethod
    def _subdir(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("-") or "\x00" in value or any(c.isspace() for c in value):
            raise ValueError("must be a plain path inside the volume")
        norm = os.path.normpath("/" + value.lstrip("/"))
        if norm != "/" + value.strip("/") or ".." in value.split("/"):
            raise ValueError("must be a normalized path inside the volume (no '..')")
        return norm

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if data is None:
            return {}
        if isinstance(data, (list, tuple)):
            data = _options_from_list(data)
        if isinstance(data, dict):
            return {_key(k): v for k, v in data.items()}
        return data

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def check_for(self, kind: str) -> None:
        allowed = {"juicefs": set(JUICEFS_OPTIONS), "nfs": NFS_OPTIONS, "file": FILE_OPTIONS}[kind]
        wrong = sorted(to_camel(k) for k in self.given() if k not in allowed)
        if wrong:
            raise ValueError(f"mountOptions {', '.join(wrong)} do not apply to {kind} storage")


def _key(key: Any) -> str:
    """``cache-size``, ``--cache-size``, ``cache_size`` and ``cacheSize`` all name cacheSize."""
    if not isinstance(key, str):
        raise ValueError("option names must be strings")
    parts = re.split(r"[-_]+", key.lstrip("-"))
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def _options_from_list(items: list | tuple) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or not re.match(r"^(--)?[A-Za-z][A-Za-z0-9_-]*(=\S*)?$", item):
            raise ValueError("list entries must be 'name=value' or '--flag' strings")
        name, eq, value = item.partition("=")
        out[name] = value if eq else True
    return out


def seconds(value: float) -> str:
    return f"{value:g}s"


def juicefs_option_args(options: MountOptions) -> list[str]:
    """The juicefs mount flags for ``options`` (each flag and value a separate argv item)."""
    args: list[str] = []
    for name, value in options.given().items():
        flag, kind = JUICEFS_OPTIONS[name]
        if kind == "bool":
            if value:
                args.append(flag)
        elif kind == "seconds":
            args += [flag, seconds(value)]
        else:
            args += [flag, str(value)]
    return args


def nfs_option_string(options: MountOptions, port: int | None) -> str:
    given = options.given()
    opts = ["ro" if given.get("read_only") else "rw"]
    for name in ("vers", "nconnect", "timeo", "retrans"):
        if name in given:
            opts.append(f"{name}={given[name]}")
    if given.get("soft"):
        opts.append("soft")
    if port:
        opts.append(f"port={port}")
    return ",".join(opts)
