"""The FUSE union filesystem's class, :class:`UnionFS` (the design is in :mod:`.unionfs`).

It stacks the layers that resolve names (:mod:`.union_lookup`), change the
top branch (:mod:`.union_copyup`) and rename (:mod:`.union_rename`), sets
the state they share, and adds the remaining operations of
:class:`fuseproto.Operations`: attributes, creating and removing names, open
files (FUSE passthrough or served here), xattrs (with the virtual counters
xattr) and the counters as JSON.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import stat
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import fuseproto as fp
from .backing import (
    Branches,
    Layer,
    XTarget,
    fallocate,
    join,
    xattr_get,
    xattr_list,
    xattr_remove,
    xattr_set,
)
from .union_rename import UnionRename
from .union_state import (
    CAPS_XATTR,
    DEFAULT_TIMEOUT,
    RESET_XATTR,
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    STATS_XATTR,
    WH_NAME_MAX,
    Node,
    Stats,
    log,
    os_error,
)

_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | getattr(os, "O_DIRECT", 0)


class UnionFS(UnionRename):
    """The FUSE operations of one union mount (see :class:`fuseproto.Operations`)."""

    def __init__(self, branches: Iterable[str | os.PathLike[str]], *, writable: bool = True,
                 entry_timeout: float = DEFAULT_TIMEOUT, attr_timeout: float = DEFAULT_TIMEOUT,
                 keep_cache: bool = True, copyup_fsync: bool = False, dirren: bool = False,
                 passthrough: bool = True) -> None:
        self.roots = [os.fsencode(os.path.abspath(b)) for b in branches]
        if not self.roots:
            raise ValueError("a union needs at least one branch")
        self.br = Branches(self.roots)
        self.nbranches = len(self.roots)
        self.writable = writable
        self.times = fp.Timeouts(entry_timeout, attr_timeout)
        self.keep_cache = keep_cache
        self.copyup_fsync = copyup_fsync
        self.dirren = dirren
        self.passthrough = passthrough
        self.session: fp.Session | None = None
        self.reflink = True
        self.preallocate = True
        self.stats = Stats()
        self.nodes: dict[int, Node] = {}
        self.inos: dict[Any, int] = {}
        self.paths: dict[bytes, Node] = {}
        self.files: dict[int, tuple[Node, str]] = {}  # fh -> (node, "p"assthrough|"c"ached)
        self.dirs: dict[int, list[Any]] = {}
        self.lower_cache: dict[tuple[int, bytes], list[Layer]] = {}
        self.next_ino = fp.ROOT_ID + 1
        self.next_dh = 1
        self.tmp_serial = 0
        self.dirren_noted = False
        self.rview = memoryview(b"")  # the read buffer, made at the first read served here
        self.on_first_cached_open: Callable[[], None] | None = None
        self.work_fd = -1
        root = Node(fp.ROOT_ID, b"", S_IFDIR, 0, b"",
                    [(b, b"") for b in range(self.nbranches)], b"")
        root.nlookup = 1
        self.nodes[root.ino] = root
        self.paths[b""] = root
        self.inos[b""] = root.ino
        self._layers(root)
        if writable:
            self._init_workdir()
        self.stats.reset()

    def close(self) -> None:
        for fd in list(self.files):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.files.clear()
        if self.work_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.work_fd)
            self.work_fd = -1
        self.br.close()

    def between_requests(self) -> None:
        self.br.trim()

    # --- FUSE operations: attributes ---------------------------------------------------------

    def getattr(self, ino: int, fh: int | None) -> bytes:
        node = self.nodes[ino]
        if node.path is None and fh is not None and fh in self.files:
            return self._attr(node, os.fstat(fh))
        return self._attr(node, self._stat(node))

    def setattr(self, ino: int, valid: int, fh: int | None, size: int, atime_ns: int,
                mtime_ns: int, mode: int, uid: int, gid: int) -> bytes:
        node = self.nodes[ino]
        update_size = bool(valid & fp.FATTR_SIZE)
        stale = update_size and self._stale_backing(node)
        self._to_top(node, size if update_size else None)
        if stale:
            self._split(node)
            raise os_error(errno.ESTALE)
        if fh is not None and fh not in self.files:
            fh = None
        fd = fh if fh is not None else next(iter(node.fds), None)
        path = node.path
        if path is None and fd is None:
            raise os_error(errno.ESTALE)
        dfd, name = self.br.at(0, path) if path is not None else (-1, b"")
        if update_size:
            if fh is not None:
                os.ftruncate(fh, size)
            elif path is not None:
                tfd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                              dir_fd=dfd)
                try:
                    os.ftruncate(tfd, size)
                finally:
                    os.close(tfd)
            else:
                assert fd is not None
                os.ftruncate(fd, size)
        if valid & (fp.FATTR_UID | fp.FATTR_GID):
            new_uid = uid if valid & fp.FATTR_UID else -1
            new_gid = gid if valid & fp.FATTR_GID else -1
            if path is not None:
                os.chown(name, new_uid, new_gid, dir_fd=dfd, follow_symlinks=False)
            else:
                assert fd is not None
                os.fchown(fd, new_uid, new_gid)
        if valid & fp.FATTR_MODE and node.kind != S_IFLNK:
            if path is not None:
                os.chmod(name, mode & 0o7777, dir_fd=dfd)
            else:
                assert fd is not None
                os.fchmod(fd, mode & 0o7777)
        if valid & (fp.FATTR_ATIME | fp.FATTR_MTIME):
            now = time.time_ns()
            if valid & fp.FATTR_ATIME_NOW:
                atime_ns = now
            if valid & fp.FATTR_MTIME_NOW:
                mtime_ns = now
            if not (valid & fp.FATTR_ATIME and valid & fp.FATTR_MTIME):
                cur = self._stat(node)
                atime_ns = atime_ns if valid & fp.FATTR_ATIME else cur.st_atime_ns
                mtime_ns = mtime_ns if valid & fp.FATTR_MTIME else cur.st_mtime_ns
            if path is not None:
                os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)
            else:
                assert fd is not None
                os.utime(fd, ns=(atime_ns, mtime_ns))
        return self._attr(node, self._stat(node))

    def readlink(self, ino: int) -> bytes:
        node = self.nodes[ino]
        if node.path is None:
            raise os_error(errno.ESTALE)
        fd, name = self._loc(node)
        return os.readlink(name, dir_fd=fd)

    def statfs(self) -> bytes:
        return fp.pack_statfs(os.statvfs(self.br.root_fds[0]))

    # --- FUSE operations: namespace --------------------------------------------------------

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, ctx: fp.Context) -> bytes:
        parent = self.nodes[parent_ino]
        self._prepare_create(parent, name)
        assert parent.path is not None
        path = join(parent.path, name)
        fd = self.br.dirfd(0, parent.path)
        uid, gid = self._new_owner(parent, ctx)
        os.mknod(name, mode, rdev, dir_fd=fd)
        os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        if mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(name, mode & 0o7777, dir_fd=fd)
        return self._created(path, os.lstat(name, dir_fd=fd))[1]

    def mkdir(self, parent_ino: int, name: bytes, mode: int, ctx: fp.Context) -> bytes:
        parent = self.nodes[parent_ino]
        removed = self._prepare_create(parent, name)
        assert parent.path is not None
        path = join(parent.path, name)
        fd = self.br.dirfd(0, parent.path)
        uid, gid = self._new_owner(parent, ctx)
        os.mkdir(name, mode & 0o7777, dir_fd=fd)
        os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        if removed:
            # Recreated over a deleted lower directory: hide what the branches below hold.
            self._mark_opaque(path)
        return self._created(path, os.lstat(name, dir_fd=fd))[1]

    def symlink(self, parent_ino: int, name: bytes, target: bytes, ctx: fp.Context) -> bytes:
        parent = self.nodes[parent_ino]
        self._prepare_create(parent, name)
        assert parent.path is not None
        path = join(parent.path, name)
        fd = self.br.dirfd(0, parent.path)
        uid, gid = self._new_owner(parent, ctx)
        os.symlink(target, name, dir_fd=fd)
        os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        return self._created(path, os.lstat(name, dir_fd=fd))[1]

    def create(self, parent_ino: int, name: bytes, mode: int, flags: int,
               ctx: fp.Context) -> bytes:
        parent = self.nodes[parent_ino]
        self._prepare_create(parent, name)
        assert parent.path is not None
        path = join(parent.path, name)
        uid, gid = self._new_owner(parent, ctx)
        fd = os.open(name, (flags & ~_OPEN_STRIP) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     mode & 0o7777, dir_fd=self.br.dirfd(0, parent.path))
        try:
            os.fchown(fd, uid, gid)
            if mode & (stat.S_ISUID | stat.S_ISGID):
                os.fchmod(fd, mode & 0o7777)
            node, entry = self._created(path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return entry + self._opened(node, fd)

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> bytes:
        node = self.nodes[ino]
        parent = self.nodes[new_parent_ino]
        if node.path is None:
            raise os_error(errno.ENOENT)
        self._copy_up(node)
        self._prepare_create(parent, new_name)
        assert parent.path is not None
        path = join(parent.path, new_name)
        sfd, sname = self.br.at(0, node.path)
        dfd = self.br.dirfd(0, parent.path)
        os.link(sname, new_name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        if node.alt is None:
            node.alt = []
        node.alt.append(path)
        self.paths[path] = node
        node.nlookup += 1
        return self._entry(node, os.lstat(new_name, dir_fd=dfd))

    def unlink(self, parent_ino: int, name: bytes) -> None:
        self._writable()
        parent = self.nodes[parent_ino]
        node = self._child(parent, name)
        if node.kind == S_IFDIR:
            raise os_error(errno.EISDIR)
        assert parent.path is not None
        path = join(parent.path, name)
        nlink = 0
        if node.branch == 0:
            need_wh = self._lower_has(parent, name)
            if need_wh and len(name) > WH_NAME_MAX:
                raise os_error(errno.ENAMETOOLONG)
            fd = self.br.dirfd(0, parent.path)
            self.stats.other_probes += 1
            nlink = os.lstat(name, dir_fd=fd).st_nlink
            os.unlink(name, dir_fd=fd)
        else:
            need_wh = True
        if need_wh:
            self._whiteout(parent.path, name)
        self._drop_path(node, path, nlink)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        self._writable()
        parent = self.nodes[parent_ino]
        node = self._child(parent, name)
        if node.kind != S_IFDIR:
            raise os_error(errno.ENOTDIR)
        if self._merge(node):
            raise os_error(errno.ENOTEMPTY)
        assert parent.path is not None
        path = join(parent.path, name)
        layers = self._layers(node)
        need_wh = any(b != 0 for b, _ in layers) or self._lower_has(parent, name)
        if need_wh and len(name) > WH_NAME_MAX:
            raise os_error(errno.ENAMETOOLONG)
        if layers and layers[0][0] == 0:
            self._clear_whiteouts(path)
            os.rmdir(name, dir_fd=self.br.dirfd(0, parent.path))
            self.br.forget_top(path)
        if need_wh:
            self._whiteout(parent.path, name)
        self._drop_path(node, path, 0)

    # --- FUSE operations: files ------------------------------------------------------------

    def _opened(self, node: Node, fd: int) -> bytes:
        """Register an open backing fd; the open reply, with its I/O mode: passthrough to
        the backing file when the kernel offers it, else served here."""
        sess = self.session
        s = self.stats
        passthrough = False
        if self.passthrough and sess is not None and sess.passthrough and node.kind == S_IFREG:
            if node.pt_count:
                # Every open of an inode must use the backing file the kernel already holds
                # for it. If that is the lower file of a node copied up since (by a chmod,
                # say), it still has the same data: writes split the node (_split).
                node.pt_count += 1
                passthrough = True
            elif not node.cached_count:
                try:
                    node.pt_id = sess.backing_open(fd)
                except OSError as err:
                    log.info("no passthrough for %r: %s", node.path, err)
                else:
                    node.pt_key = node.key
                    node.pt_count = 1
                    passthrough = True
        node.fds.add(fd)
        if passthrough:
            s.passthrough_opens += 1
            self.files[fd] = (node, "p")
            return fp.pack_open(fd, fp.FOPEN_PASSTHROUGH, node.pt_id)
        node.cached_count += 1
        s.cached_opens += 1
        self.files[fd] = (node, "c")
        if self.on_first_cached_open is not None:
            hook, self.on_first_cached_open = self.on_first_cached_open, None
            hook()
        return fp.pack_open(fd, fp.FOPEN_KEEP_CACHE if self.keep_cache else 0)

    def _stale_backing(self, node: Node) -> bool:
        """Whether the kernel holds, for this inode, a backing file the node's data is no
        longer (or, once copied up, will no longer be) in."""
        return node.pt_count > 0 and (node.branch != 0 or node.pt_key != node.key)

    def _split(self, node: Node) -> None:
        """Give the (copied-up) file a new node and inode number, and leave the old one to the
        kernel's open passthrough handles, which go on reading the lower file.

        The caller then fails the request with ESTALE: the kernel retries open(2),
        truncate(2), ... once with LOOKUP_REVAL, finds the new inode by name and works
        on it. Only passthrough needs this: the kernel allows one backing file per inode.
        """
        new = Node(self.next_ino, node.path, node.kind, node.branch, node.bpath, None, node.key)
        self.next_ino += 1
        new.alt = node.alt
        self.nodes[new.ino] = new
        self.inos[node.key] = new.ino
        for p in node.all_paths():
            self.paths[p] = new
        node.path = None
        node.alt = None
        node.key = ("split", node.ino)

    def open(self, ino: int, flags: int) -> bytes:
        node = self.nodes[ino]
        if node.key == ("split", node.ino):
            # Reached through another cached name (a hard link) of a split file: ESTALE makes
            # the kernel look the name up again and find the file's new inode.
            raise os_error(errno.ESTALE)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            stale = self._stale_backing(node)
            self._copy_up(node, 0 if flags & os.O_TRUNC else None)
            if stale:
                self._split(node)
                raise os_error(errno.ESTALE)
        flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC
        if node.path is not None:
            dfd, name = self._loc(node)
            fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=dfd)
        elif node.fds:
            # Reopened through /proc/PID/fd after the last name was removed.
            fd = os.open(f"/proc/self/fd/{next(iter(node.fds))}", flags)
        else:
            raise os_error(errno.ESTALE)
        try:
            return self._opened(node, fd)
        except BaseException:
            os.close(fd)
            raise

    def read(self, fh: int, offset: int, size: int) -> memoryview:
        # One buffer for every read: requests are answered one at a time.
        self.stats.reads_served += 1
        view = self.rview
        if size > len(view):
            view = self.rview = memoryview(mmap.mmap(-1, max(size, fp.MAX_WRITE)))
        chunk = view[:size]
        return chunk[:os.preadv(fh, [chunk], offset)]

    def write(self, fh: int, offset: int, data: memoryview) -> int:
        self.stats.writes_served += 1
        return os.pwrite(fh, data, offset)

    def release(self, fh: int) -> None:
        entry = self.files.pop(fh, None)
        if entry is not None:
            node, mode = entry
            node.fds.discard(fh)
            if mode == "p":
                node.pt_count -= 1
                if node.pt_count == 0 and self.session is not None:
                    # The kernel dropped its reference when it closed the last such file.
                    with contextlib.suppress(OSError):
                        self.session.backing_close(node.pt_id)
                    node.pt_id = 0
                    node.pt_key = None
            elif mode == "c":
                node.cached_count -= 1
        os.close(fh)

    def fsync(self, fh: int, datasync: bool) -> None:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        self.stats.fallocates += 1
        entry = self.files.get(fh)
        if entry is not None and entry[0].branch != 0:
            self._copy_up(entry[0])  # never for a writable handle: opening copied it up
        fallocate(fh, mode, offset, length)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        return os.lseek(fh, offset, whence)

    def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        return os.copy_file_range(fh_in, fh_out, length, off_in, off_out)

    # --- FUSE operations: xattrs -----------------------------------------------------------

    def _xattr_target(self, node: Node) -> XTarget:
        if node.path is not None:
            return self._loc(node)
        for fd in node.fds:
            return fd
        raise os_error(errno.ESTALE)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == fp.ROOT_ID and name.startswith(STATS_XATTR):
            if name == STATS_XATTR:
                return self.stats_json().encode()
            raise os_error(errno.ENODATA)
        node = self.nodes[ino]
        if name == CAPS_XATTR:
            # Asked before every write (the kernel checks whether it must drop file
            # capabilities): remembered per inode, since every change goes through here.
            if node.caps is None:
                try:
                    node.caps = xattr_get(self._xattr_target(node), name)
                except OSError as err:
                    if err.errno != errno.ENODATA:
                        raise
                    node.caps = b""
            if not node.caps:
                raise os_error(errno.ENODATA)
            return node.caps
        return xattr_get(self._xattr_target(node), name)

    def listxattr(self, ino: int) -> bytes:
        return b"".join(n + b"\0" for n in xattr_list(self._xattr_target(self.nodes[ino])))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        if ino == fp.ROOT_ID and name.startswith(STATS_XATTR):
            if name == RESET_XATTR:
                self.stats.reset()
                return
            raise os_error(errno.EPERM)
        node = self.nodes[ino]
        self._to_top(node)
        node.caps = None
        xattr_set(self._xattr_target(node), name, value, flags)

    def removexattr(self, ino: int, name: bytes) -> None:
        node = self.nodes[ino]
        self._to_top(node)
        node.caps = None
        xattr_remove(self._xattr_target(node), name)

    # --- counters ----------------------------------------------------------------------------

    def stats_json(self) -> str:
        d: dict[str, Any] = self.stats.as_dict()
        d["branches"] = self.nbranches
        d["inodes_live"] = len(self.nodes)
        d["inode_numbers"] = len(self.inos)
        d["open_files"] = len(self.files)
        d["passthrough"] = int(self.session is not None and self.session.passthrough
                               and self.passthrough)
        return json.dumps(d, sort_keys=True)

