"""The FUSE kernel protocol on /dev/fuse, spoken directly (no libfuse).

Why our own: Debian 12's libfuse 3.14, and pyfuse3 on top of it, cannot ask
the kernel for FUSE passthrough (Linux >= 6.9: the kernel reads and writes an
open file's backing file itself, with no round trip to the server), and
pyfuse3 needs a C build (libfuse3-dev, ~60 s of setup) and trio. The protocol
is a stream of fixed little-endian structs (``include/uapi/linux/fuse.h``),
so a single-threaded loop of ``readv`` / dispatch / ``writev`` is short, and a
server is just a process holding the /dev/fuse fd: cheap to start in a forked
child (:mod:`layerfs_drivers.aufs.forkserver`).

:func:`mount` opens /dev/fuse and mounts it (root only: ``mount(2)`` with
``fd=N,rootmode=...``); :class:`Session` answers ``FUSE_INIT`` and then serves
requests by calling the methods of an operations object (the union
filesystem), which returns packed replies built with the ``pack_*`` helpers
here or raises :class:`OSError`. Node id 1 is the root; the protocol's lookup
counting (every entry reply takes one reference, ``FORGET`` drops them) is
the operations object's business.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("layerfs.fuse")

ROOT_ID = 1
KERNEL_MAJOR = 7
OUR_MINOR = 40  # the struct layouts below are those of 7.40 (Linux 6.9: passthrough)

# --- opcodes ------------------------------------------------------------------------------------
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 17, 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE = 34, 35, 36, 38, 42, 43
READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE = 44, 45, 46, 47

# --- FUSE_INIT flags (64 bits: flags | flags2 << 32) --------------------------------------------
INIT_ASYNC_READ = 1 << 0
INIT_ATOMIC_O_TRUNC = 1 << 3
INIT_BIG_WRITES = 1 << 5
INIT_AUTO_INVAL_DATA = 1 << 12
INIT_DO_READDIRPLUS = 1 << 13
INIT_ASYNC_DIO = 1 << 15
INIT_PARALLEL_DIROPS = 1 << 18
INIT_MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
INIT_DIRECT_IO_ALLOW_MMAP = 1 << 36
INIT_PASSTHROUGH = 1 << 37

# --- open reply flags (fuse_open_out.open_flags) --------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PASSTHROUGH = 1 << 7

# --- setattr valid bits ------------------------------------------------------------------------------
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW = 128, 256

GETATTR_FH = 1
FSYNC_FDATASYNC = 1

# ioctls on the /dev/fuse fd: _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, uint32_t)
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502
MAX_STACK_DEPTH = 1  # backing files on a plain filesystem (not itself stacked)

PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_PAGES = 256
MAX_WRITE = MAX_PAGES * PAGE  # 1 MiB requests for reads and writes that cross FUSE
BUFFER_SIZE = MAX_WRITE + PAGE  # a WRITE request: headers + max_write bytes

# --- structs ---------------------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQII")  # fh offset size read_flags (lock_owner, flags follow)
WRITE_IN = struct.Struct("<QQII8xII")  # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QII")
FSYNC_IN = struct.Struct("<QII")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
SETXATTR_IN = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
COPY_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")  # ino off namelen type
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding

_BILLION = 1_000_000_000

# The running program's own symbols include libc (ctypes.util.find_library would run
# ldconfig: tens of milliseconds at every start of a mount helper).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_RDONLY = 0x1
MNT_DETACH = 0x2


# --- packing replies --------------------------------------------------------------------------------

def _split(timeout: float) -> tuple[int, int]:
    whole = int(timeout)
    return whole, int((timeout - whole) * _BILLION)


def pack_attr_fields(ino: int, st: os.stat_result, nlink: int) -> tuple[int, ...]:
    """The ``fuse_attr`` fields of ``st`` under number ``ino``."""
    a_s, a_ns = divmod(st.st_atime_ns, _BILLION)
    m_s, m_ns = divmod(st.st_mtime_ns, _BILLION)
    c_s, c_ns = divmod(st.st_ctime_ns, _BILLION)
    return (ino, st.st_size, st.st_blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns, st.st_mode, nlink,
            st.st_uid, st.st_gid, st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)


class Timeouts:
    """Entry and attribute cache times handed to the kernel, pre-split for packing."""

    def __init__(self, entry: float, attr: float) -> None:
        self.entry = _split(entry)
        self.attr = _split(attr)
        self.negative = ENTRY_OUT.pack(0, 0, self.entry[0], 0, self.entry[1], 0,
                                       *([0] * 16))

    def entry_out(self, ino: int, st: os.stat_result, nlink: int) -> bytes:
        e, a = self.entry, self.attr
        return ENTRY_OUT.pack(ino, 0, e[0], a[0], e[1], a[1], *pack_attr_fields(ino, st, nlink))

    def attr_out(self, ino: int, st: os.stat_result, nlink: int) -> bytes:
        a = self.attr
        return ATTR_OUT.pack(a[0], a[1], 0, *pack_attr_fields(ino, st, nlink))


def pack_open(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    return OPEN_OUT.pack(fh, open_flags, backing_id)


def pack_statfs(sv: os.statvfs_result) -> bytes:
    return STATFS_OUT.pack(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
                           sv.f_bsize, sv.f_namemax, sv.f_frsize, 0)


class DirBuffer:
    """A READDIRPLUS reply being filled: entries until ``size`` bytes."""

    __slots__ = ("parts", "size", "used")

    def __init__(self, size: int) -> None:
        self.parts: list[bytes] = []
        self.size = size
        self.used = 0

    def add_plus(self, entry_out: bytes, ino: int, name: bytes, mode: int, next_off: int) -> bool:
        """Add one entry (``entry_out`` from :meth:`Timeouts.entry_out`, or zeros for ``.``
        and ``..``); False, and nothing added, once it would not fit."""
        rec = len(entry_out) + DIRENT.size + len(name)
        padded = (rec + 7) & ~7
        if self.used + padded > self.size:
            return False
        self.parts.append(entry_out)
        self.parts.append(DIRENT.pack(ino, next_off, len(name), (mode & 0o170000) >> 12))
        self.parts.append(name + b"\0" * (padded - rec))
        self.used += padded
        return True

    def data(self) -> bytes:
        return b"".join(self.parts)


def dot_entry() -> bytes:
    """The entry part of a ``.`` or ``..`` READDIRPLUS record: the kernel ignores it."""
    return b"\0" * ENTRY_OUT.size


# --- mounting ----------------------------------------------------------------------------------------

def mount(target: str, fstype: str, source: str, *, readonly: bool,
          extra_options: str = "") -> int:
    """Open /dev/fuse and mount it on ``target``; returns the fd to serve.

    ``allow_other,default_permissions``: everyone may use the mount and the
    kernel checks permissions against the modes we report. suid and dev stay
    allowed (MS_NOSUID/MS_NODEV not set): the union holds root filesystems.
    The mount is live at once, but every request waits until ``FUSE_INIT``
    has been answered (:meth:`Session.init`).
    """
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        opts = (f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,"
                f"default_permissions{extra_options}")
        rc = _libc.mount(source.encode(), os.fsencode(target), f"fuse.{fstype}".encode(),
                         MS_RDONLY if readonly else 0, opts.encode())
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount fuse.{fstype}: {os.strerror(err)}", target)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unmount(target: str, *, lazy: bool = True) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: not mounted (any more)
            raise OSError(err, f"umount: {os.strerror(err)}", target)


class _Statx(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint8 * 136), ("dev_major", ctypes.c_uint32),
                ("dev_minor", ctypes.c_uint32), ("tail", ctypes.c_uint8 * 112)]


def device_of_mount(target: str) -> tuple[int, int] | None:
    """(major, minor) of the filesystem mounted on ``target``, asking the kernel's cached
    attributes only (``AT_STATX_DONT_SYNC``): safe to call from the server itself, which
    could not answer a GETATTR while it waits for its own call."""
    buf = _Statx()
    at_fdcwd, at_symlink_nofollow, at_statx_dont_sync = -100, 0x100, 0x4000
    rc = _libc.syscall(332, at_fdcwd, os.fsencode(target),
                       at_symlink_nofollow | at_statx_dont_sync, 0, ctypes.byref(buf))
    if rc != 0:
        return None
    return buf.dev_major, buf.dev_minor


# --- serving -------------------------------------------------------------------------------------------

class Context:
    """Who made a request."""

    __slots__ = ("gid", "pid", "uid")

    def __init__(self, uid: int, gid: int, pid: int) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid


class Operations(Protocol):
    """What :class:`Session` calls; replies are packed bytes (see the ``pack_*`` helpers)."""

    def lookup(self, parent: int, name: bytes) -> bytes: ...
    def forget(self, items: list[tuple[int, int]]) -> None: ...
    def getattr(self, ino: int, fh: int | None) -> bytes: ...
    def setattr(self, ino: int, valid: int, fh: int | None, size: int, atime_ns: int,
                mtime_ns: int, mode: int, uid: int, gid: int) -> bytes: ...
    def readlink(self, ino: int) -> bytes: ...
    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Context) -> bytes: ...
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Context) -> bytes: ...
    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Context) -> bytes: ...
    def unlink(self, parent: int, name: bytes) -> None: ...
    def rmdir(self, parent: int, name: bytes) -> None: ...
    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
               flags: int) -> None: ...
    def link(self, ino: int, new_parent: int, new_name: bytes) -> bytes: ...
    def open(self, ino: int, flags: int) -> bytes: ...
    def create(self, parent: int, name: bytes, mode: int, flags: int,
               ctx: Context) -> bytes: ...
    def read(self, fh: int, offset: int, size: int) -> memoryview | bytes: ...
    def write(self, fh: int, offset: int, data: memoryview) -> int: ...
    def release(self, fh: int) -> None: ...
    def fsync(self, fh: int, datasync: bool) -> None: ...
    def statfs(self) -> bytes: ...
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None: ...
    def getxattr(self, ino: int, name: bytes) -> bytes: ...
    def listxattr(self, ino: int) -> bytes: ...
    def removexattr(self, ino: int, name: bytes) -> None: ...
    def opendir(self, ino: int) -> int: ...
    def readdirplus(self, fh: int, offset: int, size: int) -> bytes: ...
    def releasedir(self, fh: int) -> None: ...
    def fsyncdir(self, fh: int, datasync: bool) -> None: ...
    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None: ...
    def lseek(self, fh: int, offset: int, whence: int) -> int: ...
    def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                        length: int, flags: int) -> int: ...


class Stop(Exception):
    """Raised (from a signal handler) to leave :meth:`Session.serve`."""


def _name(body: memoryview) -> bytes:
    """A NUL-terminated name at the start of ``body``."""
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _two_names(body: memoryview) -> tuple[bytes, bytes]:
    a, _, rest = bytes(body).partition(b"\0")
    return a, rest.partition(b"\0")[0]


class Session:
    """One mounted FUSE connection, served by ``ops`` in this thread."""

    def __init__(self, fd: int, ops: Operations, *, want_passthrough: bool = True) -> None:
        self.fd = fd
        self.ops = ops
        self.want_passthrough = want_passthrough
        self.passthrough = False  # granted by the kernel in FUSE_INIT
        self.proto_minor = 0
        # An anonymous mapping, not a bytearray: its pages are zero-filled when first
        # touched, instead of all 1 MiB being memset at every server start.
        self.buf = mmap.mmap(-1, BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self.requests = 0
        self.busy = False  # a request is being served (signals must not interrupt it)
        self.stop_check: Callable[[], bool] = lambda: False  # asked between requests
        self.between: Callable[[], None] = lambda: None  # housekeeping between requests
        self.handlers: dict[int, Callable[[int, memoryview, Context], Any]] = {
            LOOKUP: lambda n, b, c: ops.lookup(n, _name(b)),
            GETATTR: self._getattr,
            SETATTR: self._setattr,
            READLINK: lambda n, b, c: ops.readlink(n),
            SYMLINK: self._symlink,
            MKNOD: self._mknod,
            MKDIR: self._mkdir,
            UNLINK: lambda n, b, c: ops.unlink(n, _name(b)),
            RMDIR: lambda n, b, c: ops.rmdir(n, _name(b)),
            RENAME: self._rename,
            RENAME2: self._rename2,
            LINK: self._link,
            OPEN: lambda n, b, c: ops.open(n, OPEN_IN.unpack_from(b)[0]),
            READ: self._read,
            WRITE: self._write,
            STATFS: lambda n, b, c: ops.statfs(),
            RELEASE: lambda n, b, c: ops.release(RELEASE_IN.unpack_from(b)[0]),
            FSYNC: self._fsync,
            SETXATTR: self._setxattr,
            GETXATTR: self._getxattr,
            LISTXATTR: self._listxattr,
            REMOVEXATTR: lambda n, b, c: ops.removexattr(n, _name(b)),
            OPENDIR: lambda n, b, c: pack_open(ops.opendir(n), 0),
            READDIRPLUS: self._readdirplus,
            RELEASEDIR: lambda n, b, c: ops.releasedir(RELEASE_IN.unpack_from(b)[0]),
            FSYNCDIR: self._fsyncdir,
            ACCESS: lambda n, b, c: b"",  # default_permissions: the kernel checks
            CREATE: self._create,
            FALLOCATE: self._fallocate,
            LSEEK: self._lseek,
            COPY_FILE_RANGE: self._copy_file_range,
            DESTROY: lambda n, b, c: b"",
        }

    # --- the loop --------------------------------------------------------------------------------

    def _read_request(self) -> int:
        while True:
            try:
                return os.readv(self.fd, [self.buf])
            except OSError as err:
                # ENOENT: a request was interrupted before we read it; EINTR: a signal.
                if err.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue
                raise

    def _reply(self, unique: int, data: bytes | memoryview) -> None:
        try:
            if data:
                os.writev(self.fd, [OUT_HEADER.pack(16 + len(data), 0, unique), data])
            else:
                os.write(self.fd, OUT_HEADER.pack(16, 0, unique))
        except OSError as err:
            # ENOENT: the request was interrupted/aborted meanwhile: nobody waits.
            if err.errno != errno.ENOENT:
                raise

    def _error(self, unique: int, code: int) -> None:
        try:
            os.write(self.fd, OUT_HEADER.pack(16, -code, unique))
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise

    def init(self) -> None:
        """Answer FUSE_INIT (always the first request). Call once, before :meth:`serve`."""
        n = self._read_request()
        _length, opcode, unique, _node, _uid, _gid, _pid, _ext, _ = IN_HEADER.unpack_from(self.buf)
        if opcode != INIT:
            raise OSError(errno.EPROTO, f"FUSE: first request is opcode {opcode}, not INIT")
        body = self.view[IN_HEADER.size:n]
        if len(body) >= INIT_IN.size:
            major, minor, max_readahead, flags, flags2 = INIT_IN.unpack_from(body)
        else:
            major, minor, max_readahead, flags = struct.unpack_from("<IIII", body)
            flags2 = 0
        if major != KERNEL_MAJOR:
            self._error(unique, errno.EPROTO)
            raise OSError(errno.EPROTO, f"FUSE: kernel protocol {major}.{minor}, need 7.x")
        kernel = flags | (flags2 << 32) if flags & INIT_EXT else flags
        want = (INIT_ASYNC_READ | INIT_ATOMIC_O_TRUNC | INIT_BIG_WRITES | INIT_AUTO_INVAL_DATA
                | INIT_DO_READDIRPLUS | INIT_ASYNC_DIO | INIT_PARALLEL_DIROPS | INIT_MAX_PAGES
                | INIT_EXT | INIT_DIRECT_IO_ALLOW_MMAP)
        if self.want_passthrough:
            want |= INIT_PASSTHROUGH
        granted = kernel & want
        self.passthrough = bool(granted & INIT_PASSTHROUGH)
        self.proto_minor = min(minor, OUR_MINOR)
        reply = INIT_OUT.pack(KERNEL_MAJOR, self.proto_minor, max_readahead,
                              granted & 0xFFFFFFFF, 16, 12, MAX_WRITE, 1, MAX_PAGES, 0,
                              granted >> 32, MAX_STACK_DEPTH if self.passthrough else 0)
        if minor < 23:  # fuse_init_out was 24 bytes before 7.23
            reply = reply[:24]
        self._reply(unique, reply)

    def serve(self) -> None:
        """Serve requests until the filesystem is unmounted (or :class:`Stop` is raised)."""
        handlers = self.handlers
        unpack = IN_HEADER.unpack_from
        view = self.view
        hsize = IN_HEADER.size
        ops = self.ops
        while True:
            self.between()
            if self.stop_check():
                raise Stop()
            self.busy = False
            try:
                n = self._read_request()
            except OSError as err:
                if err.errno == errno.ENODEV:  # unmounted: the connection is gone
                    return
                raise
            self.busy = True
            self.requests += 1
            _length, opcode, unique, nodeid, uid, gid, pid, _ext, _ = unpack(self.buf)
            if opcode == FORGET:
                ops.forget([(nodeid, FORGET_IN.unpack_from(view, hsize)[0])])
                continue
            if opcode == BATCH_FORGET:
                count = BATCH_FORGET_IN.unpack_from(view, hsize)[0]
                base = hsize + BATCH_FORGET_IN.size
                ops.forget([FORGET_ONE.unpack_from(view, base + i * 16) for i in range(count)])
                continue
            if opcode == INTERRUPT:
                continue  # every request is answered promptly, one at a time
            handler = handlers.get(opcode)
            if handler is None:
                self._error(unique, errno.ENOSYS)
                continue
            try:
                out = handler(nodeid, view[hsize:n], Context(uid, gid, pid))
            except OSError as err:
                self._error(unique, err.errno or errno.EIO)
                continue
            except Stop:
                raise
            except Exception:
                log.exception("FUSE opcode %d failed", opcode)
                self._error(unique, errno.EIO)
                continue
            self._reply(unique, b"" if out is None else out)
            if opcode == DESTROY:
                return

    # --- passthrough ------------------------------------------------------------------------------

    def backing_open(self, fd: int) -> int:
        """Register ``fd``'s file as a backing file; returns its backing id (> 0)."""
        arg = bytearray(BACKING_MAP.pack(fd, 0, 0))
        return int(fcntl.ioctl(self.fd, DEV_IOC_BACKING_OPEN, arg, True))

    def backing_close(self, backing_id: int) -> None:
        arg = bytearray(struct.pack("<I", backing_id))
        fcntl.ioctl(self.fd, DEV_IOC_BACKING_CLOSE, arg, True)

    # --- request bodies -------------------------------------------------------------------------

    def _getattr(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        fh: int | None = None
        if len(body) >= GETATTR_IN.size:
            flags, _, fh_raw = GETATTR_IN.unpack_from(body)
            fh = fh_raw if flags & GETATTR_FH else None
        return self.ops.getattr(nodeid, fh)

    def _setattr(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        (valid, _, fh, size, _lock, atime, mtime, _ctime, atimens, mtimens, _ctimens, mode,
         _u4, uid, gid, _u5) = SETATTR_IN.unpack_from(body)
        return self.ops.setattr(nodeid, valid, fh if valid & FATTR_FH else None, size,
                                atime * _BILLION + atimens, mtime * _BILLION + mtimens,
                                mode, uid, gid)

    def _symlink(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        name, target = _two_names(body)
        return self.ops.symlink(nodeid, name, target, ctx)

    def _mknod(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        mode, rdev, _umask, _ = MKNOD_IN.unpack_from(body)
        return self.ops.mknod(nodeid, _name(body[MKNOD_IN.size:]), mode, rdev, ctx)

    def _mkdir(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        mode, _umask = MKDIR_IN.unpack_from(body)
        return self.ops.mkdir(nodeid, _name(body[MKDIR_IN.size:]), mode, ctx)

    def _rename(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        (newdir,) = RENAME_IN.unpack_from(body)
        old, new = _two_names(body[RENAME_IN.size:])
        self.ops.rename(nodeid, old, newdir, new, 0)

    def _rename2(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        newdir, flags, _ = RENAME2_IN.unpack_from(body)
        old, new = _two_names(body[RENAME2_IN.size:])
        self.ops.rename(nodeid, old, newdir, new, flags)

    def _link(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        (old,) = LINK_IN.unpack_from(body)
        return self.ops.link(old, nodeid, _name(body[LINK_IN.size:]))

    def _read(self, nodeid: int, body: memoryview, ctx: Context) -> memoryview | bytes:
        fh, offset, size, _ = READ_IN.unpack_from(body)
        return self.ops.read(fh, offset, size)

    def _write(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        fh, offset, size, _wflags, _flags, _ = WRITE_IN.unpack_from(body)
        start = WRITE_IN.size
        n = self.ops.write(fh, offset, body[start:start + size])
        return WRITE_OUT.pack(n, 0)

    def _fsync(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, flags, _ = FSYNC_IN.unpack_from(body)
        self.ops.fsync(fh, bool(flags & FSYNC_FDATASYNC))

    def _fsyncdir(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, flags, _ = FSYNC_IN.unpack_from(body)
        self.ops.fsyncdir(fh, bool(flags & FSYNC_FDATASYNC))

    def _setxattr(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        size, flags = SETXATTR_IN.unpack_from(body)
        rest = bytes(body[SETXATTR_IN.size:])
        name, _, value = rest.partition(b"\0")
        self.ops.setxattr(nodeid, name, value[:size], flags)

    def _getxattr(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        size, _ = GETXATTR_IN.unpack_from(body)
        value = self.ops.getxattr(nodeid, _name(body[GETXATTR_IN.size:]))
        return self._sized(value, size)

    def _listxattr(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        size, _ = GETXATTR_IN.unpack_from(body)
        return self._sized(self.ops.listxattr(nodeid), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "xattr larger than the buffer")
        return value

    def _readdirplus(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        fh, offset, size, _ = READ_IN.unpack_from(body)
        return self.ops.readdirplus(fh, offset, size)

    def _create(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        flags, mode, _umask, _ = CREATE_IN.unpack_from(body)
        return self.ops.create(nodeid, _name(body[CREATE_IN.size:]), mode, flags, ctx)

    def _fallocate(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body)
        self.ops.fallocate(fh, offset, length, mode)

    def _lseek(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        fh, offset, whence, _ = LSEEK_IN.unpack_from(body)
        return LSEEK_OUT.pack(self.ops.lseek(fh, offset, whence))

    def _copy_file_range(self, nodeid: int, body: memoryview, ctx: Context) -> bytes:
        fh_in, off_in, _node_out, fh_out, off_out, length, flags = COPY_RANGE_IN.unpack_from(body)
        n = self.ops.copy_file_range(fh_in, off_in, fh_out, off_out, length, flags)
        return WRITE_OUT.pack(n, 0)
