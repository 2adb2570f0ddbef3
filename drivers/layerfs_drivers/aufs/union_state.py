"""What the FUSE union (:mod:`.unionfs`) keeps about its branches and inodes.

The AUFS on-disk names (whiteouts, the opaque marker and its dirren redirect
record, the work dir), the mount's constants, :class:`Node` (one inode the
kernel knows, located in the branches), :class:`Stats` (the counters read
through ``user.layerfs.stats``) and the two small helpers every layer of
:class:`~.union_ops.UnionFS` raises with. Plain data, no I/O.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Any

from .backing import Layer

log = logging.getLogger("layerfs.unionfs")

WH = b".wh."
WH_META = b".wh..wh."
OPAQUE = b".wh..wh..opq"
WORKDIR = b".wh..wh.orph"
DIRREN_FLAG = b".wh..wh.dirren"
REDIRECT_MAGIC = b"layerfs-dirren:"
WH_NAME_MAX = 255 - len(WH)
MAX_REDIRECT = 64 * 1024

CAPS_XATTR = b"security.capability"
STATS_XATTR = b"user.layerfs.stats"
RESET_XATTR = b"user.layerfs.stats.reset"

FSTYPE = "layerfs-union"
DEFAULT_TIMEOUT = 86400.0

S_IFMT = 0o170000
S_IFDIR = stat.S_IFDIR
S_IFREG = stat.S_IFREG
S_IFLNK = stat.S_IFLNK



def check_new_name(name: bytes) -> None:
    # A name with the whiteout prefix could not be told from a whiteout.
    if name.startswith(WH):
        raise OSError(errno.EPERM, "names starting with .wh. are reserved")


def os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Stats:
    """Counters of the work the filesystem does on its branches."""

    __slots__ = ("cached_opens", "copy_up_bytes", "copy_ups", "dir_copy_ups", "dir_renames",
                 "fallocates", "getattr_stats", "lookup_name_stats", "lookup_opaque_probes",
                 "lookup_whiteout_probes", "lookups", "lookups_negative", "other_probes",
                 "passthrough_opens", "readdir_stats", "reads_served", "redirects_read",
                 "whiteouts_created", "whiteouts_removed", "writes_served")
    cached_opens: int
    copy_up_bytes: int
    copy_ups: int
    dir_copy_ups: int
    dir_renames: int
    fallocates: int
    getattr_stats: int
    lookup_name_stats: int
    lookup_opaque_probes: int
    lookup_whiteout_probes: int
    lookups: int
    lookups_negative: int
    other_probes: int
    passthrough_opens: int
    readdir_stats: int
    reads_served: int
    redirects_read: int
    whiteouts_created: int
    whiteouts_removed: int
    writes_served: int

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        d = {name: getattr(self, name) for name in self.__slots__}
        d["backing_stats"] = (self.lookup_name_stats + self.lookup_whiteout_probes
                              + self.lookup_opaque_probes + self.getattr_stats
                              + self.readdir_stats + self.other_probes)
        return d


class Node:
    """One inode the kernel knows (or knew): where it lives in the branches.

    ``path`` is its path in the union (``b""`` for the root, ``b"a/b"`` below
    it); ``alt`` holds more paths of a hardlinked file. ``branch`` and ``bpath``
    locate its topmost backing entry (in the top branch, ``bpath`` is the union
    path; below, a redirected directory's contents live elsewhere).
    Directories also have ``found``, every (branch, backing path) where the
    name was found, top-down, and ``layers``, the same cut at an opaque branch
    and with redirects followed (None until the directory is first used as a
    parent); ``redirect`` is the record of the top branch's part, if any.
    ``fds`` are the backing fds of open handles (used once the last name is
    gone: open-unlinked files); ``pt_*`` the passthrough backing file the
    kernel holds for it.
    """

    __slots__ = ("alt", "bpath", "branch", "cached_count", "caps", "fds", "found", "ino", "key",
                 "kind", "layers", "nlookup", "path", "pt_count", "pt_id", "pt_key", "redirect")

    def __init__(self, ino: int, path: bytes | None, kind: int, branch: int, bpath: bytes,
                 found: list[Layer] | None, key: Any) -> None:
        self.ino = ino
        self.path = path
        self.alt: list[bytes] | None = None
        self.kind = kind
        self.branch = branch
        self.bpath = bpath
        self.found = found
        self.layers: list[Layer] | None = None
        self.redirect: bytes | None = None
        self.nlookup = 0
        self.fds: set[int] = set()
        self.key = key
        self.pt_id = 0
        self.pt_key: Any = None
        self.pt_count = 0
        self.cached_count = 0
        self.caps: bytes | None = None  # security.capability (b"": none), once read

    def all_paths(self) -> list[bytes]:
        out = [] if self.path is None else [self.path]
        if self.alt:
            out += self.alt
        return out


def parse_redirect(data: bytes) -> bytes | None:
    """The union path (``b"a/b"``, ``b""`` for the root) a redirect record names, or None
    for a plain opaque marker or anything malformed."""
    if not data.startswith(REDIRECT_MAGIC):
        return None
    target = data[len(REDIRECT_MAGIC):]
    if not target.startswith(b"/") or b"\0" in target:
        return None
    parts = target[1:].split(b"/") if target != b"/" else []
    if any(p in (b"", b".", b"..") for p in parts):
        return None
    return b"/".join(parts)

