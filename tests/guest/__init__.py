"""A tiny bootable test guest (Debian cloud kernel + busybox initramfs).

See :mod:`tests.guest.build` (image builder, ``python -m tests.guest.build``)
and :mod:`tests.guest.domain` (smoke-test domain XML).  The names below are
re-exported lazily so that ``python -m tests.guest.build`` runs cleanly.
"""

__all__ = ["BOOT_MARKER", "GuestImage", "build_guest"]


def __getattr__(name):
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(name)
