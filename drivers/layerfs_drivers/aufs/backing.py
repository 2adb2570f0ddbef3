"""Reaching the branches of the union: directory fds, never paths from a branch root.

Every backing operation is an ``*at()`` call relative to a directory fd
(``openat``, ``fstatat``, ``mkdirat``, ``renameat2``, ``linkat``,
``symlinkat``, ``mknodat``, ``unlinkat``, ``fchownat``, ``utimensat``, and
``getxattrat`` and its siblings for xattrs), so no system call ever sees more
than one name of a union path however deep the branches are:
:class:`Branches` keeps an ``O_PATH`` fd per (branch, directory) it has met.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from typing import Any

DIR_OPEN = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LIST_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

# The running program's own symbols include libc (ctypes.util.find_library would run
# ldconfig, slowing every start of a mount helper).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

Layer = tuple[int, bytes]  # (branch index, backing path in that branch; b"" is its root)


def renameat2(src_fd: int, src: bytes, dst_fd: int, dst: bytes, flags: int) -> None:
    if _libc.renameat2(src_fd, src, dst_fd, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def parent_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


# --- xattrs relative to a directory fd -------------------------------------------------------
# Linux 6.13 added getxattrat(2) and friends; before that, /proc/self/fd/DIRFD/NAME names
# the entry in a short path (the xattr calls take no directory fd).
XTarget = int | tuple[int, bytes]  # an open fd, or (directory fd, name) not followed
_AT_SYMLINK_NOFOLLOW = 0x100
_SYS_SETXATTRAT, _SYS_GETXATTRAT, _SYS_LISTXATTRAT, _SYS_REMOVEXATTRAT = 463, 464, 465, 466
_libc.syscall.restype = ctypes.c_long
_xattrat = True  # until the kernel says ENOSYS


class _XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


# size_t arguments of the variadic syscall(): a plain Python int would go as a 32-bit int,
# leaving the upper half of the register undefined.
_ARGS_SIZE = ctypes.c_size_t(ctypes.sizeof(_XattrArgs))


def _proc_path(target: tuple[int, bytes]) -> bytes:
    return b"/proc/self/fd/%d/%s" % target


def _xattrat_call(number: int, *args: Any) -> int | None:
    """The syscall's result, or None when this kernel lacks the *xattrat calls."""
    global _xattrat
    if not _xattrat:
        return None
    rc = int(_libc.syscall(number, *args))
    if rc < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            _xattrat = False
            return None
        raise OSError(err, os.strerror(err))
    return rc


def xattr_get(target: XTarget, name: bytes) -> bytes:
    if isinstance(target, int):
        return os.getxattr(target, name)
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        args = _XattrArgs(ctypes.addressof(buf), size, 0)
        try:
            n = _xattrat_call(_SYS_GETXATTRAT, target[0], target[1], _AT_SYMLINK_NOFOLLOW, name,
                              ctypes.byref(args), _ARGS_SIZE)
        except OSError as err:
            if err.errno != errno.ERANGE:
                raise
            args = _XattrArgs(0, 0, 0)
            needed = _xattrat_call(_SYS_GETXATTRAT, target[0], target[1], _AT_SYMLINK_NOFOLLOW,
                                   name, ctypes.byref(args), _ARGS_SIZE)
            size = max(needed or 0, size * 2)
            continue
        if n is None:
            return os.getxattr(_proc_path(target), name, follow_symlinks=False)
        return buf.raw[:n]


def xattr_list(target: XTarget) -> list[bytes]:
    if isinstance(target, int):
        return [os.fsencode(n) for n in os.listxattr(target)]
    size = 1024
    while True:
        buf = ctypes.create_string_buffer(size)
        try:
            n = _xattrat_call(_SYS_LISTXATTRAT, target[0], target[1], _AT_SYMLINK_NOFOLLOW, buf,
                              ctypes.c_size_t(size))
        except OSError as err:
            if err.errno != errno.ERANGE:
                raise
            size *= 4
            continue
        if n is None:
            return [os.fsencode(x) for x in os.listxattr(_proc_path(target),
                                                           follow_symlinks=False)]
        return [x for x in buf.raw[:n].split(b"\0") if x]


def xattr_set(target: XTarget, name: bytes, value: bytes, flags: int = 0) -> None:
    if isinstance(target, int):
        os.setxattr(target, name, value, flags)
        return
    buf = ctypes.create_string_buffer(value, len(value))
    args = _XattrArgs(ctypes.addressof(buf), len(value), flags)
    if _xattrat_call(_SYS_SETXATTRAT, target[0], target[1], _AT_SYMLINK_NOFOLLOW, name,
                     ctypes.byref(args), _ARGS_SIZE) is None:
        os.setxattr(_proc_path(target), name, value, flags, follow_symlinks=False)


def xattr_remove(target: XTarget, name: bytes) -> None:
    if isinstance(target, int):
        os.removexattr(target, name)
        return
    if _xattrat_call(_SYS_REMOVEXATTRAT, target[0], target[1], _AT_SYMLINK_NOFOLLOW,
                     name) is None:
        os.removexattr(_proc_path(target), name, follow_symlinks=False)


class Branches:
    """The branch directories, reached only through directory fds.

    ``dirfd(branch, bpath)`` is an ``O_PATH`` fd of a directory, cached; a
    missing one is opened from its nearest cached ancestor one component at a
    time (``O_NOFOLLOW``: a symlink in a branch is never followed), so no
    system call ever sees more than one name. The cache is trimmed only
    between requests (:meth:`trim`), so an fd handed out stays open for the
    request that asked for it.
    """

    LIMIT = 4096

    def __init__(self, roots: list[bytes]) -> None:
        self.roots = roots
        self.root_fds: list[int] = []
        for root in roots:
            self.root_fds.append(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        self.cache: dict[Layer, int] = {}

    def dirfd(self, branch: int, bpath: bytes) -> int:
        if not bpath:
            return self.root_fds[branch]
        fd = self.cache.get((branch, bpath))
        if fd is not None:
            return fd
        names = []
        cur = bpath
        while True:
            head, _, tail = cur.rpartition(b"/")
            names.append(tail)
            if not head:
                fd = self.root_fds[branch]
                break
            cached = self.cache.get((branch, head))
            if cached is not None:
                fd = cached
                break
            cur = head
        prefix = head
        for name in reversed(names):
            fd = os.open(name, DIR_OPEN, dir_fd=fd)
            prefix = join(prefix, name)
            self.cache[(branch, prefix)] = fd
        return fd

    def at(self, branch: int, bpath: bytes) -> tuple[int, bytes]:
        """(directory fd, name) of a backing entry, for the ``*at()`` calls."""
        if not bpath:
            return self.root_fds[branch], b"."
        head, _, tail = bpath.rpartition(b"/")
        return self.dirfd(branch, head), tail

    def forget_top(self, path: bytes) -> None:
        """A top-branch directory moved or went away: drop its fds and those below it."""
        prefix = path + b"/"
        for key in [k for k in self.cache if k[0] == 0 and (k[1] == path
                                                             or k[1].startswith(prefix))]:
            os.close(self.cache.pop(key))

    def trim(self) -> None:
        if len(self.cache) > self.LIMIT:
            for key in list(self.cache)[:len(self.cache) - self.LIMIT // 2]:
                os.close(self.cache.pop(key))

    def close(self) -> None:
        for fd in [*self.cache.values(), *self.root_fds]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.cache.clear()
        self.root_fds = []
