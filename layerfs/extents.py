"""A file's extents (``FS_IOC_FIEMAP``): where its bytes are, and which are shared.

Block-level copy-on-write drivers share data between layers below the file level: a
btrfs snapshot shares every extent with its origin until one is written, a thin
device maps the same pool blocks as its origin. ``FIEMAP`` lists a file's extents with
their physical offsets and flags; on btrfs the kernel sets ``FIEMAP_EXTENT_SHARED`` on
an extent that another file or snapshot also references, which is what ``layerfs
explain`` reports as shared vs exclusive bytes. On a filesystem inside a thin device
the physical offsets are offsets on that device, which the devicemapper driver maps to
pool blocks.

The ioctl is called directly (``fcntl.ioctl`` on a packed ``struct fiemap``): no Python
library wraps it, and it is one call in a loop.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B          # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1              # write dirty pages first: delayed allocations get a place
EXTENT_LAST = 0x1
EXTENT_UNKNOWN = 0x2
EXTENT_DELALLOC = 0x4
EXTENT_DATA_INLINE = 0x200
EXTENT_UNWRITTEN = 0x800
EXTENT_SHARED = 0x2000

_HEADER = struct.Struct("=QQIIII")                  # start, length, flags, mapped, count, pad
_EXTENT = struct.Struct("=QQQQQIIII")               # logical, physical, length, 2 reserved,
                                                    # flags, 3 reserved
_BATCH = 256


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def shared(self) -> bool:
        return bool(self.flags & EXTENT_SHARED)

    @property
    def inline(self) -> bool:
        return bool(self.flags & EXTENT_DATA_INLINE)


@dataclass(frozen=True)
class Sharing:
    """A file's data bytes by how they are stored (holes count in none)."""

    exclusive: int
    shared: int
    inline: int

    def as_dict(self) -> dict[str, int]:
        return {"exclusive_bytes": self.exclusive, "shared_bytes": self.shared,
                "inline_bytes": self.inline}


def extents(path: str | os.PathLike[str]) -> list[Extent]:
    """Every extent of the file at ``path`` (OSError if the filesystem has no FIEMAP)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        out: list[Extent] = []
        start = 0
        flags = FIEMAP_FLAG_SYNC
        while True:
            buf = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
            _HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, flags, 0, _BATCH, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _HEADER.unpack_from(buf, 0)[3]
            if mapped == 0:
                return out
            for i in range(mapped):
                logical, physical, length, _, _, eflags, _, _, _ = _EXTENT.unpack_from(
                    buf, _HEADER.size + i * _EXTENT.size)
                out.append(Extent(logical, physical, length, eflags))
            last = out[-1]
            if last.flags & EXTENT_LAST or mapped < _BATCH:
                return out
            start = last.logical + last.length
            flags = 0
    finally:
        os.close(fd)


def sharing(path: str | os.PathLike[str]) -> Sharing:
    """Exclusive, shared and inline bytes of a file, from its extents."""
    exclusive = shared = inline = 0
    for ext in extents(path):
        if ext.inline:
            inline += ext.length
        elif ext.shared:
            shared += ext.length
        else:
            exclusive += ext.length
    return Sharing(exclusive, shared, inline)
