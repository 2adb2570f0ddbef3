"""Device-mapper through its ioctl interface (``/dev/mapper/control``), in-process.

What ``dmsetup`` (libdevmapper) does for us, without a process per call:
Docker's driver linked libdevmapper for the same reason. A ``dmsetup``
process costs ~2 ms on hardware but ~100 ms in the TCG test guest, where the
ioctl takes microseconds; a layer's create/mount/remove makes several calls.

The interface (include/uapi/linux/dm-ioctl.h): every call passes a
``struct dm_ioctl`` header (312 bytes) followed by a payload at
``data_start``; results come back in the same buffer (``DM_BUFFER_FULL_FLAG``
asks for a bigger one). Payloads used here:

* ``DM_TABLE_LOAD``: ``struct dm_target_spec`` (40 bytes: start, length,
  status, next = offset to the next spec *from this one*, target type[16])
  followed by the NUL-terminated parameter string, 8-byte aligned;
* ``DM_TABLE_STATUS``: the same specs out, ``next`` = offset *from the data
  start*; ``DM_STATUS_TABLE_FLAG`` returns the table instead of the status;
* ``DM_TARGET_MSG``: ``struct dm_target_msg`` (u64 sector, message);
  output (``DM_DATA_OUT_FLAG``) is a string at ``data_start``;
* ``DM_LIST_DEVICES``: ``struct dm_name_list`` (u64 dev, u32 next, name);
* ``DM_LIST_VERSIONS``: ``struct dm_target_versions`` (u32 next, u32[3], name).

udev. This path is used only when no udevd runs (see :mod:`.dmsetup`), so it
does what libdevmapper does with ``DM_DISABLE_UDEV=1``: it makes and removes
the ``/dev/mapper/NAME`` nodes itself. With udevd, ``dmsetup`` and its udev
cookies are used instead, and nodes are udev's.

Errors become the layerfs types the dmsetup wrapper raises: EEXIST ->
AlreadyExists, ENXIO/ENODEV/ENODATA -> NotFound, EBUSY -> InUse, anything else
-> ExternalCommandFailed, each naming the call, the device and the message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

from layerfs.errors import AlreadyExists, ExternalCommandFailed, InUse, LayerfsError, NotFound

CONTROL = "/dev/mapper/control"
MAPPER_DIR = Path("/dev/mapper")

# struct dm_ioctl
_HEADER = struct.Struct("=3I I I I i I I I Q 128s 129s 7x")
HEADER_SIZE = _HEADER.size  # 312
assert HEADER_SIZE == 312
_SPEC = struct.Struct("=Q Q i I 16s")  # struct dm_target_spec, 40 bytes
_VERSION = (4, 0, 0)  # major must match the kernel's; minor 0 asks for nothing new
_DEFAULT_BUFFER = 16 * 1024

# ioctl numbers: _IOWR(0xfd, nr, struct dm_ioctl)
_IOC_READ_WRITE = 3


def _iowr(nr: int) -> int:
    return (_IOC_READ_WRITE << 30) | (HEADER_SIZE << 16) | (0xFD << 8) | nr


DM_VERSION = _iowr(0)
DM_LIST_DEVICES = _iowr(2)
DM_DEV_CREATE = _iowr(3)
DM_DEV_REMOVE = _iowr(4)
DM_DEV_SUSPEND = _iowr(6)
DM_DEV_STATUS = _iowr(7)
DM_TABLE_LOAD = _iowr(9)
DM_TABLE_STATUS = _iowr(12)
DM_LIST_VERSIONS = _iowr(13)
DM_TARGET_MSG = _iowr(14)

_NAMES = {DM_VERSION: "version", DM_LIST_DEVICES: "list", DM_DEV_CREATE: "create",
          DM_DEV_REMOVE: "remove", DM_DEV_SUSPEND: "suspend/resume", DM_DEV_STATUS: "info",
          DM_TABLE_LOAD: "load", DM_TABLE_STATUS: "table/status", DM_LIST_VERSIONS: "targets",
          DM_TARGET_MSG: "message"}

# flags
DM_READONLY_FLAG = 1 << 0
DM_SUSPEND_FLAG = 1 << 1
DM_ACTIVE_PRESENT_FLAG = 1 << 5
DM_INACTIVE_PRESENT_FLAG = 1 << 6
DM_STATUS_TABLE_FLAG = 1 << 4
DM_BUFFER_FULL_FLAG = 1 << 8
DM_SKIP_LOCKFS_FLAG = 1 << 10
DM_NOFLUSH_FLAG = 1 << 11
DM_DATA_OUT_FLAG = 1 << 16
DM_DEFERRED_REMOVE = 1 << 17


class Reply:
    """A decoded ioctl result: the header fields and the payload bytes."""

    def __init__(self, buf: bytearray) -> None:
        (v0, v1, v2, data_size, data_start, target_count, open_count, flags, event_nr,
         _pad, dev, name, uuid) = _HEADER.unpack_from(buf)
        self.version = (v0, v1, v2)
        self.target_count = target_count
        self.open_count = open_count
        self.flags = flags
        self.event_nr = event_nr
        self.dev = dev
        self.name = name.split(b"\0", 1)[0].decode()
        self.uuid = uuid.split(b"\0", 1)[0].decode()
        self.data_start = data_start
        self.data_size = data_size
        self.buf = buf

    @property
    def payload(self) -> bytes:
        return bytes(self.buf[self.data_start:self.data_size])

    @property
    def major(self) -> int:
        return os.major(self.dev)

    @property
    def minor(self) -> int:
        return os.minor(self.dev)


def _classify(err: OSError, what: str) -> LayerfsError:
    text = f"dm ioctl {what}: {os.strerror(err.errno or 0)}"
    if err.errno == errno.EEXIST:
        return AlreadyExists(text)
    if err.errno in (errno.ENXIO, errno.ENODEV, errno.ENODATA, errno.ENOENT):
        return NotFound(text)
    if err.errno == errno.EBUSY:
        return InUse(text)
    return ExternalCommandFailed(text)


_control_fd: int | None = None


def _control() -> int:
    global _control_fd
    if _control_fd is None:
        try:
            _control_fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise ExternalCommandFailed(f"cannot open {CONTROL}: {err.strerror}") from err
    return _control_fd


def ioctl(cmd: int, name: str = "", *, flags: int = 0, payload: bytes = b"",
          target_count: int = 0, uuid: str = "", what: str | None = None) -> Reply:
    """One ioctl; retried with a bigger buffer while the kernel says it is full."""
    size = max(_DEFAULT_BUFFER, HEADER_SIZE + len(payload) + 8)
    label = what or f"{_NAMES.get(cmd, hex(cmd))} {name}".strip()
    if len(name.encode()) > 127:
        raise ExternalCommandFailed(f"dm ioctl {label}: name longer than 127 bytes")
    while True:
        buf = bytearray(size)
        _HEADER.pack_into(buf, 0, *_VERSION, size, HEADER_SIZE, target_count, 0, flags, 0, 0, 0,
                          name.encode(), uuid.encode())
        buf[HEADER_SIZE:HEADER_SIZE + len(payload)] = payload
        try:
            fcntl.ioctl(_control(), cmd, buf, True)
        except OSError as err:
            raise _classify(err, label) from err
        reply = Reply(buf)
        if reply.flags & DM_BUFFER_FULL_FLAG and size < 64 << 20:
            size *= 4
            continue
        return reply


def _cstring(data: bytes | bytearray, offset: int) -> str:
    end = data.find(b"\0", offset)
    return data[offset:end if end >= 0 else len(data)].decode(errors="replace")


# --------------------------------------------------------------------------
# operations (the same meaning as the dmsetup commands of the same name)
# --------------------------------------------------------------------------


def driver_version() -> str:
    return ".".join(map(str, ioctl(DM_VERSION).version))


def info(name: str) -> Reply | None:
    try:
        return ioctl(DM_DEV_STATUS, name)
    except NotFound:
        return None


def _specs(table: Sequence[tuple[int, int, str, str]]) -> bytes:
    out = bytearray()
    for i, (start, length, target, args) in enumerate(table):
        params = args.encode() + b"\0"
        params += b"\0" * (-(_SPEC.size + len(params)) % 8)
        nxt = _SPEC.size + len(params) if i < len(table) - 1 else 0
        out += _SPEC.pack(start, length, 0, nxt, target.encode()) + params
    return bytes(out)


def load(name: str, table: Sequence[tuple[int, int, str, str]], *, readonly: bool = False) -> None:
    ioctl(DM_TABLE_LOAD, name, payload=_specs(table), target_count=len(table),
          flags=DM_READONLY_FLAG if readonly else 0)


def create(name: str, table: Sequence[tuple[int, int, str, str]], *, uuid: str | None = None,
           readonly: bool = False) -> Reply:
    """DEV_CREATE + TABLE_LOAD + resume; the node /dev/mapper/NAME is made here."""
    try:
        ioctl(DM_DEV_CREATE, name, uuid=uuid or "")
    except InUse as err:  # the kernel answers EBUSY for a name that exists
        raise AlreadyExists(f"device-mapper device {name} already exists") from err
    try:
        load(name, table, readonly=readonly)
        resume(name)
    except BaseException:
        try:
            ioctl(DM_DEV_REMOVE, name)
        except LayerfsError:
            pass
        raise
    reply = ioctl(DM_DEV_STATUS, name)
    make_node(name, reply.dev)
    return reply


def suspend(name: str, *, nolockfs: bool = False, noflush: bool = False) -> None:
    flags = DM_SUSPEND_FLAG
    if nolockfs:
        flags |= DM_SKIP_LOCKFS_FLAG
    if noflush:
        flags |= DM_NOFLUSH_FLAG
    ioctl(DM_DEV_SUSPEND, name, flags=flags)


def resume(name: str) -> None:
    ioctl(DM_DEV_SUSPEND, name)


def remove(name: str, *, deferred: bool = False) -> None:
    ioctl(DM_DEV_REMOVE, name, flags=DM_DEFERRED_REMOVE if deferred else 0)
    if deferred and info(name) is not None:
        return  # removed when its last user closes it; the node goes then (or at mknodes)
    remove_node(name)


def message(name: str, msg: str, sector: int = 0) -> str:
    payload = struct.pack("=Q", sector) + msg.encode() + b"\0"
    reply = ioctl(DM_TARGET_MSG, name, payload=payload, what=f"message {name} {msg!r}")
    if reply.flags & DM_DATA_OUT_FLAG:
        return _cstring(reply.buf, reply.data_start)
    return ""


def _table_lines(name: str, flags: int) -> list[tuple[int, int, str, str]]:
    reply = ioctl(DM_TABLE_STATUS, name, flags=flags)
    out = []
    base = reply.data_start
    offset = base
    for _ in range(reply.target_count):
        start, length, _status, nxt, target = _SPEC.unpack_from(reply.buf, offset)
        args = _cstring(reply.buf, offset + _SPEC.size)
        out.append((start, length, target.split(b"\0", 1)[0].decode(), args.strip()))
        offset = base + nxt
    return out


def status(name: str) -> list[tuple[int, int, str, str]]:
    return _table_lines(name, 0)


def table(name: str) -> list[tuple[int, int, str, str]]:
    return _table_lines(name, DM_STATUS_TABLE_FLAG)


def list_devices() -> dict[str, int]:
    """{name: dev_t} of every dm device."""
    reply = ioctl(DM_LIST_DEVICES)
    out: dict[str, int] = {}
    offset = reply.data_start
    if reply.data_size <= offset + 12:
        return out
    while True:
        dev, nxt = struct.unpack_from("=QI", reply.buf, offset)
        name = _cstring(reply.buf, offset + 12)
        if name:
            out[name] = dev
        if not nxt:
            break
        offset += nxt
    return out


def targets() -> dict[str, str]:
    reply = ioctl(DM_LIST_VERSIONS)
    out: dict[str, str] = {}
    offset = reply.data_start
    while True:
        nxt, v0, v1, v2 = struct.unpack_from("=4I", reply.buf, offset)
        name = _cstring(reply.buf, offset + 16)
        if name:
            out[name] = f"{v0}.{v1}.{v2}"
        if not nxt:
            break
        offset += nxt
    return out


# --------------------------------------------------------------------------
# /dev/mapper nodes (no udev)
# --------------------------------------------------------------------------


def make_node(name: str, dev: int) -> Path:
    """/dev/mapper/NAME as a block node for ``dev``, replacing a stale one."""
    path = MAPPER_DIR / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev:
            return path
        path.unlink()
    os.mknod(path, stat.S_IFBLK | 0o600, dev)
    return path


def remove_node(name: str) -> None:
    path = MAPPER_DIR / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISBLK(st.st_mode) or stat.S_ISLNK(st.st_mode):
        path.unlink()


def mknodes(name: str | None = None) -> None:
    """Make the nodes of existing devices and drop nodes of devices that are gone."""
    devices = list_devices()
    names = [name] if name else list(devices)
    for n in names:
        if n in devices:
            make_node(n, devices[n])
        else:
            remove_node(n)
    if name is None:
        for path in MAPPER_DIR.iterdir():
            if path.name != "control" and path.name not in devices and path.is_block_device():
                remove_node(path.name)
