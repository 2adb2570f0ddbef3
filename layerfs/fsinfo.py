"""Facts about files on disk that drivers report: which filesystem a path is on, and how
much space and how many inodes a tree uses.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Usage:
    """Space a layer uses by itself (not counting its parents)."""

    bytes: int
    inodes: int
    exclusive_bytes: int | None = None
    """Block-level drivers: bytes only this layer references."""
    shared_bytes: int | None = None
    """Block-level drivers: bytes shared with other layers."""

    def as_dict(self) -> dict[str, int | None]:
        return {"bytes": self.bytes, "inodes": self.inodes,
                "exclusive_bytes": self.exclusive_bytes, "shared_bytes": self.shared_bytes}


# statfs(2) f_type magics (linux/magic.h) as `docker info` names them. os.statvfs has no
# f_type, hence the call through ctypes.
_FS_MAGIC = {
    0xEF53: "extfs", 0x9123683E: "btrfs", 0x58465342: "xfs", 0x01021994: "tmpfs",
    0x794C7630: "overlayfs", 0x65735546: "fuse", 0x2FC12FC1: "zfs", 0x6A656A63: "fakeowner",
}


def backing_filesystem(path: Path) -> str:
    """Name of the filesystem ``path`` lives on (as ``docker info`` shows it)."""
    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    buf = _Statfs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return "unknown"
    magic = buf.f_type & 0xFFFFFFFF
    return _FS_MAGIC.get(magic, hex(magic))


def layer_dir_usage(path: Path) -> Usage:
    """Bytes (allocated) and inodes of a directory tree, hardlinks counted once."""
    seen: set[tuple[int, int]] = set()
    total_bytes = 0
    inodes = 0
    stack = [str(path)]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Usage(0, 0)
    seen.add((st.st_dev, st.st_ino))
    total_bytes += st.st_blocks * 512
    inodes += 1
    while stack:
        current = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                est = entry.stat(follow_symlinks=False)
                key = (est.st_dev, est.st_ino)
                if key not in seen:
                    seen.add(key)
                    inodes += 1
                    total_bytes += est.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Usage(total_bytes, inodes)
