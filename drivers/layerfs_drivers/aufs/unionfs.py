"""A FUSE union filesystem with AUFS semantics, for kernels without aufs.

Usage (a mount helper: it returns once the mount is live)::

    python -m layerfs_drivers.aufs.unionfs [--foreground] [--entry-timeout S]
        [--attr-timeout S] [--keep-cache | --no-keep-cache] [--stats-file PATH]
        [--copyup-fsync] [--readahead-kb KB] [--log PATH] TOP:rw LOWER:ro ... MOUNTPOINT

The first branch is the top one and the only writable one (``TOP:ro`` makes
the whole union read-only); the others are read-only, top to bottom. Without
``--foreground`` the process forks: the child (a new session, cwd ``/``, no
inherited fds) mounts, tells the parent over a pipe, and serves until the
filesystem is unmounted (``umount``/``fusermount3 -u``), then exits 0. The
parent exits 0 once the mount is live, or 1 with the error on stderr (2 for
bad arguments). SIGTERM, SIGINT and SIGHUP unmount and exit; SIGUSR1 writes
``--stats-file``. The mount is ``fuse.layerfs-union`` with ``allow_other``,
``default_permissions`` (the kernel checks permissions against the modes we
report), ``suid`` and ``dev``. The server outlives the helper, so it is
re-parented: whoever runs the helper should be a child subreaper (or rely on
an init that reaps orphans) or it stays a zombie after it exits.

Branches use AUFS's on-disk format, as Docker's aufs driver left it::

    BRANCH/
      .wh.NAME            NAME is deleted in the branches below
      dir/.wh..wh..opq    dir is opaque: the branches below add nothing to it
      .wh..wh.orph/       (top branch) scratch for copy-up in progress;
                          every .wh..wh.* name is an AUFS internal, never shown

How it works
------------
*Lookup* of NAME in a directory walks the directory's branches top-down; in
each one it probes ``.wh.NAME`` (a whiteout ends the walk) and then ``NAME``.
A non-directory ends the walk; directories found in several branches merge.
A directory's branch list is cut below the first branch where it is opaque;
that is checked lazily, the first time the directory is used as a parent,
and only for branches that have another branch below them. Every probe is
counted (see *Counters*).

*Copy-up* is per file: opening for write, truncate, chmod, chown, utimens,
set/removexattr, link and rename copy the whole file to the top branch first
(FICLONE when the backing filesystem can reflink, else copy_file_range over
the data extents, so sparse files stay sparse), with mode, owner, xattrs and
times, into ``.wh..wh.orph`` and then rename it into place, so a crash never
leaves a half-copied file visible. Missing parent directories are created in
the top branch with their lower modes, owners, xattrs and times, and the
parents' times are restored afterwards, since a copy-up changes nothing the
union shows. Opening with O_TRUNC or truncating copies no data. Handles
opened read-only on the lower file are switched to the copy (dup2), so they
see later writes. Copy-up does not fsync (neither did aufs, nor does
fuse-overlayfs); ``--copyup-fsync`` adds it.

*Deleting* a lower entry writes a whiteout ``.wh.NAME`` in the top branch;
rmdir of a directory that still shows entries is ENOTEMPTY; a directory
created where a whiteout was is made opaque. A whiteout name must fit in
NAME_MAX, so names longer than 251 bytes (255 - len(".wh.")) work in the top
branch but a lower entry with such a name cannot be deleted or renamed
(ENAMETOOLONG), as in aufs.

*Renaming a directory* that has contents in a lower branch fails with EXDEV,
as aufs without ``dirren`` does. Every program that moves files already
handles EXDEV (it is what a rename across filesystems returns): ``mv`` and
``shutil.move`` fall back to copy + delete, which here becomes a copy-up of
the tree and whiteouts for the old one. Doing that inside the filesystem
would make one rename(2) take unbounded time and half-apply on a crash, and
AUFS's own alternative (dirren) needs extra metadata files in every branch.
Directories that live only in the top branch (or are opaque there) are
renamed natively. Files are copied up and renamed; the old name is whited
out if it exists below.

*Inode numbers* (``st_ino`` and the FUSE node id are the same number) stay
stable for the life of the mount, across copy-up and kernel forgets: a
table maps a key to a number that is never reused. Directories are keyed by
their path in the union (they merge across branches); other files by the
(st_dev, st_ino) of their backing file, so hardlinks in one branch share a
number and a copy-up re-keys the file to its copy. Hardlinked names the
kernel knows are linked up together; a lower hardlink first reached after its
sibling was copied up is a separate file (as in overlayfs without index).
Merged directories report st_nlink 1, as overlayfs does.

*Caching*: every change goes through this process (branches of a mounted
union must not be changed behind its back, as with aufs and overlayfs), so
the kernel's dentry, attribute, negative-entry and page caches cannot go
stale and long timeouts are safe: the defaults (``--entry-timeout`` and
``--attr-timeout`` 86400 s, ``--keep-cache``) let warm lookups and stats be
answered by the kernel without a round trip here. ``bench/layerfs_bench/aufs_fuse.py``
measures the difference.

Counters
--------
Readable while mounted as JSON from the virtual xattr ``user.layerfs.stats``
of the mount root, reset by setting ``user.layerfs.stats.reset``; neither is
listed by listxattr. ``lookup_name_stats``, ``lookup_whiteout_probes`` and
``lookup_opaque_probes`` are the probes made by lookups; ``backing_stats`` is
every stat/existence probe on a branch path, those included. A cold lookup of
a path of D components whose directories exist in all L branches, with the
file only in the bottom one, costs L*D name stats, L*D whiteout probes and
(L-1)*(D-1) opaque probes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import resource
import select
import signal
import stat
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

log = logging.getLogger("layerfs.unionfs")

WH = b".wh."
WH_META = b".wh..wh."
OPAQUE = b".wh..wh..opq"
WORKDIR = b".wh..wh.orph"
WH_NAME_MAX = 255 - len(WH)

STATS_XATTR = b"user.layerfs.stats"
RESET_XATTR = b"user.layerfs.stats.reset"

FSTYPE = "layerfs-union"
DEFAULT_TIMEOUT = 86400.0
FICLONE = 0x40049409

S_IFMT = 0o170000
S_IFDIR = stat.S_IFDIR
S_IFREG = stat.S_IFREG
S_IFLNK = stat.S_IFLNK

_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | getattr(os, "O_DIRECT", 0)
_RENAME_EXCHANGE = 2
_RENAME_NOREPLACE = 1


class Stats:
    """Counters of the work the filesystem does on its branches."""

    __slots__ = ("copy_up_bytes", "copy_ups", "dir_copy_ups", "getattr_stats",
                 "lookup_name_stats", "lookup_opaque_probes", "lookup_whiteout_probes",
                 "lookups", "lookups_negative", "other_probes", "readdir_stats",
                 "whiteouts_created", "whiteouts_removed")
    copy_up_bytes: int
    copy_ups: int
    dir_copy_ups: int
    getattr_stats: int
    lookup_name_stats: int
    lookup_opaque_probes: int
    lookup_whiteout_probes: int
    lookups: int
    lookups_negative: int
    other_probes: int
    readdir_stats: int
    whiteouts_created: int
    whiteouts_removed: int

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

    ``path`` is its path in the union, relative (``b"."`` for the root,
    ``b"./a/b"`` below it); ``alt`` holds more paths of a hardlinked file.
    ``branch`` is the topmost branch that has it; ``branches`` (directories
    only) every branch it merges, top-down, cut at an opaque one once
    ``opq_done`` (``raw`` is the list before that cut). ``fds`` are the
    backing fds of open handles, used once the last name is gone
    (open-unlinked files).
    """

    __slots__ = ("alt", "branch", "branches", "fds", "ino", "key", "kind", "nlookup",
                 "opq_done", "path", "raw")

    def __init__(self, ino: int, path: bytes | None, kind: int, branch: int,
                 branches: list[int] | None, key: Any) -> None:
        self.ino = ino
        self.path = path
        self.alt: list[bytes] | None = None
        self.kind = kind
        self.branch = branch
        self.branches = branches
        self.raw = branches
        self.opq_done = False
        self.nlookup = 0
        self.fds: set[int] = set()
        self.key = key

    def all_paths(self) -> list[bytes]:
        out = [] if self.path is None else [self.path]
        if self.alt:
            out += self.alt
        return out


def _parent_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def _check_new_name(name: bytes) -> None:
    # A name with the whiteout prefix could not be told from a whiteout.
    if name.startswith(WH):
        raise FUSEError(errno.EPERM)


P = ParamSpec("P")
R = TypeVar("R")


def _op(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Make a synchronous method a pyfuse3 request handler.

    Handlers never await, so each request runs to completion before the next
    starts and no locking is needed. OSError becomes the FUSE error; any
    other exception is logged and answered EIO instead of killing the loop.
    """

    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except OSError as err:
            raise FUSEError(err.errno or errno.EIO) from None
        except FUSEError:
            raise
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise FUSEError(errno.EIO) from None

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


class UnionFS(pyfuse3.Operations):
    """The pyfuse3 operations of one union mount."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, branches: Iterable[str | os.PathLike[str]], *, writable: bool = True,
                 entry_timeout: float = DEFAULT_TIMEOUT, attr_timeout: float = DEFAULT_TIMEOUT,
                 keep_cache: bool = True, copyup_fsync: bool = False) -> None:
        super().__init__()
        self.roots = [os.fsencode(os.path.abspath(b)) for b in branches]
        if not self.roots:
            raise ValueError("a union needs at least one branch")
        self.bfd: list[int] = []
        for branch_root in self.roots:
            self.bfd.append(os.open(branch_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        self.writable = writable
        self.entry_timeout = float(entry_timeout)
        self.attr_timeout = float(attr_timeout)
        self.keep_cache = keep_cache
        self.copyup_fsync = copyup_fsync
        self.reflink = True
        self.stats = Stats()
        self.nodes: dict[int, Node] = {}
        self.inos: dict[Any, int] = {}
        self.paths: dict[bytes, Node] = {}
        self.files: dict[int, Node] = {}
        self.dirs: dict[int, list[Any]] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.next_dh = 1
        self.tmp_serial = 0
        self.rbuf = bytearray(1 << 20)
        self.rview = memoryview(self.rbuf)
        root = Node(pyfuse3.ROOT_INODE, b".", S_IFDIR, 0, list(range(len(self.roots))), b".")
        root.nlookup = 1
        self.nodes[root.ino] = root
        self.paths[b"."] = root
        self.inos[b"."] = root.ino
        self._dir_branches(root)
        negative = pyfuse3.EntryAttributes()
        negative.st_ino = 0
        negative.entry_timeout = self.entry_timeout
        self.negative = negative
        if writable:
            self._init_workdir()
        self.stats.reset()

    def _init_workdir(self) -> None:
        top = self.bfd[0]
        st = os.stat(b".", dir_fd=top)
        work = b"./" + WORKDIR
        try:
            os.mkdir(work, 0o700, dir_fd=top)
        except FileExistsError:
            for name in os.listdir(self.roots[0] + b"/" + WORKDIR):
                with contextlib.suppress(OSError):
                    os.unlink(work + b"/" + name, dir_fd=top)
        else:
            # The scratch dir is an internal: the union's root keeps its times.
            os.utime(b".", ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=top)

    def close(self) -> None:
        for fd in list(self.files) + self.bfd:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.files.clear()
        self.bfd = []

    # --- resolution ------------------------------------------------------------------------

    def _dir_branches(self, node: Node) -> list[int]:
        """The branches a directory merges, cut below the first one where it is opaque."""
        br = node.branches
        assert br is not None
        if node.opq_done:
            return br
        if len(br) > 1:
            marker = node.path + b"/" + OPAQUE  # type: ignore[operator]
            for i in range(len(br) - 1):
                self.stats.lookup_opaque_probes += 1
                if os.access(marker, os.F_OK, dir_fd=self.bfd[br[i]], follow_symlinks=False):
                    br = node.branches = br[:i + 1]
                    break
        node.opq_done = True
        return br

    def _resolve(self, parent: Node, path: bytes,
                 name: bytes) -> tuple[os.stat_result, int, list[int] | None] | None:
        """Find ``name`` in ``parent``: (stat, topmost branch, dir branches) or None."""
        s = self.stats
        wh = parent.path + b"/" + WH + name if len(name) <= WH_NAME_MAX else None  # type: ignore[operator]
        found: os.stat_result | None = None
        fbranch = -1
        dirs: list[int] | None = None
        lstat = os.lstat
        access = os.access
        bfd = self.bfd
        for b in self._dir_branches(parent):
            fd = bfd[b]
            if wh is not None:
                s.lookup_whiteout_probes += 1
                if access(wh, os.F_OK, dir_fd=fd, follow_symlinks=False):
                    break
            s.lookup_name_stats += 1
            try:
                st = lstat(path, dir_fd=fd)
            except FileNotFoundError:
                continue
            if st.st_mode & S_IFMT == S_IFDIR:
                if found is None:
                    found, fbranch, dirs = st, b, [b]
                else:
                    dirs.append(b)  # type: ignore[union-attr]
            else:
                if found is None:
                    found, fbranch = st, b
                break
        if found is None:
            return None
        return found, fbranch, dirs

    def _attach(self, path: bytes, st: os.stat_result, branch: int,
                dirs: list[int] | None) -> Node:
        """The node for a resolved path: the live one, or a new one with its stable number."""
        kind = st.st_mode & S_IFMT
        key: Any = path if dirs is not None else (st.st_dev, st.st_ino)
        ino = self.inos.get(key)
        node = self.nodes.get(ino) if ino is not None else None
        if node is not None and node.kind != kind:
            node = None
            ino = None
        if node is None:
            if ino is None:
                ino = self.next_ino
                self.next_ino += 1
                self.inos[key] = ino
            node = Node(ino, path, kind, branch, dirs, key)
            self.nodes[ino] = node
            self.paths[path] = node
            return node
        if dirs is not None:
            node.branch = branch
            if node.raw != dirs:
                node.raw = node.branches = dirs
                node.opq_done = False
        else:
            node.branch = branch
            if node.path is None:
                node.path = path
                self.paths[path] = node
            elif node.path != path and (node.alt is None or path not in node.alt):
                if node.alt is None:
                    node.alt = []
                node.alt.append(path)
                self.paths[path] = node
        return node

    def _child(self, parent: Node, name: bytes) -> Node:
        path = parent.path + b"/" + name  # type: ignore[operator]
        node = self.paths.get(path)
        if node is not None:
            return node
        res = self._resolve(parent, path, name)
        if res is None:
            raise FUSEError(errno.ENOENT)
        return self._attach(path, *res)

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = st.st_mode
        if node.raw is not None and len(node.raw) > 1:
            e.st_nlink = 1  # a merged directory: the count is unknown (as overlayfs)
        else:
            e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _stat(self, node: Node) -> os.stat_result:
        if node.path is not None:
            self.stats.getattr_stats += 1
            return os.lstat(node.path, dir_fd=self.bfd[node.branch])
        for fd in node.fds:
            return os.fstat(fd)
        raise FUSEError(errno.ESTALE)

    def _abs(self, branch: int, path: bytes) -> bytes:
        return self.roots[branch] + path[1:]

    def _lower_has(self, parent: Node, name: bytes) -> bool:
        """Whether a branch below the top shows ``name`` in ``parent``."""
        s = self.stats
        path = parent.path + b"/" + name  # type: ignore[operator]
        wh = parent.path + b"/" + WH + name if len(name) <= WH_NAME_MAX else None  # type: ignore[operator]
        for b in self._dir_branches(parent):
            if b == 0:
                continue
            fd = self.bfd[b]
            if wh is not None:
                s.other_probes += 1
                if os.access(wh, os.F_OK, dir_fd=fd, follow_symlinks=False):
                    return False
            s.other_probes += 1
            if os.access(path, os.F_OK, dir_fd=fd, follow_symlinks=False):
                return True
        return False

    def _merge(self, node: Node) -> list[tuple[bytes, int, list[int] | None]]:
        """The merged listing of a directory: (name, topmost branch, dir branches)."""
        out: dict[bytes, list[Any]] = {}
        hidden: set[bytes] = set()
        fsencode = os.fsencode
        for b in self._dir_branches(node):
            try:
                dfd = os.open(node.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,  # type: ignore[arg-type]
                              dir_fd=self.bfd[b])
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                with os.scandir(dfd) as it:
                    entries = [(fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in it]
            finally:
                os.close(dfd)
            whiteouts = {n[4:] for n, _ in entries if n.startswith(WH) and not n.startswith(WH_META)}
            for n, isdir in entries:
                if n.startswith(WH) or n in hidden or n in whiteouts:
                    continue
                cur = out.get(n)
                if cur is None:
                    out[n] = [b, [b] if isdir else None]
                    if not isdir:
                        hidden.add(n)
                elif isdir:
                    cur[1].append(b)
                else:
                    hidden.add(n)  # a non-directory below a directory ends its merge
            hidden |= whiteouts
        return [(n, v[0], v[1]) for n, v in out.items()]

    # --- changing the top branch -----------------------------------------------------------

    def _writable(self) -> None:
        if not self.writable:
            raise FUSEError(errno.EROFS)

    def _ensure_top_dir(self, path: bytes) -> tuple[int, int]:
        """Make directory ``path`` exist in the top branch; returns its (atime, mtime).

        Missing directories are created with the attributes of their topmost
        lower copy; each parent's times are put back after a child is made,
        since that changes nothing the union shows.
        """
        node = self.paths.get(path)
        top = self.bfd[0]
        self.stats.other_probes += 1
        try:
            st = os.lstat(path, dir_fd=top)
        except FileNotFoundError:
            pass
        else:
            if st.st_mode & S_IFMT == S_IFDIR:
                return st.st_atime_ns, st.st_mtime_ns
            raise FUSEError(errno.EIO)  # the top branch contradicts the union
        ptimes = self._ensure_top_dir(_parent_of(path))
        lower = self._lower_branch(path, node)
        self.stats.other_probes += 1
        src = os.lstat(path, dir_fd=self.bfd[lower])
        os.mkdir(path, 0o700, dir_fd=top)
        os.chown(path, src.st_uid, src.st_gid, dir_fd=top, follow_symlinks=False)
        os.chmod(path, src.st_mode & 0o7777, dir_fd=top)
        self._copy_xattrs(self._abs(lower, path), self._abs(0, path), follow=False)
        os.utime(path, ns=(src.st_atime_ns, src.st_mtime_ns), dir_fd=top, follow_symlinks=False)
        os.utime(_parent_of(path), ns=ptimes, dir_fd=top, follow_symlinks=False)
        self.stats.dir_copy_ups += 1
        if node is not None and node.branches is not None and node.branches[0] != 0:
            node.branches = [0, *node.branches]
            node.raw = [0, *node.raw]  # type: ignore[misc]
            node.branch = 0
        return src.st_atime_ns, src.st_mtime_ns

    def _lower_branch(self, path: bytes, node: Node | None) -> int:
        if node is not None and node.branches:
            return node.branches[0]
        for b in range(1, len(self.bfd)):
            self.stats.other_probes += 1
            try:
                st = os.lstat(path, dir_fd=self.bfd[b])
            except (FileNotFoundError, NotADirectoryError):
                continue
            if st.st_mode & S_IFMT == S_IFDIR:
                return b
        raise FUSEError(errno.ENOENT)

    def _copy_xattrs(self, src: bytes | int, dst: bytes | int, *, follow: bool) -> None:
        try:
            names = os.listxattr(src, follow_symlinks=follow)
        except OSError as err:
            if err.errno in (errno.ENOTSUP, errno.EPERM):
                return
            raise
        for name in names:
            value = os.getxattr(src, name, follow_symlinks=follow)
            try:
                os.setxattr(dst, name, value, follow_symlinks=follow)
            except OSError as err:
                if err.errno != errno.ENOTSUP:
                    raise

    def _tmp_name(self) -> bytes:
        self.tmp_serial += 1
        return b"./" + WORKDIR + b"/" + str(self.tmp_serial).encode()

    def _copy_data(self, sfd: int, dfd: int, size: int) -> int:
        """Copy the first ``size`` bytes; holes stay holes. Returns bytes copied."""
        if size <= 0:
            return 0
        if self.reflink:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
            except OSError:
                self.reflink = False
            else:
                os.ftruncate(dfd, size)
                return size
        copied = 0
        off = 0
        while off < size:
            try:
                data = os.lseek(sfd, off, os.SEEK_DATA)
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
                break  # only a hole is left
            if data >= size:
                break
            end = min(os.lseek(sfd, data, os.SEEK_HOLE), size)
            pos = data
            while pos < end:
                n = os.copy_file_range(sfd, dfd, end - pos, pos, pos)
                if n == 0:
                    break
                pos += n
            copied += pos - data
            off = end
        os.ftruncate(dfd, size)
        return copied

    def _copy_up(self, node: Node, size: int | None = None) -> None:
        """Copy a non-directory to the top branch (only ``size`` bytes of data if given)."""
        if node.branch == 0:
            return
        self._writable()
        path = node.path
        if path is None:
            raise FUSEError(errno.EROFS)  # an open-unlinked lower file has nowhere to go
        src_fd = self.bfd[node.branch]
        top = self.bfd[0]
        self.stats.other_probes += 1
        st = os.lstat(path, dir_fd=src_fd)
        ptimes = self._ensure_top_dir(_parent_of(path))
        tmp = self._tmp_name()
        try:
            copied = self._copy_to(node, st, tmp, size)
            os.rename(tmp, path, src_dir_fd=top, dst_dir_fd=top)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=top)
            raise
        os.utime(_parent_of(path), ns=ptimes, dir_fd=top, follow_symlinks=False)
        self.stats.copy_ups += 1
        self.stats.copy_up_bytes += copied
        new = os.lstat(path, dir_fd=top)
        if self.inos.get(node.key) == node.ino:
            del self.inos[node.key]
        node.key = (new.st_dev, new.st_ino)
        self.inos[node.key] = node.ino
        node.branch = 0
        # Names of the same lower file the kernel knows: keep them one file.
        for alt in node.alt or ():
            ptimes = self._ensure_top_dir(_parent_of(alt))
            os.link(path, alt, src_dir_fd=top, dst_dir_fd=top, follow_symlinks=False)
            os.utime(_parent_of(alt), ns=ptimes, dir_fd=top, follow_symlinks=False)
        # Read-only handles on the lower file now read the copy.
        for fd in node.fds:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL) & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
            nfd = os.open(path, flags | os.O_CLOEXEC, dir_fd=top)
            os.dup2(nfd, fd, inheritable=False)
            os.close(nfd)

    def _copy_to(self, node: Node, st: os.stat_result, tmp: bytes, size: int | None) -> int:
        """Copy ``node`` (stat ``st``) to ``tmp`` in the top branch; returns bytes copied."""
        path = node.path
        assert path is not None
        src_fd = self.bfd[node.branch]
        top = self.bfd[0]
        kind = st.st_mode & S_IFMT
        copied = 0
        if kind == S_IFREG:
            sfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=src_fd)
            try:
                dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                              dir_fd=top)
                try:
                    limit = st.st_size if size is None else min(size, st.st_size)
                    copied = self._copy_data(sfd, dfd, limit)
                    os.fchown(dfd, st.st_uid, st.st_gid)
                    os.fchmod(dfd, st.st_mode & 0o7777)
                    self._copy_xattrs(sfd, dfd, follow=True)
                    if self.copyup_fsync:
                        os.fsync(dfd)
                    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        elif kind == S_IFLNK:
            os.symlink(os.readlink(path, dir_fd=src_fd), tmp, dir_fd=top)
            os.chown(tmp, st.st_uid, st.st_gid, dir_fd=top, follow_symlinks=False)
            self._copy_xattrs(self._abs(node.branch, path), self._abs(0, tmp), follow=False)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=top, follow_symlinks=False)
        else:
            os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=top)
            os.chown(tmp, st.st_uid, st.st_gid, dir_fd=top, follow_symlinks=False)
            os.chmod(tmp, st.st_mode & 0o7777, dir_fd=top)
            self._copy_xattrs(self._abs(node.branch, path), self._abs(0, tmp), follow=False)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=top, follow_symlinks=False)
        return copied

    def _to_top(self, node: Node, size: int | None = None) -> None:
        self._writable()
        if node.kind == S_IFDIR:
            if node.branch != 0:
                self._ensure_top_dir(node.path)  # type: ignore[arg-type]
        else:
            self._copy_up(node, size)

    def _whiteout(self, parent_path: bytes, name: bytes) -> None:
        if len(name) > WH_NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        self._ensure_top_dir(parent_path)
        try:
            os.mknod(parent_path + b"/" + WH + name, S_IFREG | 0o444, dir_fd=self.bfd[0])
        except FileExistsError:
            return
        self.stats.whiteouts_created += 1

    def _prepare_create(self, parent: Node, name: bytes) -> bool:
        """Get ready to create ``name`` in the top branch; True if a whiteout was removed."""
        self._writable()
        _check_new_name(name)
        path = parent.path
        assert path is not None
        if parent.branch != 0:
            self._ensure_top_dir(path)
        if len(name) > WH_NAME_MAX:
            return False
        self.stats.other_probes += 1
        try:
            os.unlink(path + b"/" + WH + name, dir_fd=self.bfd[0])
        except FileNotFoundError:
            return False
        self.stats.whiteouts_removed += 1
        return True

    def _new_owner(self, parent: Node, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        # A setgid directory hands its group down (the backing fs already did so).
        self.stats.other_probes += 1
        pst = os.lstat(parent.path, dir_fd=self.bfd[0])  # type: ignore[arg-type]
        return ctx.uid, (-1 if pst.st_mode & stat.S_ISGID else ctx.gid)

    def _created(self, path: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        kind = st.st_mode & S_IFMT
        dirs = [0] if kind == S_IFDIR else None
        node = self._attach(path, st, 0, dirs)
        if dirs is not None:
            node.opq_done = True
        node.nlookup += 1
        return self._entry(node, st)

    def _drop_path(self, node: Node, path: bytes, nlink: int) -> None:
        """``path`` no longer names ``node``; ``nlink`` is its link count before."""
        if node.path == path:
            node.path = node.alt.pop() if node.alt else None
        elif node.alt and path in node.alt:
            node.alt.remove(path)
        if self.paths.get(path) is node:
            del self.paths[path]
        gone = node.kind == S_IFDIR or (node.branch == 0 and nlink <= 1)
        if gone and node.path is None and self.inos.get(node.key) == node.ino:
            # The backing inode may be reused for a new file: give that a new number.
            del self.inos[node.key]

    def _clear_whiteouts(self, path: bytes) -> None:
        """Remove the whiteouts of a top-branch directory the union shows as empty."""
        top = self.bfd[0]
        names = os.listdir(self.roots[0] + path[1:])
        for name in names:
            if not name.startswith(WH):
                raise FUSEError(errno.ENOTEMPTY)
        for name in names:
            os.unlink(path + b"/" + name, dir_fd=top)

    def _rename_tree(self, old: bytes, new: bytes) -> None:
        """Re-key every known path under a renamed directory."""
        prefix = old + b"/"
        n = len(old)
        for p in [p for p in self.paths if p.startswith(prefix)]:
            nd = self.paths.pop(p)
            np_ = new + p[n:]
            self.paths[np_] = nd
            if nd.path == p:
                nd.path = np_
            elif nd.alt and p in nd.alt:
                nd.alt[nd.alt.index(p)] = np_
            if nd.key == p:
                nd.key = np_
        for k in [k for k in self.inos if isinstance(k, bytes) and k.startswith(prefix)]:
            self.inos[new + k[n:]] = self.inos.pop(k)

    # --- FUSE operations: lookup and attributes --------------------------------------------

    @_op
    def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        s = self.stats
        s.lookups += 1
        parent = self.nodes[parent_inode]
        if name.startswith(WH) or parent.branches is None:
            s.lookups_negative += 1
            return self.negative
        path = parent.path + b"/" + name  # type: ignore[operator]
        res = self._resolve(parent, path, name)
        if res is None:
            s.lookups_negative += 1
            return self.negative
        node = self._attach(path, *res)
        node.nlookup += 1
        return self._entry(node, res[0])

    async def forget(self, inode_list: Any) -> None:
        nodes = self.nodes
        paths = self.paths
        for ino, n in inode_list:
            node = nodes.get(ino)
            if node is None:
                continue
            node.nlookup -= n
            if node.nlookup <= 0 and ino != pyfuse3.ROOT_INODE:
                del nodes[ino]
                for p in node.all_paths():
                    if paths.get(p) is node:
                        del paths[p]

    @_op
    def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.nodes[inode]
        return self._entry(node, self._stat(node))

    @_op
    def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.nodes[inode]
        self._to_top(node, attr.st_size if fields.update_size else None)
        top = self.bfd[0]
        path = node.path
        fd = fh if fh is not None else next(iter(node.fds), None)
        if path is None and fd is None:
            raise FUSEError(errno.ESTALE)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            elif path is not None:
                os.truncate(self._abs(0, path), attr.st_size)
            else:
                os.ftruncate(fd, attr.st_size)  # type: ignore[arg-type]
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if path is not None:
                os.chown(path, uid, gid, dir_fd=top, follow_symlinks=False)
            else:
                os.fchown(fd, uid, gid)  # type: ignore[arg-type]
        if fields.update_mode and node.kind != S_IFLNK:
            if path is not None:
                os.chmod(path, attr.st_mode & 0o7777, dir_fd=top)
            else:
                os.fchmod(fd, attr.st_mode & 0o7777)  # type: ignore[arg-type]
        if fields.update_atime or fields.update_mtime:
            if fields.update_atime and fields.update_mtime:
                times = (attr.st_atime_ns, attr.st_mtime_ns)
            else:
                cur = self._stat(node)
                times = (attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                         attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns)
            if path is not None:
                os.utime(path, ns=times, dir_fd=top, follow_symlinks=False)
            else:
                os.utime(fd, ns=times)  # type: ignore[arg-type]
        return self._entry(node, self._stat(node))

    @_op
    def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self.nodes[inode]
        if node.path is None:
            raise FUSEError(errno.ESTALE)
        return os.readlink(node.path, dir_fd=self.bfd[node.branch])

    @_op
    def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.bfd[0])
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, attr, getattr(sv, attr))
        return out

    # --- FUSE operations: namespace --------------------------------------------------------

    @_op
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.nodes[parent_inode]
        self._prepare_create(parent, name)
        path = parent.path + b"/" + name  # type: ignore[operator]
        top = self.bfd[0]
        uid, gid = self._new_owner(parent, ctx)
        os.mknod(path, mode, rdev, dir_fd=top)
        os.chown(path, uid, gid, dir_fd=top, follow_symlinks=False)
        if mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, mode & 0o7777, dir_fd=top)
        return self._created(path, os.lstat(path, dir_fd=top))

    @_op
    def mkdir(self, parent_inode: int, name: bytes, mode: int,
              ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.nodes[parent_inode]
        removed = self._prepare_create(parent, name)
        path = parent.path + b"/" + name  # type: ignore[operator]
        top = self.bfd[0]
        uid, gid = self._new_owner(parent, ctx)
        os.mkdir(path, mode & 0o7777, dir_fd=top)
        os.chown(path, uid, gid, dir_fd=top, follow_symlinks=False)
        if removed:
            # Recreated over a deleted lower directory: hide what the branches below hold.
            os.mknod(path + b"/" + OPAQUE, S_IFREG | 0o444, dir_fd=top)
        return self._created(path, os.lstat(path, dir_fd=top))

    @_op
    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                ctx: Any) -> pyfuse3.EntryAttributes:
        parent = self.nodes[parent_inode]
        self._prepare_create(parent, name)
        path = parent.path + b"/" + name  # type: ignore[operator]
        top = self.bfd[0]
        uid, gid = self._new_owner(parent, ctx)
        os.symlink(target, path, dir_fd=top)
        os.chown(path, uid, gid, dir_fd=top, follow_symlinks=False)
        return self._created(path, os.lstat(path, dir_fd=top))

    @_op
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.nodes[parent_inode]
        self._prepare_create(parent, name)
        path = parent.path + b"/" + name  # type: ignore[operator]
        uid, gid = self._new_owner(parent, ctx)
        fd = os.open(path, (flags & ~_OPEN_STRIP) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     mode & 0o7777, dir_fd=self.bfd[0])
        try:
            os.fchown(fd, uid, gid)
            if mode & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, mode & 0o7777)
            entry = self._created(path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        node = self.paths[path]
        node.fds.add(fd)
        self.files[fd] = node
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.keep_cache), entry

    @_op
    def link(self, inode: int, new_parent_inode: int, new_name: bytes,
             ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.nodes[inode]
        parent = self.nodes[new_parent_inode]
        if node.path is None:
            raise FUSEError(errno.ENOENT)
        self._copy_up(node)
        self._prepare_create(parent, new_name)
        path = parent.path + b"/" + new_name  # type: ignore[operator]
        top = self.bfd[0]
        os.link(node.path, path, src_dir_fd=top, dst_dir_fd=top, follow_symlinks=False)
        if node.alt is None:
            node.alt = []
        node.alt.append(path)
        self.paths[path] = node
        node.nlookup += 1
        return self._entry(node, os.lstat(path, dir_fd=top))

    @_op
    def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        parent = self.nodes[parent_inode]
        node = self._child(parent, name)
        if node.kind == S_IFDIR:
            raise FUSEError(errno.EISDIR)
        path = parent.path + b"/" + name  # type: ignore[operator]
        top = self.bfd[0]
        nlink = 0
        if node.branch == 0:
            need_wh = self._lower_has(parent, name)
            if need_wh and len(name) > WH_NAME_MAX:
                raise FUSEError(errno.ENAMETOOLONG)
            self.stats.other_probes += 1
            nlink = os.lstat(path, dir_fd=top).st_nlink
            os.unlink(path, dir_fd=top)
        else:
            need_wh = True
        if need_wh:
            self._whiteout(parent.path, name)  # type: ignore[arg-type]
        self._drop_path(node, path, nlink)

    @_op
    def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        parent = self.nodes[parent_inode]
        node = self._child(parent, name)
        if node.kind != S_IFDIR:
            raise FUSEError(errno.ENOTDIR)
        if self._merge(node):
            raise FUSEError(errno.ENOTEMPTY)
        path = parent.path + b"/" + name  # type: ignore[operator]
        branches = node.branches or []
        need_wh = any(b != 0 for b in branches) or self._lower_has(parent, name)
        if need_wh and len(name) > WH_NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if branches and branches[0] == 0:
            self._clear_whiteouts(path)
            os.rmdir(path, dir_fd=self.bfd[0])
        if need_wh:
            self._whiteout(parent.path, name)  # type: ignore[arg-type]
        self._drop_path(node, path, 0)

    @_op
    def rename(self, old_parent_inode: int, old_name: bytes, new_parent_inode: int,
               new_name: bytes, flags: int, ctx: Any) -> None:
        self._writable()
        if flags & _RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)  # as aufs
        _check_new_name(new_name)
        oparent = self.nodes[old_parent_inode]
        nparent = self.nodes[new_parent_inode]
        old = oparent.path + b"/" + old_name  # type: ignore[operator]
        new = nparent.path + b"/" + new_name  # type: ignore[operator]
        src = self._child(oparent, old_name)
        dst = self.paths.get(new)
        if dst is src:
            return
        isdir = src.kind == S_IFDIR
        if dst is not None:
            if flags & _RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            if isdir:
                if dst.kind != S_IFDIR:
                    raise FUSEError(errno.ENOTDIR)
                if self._merge(dst):
                    raise FUSEError(errno.ENOTEMPTY)
            elif dst.kind == S_IFDIR:
                raise FUSEError(errno.EISDIR)
        if isdir and self._dir_branches(src) != [0]:
            raise FUSEError(errno.EXDEV)  # lower contents: see the module docstring
        need_wh = src.branch != 0 or self._lower_has(oparent, old_name)
        if need_wh and len(old_name) > WH_NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        top = self.bfd[0]
        if not isdir:
            self._copy_up(src)
        self._ensure_top_dir(nparent.path)  # type: ignore[arg-type]
        below = self._lower_has(nparent, new_name)
        removed = self._prepare_create(nparent, new_name)
        dst_nlink = 0
        if dst is not None and dst.branch == 0:
            if dst.kind == S_IFDIR:
                self._clear_whiteouts(new)
            else:
                self.stats.other_probes += 1
                dst_nlink = os.lstat(new, dir_fd=top).st_nlink
        if isdir and (below or removed):
            with contextlib.suppress(FileExistsError):
                os.mknod(old + b"/" + OPAQUE, S_IFREG | 0o444, dir_fd=top)
        os.rename(old, new, src_dir_fd=top, dst_dir_fd=top)
        if need_wh:
            self._whiteout(oparent.path, old_name)  # type: ignore[arg-type]
        if dst is not None:
            self._drop_path(dst, new, dst_nlink)
        # Move the source's bookkeeping to the new name.
        if self.paths.get(old) is src:
            del self.paths[old]
        self.paths[new] = src
        if src.path == old:
            src.path = new
        elif src.alt and old in src.alt:
            src.alt[src.alt.index(old)] = new
        if isdir:
            if self.inos.get(old) == src.ino:
                del self.inos[old]
            self.inos[new] = src.ino
            src.key = new
            src.branches = src.raw = [0]
            src.branch = 0
            src.opq_done = True
            self._rename_tree(old, new)

    # --- FUSE operations: files ------------------------------------------------------------

    @_op
    def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.nodes[inode]
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._copy_up(node, 0 if flags & os.O_TRUNC else None)
        flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC
        if node.path is not None:
            fd = os.open(node.path, flags | os.O_NOFOLLOW, dir_fd=self.bfd[node.branch])
        elif node.fds:
            # Reopened through /proc/PID/fd after the last name was removed.
            fd = os.open(f"/proc/self/fd/{next(iter(node.fds))}", flags)
        else:
            raise FUSEError(errno.ESTALE)
        node.fds.add(fd)
        self.files[fd] = node
        return pyfuse3.FileInfo(fh=fd, keep_cache=self.keep_cache)

    @_op
    def read(self, fh: int, off: int, size: int) -> bytes:
        # One buffer for every read: requests are answered one at a time, and
        # a fresh bytes object per request (256 KiB and more) would be mmap'd,
        # faulted in and unmapped each time.
        view = self.rview
        if size > len(view):
            self.rbuf = bytearray(size)
            view = self.rview = memoryview(self.rbuf)
        chunk = view[:size]
        return chunk[:os.preadv(fh, [chunk], off)]  # type: ignore[return-value]  # pyfuse3 takes any buffer

    @_op
    def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        # Nothing to do on close(2); ENOSYS makes the kernel stop sending FLUSH
        # (one round trip less per close).
        raise FUSEError(errno.ENOSYS)

    @_op
    def release(self, fh: int) -> None:
        node = self.files.pop(fh, None)
        if node is not None:
            node.fds.discard(fh)
        os.close(fh)

    @_op
    def fsync(self, fh: int, datasync: bool) -> None:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    # --- FUSE operations: directories ------------------------------------------------------

    @_op
    def opendir(self, inode: int, ctx: Any) -> int:
        node = self.nodes[inode]
        if node.kind != S_IFDIR:
            raise FUSEError(errno.ENOTDIR)
        dh = self.next_dh
        self.next_dh += 1
        self.dirs[dh] = [node, None]
        return dh

    @_op
    def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self.dirs[fh]
        node = handle[0]
        if handle[1] is None or start_id == 0:
            handle[1] = self._merge(node) if node.path is not None else []
        entries = handle[1]
        s = self.stats
        bfd = self.bfd
        base = node.path + b"/"
        # "." and "..": the kernel takes no reference on them and ignores their
        # attributes, so only the inode number and type are filled in.
        for i in range(start_id, 2):
            dot = pyfuse3.EntryAttributes()
            dot.st_mode = S_IFDIR
            if i == 0:
                dot.st_ino = node.ino
            else:
                up = (node if node.path is None or node.path == b"."
                      else self.paths.get(_parent_of(node.path)))
                dot.st_ino = up.ino if up is not None else node.ino
            if not pyfuse3.readdir_reply(token, b"." * (i + 1), dot, i + 1):
                return
        for i in range(max(start_id, 2), len(entries) + 2):
            name, b, dirs = entries[i - 2]
            path = base + name
            s.readdir_stats += 1
            try:
                st = os.lstat(path, dir_fd=bfd[b])
            except FileNotFoundError:
                continue
            child = self._attach(path, st, b, list(dirs) if dirs is not None else None)
            if not pyfuse3.readdir_reply(token, name, self._entry(child, st), i + 1):
                if child.nlookup == 0 and child.ino != pyfuse3.ROOT_INODE:
                    self.nodes.pop(child.ino, None)
                    for p in child.all_paths():
                        if self.paths.get(p) is child:
                            del self.paths[p]
                return
            child.nlookup += 1

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @_op
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        node = self.dirs[fh][0]
        if node.branch != 0 or node.path is None:
            return
        fd = os.open(node.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.bfd[0])
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- FUSE operations: xattrs -----------------------------------------------------------

    def _xattr_target(self, node: Node) -> bytes | int:
        if node.path is not None:
            return self._abs(node.branch, node.path)
        for fd in node.fds:
            return fd
        raise FUSEError(errno.ESTALE)

    @_op
    def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name.startswith(STATS_XATTR):
            if name == STATS_XATTR:
                return self.stats_json().encode()
            raise FUSEError(pyfuse3.ENOATTR)
        node = self.nodes[inode]
        try:
            return os.getxattr(self._xattr_target(node), name, follow_symlinks=False)
        except OSError as err:
            if err.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_op
    def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        node = self.nodes[inode]
        names = os.listxattr(self._xattr_target(node), follow_symlinks=False)
        return [os.fsencode(n) for n in names]

    @_op
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        if inode == pyfuse3.ROOT_INODE and name.startswith(STATS_XATTR):
            if name == RESET_XATTR:
                self.stats.reset()
                return
            raise FUSEError(errno.EPERM)
        node = self.nodes[inode]
        self._to_top(node)
        os.setxattr(self._xattr_target(node), name, value, follow_symlinks=False)

    @_op
    def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        node = self.nodes[inode]
        self._to_top(node)
        try:
            os.removexattr(self._xattr_target(node), name, follow_symlinks=False)
        except OSError as err:
            if err.errno == errno.ENODATA:
                raise FUSEError(pyfuse3.ENOATTR) from None
            raise

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True  # default_permissions: the kernel checks

    # --- counters ----------------------------------------------------------------------------

    def stats_json(self) -> str:
        d: dict[str, Any] = self.stats.as_dict()
        d["branches"] = len(self.roots)
        d["inodes_live"] = len(self.nodes)
        d["inode_numbers"] = len(self.inos)
        d["open_files"] = len(self.files)
        return json.dumps(d, sort_keys=True)


# --- the mount helper ------------------------------------------------------------------------

def parse_branches(specs: list[str]) -> tuple[list[str], bool]:
    """``DIR:rw DIR:ro ...`` -> (dirs top-down, top writable)."""
    dirs: list[str] = []
    writable = True
    for i, spec in enumerate(specs):
        path, sep, mode = spec.rpartition(":")
        if not sep or mode not in ("rw", "ro"):
            path, mode = spec, ("rw" if i == 0 else "ro")
        if mode == "rw" and i > 0:
            raise ValueError(f"{spec}: only the first (top) branch can be rw")
        if i == 0:
            writable = mode == "rw"
        if not os.path.isdir(path):
            raise ValueError(f"{path}: branch is not a directory")
        dirs.append(path)
    if not dirs:
        raise ValueError("no branches given")
    return dirs, writable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m layerfs_drivers.aufs.unionfs",
        description="Mount a union of branches with AUFS semantics (FUSE).")
    p.add_argument("--foreground", action="store_true", help="serve in this process")
    p.add_argument("--entry-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="kernel cache time for names, found or not (default %(default)s)")
    p.add_argument("--attr-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="kernel cache time for attributes (default %(default)s)")
    p.add_argument("--keep-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep file pages cached across opens (default on)")
    p.add_argument("--copyup-fsync", action="store_true",
                   help="fsync each copied-up file before it replaces the lower one")
    p.add_argument("--readahead-kb", type=int, default=1024, metavar="KB",
                   help="readahead of the mount (default %(default)s; 0 keeps the kernel's)")
    p.add_argument("--stats-file", metavar="PATH",
                   help="write the counters as JSON here on exit and on SIGUSR1")
    p.add_argument("--log", metavar="PATH", help="log errors here (default: discarded)")
    p.add_argument("branches", nargs="+", metavar="BRANCH:rw|ro")
    p.add_argument("mountpoint")
    return p


def _mount_options(writable: bool) -> set[str]:
    opts = {f"fsname={FSTYPE}", f"subtype={FSTYPE}", "allow_other", "default_permissions",
            "suid", "dev"}
    opts.add("rw" if writable else "ro")
    return opts


def _write_stats(fs: UnionFS, path: str | None) -> None:
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(fs.stats_json() + "\n")
    os.replace(tmp, path)


class _NoLock:
    """Stands in for the trio.Lock pyfuse3 makes to take turns reading requests."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Server:
    """Runs pyfuse3's loop with a cheaper wait for requests.

    pyfuse3 (3.5) waits for each request with ``trio.lowlevel.wait_readable``
    under a ``trio.Lock``, which costs an epoll_ctl, two epoll_waits and two
    passes through trio's scheduler per request. Our handlers never await and
    we run a single reader task, so nothing else needs the event loop: the wait
    for the /dev/fuse fd becomes a plain poll(2) and the lock a no-op. That
    cut the server's CPU time per request by half (bench/layerfs_bench/aufs_fuse.py, lookups
    with timeouts 0). Both are looked up by name when pyfuse3 needs them; if a
    later pyfuse3 stops doing so, its own (slower) path simply runs. Signals
    set a flag, checked at least every ``TICK`` seconds, instead of going
    through trio; SIGUSR1 writes the stats file.
    """

    TICK = 0.25

    def __init__(self, fs: UnionFS, stats_file: str | None) -> None:
        self.fs = fs
        self.stats_file = stats_file
        self.stopping = False
        self.fuse_fd: int | None = None
        self.poller = select.poll()
        self.trio_wait = trio.lowlevel.wait_readable
        self.after_init: Callable[[], None] | None = None  # runs once INIT is answered
        self.waits = 0

    def _signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1:
            _write_stats(self.fs, self.stats_file)
        else:
            self.stopping = True

    async def wait_readable(self, fd: Any) -> None:
        if fd != self.fuse_fd:
            if (self.fuse_fd is not None or not isinstance(fd, int)
                    or os.readlink(f"/proc/self/fd/{fd}") != "/dev/fuse"):
                await self.trio_wait(fd)
                return
            self.fuse_fd = fd
            self.poller.register(fd, select.POLLIN)
        if self.after_init is not None:
            # The first request is always FUSE_INIT; it has been answered by
            # the time we wait for the second.
            self.waits += 1
            if self.waits == 2:
                self.after_init()
                self.after_init = None
        timeout = int(self.TICK * 1000)
        while not self.stopping:
            if self.poller.poll(timeout):
                return
        pyfuse3.terminate()
        raise trio.ClosedResourceError("unionfs: stopping on a signal")

    def run(self) -> bool:
        """Serve until unmounted (False) or stopped by a signal (True)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._signal)
        trio.lowlevel.wait_readable = self.wait_readable
        trio_lock = trio.Lock
        trio.Lock = _NoLock  # type: ignore[misc,assignment]
        try:
            trio.run(pyfuse3.main, 1, 1)
        finally:
            trio.lowlevel.wait_readable = self.trio_wait
            trio.Lock = trio_lock  # type: ignore[misc]
        return self.stopping


def _run(args: argparse.Namespace, dirs: list[str], writable: bool,
         ready: Callable[[], None]) -> int:
    if args.log:  # here: the daemon has closed every fd it inherited
        logging.basicConfig(filename=args.log, level=logging.INFO,
                            format="%(asctime)s %(process)d %(levelname)s %(message)s")
    fs = UnionFS(dirs, writable=writable, entry_timeout=args.entry_timeout,
                 attr_timeout=args.attr_timeout, keep_cache=args.keep_cache,
                 copyup_fsync=args.copyup_fsync)
    os.umask(0)  # modes come from the kernel with the caller's umask applied
    # One backing fd per open file in the union: allow as many as we may.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    real_mountpoint = os.path.realpath(args.mountpoint)
    pyfuse3.init(fs, args.mountpoint, _mount_options(writable))
    server = _Server(fs, args.stats_file)
    if args.readahead_kb > 0:
        # The kernel resets the readahead when it gets our FUSE_INIT reply.
        server.after_init = lambda: _set_readahead(real_mountpoint, args.readahead_kb)
    ready()
    stopped = True
    try:
        stopped = server.run()
    finally:
        pyfuse3.close(unmount=stopped)
        _write_stats(fs, args.stats_file)
        fs.close()
    return 0


def _set_readahead(real_mountpoint: str, kb: int) -> None:
    """Raise the readahead of this mount's bdi (the kernel's default is 128 KiB).

    FUSE reads are answered one request at a time, so a sequential reader is
    bound by round trips: 1 MiB of readahead keeps requests queued and read a
    200 MB file about 1.5x faster here (bench/layerfs_bench/aufs_fuse.py seq_read). Needs
    root; without it the default stays.
    """
    # Never touch the mount point here (not even realpath(), which lstat()s
    # it): the request would wait for this very process, which is not serving
    # yet. ``real_mountpoint`` was resolved before mounting; mountinfo has the
    # device.
    real = real_mountpoint
    dev = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                target = (fields[4].replace("\\040", " ").replace("\\011", "\t")
                          .replace("\\012", "\n").replace("\\134", "\\"))
                if target == real:
                    dev = fields[2]  # the last mount on the path wins
        if dev is None:
            return
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(kb))
    except OSError as err:
        log.info("cannot set the readahead of %s: %s", real_mountpoint, err)


def _close_inherited(keep: int) -> None:
    max_fd = os.sysconf("SC_OPEN_MAX")
    os.closerange(3, keep)
    os.closerange(keep + 1, max_fd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        dirs, writable = parse_branches(args.branches)
        dirs = [os.path.abspath(d) for d in dirs]
        args.mountpoint = os.path.abspath(args.mountpoint)
        if not os.path.isdir(args.mountpoint):
            raise ValueError(f"{args.mountpoint}: mount point is not a directory")
        real_mnt = os.path.realpath(args.mountpoint)
        for d in dirs:
            real = os.path.realpath(d)
            if real_mnt == real or real_mnt.startswith(real.rstrip("/") + "/"):
                # Serving a lookup would then wait for this very server.
                raise ValueError(f"{args.mountpoint}: mount point is inside branch {d}")
    except ValueError as err:
        print(f"unionfs: {err}", file=sys.stderr)
        return 2
    if args.foreground:
        try:
            return _run(args, dirs, writable, lambda: None)
        except (OSError, RuntimeError) as err:
            print(f"unionfs: mount {args.mountpoint}: {err}", file=sys.stderr)
            return 1

    # Daemon: the child mounts and serves; the parent waits until the mount is
    # live (or failed) so it behaves like a mount.fuse helper.
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(wfd)
        chunks = []
        while chunk := os.read(rfd, 4096):
            chunks.append(chunk)
        os.close(rfd)
        msg = b"".join(chunks)
        if msg[:1] == b"R":
            return 0
        text = msg[1:].decode(errors="replace") or "the server exited before mounting"
        print(f"unionfs: mount {args.mountpoint}: {text}", file=sys.stderr)
        return 1

    code = 1
    try:
        os.close(rfd)
        os.setsid()
        os.chdir("/")
        _close_inherited(wfd)
        null = os.open(os.devnull, os.O_RDWR)
        # stderr stays the caller's until the mount is live, so libfuse's own
        # message about a failed mount reaches it; then nothing of the
        # caller's stays open (it may be waiting for EOF on its pipes).
        os.dup2(null, 0)
        os.dup2(null, 1)

        def ready() -> None:
            os.dup2(null, 2)
            os.write(wfd, b"R")
            os.close(wfd)

        code = _run(args, dirs, writable, ready)
    except BaseException as err:  # report to the waiting parent, never return to its caller
        with contextlib.suppress(OSError):
            os.write(wfd, b"E" + str(err).encode(errors="replace"))
        if args.log:
            log.exception("unionfs server failed")
    finally:
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
