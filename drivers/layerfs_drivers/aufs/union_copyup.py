"""Changing the top branch of the FUSE union (see *Copy-up* and *Deleting* in
:mod:`.unionfs`).

:class:`UnionCopyUp`, the second layer of :class:`~.union_ops.UnionFS`:
copying a file (data, owner, mode, xattrs, times) and missing parent
directories up to the top branch through the work dir ``.wh..wh.orph``,
whiteouts and opaque markers, and the bookkeeping when a name is created or
dropped. Every write to a branch that the FUSE operations make starts here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from . import fuseproto as fp
from .backing import (
    DIR_OPEN,
    LIST_OPEN,
    Layer,
    XTarget,
    fallocate,
    parent_of,
    xattr_get,
    xattr_list,
    xattr_set,
)
from .union_lookup import UnionLookup
from .union_state import (
    OPAQUE,
    S_IFDIR,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    WH,
    WH_NAME_MAX,
    WORKDIR,
    Node,
    check_new_name,
    os_error,
)

FICLONE = 0x40049409


class UnionCopyUp(UnionLookup):
    """Copy-up, whiteouts and the work dir: the top branch made ready for a change."""

    writable: bool
    copyup_fsync: bool
    reflink: bool
    preallocate: bool
    tmp_serial: int
    work_fd: int

    # --- changing the top branch -----------------------------------------------------------

    def _writable(self) -> None:
        if not self.writable:
            raise os_error(errno.EROFS)

    def _ensure_top_dir(self, path: bytes) -> tuple[int, int]:
        """Make directory ``path`` exist in the top branch; returns its (atime, mtime).

        Missing directories are created with the attributes of their topmost
        lower part; each parent's times are put back after a child is made,
        since that changes nothing the union shows.
        """
        missing: list[bytes] = []
        cur = path
        while True:
            self.stats.other_probes += 1
            try:
                fd, name = self.br.at(0, cur)
                st = os.lstat(name, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(cur)
                cur = parent_of(cur)
                continue
            if st.st_mode & S_IFMT != S_IFDIR:
                raise os_error(errno.EIO)  # the top branch contradicts the union
            break
        times = (st.st_atime_ns, st.st_mtime_ns)
        for p in reversed(missing):
            times = self._make_top_dir(p, times)
        return times

    def _make_top_dir(self, path: bytes, ptimes: tuple[int, int]) -> tuple[int, int]:
        node = self._dir_node(path)
        lower = next(((b, bp) for b, bp in self._layers(node) if b != 0), None)
        if lower is None:
            raise os_error(errno.ENOENT)
        self.stats.other_probes += 1
        sfd, sname = self.br.at(*lower)
        src = os.lstat(sname, dir_fd=sfd)
        fd, name = self.br.at(0, path)
        os.mkdir(name, 0o700, dir_fd=fd)
        os.chown(name, src.st_uid, src.st_gid, dir_fd=fd, follow_symlinks=False)
        os.chmod(name, src.st_mode & 0o7777, dir_fd=fd)
        self._copy_xattrs(self.br.at(*lower), (fd, name))
        os.utime(name, ns=(src.st_atime_ns, src.st_mtime_ns), dir_fd=fd, follow_symlinks=False)
        os.utime(b".", ns=ptimes, dir_fd=fd, follow_symlinks=False)
        self.stats.dir_copy_ups += 1
        if node.found is not None and node.found[0][0] != 0:
            node.found = [(0, path), *node.found]
            if node.layers is not None:
                node.layers = [(0, path), *node.layers]
            node.branch = 0
            node.bpath = path
        return src.st_atime_ns, src.st_mtime_ns

    def _copy_xattrs(self, src: XTarget, dst: XTarget) -> None:
        try:
            names = xattr_list(src)
        except OSError as err:
            if err.errno in (errno.ENOTSUP, errno.EPERM):
                return
            raise
        for name in names:
            value = xattr_get(src, name)
            try:
                xattr_set(dst, name, value)
            except OSError as err:
                if err.errno != errno.ENOTSUP:
                    raise

    def _tmp_name(self) -> bytes:
        self.tmp_serial += 1
        return str(self.tmp_serial).encode()

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
            if self.preallocate:
                # Allocating the extent first makes the copy ~25% faster on ext4 (one
                # allocation instead of delayed allocation as pages are written).
                try:
                    fallocate(dfd, 0, data, end - data)
                except OSError:
                    self.preallocate = False
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
            raise os_error(errno.EROFS)  # an open-unlinked lower file has nowhere to go
        self.stats.other_probes += 1
        sfd, sname = self.br.at(node.branch, node.bpath)
        st = os.lstat(sname, dir_fd=sfd)
        ptimes = self._ensure_top_dir(parent_of(path))
        tmp = self._tmp_name()
        work = self.work_fd
        dfd, dname = self.br.at(0, path)
        try:
            copied = self._copy_to(sfd, sname, st, tmp, size, (node.branch, node.bpath))
            os.rename(tmp, dname, src_dir_fd=work, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=work)
            raise
        os.utime(b".", ns=ptimes, dir_fd=dfd, follow_symlinks=False)
        self.stats.copy_ups += 1
        self.stats.copy_up_bytes += copied
        new = os.lstat(dname, dir_fd=dfd)
        if self.inos.get(node.key) == node.ino:
            del self.inos[node.key]
        node.key = (new.st_dev, new.st_ino)
        self.inos[node.key] = node.ino
        node.branch = 0
        node.bpath = path
        # Names of the same lower file the kernel knows: keep them one file.
        for alt in node.alt or ():
            aptimes = self._ensure_top_dir(parent_of(alt))
            afd, aname = self.br.at(0, alt)
            os.link(dname, aname, src_dir_fd=dfd, dst_dir_fd=afd, follow_symlinks=False)
            os.utime(b".", ns=aptimes, dir_fd=afd, follow_symlinks=False)
        # Handles on the lower file now read the copy (those served here; the kernel's own
        # passthrough files stay on the lower file).
        for fd in node.fds:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL) & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
            nfd = os.open(dname, flags | os.O_CLOEXEC, dir_fd=dfd)
            os.dup2(nfd, fd, inheritable=False)
            os.close(nfd)

    def _copy_to(self, sfd: int, sname: bytes, st: os.stat_result, tmp: bytes,
                 size: int | None, src: Layer) -> int:
        """Copy the entry (``st``) at ``sname`` in ``sfd`` to ``tmp`` in the work dir;
        returns the bytes of data copied."""
        work = self.work_fd
        kind = st.st_mode & S_IFMT
        copied = 0
        if kind == S_IFREG:
            rfd = os.open(sname, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=sfd)
            try:
                wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                              dir_fd=work)
                try:
                    limit = st.st_size if size is None else min(size, st.st_size)
                    copied = self._copy_data(rfd, wfd, limit)
                    os.fchown(wfd, st.st_uid, st.st_gid)
                    os.fchmod(wfd, st.st_mode & 0o7777)
                    self._copy_xattrs(rfd, wfd)
                    if self.copyup_fsync:
                        os.fsync(wfd)
                    os.utime(wfd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(wfd)
            finally:
                os.close(rfd)
            return copied
        if kind == S_IFLNK:
            os.symlink(os.readlink(sname, dir_fd=sfd), tmp, dir_fd=work)
        else:
            os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work)
            os.chmod(tmp, st.st_mode & 0o7777, dir_fd=work)
        os.chown(tmp, st.st_uid, st.st_gid, dir_fd=work, follow_symlinks=False)
        if kind != S_IFLNK:
            os.chmod(tmp, st.st_mode & 0o7777, dir_fd=work)  # chown cleared set-id bits
        self._copy_xattrs(self.br.at(*src), (work, tmp))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work, follow_symlinks=False)
        return copied

    def _to_top(self, node: Node, size: int | None = None) -> None:
        self._writable()
        if node.kind == S_IFDIR:
            if node.branch != 0 and node.path is not None:
                self._ensure_top_dir(node.path)
        else:
            self._copy_up(node, size)

    def _whiteout(self, parent_path: bytes, name: bytes) -> None:
        if len(name) > WH_NAME_MAX:
            raise os_error(errno.ENAMETOOLONG)
        self._ensure_top_dir(parent_path)
        try:
            os.mknod(WH + name, S_IFREG | 0o444, dir_fd=self.br.dirfd(0, parent_path))
        except FileExistsError:
            return
        self.stats.whiteouts_created += 1

    def _prepare_create(self, parent: Node, name: bytes) -> bool:
        """Get ready to create ``name`` in the top branch; True if a whiteout was removed."""
        self._writable()
        check_new_name(name)
        path = parent.path
        if path is None:
            raise os_error(errno.ENOENT)
        if parent.branch != 0:
            self._ensure_top_dir(path)
        if len(name) > WH_NAME_MAX:
            return False
        self.stats.other_probes += 1
        try:
            os.unlink(WH + name, dir_fd=self.br.dirfd(0, path))
        except FileNotFoundError:
            return False
        self.stats.whiteouts_removed += 1
        return True

    def _new_owner(self, parent: Node, ctx: fp.Context) -> tuple[int, int]:
        # A setgid directory hands its group down (the backing fs already did so).
        self.stats.other_probes += 1
        pst = os.stat(self.br.dirfd(0, parent.path or b""))
        return ctx.uid, (-1 if pst.st_mode & stat.S_ISGID else ctx.gid)

    def _created(self, path: bytes, st: os.stat_result) -> tuple[Node, bytes]:
        kind = st.st_mode & S_IFMT
        dirs: list[Layer] | None = [(0, path)] if kind == S_IFDIR else None
        node = self._attach(path, st, 0, path, dirs)
        if dirs is not None:
            node.layers = list(dirs)
        node.nlookup += 1
        return node, self._entry(node, st)

    def _drop_path(self, node: Node, path: bytes, nlink: int) -> None:
        """``path`` no longer names ``node``; ``nlink`` is its link count before."""
        if node.path == path:
            node.path = node.alt.pop() if node.alt else None
        elif node.alt and path in node.alt:
            node.alt.remove(path)
        if self.paths.get(path) is node:
            del self.paths[path]
        if node.branch == 0 and node.path is not None:
            node.bpath = node.path
        gone = node.kind == S_IFDIR or (node.branch == 0 and nlink <= 1)
        if gone and node.path is None and self.inos.get(node.key) == node.ino:
            # The backing inode may be reused for a new file: give that a new number.
            del self.inos[node.key]

    def _clear_whiteouts(self, path: bytes) -> None:
        """Remove the whiteouts (and markers) of a top-branch directory the union shows as
        empty."""
        dfd = self.br.dirfd(0, path)
        lfd = os.open(b".", LIST_OPEN, dir_fd=dfd)
        try:
            names = [os.fsencode(n) for n in os.listdir(lfd)]
        finally:
            os.close(lfd)
        for name in names:
            if not name.startswith(WH):
                raise os_error(errno.ENOTEMPTY)
        for name in names:
            os.unlink(name, dir_fd=dfd)

    def _mark_opaque(self, path: bytes) -> None:
        with contextlib.suppress(FileExistsError):
            os.mknod(OPAQUE, S_IFREG | 0o444, dir_fd=self.br.dirfd(0, path))

    # --- the work dir ------------------------------------------------------------------------

    def _init_workdir(self) -> None:
        top = self.br.root_fds[0]
        st = os.stat(b".", dir_fd=top)
        try:
            os.mkdir(WORKDIR, 0o700, dir_fd=top)
        except FileExistsError:
            self.work_fd = os.open(WORKDIR, DIR_OPEN, dir_fd=top)
            lfd = os.open(b".", LIST_OPEN, dir_fd=self.work_fd)
            try:
                leftovers = os.listdir(lfd)
            finally:
                os.close(lfd)
            for name in leftovers:
                # Leftovers of a crash: half-made copies (files) and dirren dirs.
                try:
                    os.unlink(name, dir_fd=self.work_fd)
                except IsADirectoryError:
                    import shutil

                    with contextlib.suppress(OSError):
                        shutil.rmtree(name, dir_fd=self.work_fd)
                except OSError:
                    pass
        else:
            self.work_fd = os.open(WORKDIR, DIR_OPEN, dir_fd=top)
            # The scratch dir is an internal: the union's root keeps its times.
            os.utime(b".", ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=top)

