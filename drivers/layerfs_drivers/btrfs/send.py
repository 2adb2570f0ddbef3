"""Reading a ``btrfs send`` stream (format v1) for the paths it touches.

``btrfs send -p PARENT CHILD`` walks the two snapshots' metadata trees side
by side in the kernel, skipping subtrees that share blocks, and emits the
operations that turn PARENT into CHILD. With ``--no-data`` writes become
``update_extent`` records, so the stream stays small whatever the file sizes.

Stream layout: the magic ``btrfs-stream\\0``, a le32 version, then commands,
each a header (le32 length, le16 command, le32 crc32c) followed by ``length``
bytes of attributes (le16 type, le16 length, value). Only the path attributes
matter here. Reference: the kernel's fs/btrfs/send.h.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from layerfs.errors import LayerfsError

MAGIC = b"btrfs-stream\0"

# Commands (send.h, protocol v1; v2/v3 add fallocate, fileattr, encoded_write, verity)
CMD_NAMES = {
    1: "subvol", 2: "snapshot", 3: "mkfile", 4: "mkdir", 5: "mknod", 6: "mkfifo", 7: "mksock",
    8: "symlink", 9: "rename", 10: "link", 11: "unlink", 12: "rmdir", 13: "set_xattr",
    14: "remove_xattr", 15: "write", 16: "clone", 17: "truncate", 18: "chmod", 19: "chown",
    20: "utimes", 21: "end", 22: "update_extent", 23: "fallocate", 24: "fileattr",
    25: "encoded_write", 26: "enable_verity",
}
ATTR_PATH, ATTR_PATH_TO, ATTR_PATH_LINK, ATTR_CLONE_PATH = 15, 16, 17, 22
_PATH_ATTRS = (ATTR_PATH, ATTR_PATH_TO, ATTR_PATH_LINK)

# Commands whose target may be a directory with new contents below it (a new
# directory, or one renamed into place from an orphan name): compare its whole subtree.
_SUBTREE_CMDS = {"mkdir", "rename"}


@dataclass
class SendSummary:
    paths: set[str] = field(default_factory=set)
    """Every path an operation named (as "/a/b")."""
    subtrees: set[str] = field(default_factory=set)
    """Paths whose whole subtree must be compared (new or moved directories)."""
    commands: int = 0


def parse(stream: bytes) -> SendSummary:
    if not stream.startswith(MAGIC):
        raise LayerfsError("not a btrfs send stream (bad magic)")
    (version,) = struct.unpack_from("<I", stream, len(MAGIC))
    if version not in (1, 2, 3):
        raise LayerfsError(f"btrfs send stream version {version} is not supported")
    summary = SendSummary()
    pos = len(MAGIC) + 4
    end = len(stream)
    while pos < end:
        if pos + 10 > end:
            raise LayerfsError("truncated btrfs send stream")
        length, cmd = struct.unpack_from("<IH", stream, pos)
        pos += 10
        body_end = pos + length
        name = CMD_NAMES.get(cmd, str(cmd))
        summary.commands += 1
        while pos < body_end:
            attr, alen = struct.unpack_from("<HH", stream, pos)
            pos += 4
            if attr in _PATH_ATTRS:
                value = stream[pos:pos + alen].decode("utf-8", "surrogateescape")
                path = "/" + value.lstrip("/")
                if value:
                    summary.paths.add(path)
                    if name in _SUBTREE_CMDS and attr in (ATTR_PATH, ATTR_PATH_TO):
                        summary.subtrees.add(path)
            pos += alen
        pos = body_end
    return summary


def changed_paths(stream: bytes) -> SendSummary:
    """Paths touched by a ``btrfs send --no-data`` stream."""
    return parse(stream)


# --- running a send without a subprocess --------------------------------------------------------
# BTRFS_IOC_SEND = _IOW(0x94, 38, struct btrfs_ioctl_send_args), 72 bytes:
#   s64 send_fd; u64 clone_sources_count; u64 *clone_sources; u64 parent_root;
#   u64 flags; u32 version; u8 reserved[28]
# Calling the ioctl directly saves the fork/exec of `btrfs send` (about a third
# of the time of a small diff).
BTRFS_IOC_SEND = 0x40489426
BTRFS_SEND_FLAG_NO_FILE_DATA = 0x1


def send_no_data(child: str, parent: str) -> bytes:
    """The ``btrfs send --no-data -p parent child`` stream, both read-only subvolumes."""
    import ctypes
    import fcntl
    import os
    import threading

    import btrfsutil

    parent_id = btrfsutil.subvolume_id(parent)
    sources = (ctypes.c_uint64 * 1)(parent_id)
    read_fd, write_fd = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            data = os.read(read_fd, 1 << 16)
            if not data:
                break
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    args = struct.pack("<qQQQQI28x", write_fd, 1, ctypes.addressof(sources), parent_id,
                       BTRFS_SEND_FLAG_NO_FILE_DATA, 0)
    buf = ctypes.create_string_buffer(args, len(args))
    fd = os.open(child, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_SEND, buf)
    except OSError as err:
        raise LayerfsError(f"btrfs send of {child} against {parent}: {err.strerror}") from err
    finally:
        os.close(fd)
        os.close(write_fd)
        reader.join()
        os.close(read_fd)
    return b"".join(chunks)
