"""The index folder's lock (``tc_explore.folder_lock``, shared with weight-view
builds, which must not import the index package), under its index name."""
from ..folder_lock import HEARTBEAT_EVERY, STALE_AFTER, FolderLock, lock_path

__all__ = ["FolderLock", "lock_path", "HEARTBEAT_EVERY", "STALE_AFTER"]
