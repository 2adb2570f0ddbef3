"""Renames in the FUSE union (see *Renaming* and *Renaming a directory* in
:mod:`.unionfs`).

:class:`UnionRename`, the third layer of :class:`~.union_ops.UnionFS`:
rename(2) and its ``renameat2`` flags, RENAME_EXCHANGE, and dirren -- a lower
directory moved in O(1) by a redirect record in its top-branch part -- with
the re-keying of every known path under a moved directory. Kept apart
because it is the one operation that moves names, not just makes or drops
them.
"""

from __future__ import annotations

import contextlib
import errno
import os

from .backing import DIR_OPEN, join, parent_of, renameat2
from .union_copyup import UnionCopyUp
from .union_state import (
    DIRREN_FLAG,
    OPAQUE,
    REDIRECT_MAGIC,
    S_IFDIR,
    S_IFREG,
    WH_NAME_MAX,
    Node,
    check_new_name,
    os_error,
)

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


class UnionRename(UnionCopyUp):
    """rename(2), RENAME_EXCHANGE and dirren."""

    dirren: bool
    dirren_noted: bool

    # --- moved names and redirect records ----------------------------------------------------

    def _rekey(self, old: bytes, new: bytes) -> None:
        """Re-key every known path at and under a moved directory (top-branch parts too)."""
        prefix = old + b"/"
        n = len(old)

        def moved(p: bytes) -> bytes:
            return new + p[n:] if p == old or p.startswith(prefix) else p

        for p in [p for p in self.paths if p == old or p.startswith(prefix)]:
            nd = self.paths.pop(p)
            self.paths[moved(p)] = nd
            if nd.path is not None:
                nd.path = moved(nd.path)
            if nd.alt:
                nd.alt = [moved(a) for a in nd.alt]
            if isinstance(nd.key, bytes):
                nd.key = moved(nd.key)
            if nd.branch == 0:
                nd.bpath = moved(nd.bpath)
            if nd.found is not None:
                nd.found = [(b, moved(bp) if b == 0 else bp) for b, bp in nd.found]
            if nd.layers is not None:
                nd.layers = [(b, moved(bp) if b == 0 else bp) for b, bp in nd.layers]
        for k in [k for k in self.inos if isinstance(k, bytes) and (k == old
                                                                   or k.startswith(prefix))]:
            self.inos[moved(k)] = self.inos.pop(k)
        self.br.forget_top(old)

    def _note_dirren(self) -> None:
        """Mark the top branch as holding redirects (the driver then diffs it by walking the
        mounted tree: the branch alone no longer describes the layer)."""
        if self.dirren_noted:
            return
        top = self.br.root_fds[0]
        st = os.stat(b".", dir_fd=top)
        try:
            os.mknod(DIRREN_FLAG, S_IFREG | 0o444, dir_fd=top)
        except FileExistsError:
            pass
        else:
            os.utime(b".", ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=top)
        self.dirren_noted = True

    def _write_marker(self, dirfd: int, content: bytes) -> None:
        """Put ``content`` in the opaque marker of a top-branch directory, atomically,
        keeping the directory's times."""
        st = os.stat(dirfd)
        tmp = self._tmp_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444,
                     dir_fd=self.work_fd)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        os.rename(tmp, OPAQUE, src_dir_fd=self.work_fd, dst_dir_fd=dirfd)
        os.utime(b".", ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dirfd, follow_symlinks=False)

    def _dirren_source(self, node: Node) -> tuple[int, bytes]:
        """Make a lower directory movable: (dir fd, name) of a top-branch directory that
        records where its lower contents are. Its own top part if it has one (the record
        written in place: at its own name it changes nothing), else a new directory in the
        work dir with the lower part's attributes."""
        assert node.path is not None
        record = REDIRECT_MAGIC + b"/" + self._lower_path(node)
        self._note_dirren()
        if node.found and node.found[0][0] == 0:
            if node.redirect is None:
                self._write_marker(self.br.dirfd(0, node.path), record)
            return self.br.at(0, node.path)
        lower = self._layers(node)[0]
        sfd, sname = self.br.at(*lower)
        src = os.lstat(sname, dir_fd=sfd)
        tmp = self._tmp_name()
        work = self.work_fd
        os.mkdir(tmp, 0o700, dir_fd=work)
        os.chown(tmp, src.st_uid, src.st_gid, dir_fd=work, follow_symlinks=False)
        os.chmod(tmp, src.st_mode & 0o7777, dir_fd=work)
        self._copy_xattrs(self.br.at(*lower), (work, tmp))
        tfd = os.open(tmp, DIR_OPEN, dir_fd=work)
        try:
            self._write_marker(tfd, record)
        finally:
            os.close(tfd)
        os.utime(tmp, ns=(src.st_atime_ns, src.st_mtime_ns), dir_fd=work, follow_symlinks=False)
        return work, tmp

    # --- FUSE operations: rename -------------------------------------------------------------

    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
               new_name: bytes, flags: int) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise os_error(errno.EINVAL)
        oparent = self.nodes[old_parent_ino]
        nparent = self.nodes[new_parent_ino]
        src = self._child(oparent, old_name)
        if nparent.path is None or nparent.kind != S_IFDIR:
            raise os_error(errno.ENOENT)
        if flags & RENAME_EXCHANGE:
            self._exchange(oparent, old_name, src, nparent, new_name)
            return
        check_new_name(new_name)
        assert oparent.path is not None
        old = join(oparent.path, old_name)
        new = join(nparent.path, new_name)
        dst = self.paths.get(new)
        if dst is None:
            with contextlib.suppress(FileNotFoundError):
                dst = self._child(nparent, new_name)
        if dst is src:
            return
        isdir = src.kind == S_IFDIR
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise os_error(errno.EEXIST)
            if isdir:
                if dst.kind != S_IFDIR:
                    raise os_error(errno.ENOTDIR)
                if self._merge(dst):
                    raise os_error(errno.ENOTEMPTY)
            elif dst.kind == S_IFDIR:
                raise os_error(errno.EISDIR)
        lower_dir = isdir and self._has_lower(src)
        if lower_dir and not self.dirren:
            raise os_error(errno.EXDEV)  # see the module docstring
        need_wh = (bool(flags & RENAME_WHITEOUT) or src.branch != 0
                   or self._lower_has(oparent, old_name))
        if need_wh and len(old_name) > WH_NAME_MAX:
            raise os_error(errno.ENAMETOOLONG)
        if not isdir:
            self._copy_up(src)
        self._ensure_top_dir(nparent.path)
        below = self._lower_has(nparent, new_name)
        removed = self._prepare_create(nparent, new_name)
        dst_nlink = 0
        ndfd = self.br.dirfd(0, nparent.path)
        if dst is not None and dst.branch == 0:
            if dst.kind == S_IFDIR:
                self._clear_whiteouts(new)
            else:
                self.stats.other_probes += 1
                dst_nlink = os.lstat(new_name, dir_fd=ndfd).st_nlink
        if lower_dir:
            sfd, sname = self._dirren_source(src)
            self.stats.dir_renames += 1
        else:
            sfd, sname = self.br.at(0, old)
            if isdir and (below or removed):
                self._mark_opaque(old)
        os.rename(sname, new_name, src_dir_fd=sfd, dst_dir_fd=ndfd)
        if need_wh:
            self._whiteout(oparent.path, old_name)
        if dst is not None:
            self._drop_path(dst, new, dst_nlink)
            if dst.kind == S_IFDIR:
                self.br.forget_top(new)
        self._move_name(src, old, new)
        if isdir:
            if lower_dir:
                # Read again from the record, as a later mount would.
                src.found = [(0, new)]
                src.layers = None
                src.redirect = None
            else:
                src.found = src.layers = [(0, new)]
            src.branch = 0
            src.bpath = new

    def _move_name(self, node: Node, old: bytes, new: bytes) -> None:
        """``node``'s name ``old`` is now ``new`` (and, for a directory, everything below)."""
        if self.paths.get(old) is node:
            del self.paths[old]
        self.paths[new] = node
        if node.path == old:
            node.path = new
        elif node.alt and old in node.alt:
            node.alt[node.alt.index(old)] = new
        if node.kind == S_IFDIR:
            self._rekey(old, new)
            if self.inos.get(old) == node.ino:
                del self.inos[old]
            self.inos[new] = node.ino
            node.key = new
        if node.branch == 0:
            node.bpath = new

    def _exchange(self, oparent: Node, old_name: bytes, src: Node, nparent: Node,
                  new_name: bytes) -> None:
        """RENAME_EXCHANGE: both entries to the top branch, then swapped there."""
        assert oparent.path is not None and nparent.path is not None
        old = join(oparent.path, old_name)
        new = join(nparent.path, new_name)
        dst = self._child(nparent, new_name)
        if dst is src:
            return
        moves = ((src, oparent, old, nparent, new_name), (dst, nparent, new, oparent, old_name))
        lower = [n.kind == S_IFDIR and self._has_lower(n) for n, *_ in moves]
        if any(lower) and not self.dirren:
            raise os_error(errno.EXDEV)
        for (node, _from_parent, path, to_parent, to_name), has_lower in zip(moves, lower,
                                                                             strict=True):
            self._ensure_top_dir(parent_of(path))
            if node.kind != S_IFDIR:
                self._copy_up(node)
            elif has_lower:
                self._dirren_in_place(node, path)
                self.stats.dir_renames += 1
            else:
                if node.branch != 0:  # no lower part but not in the top: cannot happen
                    raise os_error(errno.EIO)
                if self._lower_has(to_parent, to_name):
                    self._mark_opaque(path)
        ofd, oname = self.br.at(0, old)
        nfd, nname = self.br.at(0, new)
        renameat2(ofd, oname, nfd, nname, RENAME_EXCHANGE)
        # Swap the bookkeeping through a name no real path can have.
        parked = b"\0exchange"
        self._move_name(src, old, parked)
        self._move_name(dst, new, old)
        self._move_name(src, parked, new)
        for node, path, has_lower in ((src, new, lower[0]), (dst, old, lower[1])):
            if node.kind == S_IFDIR:
                node.branch = 0
                node.bpath = path
                if has_lower:
                    node.found, node.layers, node.redirect = [(0, path)], None, None
                else:
                    node.found = node.layers = [(0, path)]

    def _dirren_in_place(self, node: Node, path: bytes) -> None:
        """Give a lower directory a top-branch part at its own name, recording its lower
        contents (a step of RENAME_EXCHANGE)."""
        sfd, sname = self._dirren_source(node)
        if sfd == self.work_fd:
            fd, name = self.br.at(0, path)
            os.rename(sname, name, src_dir_fd=sfd, dst_dir_fd=fd)
            node.found = [(0, path), *(node.found or [])]
            node.layers = None
            node.redirect = None
            node.branch = 0
            node.bpath = path

