"""Model center: mount model storage (JuiceFS/ZDFS, NFS, local dirs) under the models root,
keep the mounts healthy, and restore them after a restart."""
from .service import ModelCenterService
from .urls import MountOptions, StorageUrl, StorageUrlError, parse_storage_url
from .watcher import MountWatcher

__all__ = ["ModelCenterService", "MountOptions", "MountWatcher", "StorageUrl",
           "StorageUrlError", "parse_storage_url"]
