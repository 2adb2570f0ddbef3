"""The container's view of the system: mount namespace setup, and joining namespaces.

:func:`setup_mounts` runs in the container's first process, in a fresh mount
namespace, before anything of the container runs. The order matters:

1. make every mount private (``MS_REC|MS_PRIVATE``): nothing propagates back to the host;
2. bind the rootfs onto itself (``pivot_root`` needs a mount point), ``nodev``;
3. everything that comes from the host (volume sources, the generated /etc files,
   host device nodes in a user namespace) was cloned by the runner before the fork
   as detached mounts (``open_tree(OPEN_TREE_CLONE)``, :func:`open_sources`), with
   ``nodev`` and ``ro`` already applied: as host root (a user-namespaced root could
   not even traverse the state directory) and attachable in any mount namespace
   (a bind from a path of the host's namespace is refused in a user namespace);
4. ``pivot_root(".", ".")``: the new root becomes ``/`` for path lookups while the
   old root stays stacked in the namespace (a kernel that refuses proc/sysfs mounts
   in a user namespace unless a full proc/sysfs is already visible is satisfied);
5. mount ``/proc``, a minimal ``/dev``, ``/sys`` read-only, the masked and
   read-only paths and the volumes. Every target is a path *inside the new root*,
   so a symlink planted in the image (``/proc -> /etc``, ``data -> /``) resolves in
   the container and can never reach the host; host sources are attached from their
   detached-mount fds (``move_mount``);
6. detach the old root (``umount2(".", MNT_DETACH)``); from here on no path leads out.

The masked and read-only path lists are Docker's (moby ``oci/defaults.go``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import _sys
from .spec import Volume

MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# (name, major, minor): the nodes of a Docker container's /dev, all mode 0666.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9), ("tty", 5, 0))
DEV_SYMLINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                ("ptmx", "pts/ptmx"))

NS_FLAGS = {"user": _sys.CLONE_NEWUSER, "ipc": _sys.CLONE_NEWIPC, "uts": _sys.CLONE_NEWUTS,
            "net": _sys.CLONE_NEWNET, "pid": _sys.CLONE_NEWPID, "cgroup": _sys.CLONE_NEWCGROUP,
            "mnt": _sys.CLONE_NEWNS}

_PROC_FLAGS = _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC


@dataclass
class MountPlan:
    """What :func:`setup_mounts` needs; computed by the engine before the fork."""

    rootfs: str
    volumes: Sequence[Volume] = ()
    etc_files: dict[str, str] = field(default_factory=dict)  # container path -> host file
    read_only: bool = False
    userns: bool = False       # no mknod: bind the host's device nodes instead
    host_sysfs: bool = False   # sysfs cannot be mounted (userns + host netns): bind the host's
    # detached mounts from open_sources(), valid in the forked child
    volume_fds: list[int] = field(default_factory=list)
    etc_fds: dict[str, int] = field(default_factory=dict)
    dev_fds: dict[str, int] = field(default_factory=dict)
    sys_fd: int = -1

    def fds(self) -> list[int]:
        return [*self.volume_fds, *self.etc_fds.values(), *self.dev_fds.values(),
                *([self.sys_fd] if self.sys_fd >= 0 else [])]


def open_sources(plan: MountPlan) -> None:
    """Clone every host path the container will see as a detached mount; in the runner."""
    try:
        for vol in plan.volumes:
            try:
                fd = _sys.open_tree_clone(str(vol.source))
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "volume source does not exist",
                                        str(vol.source)) from None
            plan.volume_fds.append(fd)
            ro = _sys.MOUNT_ATTR_RDONLY if vol.readonly else 0
            _sys.mount_setattr("", _sys.MOUNT_ATTR_NODEV | ro, fd=fd)
        for target, src in plan.etc_files.items():
            plan.etc_fds[target] = _sys.open_tree_clone(src, recursive=False)
        if plan.userns:
            for name, _, _ in DEVICES:
                plan.dev_fds[name] = _sys.open_tree_clone(f"/dev/{name}", recursive=False)
        if plan.host_sysfs:
            plan.sys_fd = _sys.open_tree_clone("/sys")
            _sys.mount_setattr("", _sys.MOUNT_ATTR_RDONLY, fd=plan.sys_fd)
    except BaseException:
        close_sources(plan)
        raise


def close_sources(plan: MountPlan) -> None:
    for fd in plan.fds():
        os.close(fd)
    plan.volume_fds, plan.etc_fds, plan.dev_fds, plan.sys_fd = [], {}, {}, -1


def _mkdirs(path: str, mode: int = 0o755) -> None:
    # Only called after pivot_root: symlinks resolve inside the container, so a
    # hostile "/proc -> /somewhere" just moves the directory within the container.
    os.makedirs(os.path.realpath(path), mode, exist_ok=True)




def _mount_dev(plan: MountPlan) -> None:
    _mkdirs("/dev")
    _sys.mount("tmpfs", "/dev", "tmpfs", _sys.MS_NOSUID | _sys.MS_STRICTATIME,
               "mode=755,size=65536k")
    for name, major, minor in DEVICES:
        path = f"/dev/{name}"
        if plan.userns:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            _sys.move_mount(plan.dev_fds[name], path)
        else:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    os.mkdir("/dev/pts", 0o755)
    opts = "newinstance,ptmxmode=0666,mode=0620" + ("" if plan.userns else ",gid=5")
    _sys.mount("devpts", "/dev/pts", "devpts", _sys.MS_NOSUID | _sys.MS_NOEXEC, opts)
    os.mkdir("/dev/shm", 0o1777)
    _sys.mount("shm", "/dev/shm", "tmpfs", _PROC_FLAGS, "mode=1777,size=65536k")
    os.mkdir("/dev/mqueue", 0o755)
    try:
        _sys.mount("mqueue", "/dev/mqueue", "mqueue", _PROC_FLAGS)
    except OSError as err:
        if err.errno != errno.ENODEV:  # a kernel without POSIX message queues
            raise
    for name, dest in DEV_SYMLINKS:
        os.symlink(dest, f"/dev/{name}")


def _mask(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        _sys.mount("tmpfs", path, "tmpfs", _sys.MS_RDONLY, "size=0")
    else:
        _sys.mount("/dev/null", path, None, _sys.MS_BIND)


def _readonly(path: str) -> None:
    try:
        _sys.mount(path, path, None, _sys.MS_BIND | _sys.MS_REC)
    except FileNotFoundError:
        return
    _sys.mount(None, path, None, _sys.MS_BIND | _sys.MS_REMOUNT | _sys.MS_RDONLY | _PROC_FLAGS)


def _volume_target(target: str, source_is_dir: bool) -> None:
    if source_is_dir:
        _mkdirs(target)
        return
    _mkdirs(os.path.dirname(target))
    if not os.path.lexists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o644))


def setup_mounts(plan: MountPlan) -> None:
    """Build the container's mount tree and ``pivot_root`` into it (see the module doc).

    Must run in a new mount namespace (and, for ``/proc``, as PID 1 of the new
    PID namespace). Leaves the process with ``/`` and cwd at the new root.
    """
    os.umask(0)
    _sys.mount(None, "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    _sys.mount(plan.rootfs, plan.rootfs, None, _sys.MS_BIND | _sys.MS_REC)
    # Device nodes shipped in an image (or created through a volume) stay unusable:
    # only the /dev built below, which holds just the allowed nodes, has dev semantics.
    _sys.mount_setattr(plan.rootfs, _sys.MOUNT_ATTR_NODEV)

    os.chdir(plan.rootfs)
    _sys.pivot_root(".", ".")

    _mkdirs("/proc")
    _sys.mount("proc", "/proc", "proc", _PROC_FLAGS)
    _mount_dev(plan)
    _mkdirs("/sys")
    if plan.host_sysfs:
        _sys.move_mount(plan.sys_fd, "/sys")
    else:
        _sys.mount("sysfs", "/sys", "sysfs", _PROC_FLAGS | _sys.MS_RDONLY)
    for path in MASKED_PATHS:
        _mask(path)
    for path in READONLY_PATHS:
        _readonly(path)

    for vol, fd in zip(plan.volumes, plan.volume_fds, strict=True):
        _volume_target(vol.target, stat.S_ISDIR(os.fstat(fd).st_mode))
        _sys.move_mount(fd, vol.target)
    if os.path.isdir("/etc"):
        for target, fd in plan.etc_fds.items():
            try:
                _volume_target(target, False)
                _sys.move_mount(fd, target)
            except OSError:
                # A dangling symlink or a read-only /etc: the image keeps its own file.
                continue
    close_sources(plan)

    # The old root is stacked on "." since pivot_root: detach it and everything below.
    _sys.mount(None, ".", None, _sys.MS_REC | _sys.MS_PRIVATE)
    _sys.umount2(".", _sys.MNT_DETACH)
    os.chdir("/")
    if plan.read_only:
        _sys.mount_setattr("/", _sys.MOUNT_ATTR_RDONLY, recursive=False)
    os.umask(0o022)


# --- joining an existing container's namespaces (exec) -----------------------------------------
def open_namespaces(pid: int, kinds: Sequence[str]) -> dict[str, int]:
    """O_RDONLY fds of ``/proc/<pid>/ns/<kind>`` for each kind that differs from ours."""
    fds: dict[str, int] = {}
    try:
        for kind in kinds:
            if os.stat(f"/proc/{pid}/ns/{kind}").st_ino == os.stat(f"/proc/self/ns/{kind}").st_ino:
                continue
            fds[kind] = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def join_namespaces(fds: dict[str, int]) -> None:
    """setns into each namespace; the user namespace first, the mount namespace last.

    The pid namespace is not joined here (it only applies to children); the
    engine forks into it with :func:`pid_namespace_for_children`.
    """
    order = ("user", "ipc", "uts", "net", "cgroup", "mnt")
    for kind in order:
        if kind in fds:
            _sys.setns(fds[kind], NS_FLAGS[kind])


class ForkInto:
    """Context manager: make *this thread*'s next fork land in new or given namespaces.

    ``unshare(CLONE_NEWPID)`` (or ``setns`` on a pid namespace) changes only the
    namespace of the calling thread's *children*; on exit the thread is put back
    with ``setns`` on fds of its own namespaces, so the runner itself is never
    moved and other threads are never affected. The same holds for the network
    namespace, which is per thread. This is what lets the container's init be a
    plain ``os.fork()`` child of the runner and PID 1 of its namespace at once.
    """

    def __init__(self, new: int = 0, join: dict[str, int] | None = None) -> None:
        self.new = new
        self.join = join or {}
        self.back: dict[int, int] = {}

    def __enter__(self) -> ForkInto:
        flags = self.new | sum(NS_FLAGS[k] for k in self.join)
        try:
            for flag, name in ((_sys.CLONE_NEWPID, "pid"),
                               (_sys.CLONE_NEWNET, "net")):
                if flags & flag:
                    self.back[flag] = os.open(f"/proc/thread-self/ns/{name}",
                                              os.O_RDONLY | os.O_CLOEXEC)
            if self.new:
                _sys.unshare(self.new)
            for kind, fd in self.join.items():
                _sys.setns(fd, NS_FLAGS[kind])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for flag, fd in self.back.items():
            try:
                _sys.setns(fd, flag)
            finally:
                os.close(fd)
        self.back.clear()

    def netns_fd(self) -> int:
        """A new fd for the network namespace the thread is in right now (inside the block)."""
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
