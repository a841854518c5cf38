"""Live virtiofs shares of model directories into running VMs.

Attach and detach run under the per-VM lock, live and on the persistent definition. The
device is a :class:`~kvmagent.vm.config.VirtiofsShare` rendered with ElementTree.

Sources: a share's source must resolve to a directory inside ``<models_root>/<uuid>/`` of a
model center that is recorded and mounted right now (checked again under the model center's
lock, which its umount takes too). virtiofsd never exports the requested path itself: the
agent makes a bind mount (``<virtiofs_readonly_root>/<vm>/tag-<tag>``, read-only or
read-write) of the directory a child process opened component by component with
``O_PATH|O_NOFOLLOW|O_DIRECTORY`` from the model-center mount, binding ``/proc/self/fd/N``.
A symlink swapped in after the checks fails the walk instead of redirecting the export, and
the mount table is checked afterwards (the export's root and device must be the model
center's directory). libvirt 9 refuses ``<readonly/>`` for virtiofs and virtiofsd 7.2 has no
read-only switch, so for a read-only share the read-only bind is what makes the host kernel
refuse every write. The mapping (tag -> source, exported dir) is kept under
``virtiofs/<vm>`` in the state store; bind mounts are removed on detach, and when the domain
stops or is undefined.

Detach waits for libvirt's device-removed event (the guest must answer the ACPI unplug); a
guest that never releases the device gives a clear error after ``virtiofs_detach_timeout``.

If the guest agent answers, the share is also mounted inside the guest (guest-exec of
``mkdir -p`` and ``mount -t virtiofs``; argument lists, no shell).
"""
from .registry import FOLDER, Share, ShareRegistry, list_shares
from .service import SERVICE, VirtiofsService

__all__ = ["FOLDER", "SERVICE", "Share", "ShareRegistry", "VirtiofsService", "list_shares"]
