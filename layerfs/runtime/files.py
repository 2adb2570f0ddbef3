"""Reading a file of a container's root filesystem from the host, when the file is hostile.

The runner reads a few files of the image before the container exists (``/etc/passwd``
and ``/etc/group`` for ``run -u NAME``, and again for ``exec -u NAME`` while the
container runs and may have replaced them). The host process is root, so "just
open it" would follow a symlink out of the root, block forever on a FIFO, read a
block device of the host, or arm a watchdog by opening its character device.
:func:`read_small_file` opens nothing but a regular file, inside the root, and
reads a bounded amount of it.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import InvalidArgument
from . import _sys

_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFBLK: "block device", stat.S_IFCHR: "character device",
          stat.S_IFSOCK: "socket", stat.S_IFDIR: "directory", stat.S_IFLNK: "symbolic link"}


def read_small_file(root: str | os.PathLike[str], path: str, limit: int = 1 << 20) -> bytes | None:
    """The bytes of ``path`` (relative to ``root``, resolved inside it), or ``None`` if it
    does not exist. Anything but a regular file of at most ``limit`` bytes is an
    :class:`InvalidArgument` naming what it is.

    The file is first opened ``O_PATH`` (which opens no device and cannot block) with
    ``openat2(RESOLVE_IN_ROOT)``: symlinks on the way and ``..`` stay inside ``root``;
    the last component must not be a symlink (``O_NOFOLLOW``). Only once ``fstat`` says it
    is a regular file is it reopened for reading, through the same inode, ``O_NONBLOCK``.
    """
    where = f"{path} of the container's root filesystem"
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            pfd = _sys.openat2(root_fd, path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                               _sys.RESOLVE_IN_ROOT | _sys.RESOLVE_NO_MAGICLINKS)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise InvalidArgument(f"{where} is a symbolic link: refusing to follow it"
                                      ) from None
            raise InvalidArgument(f"{where}: cannot be opened: {os.strerror(err.errno or 0)}"
                                  ) from None
    finally:
        os.close(root_fd)
    try:
        _require_regular(os.fstat(pfd), where, limit)
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY |
                     os.O_CLOEXEC)
    finally:
        os.close(pfd)
    try:
        _require_regular(os.fstat(fd), where, limit)   # the same inode: O_PATH pinned it
        chunks = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidArgument(f"{where}: larger than {limit} bytes")
    return data


def _require_regular(st: os.stat_result, where: str, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
        raise InvalidArgument(f"{where} is a {kind}, not a regular file: refusing to read it")
    if st.st_size > limit:
        raise InvalidArgument(f"{where}: larger than {limit} bytes ({st.st_size})")

