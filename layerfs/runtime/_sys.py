"""ctypes wrappers for the Linux calls that Python 3.11's :mod:`os` lacks.

unshare/setns/pivot_root/mount/sethostname/prctl/capset/close_range/openat2 are
called directly, never through a helper process: the container start path must
not spawn anything when networking is off (see docs/runtime.md, "Speed").

Every wrapper raises :class:`OSError` with the errno and the path or name it
acted on; :mod:`layerfs.runtime.engine` turns those into :class:`LayerfsError`.
Much of this runs in a freshly forked child, so nothing here allocates locks or
starts threads.
"""

from __future__ import annotations

import ctypes
import os

# --- clone(2)/unshare(2) flags (linux/sched.h) ---------------------------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# --- mount(2) flags (linux/mount.h) --------------------------------------------------------------
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 0x2

# statvfs f_flag bits that are per-mount flags and must survive a bind remount
# (in a user namespace the kernel refuses a remount that would clear them).
ST_TO_MS = {
    os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}

# --- mount_setattr(2) -------------------------------------------------------------------------------
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100
OPEN_TREE_CLONE = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4

# --- prctl(2) options (linux/prctl.h) ---------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# --- syscall numbers ----------------------------------------------------------------------------------
_SYSCALLS = {
    # name: (x86_64, aarch64)
    "capget": (125, 90),
    "capset": (126, 91),
    "pivot_root": (155, 41),
    "close_range": (436, 436),
    "openat2": (437, 437),
    "mount_setattr": (442, 442),
    "seccomp": (317, 277),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
}
_ARCH = {"x86_64": 0, "aarch64": 1}.get(os.uname().machine)


def _nr(name: str) -> int:
    if _ARCH is None:
        raise OSError(38, f"{name}: no syscall number for {os.uname().machine} in layerfs")
    return _SYSCALLS[name][_ARCH]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _check(rc: int, what: str, target: object = None) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", None if target is None else str(target))
    return rc


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare", hex(flags))


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns", hex(nstype))


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    rc = _libc.mount(source.encode() if source else None, target.encode(),
                     fstype.encode() if fstype else None, flags,
                     data.encode() if data else None)
    _check(rc, f"mount {fstype or source or ''}", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_nr("pivot_root"), new_root.encode(), put_old.encode()),
           "pivot_root", new_root)


def mount_setattr(path: str, attr_set: int, recursive: bool = True, fd: int = AT_FDCWD) -> None:
    """Set ``MOUNT_ATTR_*`` flags on the mount at ``path`` (and every mount below it).

    With ``fd`` and ``path=""`` it acts on the mount ``fd`` refers to (an
    :func:`open_tree` result).
    """
    # struct mount_attr { u64 attr_set, attr_clr, propagation, userns_fd; }
    attr = (ctypes.c_uint64 * 4)(attr_set, 0, 0, 0)
    flags = (AT_RECURSIVE if recursive else 0) | (AT_EMPTY_PATH if not path else 0)
    _check(_libc.syscall(_nr("mount_setattr"), fd, path.encode(), flags, ctypes.byref(attr),
                         ctypes.sizeof(attr)), "mount_setattr", path or f"fd {fd}")


def open_tree_clone(path: str, recursive: bool = True) -> int:
    """A detached copy of the mount tree at ``path`` (Linux 5.2+), as an ``O_CLOEXEC`` fd.

    It can be attached with :func:`move_mount` in another mount namespace, including
    one owned by a user namespace; a plain bind of a path opened in the host's
    namespace would be refused there (EINVAL).
    """
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    return _check(_libc.syscall(_nr("open_tree"), AT_FDCWD, path.encode(), flags),
                  "open_tree", path)


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount ``fd`` at ``target``."""
    _check(_libc.syscall(_nr("move_mount"), fd, b"", AT_FDCWD, target.encode(),
                         MOVE_MOUNT_F_EMPTY_PATH), "move_mount", target)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname", name)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), "prctl", option)


def set_process_name(name: str) -> None:
    """Set comm and /proc/self/cmdline to ``name`` (the container's PID 1 is a fork of
    the runner: without this it would show the runner's command line to the container).

    cmdline is read by the kernel from the original argv strings at the top of the
    stack (arg_start..arg_end in /proc/self/stat); CPython copied them at startup and
    never reads them again, so they are overwritten in place, like setproctitle does.
    """
    raw = name.encode()
    buf = ctypes.create_string_buffer(raw[:15])
    prctl(PR_SET_NAME, ctypes.addressof(buf))
    try:
        with open("/proc/self/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()
        start, end = int(fields[45]), int(fields[46])   # stat fields 48 and 49
    except (OSError, ValueError, IndexError):
        return
    if end > start:
        ctypes.memset(start, 0, end - start)
        ctypes.memmove(start, raw, min(len(raw), end - start - 1))


def close_range(first: int, last: int = 0xFFFFFFFF) -> None:
    """Close every fd in [first, last]; the kernel does it in one call (Linux 5.9+)."""
    if first > last:
        return
    if _libc.syscall(_nr("close_range"), first, last, 0) < 0:
        os.closerange(first, min(last, 1 << 20) + 1)


def close_all_except(keep: set[int] | frozenset[int], first: int = 3) -> None:
    """Close every fd >= ``first`` that is not in ``keep``."""
    lo = first
    for fd in sorted(f for f in keep if f >= first):
        close_range(lo, fd - 1)
        lo = fd + 1
    close_range(lo)


# --- capabilities ---------------------------------------------------------------------------------
_CAP_V3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (64-bit masks)."""
    hdr = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.syscall(_nr("capset"), ctypes.byref(hdr), data), "capset")


def capget(pid: int = 0) -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of ``pid`` (0: this thread)."""
    hdr = _CapHeader(_CAP_V3, pid)
    data = (_CapData * 2)()
    _check(_libc.syscall(_nr("capget"), ctypes.byref(hdr), data), "capget", pid)
    eff = data[0].effective | (data[1].effective << 32)
    prm = data[0].permitted | (data[1].permitted << 32)
    inh = data[0].inheritable | (data[1].inheritable << 32)
    return eff, prm, inh


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except OSError:
        return 40


# --- ioctl for the one interface flag the fast path needs -----------------------------------------
_libc.socket.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """Bring ``lo`` up in the current network namespace (SIOCSIFFLAGS: no helper process,
    and no import of :mod:`socket` in the freshly forked child)."""
    fd = _check(_libc.socket(2, 2 | os.O_CLOEXEC, 0), "socket")   # AF_INET, SOCK_DGRAM
    try:
        ifreq = ctypes.create_string_buffer(b"lo", 40)             # struct ifreq
        _check(_libc.ioctl(fd, _SIOCGIFFLAGS, ifreq), "SIOCGIFFLAGS", "lo")
        flags = int.from_bytes(ifreq.raw[16:18], "little") | _IFF_UP
        ctypes.memmove(ctypes.addressof(ifreq) + 16, flags.to_bytes(2, "little"), 2)
        _check(_libc.ioctl(fd, _SIOCSIFFLAGS, ifreq), "SIOCSIFFLAGS", "lo")
    finally:
        os.close(fd)


# --- seccomp(2) ---------------------------------------------------------------------------------
SECCOMP_SET_MODE_FILTER = 1


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_set_filter(bpf: bytes, flags: int = 0) -> None:
    """Install a classic BPF seccomp filter on this thread (needs no_new_privs or
    CAP_SYS_ADMIN). ``bpf`` is a whole program of 8-byte ``struct sock_filter``\\s."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    _check(_libc.syscall(_nr("seccomp"), SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog)),
           "seccomp")


# --- openat2(2) -----------------------------------------------------------------------------------
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2) (Linux 5.6+; Python has no binding): ``RESOLVE_IN_ROOT`` resolves
    ``path`` as if ``dirfd`` were ``/``, symlinks and ``..`` included."""
    how = _OpenHow(flags, mode, resolve)
    return _check(_libc.syscall(_nr("openat2"), dirfd, path.encode(), ctypes.byref(how),
                                ctypes.sizeof(how)), "openat2", path)
