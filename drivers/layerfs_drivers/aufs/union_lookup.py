"""Resolution in the FUSE union: how a name is found in the branches (see
*Lookup*, *Renaming a directory* and *Inode numbers* in :mod:`.unionfs`).

:class:`UnionLookup`, the first layer of :class:`~.union_ops.UnionFS`: a
directory's branches (cut at an opaque one, redirects followed), the search
for a name (whiteouts first), the table that keeps inode numbers stable,
merged listings, and the read-only FUSE operations built on them: lookup,
forget and readdir. Nothing here changes a branch.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from . import fuseproto as fp
from .backing import LIST_OPEN, Branches, Layer, join, parent_of
from .union_state import (
    MAX_REDIRECT,
    OPAQUE,
    S_IFDIR,
    S_IFMT,
    S_IFREG,
    WH,
    WH_META,
    WH_NAME_MAX,
    Node,
    Stats,
    log,
    os_error,
    parse_redirect,
)


class UnionLookup:
    """Finding names in the branches; the state every layer of the union shares is declared
    here and set by :meth:`UnionFS.__init__ <.union_ops.UnionFS>`."""

    roots: list[bytes]
    br: Branches
    nbranches: int
    times: fp.Timeouts
    stats: Stats
    nodes: dict[int, Node]
    inos: dict[Any, int]
    paths: dict[bytes, Node]
    dirs: dict[int, list[Any]]
    lower_cache: dict[tuple[int, bytes], list[Layer]]
    next_ino: int
    next_dh: int

    # --- resolution ------------------------------------------------------------------------

    def _layers(self, node: Node) -> list[Layer]:
        """A directory's branches, cut at an opaque one, redirects followed (lazily)."""
        layers = node.layers
        if layers is None:
            assert node.found is not None
            layers, node.redirect = self._process(node.found)
            node.layers = layers
        return layers

    def _process(self, found: list[Layer]) -> tuple[list[Layer], bytes | None]:
        """Check each found part of a directory (but one in the bottom branch) for the
        opaque marker; a marker holding a redirect continues at the recorded path in the
        branches below. Returns the layers and the top branch's redirect."""
        out: list[Layer] = []
        last = self.nbranches - 1
        lstat = os.lstat
        for b, bp in found:
            out.append((b, bp))
            if b == last:
                break
            self.stats.lookup_opaque_probes += 1
            fd = self.br.dirfd(b, bp)
            try:
                st = lstat(OPAQUE, dir_fd=fd)
            except FileNotFoundError:
                continue
            target = self._redirect_in(fd, st)
            if target is None:
                return out, None
            out.extend(self._lower_layers(target, b))
            return out, target if b == 0 else None
        return out, None

    def _redirect_in(self, dirfd: int, st: os.stat_result) -> bytes | None:
        if st.st_size == 0 or st.st_mode & S_IFMT != S_IFREG or st.st_size > MAX_REDIRECT:
            return None
        self.stats.redirects_read += 1
        fd = os.open(OPAQUE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            data = os.read(fd, MAX_REDIRECT + 1)
        finally:
            os.close(fd)
        target = parse_redirect(data)
        if target is None:
            log.warning("ignoring a malformed redirect record (%d bytes)", len(data))
        return target

    def _lower_layers(self, target: bytes, below: int) -> list[Layer]:
        """The layers of directory ``target`` in the union of the branches below ``below``
        (never changing: those branches are read-only), or [] if it is not one there."""
        key = (below, target)
        cached = self.lower_cache.get(key)
        if cached is not None:
            return cached
        layers, _ = self._process([(b, b"") for b in range(below + 1, self.nbranches)])
        for name in target.split(b"/") if target else ():
            res = self._find(layers, name)
            if res is None or res[3] is None:
                layers = []
                break
            layers, _ = self._process(res[3])
        self.lower_cache[key] = layers
        return layers

    def _find(self, layers: list[Layer], name: bytes
              ) -> tuple[os.stat_result, int, bytes, list[Layer] | None] | None:
        """Find ``name`` below a directory's ``layers``:
        (stat, topmost branch, its backing path, directory parts) or None."""
        s = self.stats
        wh = WH + name if len(name) <= WH_NAME_MAX else None
        found: os.stat_result | None = None
        fbranch = -1
        fbpath = b""
        dirs: list[Layer] | None = None
        lstat = os.lstat
        access = os.access
        dirfd = self.br.dirfd
        for b, bp in layers:
            fd = dirfd(b, bp)
            if wh is not None:
                s.lookup_whiteout_probes += 1
                if access(wh, os.F_OK, dir_fd=fd, follow_symlinks=False):
                    break
            s.lookup_name_stats += 1
            try:
                st = lstat(name, dir_fd=fd)
            except FileNotFoundError:
                continue
            cbp = bp + b"/" + name if bp else name
            if st.st_mode & S_IFMT == S_IFDIR:
                if found is None:
                    found, fbranch, fbpath, dirs = st, b, cbp, [(b, cbp)]
                elif dirs is not None:
                    dirs.append((b, cbp))
            else:
                if found is None:
                    found, fbranch, fbpath = st, b, cbp
                break
        if found is None:
            return None
        return found, fbranch, fbpath, dirs

    def _attach(self, path: bytes, st: os.stat_result, branch: int, bpath: bytes,
                dirs: list[Layer] | None) -> Node:
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
            node = Node(ino, path, kind, branch, bpath, dirs, key)
            self.nodes[ino] = node
            self.paths[path] = node
            return node
        node.branch = branch
        node.bpath = bpath
        if dirs is not None:
            if node.found != dirs:
                node.found = dirs
                node.layers = None
                node.redirect = None
        elif node.path is None:
            node.path = path
            self.paths[path] = node
        elif node.path != path and (node.alt is None or path not in node.alt):
            if node.alt is None:
                node.alt = []
            node.alt.append(path)
            self.paths[path] = node
        return node

    def _child(self, parent: Node, name: bytes) -> Node:
        if parent.path is None or parent.kind != S_IFDIR:
            raise os_error(errno.ENOENT)
        path = join(parent.path, name)
        node = self.paths.get(path)
        if node is not None:
            return node
        res = self._find(self._layers(parent), name)
        if res is None:
            raise os_error(errno.ENOENT)
        return self._attach(path, *res)

    def _dir_node(self, path: bytes) -> Node:
        """The directory at union ``path``: the live node, or one resolved from the root."""
        node = self.paths.get(path)
        if node is not None and node.kind == S_IFDIR:
            return node
        cur = self.paths[b""]
        for name in path.split(b"/") if path else ():
            child = self.paths.get(join(cur.path or b"", name))
            if child is None:
                res = self._find(self._layers(cur), name)
                if res is None or res[3] is None:
                    raise os_error(errno.ENOENT)
                child = Node(0, join(cur.path or b"", name), S_IFDIR, res[1], res[2], res[3],
                             None)  # transient: not registered
            cur = child
        return cur

    @staticmethod
    def _nlink(node: Node, st: os.stat_result) -> int:
        if node.kind == S_IFDIR and (
                (node.found is not None and len(node.found) > 1) or node.redirect is not None
                or (node.layers is not None and len(node.layers) > 1)):
            return 1  # a merged directory: the count is unknown (as overlayfs)
        return st.st_nlink

    def _entry(self, node: Node, st: os.stat_result) -> bytes:
        return self.times.entry_out(node.ino, st, self._nlink(node, st))

    def _attr(self, node: Node, st: os.stat_result) -> bytes:
        return self.times.attr_out(node.ino, st, self._nlink(node, st))

    def _loc(self, node: Node) -> tuple[int, bytes]:
        """(directory fd, name) of a node's topmost backing entry."""
        if node.branch == 0 and node.path is not None:
            return self.br.at(0, node.path)
        return self.br.at(node.branch, node.bpath)

    def _stat(self, node: Node) -> os.stat_result:
        if node.path is not None:
            self.stats.getattr_stats += 1
            fd, name = self._loc(node)
            return os.lstat(name, dir_fd=fd)
        for fd in node.fds:
            return os.fstat(fd)
        raise os_error(errno.ESTALE)

    def _lower_has(self, parent: Node, name: bytes) -> bool:
        """Whether a branch below the top shows ``name`` in ``parent``."""
        s = self.stats
        wh = WH + name if len(name) <= WH_NAME_MAX else None
        for b, bp in self._layers(parent):
            if b == 0:
                continue
            fd = self.br.dirfd(b, bp)
            if wh is not None:
                s.other_probes += 1
                if os.access(wh, os.F_OK, dir_fd=fd, follow_symlinks=False):
                    return False
            s.other_probes += 1
            if os.access(name, os.F_OK, dir_fd=fd, follow_symlinks=False):
                return True
        return False

    def _has_lower(self, node: Node) -> bool:
        """Whether a directory shows anything from a branch below the top."""
        return any(b != 0 for b, _ in self._layers(node))

    def _merge(self, node: Node) -> list[tuple[bytes, int, bytes, list[Layer] | None]]:
        """The merged listing of a directory: (name, topmost branch, its backing path,
        directory parts)."""
        out: dict[bytes, list[Any]] = {}
        hidden: set[bytes] = set()
        fsencode = os.fsencode
        for b, bp in self._layers(node):
            try:
                dfd = os.open(b".", LIST_OPEN, dir_fd=self.br.dirfd(b, bp))
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
                cbp = bp + b"/" + n if bp else n
                if cur is None:
                    out[n] = [b, cbp, [(b, cbp)] if isdir else None]
                    if not isdir:
                        hidden.add(n)
                elif isdir:
                    cur[2].append((b, cbp))
                else:
                    hidden.add(n)  # a non-directory below a directory ends its merge
            hidden |= whiteouts
        return [(n, v[0], v[1], v[2]) for n, v in out.items()]

    def _lower_path(self, node: Node) -> bytes:
        """A directory's path in the union of the branches below the top one."""
        names: list[bytes] = []
        cur = node
        while True:
            self._layers(cur)
            if cur.redirect is not None:
                base = cur.redirect
                break
            if not cur.path:
                base = b""
                break
            head, _, tail = cur.path.rpartition(b"/")
            names.append(tail)
            cur = self._dir_node(head)
        for name in reversed(names):
            base = join(base, name)
        return base

    # --- FUSE operations: lookup -----------------------------------------------------------

    def lookup(self, parent_ino: int, name: bytes) -> bytes:
        s = self.stats
        s.lookups += 1
        parent = self.nodes[parent_ino]
        if name.startswith(WH) or parent.kind != S_IFDIR or parent.path is None:
            s.lookups_negative += 1
            return self.times.negative
        res = self._find(self._layers(parent), name)
        if res is None:
            s.lookups_negative += 1
            return self.times.negative
        node = self._attach(join(parent.path, name), *res)
        node.nlookup += 1
        return self._entry(node, res[0])

    def forget(self, items: list[tuple[int, int]]) -> None:
        nodes = self.nodes
        paths = self.paths
        for ino, n in items:
            node = nodes.get(ino)
            if node is None:
                continue
            node.nlookup -= n
            if node.nlookup <= 0 and ino != fp.ROOT_ID:
                del nodes[ino]
                for p in node.all_paths():
                    if paths.get(p) is node:
                        del paths[p]

    # --- FUSE operations: directories ------------------------------------------------------

    def opendir(self, ino: int) -> int:
        node = self.nodes[ino]
        if node.kind != S_IFDIR:
            raise os_error(errno.ENOTDIR)
        dh = self.next_dh
        self.next_dh += 1
        self.dirs[dh] = [node, None]
        return dh

    def readdirplus(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.dirs[fh]
        node: Node = handle[0]
        if handle[1] is None or offset == 0:
            handle[1] = self._merge(node) if node.path is not None else []
        entries = handle[1]
        s = self.stats
        out = fp.DirBuffer(size)
        # "." and "..": the kernel takes no reference on them and ignores their
        # attributes (nodeid 0), so only the inode number and type are filled in.
        for i in range(offset, 2):
            if i == 0:
                ino = node.ino
            else:
                up = (node if not node.path else self.paths.get(parent_of(node.path)))
                ino = up.ino if up is not None else node.ino
            if not out.add_plus(fp.dot_entry(), ino, b"." * (i + 1), S_IFDIR, i + 1):
                return out.data()
        base = node.path or b""
        at = self.br.at
        for i in range(max(offset, 2), len(entries) + 2):
            name, b, bpath, dirs = entries[i - 2]
            s.readdir_stats += 1
            fd, bname = at(b, bpath)
            try:
                st = os.lstat(bname, dir_fd=fd)
            except FileNotFoundError:
                continue
            child = self._attach(join(base, name), st, b, bpath,
                                 list(dirs) if dirs is not None else None)
            if not out.add_plus(self._entry(child, st), child.ino, name, st.st_mode, i + 1):
                if child.nlookup == 0 and child.ino != fp.ROOT_ID:
                    self.nodes.pop(child.ino, None)
                    for p in child.all_paths():
                        if self.paths.get(p) is child:
                            del self.paths[p]
                break
            child.nlookup += 1
        return out.data()

    def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        node: Node = self.dirs[fh][0]
        if node.branch != 0 or node.path is None:
            return
        fd = os.open(b".", LIST_OPEN, dir_fd=self.br.dirfd(0, node.path))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

