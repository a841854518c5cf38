"""Smoke tests of the tiny test guest on the real libvirt/QEMU (TCG).

They boot the guest built by tests/guest/build.py and check the behaviour the
agent's integration tests rely on: the boot marker, live virtiofs attach (the
guest mounts the share and reads a host file), live detach (the guest lets
the device go, libvirt drops it, virtiofsd exits) and ACPI shutdown.

Self-contained: no conftest needed.  Select with ``-m guest``.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET

import libvirt  # noqa: E402  (a missing binding must fail, not skip)
import pytest

try:
    from tests.guest.build import BOOT_MARKER, GuestImage, build_guest
    from tests.guest.domain import tiny_domain_xml
except ImportError:  # tests/ on sys.path instead of the repository root
    from guest.build import BOOT_MARKER, GuestImage, build_guest  # type: ignore[no-redef]
    from guest.domain import tiny_domain_xml  # type: ignore[no-redef]

pytestmark = pytest.mark.guest

URI = "qemu:///system"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
BOOT_TIMEOUT = 60.0
MOUNT_TIMEOUT = 30.0
DETACH_TIMEOUT = 20.0
SHUTDOWN_TIMEOUT = 30.0


# ---------------------------------------------------------------------------
# helpers


class Console:
    """The guest's serial console log (a file written by QEMU)."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def offset(self) -> int:
        return len(self.text())

    def tail(self, lines: int = 40) -> str:
        t = self.text().splitlines()[-lines:]
        return "\n".join(t) if t else "<console log empty>"

    def wait_for(self, pattern: str, timeout: float, since: int = 0, what: str = "") -> re.Match:
        """Wait for a regex (multiline) in the log after offset ``since``."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text(), since)
            if m:
                return m
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what or pattern!r} "
                    f"in {self.path}; console tail:\n{self.tail()}"
                )
            time.sleep(0.1)


def _wait(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _virtiofsd_pids(source_dir: pathlib.Path) -> set[int]:
    """virtiofsd processes serving ``source_dir`` (libvirt passes -o source=DIR)."""
    pids = set()
    needle = f"source={source_dir}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"virtiofsd") and any(needle in a for a in argv):
            pids.add(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def virtiofs_xml(source_dir: pathlib.Path, tag: str) -> str:
    # Note: libvirt 9.0 refuses <readonly/> here ("virtiofs does not yet
    # support read-only mode"), so the share is attached read-write.
    fs = ET.Element("filesystem", type="mount", accessmode="passthrough")
    ET.SubElement(fs, "driver", type="virtiofs")
    ET.SubElement(fs, "binary", path=VIRTIOFSD)
    ET.SubElement(fs, "source", dir=str(source_dir))
    ET.SubElement(fs, "target", dir=tag)
    return ET.tostring(fs, encoding="unicode")


def _has_filesystem(dom, tag: str) -> bool:
    root = ET.fromstring(dom.XMLDesc(0))
    return any(t.get("dir") == tag for t in root.findall("./devices/filesystem/target"))


def _state(dom) -> int:
    return dom.state()[0]


class Guest:
    def __init__(self, dom, console: Console, workdir: pathlib.Path, boot_seconds: float):
        self.dom = dom
        self.console = console
        self.workdir = workdir
        self.boot_seconds = boot_seconds


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    t0 = time.monotonic()
    image = build_guest()
    print(f"\nguest image ready in {time.monotonic() - t0:.2f}s: {image}")
    assert image.kernel.is_file() and image.initrd.is_file()
    return image


@pytest.fixture(scope="module")
def conn():
    c = libvirt.open(URI)  # libvirtd down is a failure of the environment, not a skip
    yield c
    c.close()


@pytest.fixture
def workdir():
    # Not pytest's tmp_path: /tmp/pytest-of-root is 0700 and QEMU runs as
    # libvirt-qemu, which must reach the console log.
    d = pathlib.Path(tempfile.mkdtemp(prefix="kvmagent-guest-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def guest(conn, guest_image, workdir, record_property):
    name = f"kvmagent-test-guest-{uuid.uuid4().hex[:8]}"
    console = Console(workdir / "console.log")
    xml = tiny_domain_xml(name, str(uuid.uuid4()), guest_image, str(console.path))
    dom = conn.defineXML(xml)
    try:
        t0 = time.monotonic()
        dom.create()
        console.wait_for(rf"^{re.escape(BOOT_MARKER)}\s*$", BOOT_TIMEOUT, what="boot marker")
        boot = time.monotonic() - t0
        print(f"\nboot: {boot:.2f}s (create -> {BOOT_MARKER})")
        record_property("boot_seconds", round(boot, 2))
        yield Guest(dom, console, workdir, boot)
    finally:
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass
        try:
            dom.undefine()
        except libvirt.libvirtError:
            pass


# ---------------------------------------------------------------------------
# tests


def test_guest_boots_and_heartbeats(guest):
    assert _state(guest.dom) == libvirt.VIR_DOMAIN_RUNNING
    since = guest.console.offset()
    guest.console.wait_for(r"^KVMAGENT-GUEST-ALIVE \d+\s*$", 12, since, "a heartbeat after boot")
    text = guest.console.text()
    assert "KVMAGENT-GUEST-WARN" not in text, f"guest warned:\n{guest.console.tail()}"


def test_virtiofs_live_attach_and_detach(guest, record_property):
    dom, console = guest.dom, guest.console
    share = guest.workdir / "share"
    share.mkdir()
    content = f"kvmagent-share-{uuid.uuid4().hex}"
    (share / "hello.txt").write_text(content + "\nsecond line\n")
    tag = "models"
    fs_xml = virtiofs_xml(share, tag)

    # attach -> mounted and read in the guest
    since = console.offset()
    t0 = time.monotonic()
    dom.attachDeviceFlags(fs_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    attach_call = time.monotonic() - t0
    assert _has_filesystem(dom, tag), "attached filesystem missing from the live XML"
    console.wait_for(rf"^VIRTIOFS-MOUNTED {tag}\s*$", MOUNT_TIMEOUT, since, f"VIRTIOFS-MOUNTED {tag}")
    mounted = time.monotonic() - t0
    console.wait_for(rf"^VIRTIOFS-READ {tag} hello\.txt {re.escape(content)}\s*$", 10, since,
                     "the guest reading hello.txt from the share")
    print(f"\nattach: call {attach_call:.2f}s, attach -> mounted in guest {mounted:.2f}s")
    record_property("attach_to_mounted_seconds", round(mounted, 2))

    pids = _virtiofsd_pids(share)
    assert pids, f"no virtiofsd process serving {share}"

    # detach while the guest has the share mounted
    since = console.offset()
    t0 = time.monotonic()
    dom.detachDeviceFlags(fs_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    detach_call = time.monotonic() - t0
    gone = _wait(lambda: not _has_filesystem(dom, tag), DETACH_TIMEOUT)
    detached = time.monotonic() - t0
    assert gone, (
        f"filesystem {tag} still in the live XML {DETACH_TIMEOUT:.0f}s after detach "
        f"(guest did not release it); console tail:\n{console.tail()}"
    )
    print(f"detach: call {detach_call:.2f}s, device gone from live XML after {detached:.2f}s")
    record_property("detach_seconds", round(detached, 2))

    exited = _wait(lambda: not any(_alive(p) for p in pids), 10)
    assert exited, f"virtiofsd {sorted(p for p in pids if _alive(p))} still running after detach"
    console.wait_for(rf"^VIRTIOFS-GONE {tag}\s*$", 10, since, f"VIRTIOFS-GONE {tag}")
    # and the guest is still healthy afterwards
    since = console.offset()
    console.wait_for(r"^KVMAGENT-GUEST-ALIVE \d+\s*$", 12, since, "a heartbeat after the detach")
    assert _state(dom) == libvirt.VIR_DOMAIN_RUNNING


def test_acpi_shutdown(guest, record_property):
    dom, console = guest.dom, guest.console
    t0 = time.monotonic()
    dom.shutdown()
    off = _wait(lambda: _state(dom) == libvirt.VIR_DOMAIN_SHUTOFF, SHUTDOWN_TIMEOUT, 0.2)
    took = time.monotonic() - t0
    assert off, (
        f"domain not shut off {SHUTDOWN_TIMEOUT:.0f}s after dom.shutdown() "
        f"(state {dom.state()}); console tail:\n{console.tail()}"
    )
    assert "KVMAGENT-GUEST-POWEROFF" in console.text(), console.tail()
    print(f"\nshutdown: dom.shutdown() -> shut off {took:.2f}s")
    record_property("shutdown_seconds", round(took, 2))


def test_acpi_shutdown_with_virtiofs_mounted(guest):
    dom, console = guest.dom, guest.console
    share = guest.workdir / "share"
    share.mkdir()
    (share / "f").write_text("x\n")
    since = console.offset()
    dom.attachDeviceFlags(virtiofs_xml(share, "data"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    console.wait_for(r"^VIRTIOFS-MOUNTED data\s*$", MOUNT_TIMEOUT, since, "VIRTIOFS-MOUNTED data")
    pids = _virtiofsd_pids(share)
    assert pids, f"no virtiofsd process serving {share}"
    dom.shutdown()
    off = _wait(lambda: _state(dom) == libvirt.VIR_DOMAIN_SHUTOFF, SHUTDOWN_TIMEOUT, 0.2)
    assert off, f"domain not shut off after dom.shutdown(); console tail:\n{console.tail()}"
    assert _wait(lambda: not any(_alive(p) for p in pids), 10), "virtiofsd outlived the domain"
