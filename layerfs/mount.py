"""The one module that performs and undoes mounts.

Drivers never mount anything: they describe what to mount as :class:`Mount`
values (containerd's design) and this module turns them into mount(2) calls,
the new mount API (fsopen/fsconfig/fsmount) for overlay stacks whose option
string no longer fits one page, or a FUSE helper process. It can also find and
undo every mount below a directory, which is how a crashed process's leftovers
are cleaned up.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .errors import InvalidArgument, LayerfsError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
FUSE_HELPER_TIMEOUT = 60  # seconds a FUSE helper may take to report its mount live

# mount(2) flags (linux/mount.h)
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

_FLAG_OPTIONS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
    "remount": MS_REMOUNT,
}
_NOOP_OPTIONS = {"rw", "defaults"}

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True)
class Mount:
    """One mount, as data.

    ``type`` is the filesystem type (``overlay``, ``bind``, ``ext4``, ``btrfs``,
    ``fuse.<name>``), ``source`` the device or directory, ``options`` the
    comma-separated options split into a tuple (flags such as ``ro`` and
    ``rbind`` included). For FUSE mounts ``helper`` is the command that mounts
    the filesystem: the target path is appended and the command must return
    once the mount is live (the way mount.fuse helpers behave).
    """

    type: str
    source: str
    options: tuple[str, ...] = ()
    helper: tuple[str, ...] = field(default=())

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


CAP_SYS_ADMIN = 21


def can_mount() -> bool:
    """Whether this process may call mount(2): CAP_SYS_ADMIN in its effective set (root,
    or root of a user namespace). Drivers whose mounts need it say so in ``check()``, so
    that auto-selection never picks one that would fail later with EPERM."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


# --- the new mount API (fsopen/fsconfig/fsmount/move_mount), Linux >= 5.2 ---------------------
# Needed for overlay stacks whose lowerdir list does not fit mount(2)'s one-page
# data argument: since Linux 6.8 overlay accepts one ``lowerdir+`` per layer.
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT, _SYS_MOVE_MOUNT = 430, 431, 432, 429
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6
_FSOPEN_CLOEXEC, _FSMOUNT_CLOEXEC = 0x1, 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_AT_FDCWD = -100
_libc.syscall.restype = ctypes.c_long


def _raise_errno(what: str, target: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}", target)


def _mount_syscall(source: str, target: str, fstype: str | None, flags: int, data: str) -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                     flags, data.encode() if data else None)
    if rc != 0:
        _raise_errno(f"mount {fstype or ''} {source}", target)


def _split_options(options: Sequence[str]) -> tuple[int, list[str]]:
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[opt]
        elif opt not in _NOOP_OPTIONS:
            data.append(opt)
    return flags, data


def new_mount_api_available() -> bool:
    """True when fsopen(2) works (and so ``lowerdir+`` can be tried for overlay)."""
    fd = _libc.syscall(_SYS_FSOPEN, b"tmpfs", _FSOPEN_CLOEXEC)
    if fd < 0:
        return False
    os.close(fd)
    return True


def _fsconfig(fs_fd: int, cmd: int, key: str | None, value: str | None, target: str) -> None:
    rc = _libc.syscall(_SYS_FSCONFIG, fs_fd, cmd, key.encode() if key else None,
                       value.encode() if value is not None else None, 0)
    if rc < 0:
        _raise_errno(f"fsconfig {key}={value}", target)


def _mount_overlay_fsconfig(options: Sequence[str], target: str) -> None:
    """Mount overlay through fsopen/fsconfig, one ``lowerdir+`` per layer."""
    flags, data = _split_options(options)
    fs_fd = _libc.syscall(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    if fs_fd < 0:
        _raise_errno("fsopen overlay", target)
    try:
        _fsconfig(fs_fd, _FSCONFIG_SET_STRING, "source", "overlay", target)
        for opt in data:
            key, _, value = opt.partition("=")
            if key == "lowerdir":
                # Split the classic colon list into lowerdir+ entries (escaped
                # colons are not used by layerfs paths).
                for layer in value.split(":"):
                    _fsconfig(fs_fd, _FSCONFIG_SET_STRING, "lowerdir+", layer, target)
            elif "=" in opt:
                _fsconfig(fs_fd, _FSCONFIG_SET_STRING, key, value, target)
            else:
                _fsconfig(fs_fd, _FSCONFIG_SET_FLAG, key, None, target)
        _fsconfig(fs_fd, _FSCONFIG_CMD_CREATE, None, None, target)
        attrs = _MOUNT_ATTR_RDONLY if flags & MS_RDONLY else 0
        mnt_fd = _libc.syscall(_SYS_FSMOUNT, fs_fd, _FSMOUNT_CLOEXEC, attrs)
        if mnt_fd < 0:
            _raise_errno("fsmount overlay", target)
        try:
            rc = _libc.syscall(_SYS_MOVE_MOUNT, mnt_fd, b"", _AT_FDCWD, target.encode(),
                               _MOVE_MOUNT_F_EMPTY_PATH)
            if rc < 0:
                _raise_errno("move_mount overlay", target)
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)


def _common_dir(paths: Sequence[str]) -> str:
    return os.path.commonpath([os.path.dirname(p) for p in paths])


def _mount_overlay_relative(options: Sequence[str], target: str) -> None:
    """Mount overlay with paths relative to their common parent, from a chdir'd child.

    This is how Docker fits 128 layers into one page on kernels without the new
    mount API: the kernel resolves relative lowerdir paths against the caller's
    working directory, so the option string only carries short names.
    """
    flags, data = _split_options(options)
    paths: list[str] = []
    for opt in data:
        key, _, value = opt.partition("=")
        if key in ("lowerdir", "upperdir", "workdir"):
            paths.extend(value.split(":"))
    base = _common_dir(paths)
    rel: list[str] = []
    for opt in data:
        key, _, value = opt.partition("=")
        if key in ("lowerdir", "upperdir", "workdir"):
            value = ":".join(os.path.relpath(p, base) for p in value.split(":"))
            rel.append(f"{key}={value}")
        else:
            rel.append(opt)
    joined = ",".join(rel)
    if len(joined) >= PAGE_SIZE:
        raise InvalidArgument(
            f"overlay options for {target} are {len(joined)} bytes even with relative paths; "
            f"the limit is {PAGE_SIZE} and this kernel lacks the new mount API")
    abs_target = os.path.abspath(target)
    pid = os.fork()
    if pid == 0:  # child: chdir only here, the parent's cwd is never touched
        try:
            os.chdir(base)
            rc = _libc.mount(b"overlay", abs_target.encode(), b"overlay", flags, joined.encode())
            os._exit(0 if rc == 0 else min(ctypes.get_errno(), 255) or 1)
        except BaseException:
            os._exit(255)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise OSError(code, f"mount overlay (relative paths): {os.strerror(code)}", target)


def mount_overlay(options: Sequence[str], target: str, *, method: str = "auto") -> None:
    """Mount an overlay; ``method`` is ``auto``, ``data`` (mount(2)), ``relative`` or ``fsconfig``."""
    flags, data = _split_options(options)
    joined = ",".join(data)
    if method == "auto":
        if len(joined) < PAGE_SIZE:
            method = "data"
        elif new_mount_api_available():
            method = "fsconfig"
        else:
            method = "relative"
    if method == "data":
        _mount_syscall("overlay", target, "overlay", flags, joined)
    elif method == "fsconfig":
        _mount_overlay_fsconfig(options, target)
    elif method == "relative":
        _mount_overlay_relative(options, target)
    else:
        raise InvalidArgument(f"unknown overlay mount method {method!r}")


# --- FUSE mounts from a warm process ----------------------------------------------------------

class FuseForker(Protocol):
    """Something that performs FUSE helper mounts from an already-running process.

    ``mount(helper, target)`` does what running ``[*helper, target]`` would do
    and returns True once the mount is live; False when it cannot serve that
    helper (the mount module then runs the command); it raises OSError, its
    ``strerror`` the reason, when mounting failed. One that also works in
    processes forked after it was made (the daemon's workers) says so with a
    true ``fork_safe`` attribute.
    """

    def mount(self, helper: Sequence[str], target: str) -> bool: ...


_fuse_forker: FuseForker | None = None


def set_fuse_forker(forker: FuseForker | None) -> FuseForker | None:
    """Route FUSE helper mounts through ``forker`` (None: run the helper commands again).

    A long-lived process (the ``layerfs daemon``, the bench) calls this once at
    its start with :class:`layerfs_drivers.aufs.forkserver.ForkServer` (made by
    ``AufsDriver.make_fuse_forker()``), so an aufs mount forks its server from a
    warm process instead of starting an interpreter; a command-line run never
    does and mounts exactly as before. Returns the previous forker.
    """
    global _fuse_forker
    previous, _fuse_forker = _fuse_forker, forker
    return previous


def fuse_forker() -> FuseForker | None:
    """The forker that FUSE helper mounts go through (None: they run the helper)."""
    return _fuse_forker


def _mount_fuse(m: Mount, tgt: str) -> None:
    if not m.helper:
        raise InvalidArgument(f"FUSE mount {m.source} has no helper command")
    forker = _fuse_forker
    if forker is not None and forker.mount(m.helper, tgt):
        return
    try:
        proc = subprocess.run([*m.helper, tgt], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=FUSE_HELPER_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise LayerfsError(f"mount {m.type} on {tgt}: helper did not report a live "
                           f"mount within {FUSE_HELPER_TIMEOUT} s") from err
    if proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit {proc.returncode}"
        raise LayerfsError(f"mount {m.type} on {tgt}: {detail}")


def mount(m: Mount, target: str | os.PathLike[str]) -> None:
    """Perform one mount onto ``target`` (which must exist)."""
    tgt = os.fspath(target)
    try:
        if m.type.startswith("fuse.") or m.helper:
            _mount_fuse(m, tgt)
        elif m.type == "overlay":
            mount_overlay(m.options, tgt)
        elif m.type == "bind" or "bind" in m.options or "rbind" in m.options:
            flags, _ = _split_options(m.options)
            flags |= MS_BIND
            _mount_syscall(m.source, tgt, None, flags & ~MS_RDONLY, "")
            if flags & MS_RDONLY:
                # A bind mount ignores MS_RDONLY until it is remounted.
                _mount_syscall("none", tgt, None, MS_REMOUNT | MS_BIND | MS_RDONLY, "")
        else:
            flags, data = _split_options(m.options)
            _mount_syscall(m.source, tgt, m.type, flags, ",".join(data))
    except OSError as err:
        raise LayerfsError(f"mount {m.type} {m.source} on {tgt}: {err.strerror or err}") from err


def mount_all(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
    """Mount ``mounts`` in order onto ``target``; on failure undo what was done."""
    done = 0
    try:
        for m in mounts:
            mount(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


# --- finding and undoing mounts ----------------------------------------------------------------

@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/self/mountinfo`` (proc(5)), with its fields unescaped.

    ``36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue``
    is mount 36 (parent 35) of device 98:0, showing ``/mnt1`` of that filesystem at
    ``/mnt2``, with per-mount options ``rw,noatime``, then after the ``-``: type, source
    and the superblock's options.
    """

    mount_id: int
    parent_id: int
    devno: int            # st_dev of the filesystem (os.makedev(major, minor))
    root: str             # the directory of the filesystem mounted here ("/" for all of it)
    target: str           # the mount point
    mount_options: str    # per-mount options ("rw,nosuid,relatime")
    fstype: str
    source: str
    super_options: str    # the superblock's options ("rw,lowerdir=...,prjquota")

    @property
    def super_option_set(self) -> set[str]:
        return set(self.super_options.split(","))


_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape_field(field_: str) -> str:
    """A mountinfo field as the kernel wrote it: space, tab, newline and backslash (and
    anything else it chose to) escaped as ``\\ooo`` octal."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field_)


def parse_mountinfo_line(line: str) -> MountInfo:
    """One line of mountinfo. Optional fields (``shared:N``, ``master:N``) end at ``-``."""
    left, sep, right = line.rstrip("\n").partition(" - ")
    lf, rf = left.split(" "), right.split(" ")
    if not sep or len(lf) < 6 or len(rf) < 2:
        raise ValueError(f"not a mountinfo line: {line!r}")
    major, _, minor = lf[2].partition(":")
    return MountInfo(int(lf[0]), int(lf[1]), os.makedev(int(major), int(minor)),
                     unescape_field(lf[3]), unescape_field(lf[4]), lf[5], unescape_field(rf[0]),
                     unescape_field(rf[1]), unescape_field(rf[2]) if len(rf) > 2 else "")


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    """Every mount in this mount namespace, in the kernel's order (parents first)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [parse_mountinfo_line(line) for line in f if line.strip()]


def is_mounted(target: str | os.PathLike[str]) -> bool:
    tgt = os.path.realpath(target)
    return any(m.target == tgt for m in mountinfo())


def mounts_under(root: str | os.PathLike[str]) -> list[MountInfo]:
    """Every mount at or below ``root``, deepest first (the order to unmount in)."""
    base = os.path.realpath(root)
    found = [m for m in mountinfo()
             if m.target == base or m.target.startswith(base.rstrip("/") + "/")]
    return sorted(found, key=lambda m: (m.target.count("/"), m.mount_id), reverse=True)


def unmount(target: str | os.PathLike[str], *, lazy: bool = False, retries: int = 20) -> None:
    """Unmount the top mount at ``target``; retries briefly on EBUSY, then detaches lazily
    only when ``lazy`` is set. A dead FUSE mount (its server killed) unmounts normally."""
    tgt = os.fspath(target).encode()
    for attempt in range(retries):
        if _libc.umount2(tgt, 0) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # not a mount point: nothing to do
            return
        if err == errno.EBUSY and attempt < retries - 1:
            time.sleep(0.05)
            continue
        if lazy and _libc.umount2(tgt, MNT_DETACH) == 0:
            return
        raise LayerfsError(f"umount {os.fsdecode(tgt)}: {os.strerror(err)}")


def unmount_all_under(root: str | os.PathLike[str], *, lazy: bool = True) -> list[str]:
    """Undo every mount at or below ``root`` (crash recovery); returns what was unmounted."""
    undone = []
    for m in mounts_under(root):
        unmount(m.target, lazy=lazy)
        undone.append(m.target)
    return undone


@contextlib.contextmanager
def mounted(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> Iterator[Path]:
    """Context manager: mount, yield the target, always unmount."""
    mount_all(mounts, target)
    try:
        yield Path(target)
    finally:
        for _ in mounts:
            unmount(target, lazy=True)
