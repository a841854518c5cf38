"""Build (and cache) a tiny bootable test guest from Debian packages only.

The guest is a Debian cloud kernel plus an initramfs holding busybox-static,
a handful of kernel modules, the QEMU guest agent (``qemu-ga`` from the
host's qemu-guest-agent package, with the shared libraries it links) and
``init.sh`` (next to this file).  It boots
under TCG in a few seconds and speaks a line protocol on the serial console
(see ``init.sh``): ``KVMAGENT-GUEST-READY`` once up, a heartbeat, virtiofs
mount/read/gone lines and a power-off line on the ACPI power button.

Usage::

    from tests.guest.build import build_guest, BOOT_MARKER
    image = build_guest()          # GuestImage(kernel=..., initrd=...)

or ``python -m tests.guest.build [CACHE_DIR]`` which builds and prints the paths.

The cache lives in ``$KVMAGENT_GUEST_CACHE`` or ``/var/cache/kvmagent-test-guest``.
Each build goes to a temporary directory renamed into place when complete,
under an exclusive lock, in a directory named after the kernel package, its
version and a hash of everything else that goes into the initramfs (init
script, module list, busybox and qemu-ga binaries, this builder's format version), so a
changed init script gives a new build and concurrent users never see a half
written image.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["BOOT_MARKER", "GuestBuildError", "GuestImage", "build_guest"]

BOOT_MARKER = "KVMAGENT-GUEST-READY"

DEFAULT_CACHE_DIR = pathlib.Path("/var/cache/kvmagent-test-guest")
CACHE_ENV = "KVMAGENT_GUEST_CACHE"

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
QGA_PACKAGE = "qemu-guest-agent"
QGA_PATHS = ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga")

# Loaded by /init in this order (each one's dependencies come before it).
# virtio_blk serves the optional raw disk; button+evdev turn the ACPI power
# button into /dev/input/eventN so /init can power off on virDomainShutdown.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",  # the guest agent's virtio-serial port
    "fuse",
    "virtiofs",
    "button",
    "evdev",
)

INIT_SCRIPT = pathlib.Path(__file__).with_name("init.sh")

# Bump when the layout of the initramfs or of the cache entry changes.
FORMAT_VERSION = "2"

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.gz"
MANIFEST_NAME = "manifest.json"
PRUNE_AFTER_DAYS = 14


class GuestBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class GuestImage:
    kernel: pathlib.Path
    initrd: pathlib.Path


# --------------------------------------------------------------------------
# helpers


def _log(msg: str) -> None:
    print(f"[guest-build] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    try:
        return subprocess.run(cmd, check=True, **kw)
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise GuestBuildError(f"{' '.join(cmd)} failed ({e.returncode}): {err}") from e
    except FileNotFoundError as e:
        raise GuestBuildError(f"{cmd[0]} not found: {e}") from e


def _apt_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DEBIAN_FRONTEND", "noninteractive")
    env["LC_ALL"] = "C"
    return env


def _resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel image linux-image-cloud-amd64 depends on."""

    def apt_cache(*args: str) -> str | None:
        p = subprocess.run(
            ["apt-cache", *args],
            check=False, capture_output=True, text=True, env=_apt_env(),
        )
        return p.stdout if p.returncode == 0 else None

    def attempt() -> tuple[str, str] | None:
        out = apt_cache("show", "--no-all-versions", KERNEL_META_PACKAGE)
        if not out:
            return None
        m = re.search(r"^Depends:.*?\b(linux-image-[^\s,]+-cloud-amd64)(?:\s*\(=\s*([^)\s]+)\))?",
                      out, re.MULTILINE)
        if not m:
            return None
        pkg, version = m.group(1), m.group(2)
        if version is None:
            pol = apt_cache("policy", pkg) or ""
            v = re.search(r"^\s*Candidate:\s*(\S+)\s*$", pol, re.MULTILINE)
            if not v or v.group(1) == "(none)":
                return None
            version = v.group(1)
        return pkg, version

    found = attempt()
    if found is None:
        _log("apt metadata lacks the cloud kernel; running apt-get update")
        _run(["apt-get", "update"], env=_apt_env())
        found = attempt()
    if found is None:
        raise GuestBuildError(f"cannot resolve the kernel package {KERNEL_META_PACKAGE} depends on")
    return found


def _busybox() -> pathlib.Path:
    for p in BUSYBOX_PATHS:
        path = pathlib.Path(p)
        if path.is_file() and _is_static(path):
            return path
    _log(f"installing {BUSYBOX_PACKAGE}")
    _run(["apt-get", "install", "-y", "--no-install-recommends", BUSYBOX_PACKAGE], env=_apt_env())
    for p in BUSYBOX_PATHS:
        path = pathlib.Path(p)
        if path.is_file() and _is_static(path):
            return path
    raise GuestBuildError("no static busybox after installing busybox-static")


def _qga() -> pathlib.Path:
    """The host's qemu-ga: same distribution as the guest's kernel, so its libraries fit."""
    for attempt in range(2):
        for p in QGA_PATHS:
            if pathlib.Path(p).is_file():
                return pathlib.Path(p)
        if attempt == 0:
            _log(f"installing {QGA_PACKAGE}")
            _run(["apt-get", "install", "-y", "--no-install-recommends", QGA_PACKAGE],
                 env=_apt_env())
    raise GuestBuildError(f"no qemu-ga after installing {QGA_PACKAGE}")


def _shared_libraries(binary: pathlib.Path) -> list[pathlib.Path]:
    """Absolute paths of the libraries (and the loader) ``binary`` needs, as ldd resolves them."""
    out = _run(["ldd", str(binary)], text=True).stdout
    libs = []
    for line in out.splitlines():
        # "libglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x...)" or
        # "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vdso has no file.
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(pathlib.Path(m.group(1)))
        elif "=>" in line and "not found" in line:
            raise GuestBuildError(f"{binary}: {line.strip()}")
    return libs


def _is_static(path: pathlib.Path) -> bool:
    # A static ELF has no PT_INTERP; cheap check: no ".interp"/ld-linux string.
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"\x7fELF") and b"ld-linux" not in head


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_hash(busybox: pathlib.Path, qga: pathlib.Path) -> str:
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION}\n".encode())
    h.update(("modules=" + ",".join(MODULES) + "\n").encode())
    h.update(b"init=")
    h.update(INIT_SCRIPT.read_bytes())
    h.update(f"\nbusybox={_sha256_file(busybox)}\n".encode())
    for path in [qga, *_shared_libraries(qga)]:
        h.update(f"{path}={_sha256_file(path)}\n".encode())
    return h.hexdigest()[:16]


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)


def _is_complete(entry: pathlib.Path) -> bool:
    return all((entry / n).is_file() for n in (KERNEL_NAME, INITRD_NAME, MANIFEST_NAME))


def _image(entry: pathlib.Path) -> GuestImage:
    with contextlib.suppress(OSError):
        os.utime(entry)  # last use, for pruning
    return GuestImage(kernel=entry / KERNEL_NAME, initrd=entry / INITRD_NAME)


def _prune(cache_dir: pathlib.Path, keep: pathlib.Path) -> None:
    """Drop builds unused for PRUNE_AFTER_DAYS (other checkouts may still use recent ones)."""
    limit = time.time() - PRUNE_AFTER_DAYS * 86400
    for p in cache_dir.glob("linux-image-*"):
        if p == keep or not p.is_dir():
            continue
        with contextlib.suppress(OSError):
            if p.stat().st_mtime < limit:
                _log(f"pruning unused build {p.name}")
                shutil.rmtree(p)


@contextlib.contextmanager
def _locked(cache_dir: pathlib.Path):
    with open(cache_dir / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# the build


def _fetch_deb(pkg: str, version: str, debs_dir: pathlib.Path) -> pathlib.Path:
    """The kernel .deb: from apt's archive cache, our own cache, or apt-get download.

    Downloads are kept in ``debs_dir`` (only the current kernel) so that a
    rebuild for a changed init script does not download again.
    """
    prefix = f"{pkg}_{version.replace(':', '%3a')}_"
    for d in (pathlib.Path("/var/cache/apt/archives"), debs_dir):
        for deb in sorted(d.glob(f"{pkg}_*.deb")):
            if deb.name.startswith(prefix):
                _log(f"using {deb}")
                return deb
    debs_dir.mkdir(exist_ok=True)
    dl = pathlib.Path(tempfile.mkdtemp(prefix=".dl-", dir=debs_dir))
    try:
        _log(f"apt-get download {pkg}={version}")
        _run(["apt-get", "download", f"{pkg}={version}"], cwd=dl, env=_apt_env())
        got = sorted(dl.glob(f"{pkg}_*.deb"))
        if not got:
            raise GuestBuildError(f"apt-get download {pkg} produced no .deb")
        for old in debs_dir.glob("linux-image-*.deb"):
            old.unlink()
        final = debs_dir / got[0].name
        os.rename(got[0], final)
        return final
    finally:
        shutil.rmtree(dl, ignore_errors=True)


def _module_bytes(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        p = _run(["zstd", "-dc"], input=data)
        return p.stdout
    raise GuestBuildError(f"unknown module compression: {path}")


def _modinfo(data: bytes, key: str) -> str | None:
    m = re.search(rb"(?:^|\x00)" + re.escape(key.encode()) + rb"=([^\x00]*)\x00", data)
    return m.group(1).decode() if m else None


def _collect_modules(moddir: pathlib.Path) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Return ([(name, ko bytes)] in load order, [built-in names])."""
    builtin: set[str] = set()
    bfile = moddir / "modules.builtin"
    if bfile.is_file():
        for line in bfile.read_text().splitlines():
            builtin.add(pathlib.Path(line).name.split(".ko")[0].replace("-", "_"))
    index: dict[str, pathlib.Path] = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        index.setdefault(p.name.split(".ko")[0].replace("-", "_"), p)

    loaded: list[tuple[str, bytes]] = []
    builtins: list[str] = []
    available = set(builtin)
    for name in MODULES:
        if name in builtin:
            builtins.append(name)
            continue
        path = index.get(name)
        if path is None:
            raise GuestBuildError(f"kernel module {name} is neither built in nor in {moddir}")
        data = _module_bytes(path)
        deps = [d.replace("-", "_") for d in (_modinfo(data, "depends") or "").split(",") if d]
        missing = [d for d in deps if d not in available]
        if missing:
            raise GuestBuildError(f"module {name} needs {missing}, not loaded before it")
        loaded.append((name, data))
        available.add(name)
    return loaded, builtins


def _pack_initramfs(root: pathlib.Path, busybox: pathlib.Path, out: pathlib.Path) -> None:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = pathlib.Path(dirpath).relative_to(root)
        if str(rel) != ".":
            paths.append(str(rel))
        for fn in sorted(filenames):
            paths.append(str(rel / fn) if str(rel) != "." else fn)
    listing = ("\n".join(paths) + "\n").encode()
    p = _run([str(busybox), "cpio", "-o", "-H", "newc"], cwd=root, input=listing)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(p.stdout)


def _build(entry_tmp: pathlib.Path, pkg: str, version: str, busybox: pathlib.Path,
           qga: pathlib.Path, key: str) -> None:
    work = entry_tmp / "work"
    work.mkdir()
    deb = _fetch_deb(pkg, version, entry_tmp.parent / "debs")
    x = work / "x"
    _run(["dpkg-deb", "-x", str(deb), str(x)])
    vmlinuz = sorted((x / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise GuestBuildError(f"expected one boot/vmlinuz-* in {deb}, found {vmlinuz}")
    kernel_release = vmlinuz[0].name[len("vmlinuz-"):]
    moddir = None
    for base in ("lib/modules", "usr/lib/modules"):
        if (x / base / kernel_release).is_dir():
            moddir = x / base / kernel_release
            break
    if moddir is None:
        raise GuestBuildError(f"no modules directory for {kernel_release} in {deb}")
    modules, builtins = _collect_modules(moddir)

    root = work / "root"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "mnt",
              "lib/modules", "etc/kvmagent"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    listing = _run([str(busybox), "--list-full"], text=True).stdout.split()
    for applet in listing:
        target = root / applet
        if target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", target)
    if not (root / "bin/sh").is_symlink():
        raise GuestBuildError("busybox has no sh applet")
    for path in [qga, *_shared_libraries(qga)]:
        dest = root / path.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)  # follows symlinks: the soname holds the real file
        os.chmod(dest, 0o755)
    shutil.copyfile(INIT_SCRIPT, root / "init")
    os.chmod(root / "init", 0o755)
    for name, data in modules:
        (root / "lib/modules" / f"{name}.ko").write_bytes(data)
    (root / "etc/kvmagent/modules").write_text("".join(f"{n}\n" for n, _ in modules))
    # /dev/console lets the kernel give /init a console before devtmpfs is up;
    # /init also re-opens it after mounting devtmpfs, so this is best effort.
    with contextlib.suppress(OSError):
        os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))

    shutil.copyfile(vmlinuz[0], entry_tmp / KERNEL_NAME)
    _pack_initramfs(root, busybox, entry_tmp / INITRD_NAME)
    manifest = {
        "kernel_package": pkg,
        "kernel_package_version": version,
        "kernel_release": kernel_release,
        "modules": [n for n, _ in modules],
        "builtin_modules": builtins,
        "content_hash": key,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (entry_tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(work)
    for n in (KERNEL_NAME, INITRD_NAME, MANIFEST_NAME):
        os.chmod(entry_tmp / n, 0o644)
    # qemu runs as libvirt-qemu: the entry must be world readable/traversable.
    os.chmod(entry_tmp, 0o755)


def build_guest(cache_dir: pathlib.Path | None = None) -> GuestImage:
    """Return a bootable GuestImage, building it on first use (idempotent, cached)."""
    if cache_dir is None:
        cache_dir = pathlib.Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)
    cache_dir = pathlib.Path(cache_dir).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        os.chmod(cache_dir, 0o755)

    memo = _MEMO.get(cache_dir)
    if memo is not None and memo.kernel.is_file() and memo.initrd.is_file():
        return memo
    image = _build_guest(cache_dir)
    _MEMO[cache_dir] = image
    return image


# Per-process memo: spares the apt-cache lookup on repeated calls in a session.
_MEMO: dict[pathlib.Path, GuestImage] = {}


def _build_guest(cache_dir: pathlib.Path) -> GuestImage:
    busybox, qga = _busybox(), _qga()
    key = _content_hash(busybox, qga)
    try:
        pkg, version = _resolve_kernel_package()
    except GuestBuildError as e:
        # Offline and no apt metadata: reuse the newest build of this content.
        candidates = sorted(
            (p for p in cache_dir.glob(f"*_{key}") if _is_complete(p)),
            key=lambda p: p.stat().st_mtime,
        )
        if candidates:
            _log(f"{e}; reusing {candidates[-1]}")
            return _image(candidates[-1])
        raise

    entry = cache_dir / f"{_safe(pkg)}_{_safe(version)}_{key}"
    if _is_complete(entry):
        return _image(entry)
    with _locked(cache_dir):
        if _is_complete(entry):
            return _image(entry)
        # Leftovers of interrupted builds (we hold the lock: nobody is building).
        for stale in cache_dir.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if entry.exists():
            shutil.rmtree(entry)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            t0 = time.monotonic()
            _build(tmp, pkg, version, busybox, qga, key)
            os.rename(tmp, entry)
            _log(f"built {entry} in {time.monotonic() - t0:.1f}s")
            _prune(cache_dir, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _image(entry)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m tests.guest.build [CACHE_DIR]\n"
              f"default cache: ${CACHE_ENV} or {DEFAULT_CACHE_DIR}")
        return 0
    cache = pathlib.Path(argv[0]) if argv else None
    try:
        image = build_guest(cache)
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"kernel={image.kernel}")
    print(f"initrd={image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
