"""A FUSE union filesystem with AUFS semantics, for kernels without aufs.

Usage (a mount helper: it returns once the mount is live)::

    python -m layerfs_drivers.aufs.unionfs [--foreground] [--entry-timeout S]
        [--attr-timeout S] [--keep-cache | --no-keep-cache] [--stats-file PATH]
        [--copyup-fsync] [--readahead-kb KB] [--dirren] [--no-passthrough]
        [--log PATH] TOP:rw LOWER:ro ... MOUNTPOINT

The first branch is the top one and the only writable one (``TOP:ro`` makes
the whole union read-only); the others are read-only, top to bottom. Without
``--foreground`` the process forks: the child (a new session, cwd ``/``, no
inherited fds) mounts, tells the parent over a pipe, and serves until the
filesystem is unmounted (``umount``), then exits 0. The parent exits 0 once
the mount is live, or 1 with the error on stderr (2 for bad arguments).
SIGTERM, SIGINT and SIGHUP unmount and exit; SIGUSR1 writes ``--stats-file``.
The mount is ``fuse.layerfs-union`` with ``allow_other``,
``default_permissions`` (the kernel checks permissions against the modes we
report), ``suid`` and ``dev``; mounting needs root. The server outlives the
helper, so it is re-parented: whoever runs the helper should be a child
subreaper, or it stays a zombie after it exits. A long-lived process avoids
both the cold start and the re-parenting with
:class:`layerfs_drivers.aufs.forkserver.ForkServer`, which forks servers from
a warm process (:func:`serve_forked`).

The server speaks the kernel's FUSE protocol itself
(:mod:`layerfs_drivers.aufs.fuseproto`), single-threaded.

Branches use AUFS's on-disk format, as Docker's aufs driver left it::

    BRANCH/
      .wh.NAME            NAME is deleted in the branches below
      dir/.wh..wh..opq    dir is opaque: the branches below add nothing to it;
                          with dirren, the file may instead hold a redirect
                          ("layerfs-dirren:/old/path": see *Renaming a directory*)
      .wh..wh.orph/       (top branch) scratch for copy-up in progress;
      .wh..wh.dirren      (top branch) present once a redirect was written;
                          every .wh..wh.* name is an AUFS internal, never shown

How it works
------------
*Backing access* never builds a path from a branch root: every operation is
``*at()`` relative to a directory fd (``openat``, ``fstatat``, ``mkdirat``,
``renameat2``, ``linkat``, ``symlinkat``, ``mknodat``, ``unlinkat``,
``fchownat``, ``utimensat``; xattrs with ``getxattrat`` and its siblings, or through
``/proc/self/fd/DIRFD/NAME`` before Linux 6.13), so
a union path up to PATH_MAX works however deep the branches are. Directory
fds (``O_PATH``) are cached per branch and backing path, opened component by
component from the branch root when missing.

*Lookup* of NAME in a directory walks the directory's branches top-down; in
each one it probes ``.wh.NAME`` (a whiteout ends the walk) and then ``NAME``.
A non-directory ends the walk; directories found in several branches merge.
A directory's branch list is cut below the first branch where it is opaque;
that is checked lazily, the first time the directory is used as a parent,
in each branch of it that has another branch below. Every probe is counted
(see *Counters*).

*Copy-up* is per file: opening for write, truncate, chmod, chown, utimens,
set/removexattr, link and rename copy the whole file to the top branch first
(FICLONE when the backing filesystem can reflink — O(1) whatever the size —
else copy_file_range over the data extents, so sparse files stay sparse),
with mode, owner, xattrs and times, into ``.wh..wh.orph`` and then rename it
into place, so a crash never leaves a half-copied file visible. Missing parent
directories are created in the top branch with their lower modes, owners,
xattrs and times, and the parents' times are restored afterwards, since a
copy-up changes nothing the union shows. Opening with O_TRUNC or truncating
copies no data. Copy-up does not fsync (neither did aufs, nor does
fuse-overlayfs); ``--copyup-fsync`` adds it.

*Reads and writes* go straight from the kernel to the backing file where the
kernel offers FUSE passthrough (Linux >= 6.9): the open reply names a backing
file registered with FUSE_DEV_IOC_BACKING_OPEN and no READ or WRITE request
reaches this process. The kernel allows one backing file per inode at a time,
so a file whose data is about to change in its copy (opened for writing,
truncated) while handles opened on its lower file are still open gets a new
inode: the request fails with ESTALE, which the kernel retries once after
looking the name up again. The handles open before keep reading the lower
file (as with fuse-overlayfs), and the name's st_ino changes; another hard
link name the kernel still caches opens the new inode the same way, but a
stat of it may show the old inode's attributes until it is looked up again.
Without passthrough (``--no-passthrough``, older kernels, a backing
filesystem that is itself stacked), reads and writes are served here, with
the kernel's page cache kept across opens (``--keep-cache``), and read-only
handles are switched to the copy on copy-up (dup2), so they see later writes.

*Deleting* a lower entry writes a whiteout ``.wh.NAME`` in the top branch;
rmdir of a directory that still shows entries is ENOTEMPTY; a directory
created where a whiteout was is made opaque. A whiteout name must fit in
NAME_MAX, so names longer than 251 bytes (255 - len(".wh.")) work in the top
branch but a lower entry with such a name cannot be deleted or renamed
(ENAMETOOLONG), as in aufs.

*Renaming* files copies them up and renames them in the top branch; the old
name is whited out if it exists below. ``renameat2`` flags: RENAME_NOREPLACE
(EEXIST), RENAME_EXCHANGE (both entries are brought to the top branch and
swapped) and RENAME_WHITEOUT (a whiteout ``.wh.OLD`` is always left in the
top branch, in AUFS's form: the name is hidden in the union, whatever the
branches below hold); other flags are EINVAL.

*Renaming a directory* that exists in a lower branch — with contents or
empty — fails with EXDEV by default, as aufs without ``dirren`` does. Every
program that moves files handles EXDEV (what a rename across filesystems
returns): ``mv`` and ``shutil.move`` fall back to copy + delete. Directories
that live only in the top branch (or are opaque there) are renamed natively.
With ``--dirren`` (AUFS's opt-in, the driver's ``dirren`` option) a lower
directory is renamed in place, in O(1): its top-branch part (made if missing)
moves to the new name and records where its lower contents are, as a
redirect in its ``.wh..wh..opq`` file (``layerfs-dirren:`` + its absolute
path in the union of the branches below); the old name is whited out. A
redirect is opaque for the new name and reads the branches below at the
recorded path, resolved there as a lookup of its own (whiteouts, opaque
directories and older redirects in those branches apply), so it stays right
when the branch becomes a lower branch of a later mount. As with overlayfs's
``redirect_dir``, such a branch is no longer a self-contained change set: the
aufs driver then diffs and exports the layer by walking the mounted trees.
Crash safety: the record is written first, the rename is atomic, the
whiteout comes last; a crash in between shows the directory under both names.

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
answered by the kernel without a round trip here.
``bench/layerfs_bench/aufs_fuse.py`` measures the difference.

Counters
--------
Readable while mounted as JSON from the virtual xattr ``user.layerfs.stats``
of the mount root, reset by setting ``user.layerfs.stats.reset``; neither is
listed by listxattr. ``lookup_name_stats``, ``lookup_whiteout_probes`` and
``lookup_opaque_probes`` are the probes made by lookups; ``backing_stats`` is
every stat/existence probe on a branch path, those included. A cold lookup of
a path of D components whose directories exist in all L branches, with the
file only in the bottom one, costs L*D name stats, L*D whiteout probes and
(L-1)*(D-1) opaque probes. ``passthrough_opens`` and ``cached_opens`` count
how opened files do their I/O, ``reads_served`` and ``writes_served`` the READ
and WRITE requests that reached this process.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import resource
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from . import fuseproto as fp
from .backing import (
    DIR_OPEN,
    LIST_OPEN,
    Branches,
    Layer,
    XTarget,
    fallocate,
    join,
    parent_of,
    renameat2,
    xattr_get,
    xattr_list,
    xattr_remove,
    xattr_set,
)

log = logging.getLogger("layerfs.unionfs")

WH = b".wh."
WH_META = b".wh..wh."
OPAQUE = b".wh..wh..opq"
WORKDIR = b".wh..wh.orph"
DIRREN_FLAG = b".wh..wh.dirren"
REDIRECT_MAGIC = b"layerfs-dirren:"
WH_NAME_MAX = 255 - len(WH)
MAX_REDIRECT = 64 * 1024

CAPS_XATTR = b"security.capability"
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
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
def _check_new_name(name: bytes) -> None:
    # A name with the whiteout prefix could not be told from a whiteout.
    if name.startswith(WH):
        raise OSError(errno.EPERM, "names starting with .wh. are reserved")


def _errno(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Stats:
    """Counters of the work the filesystem does on its branches."""

    __slots__ = ("cached_opens", "copy_up_bytes", "copy_ups", "dir_copy_ups", "dir_renames",
                 "fallocates", "getattr_stats", "lookup_name_stats", "lookup_opaque_probes",
                 "lookup_whiteout_probes", "lookups", "lookups_negative", "other_probes",
                 "passthrough_opens", "readdir_stats", "reads_served", "redirects_read",
                 "whiteouts_created", "whiteouts_removed", "writes_served")
    cached_opens: int
    copy_up_bytes: int
    copy_ups: int
    dir_copy_ups: int
    dir_renames: int
    fallocates: int
    getattr_stats: int
    lookup_name_stats: int
    lookup_opaque_probes: int
    lookup_whiteout_probes: int
    lookups: int
    lookups_negative: int
    other_probes: int
    passthrough_opens: int
    readdir_stats: int
    reads_served: int
    redirects_read: int
    whiteouts_created: int
    whiteouts_removed: int
    writes_served: int

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

    ``path`` is its path in the union (``b""`` for the root, ``b"a/b"`` below
    it); ``alt`` holds more paths of a hardlinked file. ``branch`` and ``bpath``
    locate its topmost backing entry (in the top branch, ``bpath`` is the union
    path; below, a redirected directory's contents live elsewhere).
    Directories also have ``found``, every (branch, backing path) where the
    name was found, top-down, and ``layers``, the same cut at an opaque branch
    and with redirects followed (None until the directory is first used as a
    parent); ``redirect`` is the record of the top branch's part, if any.
    ``fds`` are the backing fds of open handles (used once the last name is
    gone: open-unlinked files); ``pt_*`` the passthrough backing file the
    kernel holds for it.
    """

    __slots__ = ("alt", "bpath", "branch", "cached_count", "caps", "fds", "found", "ino", "key",
                 "kind", "layers", "nlookup", "path", "pt_count", "pt_id", "pt_key", "redirect")

    def __init__(self, ino: int, path: bytes | None, kind: int, branch: int, bpath: bytes,
                 found: list[Layer] | None, key: Any) -> None:
        self.ino = ino
        self.path = path
        self.alt: list[bytes] | None = None
        self.kind = kind
        self.branch = branch
        self.bpath = bpath
        self.found = found
        self.layers: list[Layer] | None = None
        self.redirect: bytes | None = None
        self.nlookup = 0
        self.fds: set[int] = set()
        self.key = key
        self.pt_id = 0
        self.pt_key: Any = None
        self.pt_count = 0
        self.cached_count = 0
        self.caps: bytes | None = None  # security.capability (b"": none), once read

    def all_paths(self) -> list[bytes]:
        out = [] if self.path is None else [self.path]
        if self.alt:
            out += self.alt
        return out


def parse_redirect(data: bytes) -> bytes | None:
    """The union path (``b"a/b"``, ``b""`` for the root) a redirect record names, or None
    for a plain opaque marker or anything malformed."""
    if not data.startswith(REDIRECT_MAGIC):
        return None
    target = data[len(REDIRECT_MAGIC):]
    if not target.startswith(b"/") or b"\0" in target:
        return None
    parts = target[1:].split(b"/") if target != b"/" else []
    if any(p in (b"", b".", b"..") for p in parts):
        return None
    return b"/".join(parts)


class UnionFS:
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
            raise _errno(errno.ENOENT)
        path = join(parent.path, name)
        node = self.paths.get(path)
        if node is not None:
            return node
        res = self._find(self._layers(parent), name)
        if res is None:
            raise _errno(errno.ENOENT)
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
                    raise _errno(errno.ENOENT)
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
        raise _errno(errno.ESTALE)

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

    # --- changing the top branch -----------------------------------------------------------

    def _writable(self) -> None:
        if not self.writable:
            raise _errno(errno.EROFS)

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
                raise _errno(errno.EIO)  # the top branch contradicts the union
            break
        times = (st.st_atime_ns, st.st_mtime_ns)
        for p in reversed(missing):
            times = self._make_top_dir(p, times)
        return times

    def _make_top_dir(self, path: bytes, ptimes: tuple[int, int]) -> tuple[int, int]:
        node = self._dir_node(path)
        lower = next(((b, bp) for b, bp in self._layers(node) if b != 0), None)
        if lower is None:
            raise _errno(errno.ENOENT)
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
            raise _errno(errno.EROFS)  # an open-unlinked lower file has nowhere to go
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
            raise _errno(errno.ENAMETOOLONG)
        self._ensure_top_dir(parent_path)
        try:
            os.mknod(WH + name, S_IFREG | 0o444, dir_fd=self.br.dirfd(0, parent_path))
        except FileExistsError:
            return
        self.stats.whiteouts_created += 1

    def _prepare_create(self, parent: Node, name: bytes) -> bool:
        """Get ready to create ``name`` in the top branch; True if a whiteout was removed."""
        self._writable()
        _check_new_name(name)
        path = parent.path
        if path is None:
            raise _errno(errno.ENOENT)
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
                raise _errno(errno.ENOTEMPTY)
        for name in names:
            os.unlink(name, dir_fd=dfd)

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

    def _mark_opaque(self, path: bytes) -> None:
        with contextlib.suppress(FileExistsError):
            os.mknod(OPAQUE, S_IFREG | 0o444, dir_fd=self.br.dirfd(0, path))

    # --- FUSE operations: lookup and attributes --------------------------------------------

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
            raise _errno(errno.ESTALE)
        if fh is not None and fh not in self.files:
            fh = None
        fd = fh if fh is not None else next(iter(node.fds), None)
        path = node.path
        if path is None and fd is None:
            raise _errno(errno.ESTALE)
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
            raise _errno(errno.ESTALE)
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
            raise _errno(errno.ENOENT)
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
            raise _errno(errno.EISDIR)
        assert parent.path is not None
        path = join(parent.path, name)
        nlink = 0
        if node.branch == 0:
            need_wh = self._lower_has(parent, name)
            if need_wh and len(name) > WH_NAME_MAX:
                raise _errno(errno.ENAMETOOLONG)
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
            raise _errno(errno.ENOTDIR)
        if self._merge(node):
            raise _errno(errno.ENOTEMPTY)
        assert parent.path is not None
        path = join(parent.path, name)
        layers = self._layers(node)
        need_wh = any(b != 0 for b, _ in layers) or self._lower_has(parent, name)
        if need_wh and len(name) > WH_NAME_MAX:
            raise _errno(errno.ENAMETOOLONG)
        if layers and layers[0][0] == 0:
            self._clear_whiteouts(path)
            os.rmdir(name, dir_fd=self.br.dirfd(0, parent.path))
            self.br.forget_top(path)
        if need_wh:
            self._whiteout(parent.path, name)
        self._drop_path(node, path, 0)

    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
               new_name: bytes, flags: int) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise _errno(errno.EINVAL)
        oparent = self.nodes[old_parent_ino]
        nparent = self.nodes[new_parent_ino]
        src = self._child(oparent, old_name)
        if nparent.path is None or nparent.kind != S_IFDIR:
            raise _errno(errno.ENOENT)
        if flags & RENAME_EXCHANGE:
            self._exchange(oparent, old_name, src, nparent, new_name)
            return
        _check_new_name(new_name)
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
                raise _errno(errno.EEXIST)
            if isdir:
                if dst.kind != S_IFDIR:
                    raise _errno(errno.ENOTDIR)
                if self._merge(dst):
                    raise _errno(errno.ENOTEMPTY)
            elif dst.kind == S_IFDIR:
                raise _errno(errno.EISDIR)
        lower_dir = isdir and self._has_lower(src)
        if lower_dir and not self.dirren:
            raise _errno(errno.EXDEV)  # see the module docstring
        need_wh = (bool(flags & RENAME_WHITEOUT) or src.branch != 0
                   or self._lower_has(oparent, old_name))
        if need_wh and len(old_name) > WH_NAME_MAX:
            raise _errno(errno.ENAMETOOLONG)
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
            raise _errno(errno.EXDEV)
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
                    raise _errno(errno.EIO)
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
            raise _errno(errno.ESTALE)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            stale = self._stale_backing(node)
            self._copy_up(node, 0 if flags & os.O_TRUNC else None)
            if stale:
                self._split(node)
                raise _errno(errno.ESTALE)
        flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC
        if node.path is not None:
            dfd, name = self._loc(node)
            fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=dfd)
        elif node.fds:
            # Reopened through /proc/PID/fd after the last name was removed.
            fd = os.open(f"/proc/self/fd/{next(iter(node.fds))}", flags)
        else:
            raise _errno(errno.ESTALE)
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

    # --- FUSE operations: directories ------------------------------------------------------

    def opendir(self, ino: int) -> int:
        node = self.nodes[ino]
        if node.kind != S_IFDIR:
            raise _errno(errno.ENOTDIR)
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

    # --- FUSE operations: xattrs -----------------------------------------------------------

    def _xattr_target(self, node: Node) -> XTarget:
        if node.path is not None:
            return self._loc(node)
        for fd in node.fds:
            return fd
        raise _errno(errno.ESTALE)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == fp.ROOT_ID and name.startswith(STATS_XATTR):
            if name == STATS_XATTR:
                return self.stats_json().encode()
            raise _errno(errno.ENODATA)
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
                raise _errno(errno.ENODATA)
            return node.caps
        return xattr_get(self._xattr_target(node), name)

    def listxattr(self, ino: int) -> bytes:
        return b"".join(n + b"\0" for n in xattr_list(self._xattr_target(self.nodes[ino])))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        if ino == fp.ROOT_ID and name.startswith(STATS_XATTR):
            if name == RESET_XATTR:
                self.stats.reset()
                return
            raise _errno(errno.EPERM)
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


class _ArgumentParser(argparse.ArgumentParser):
    """Raises ValueError instead of exiting when ``raise_errors`` (a forked server reports
    its errors to whoever asked for the mount)."""

    raise_errors = False

    def error(self, message: str) -> NoReturn:
        if self.raise_errors:
            raise ValueError(message)
        super().error(message)


def _parser() -> _ArgumentParser:
    p = _ArgumentParser(
        prog="python -m layerfs_drivers.aufs.unionfs",
        description="Mount a union of branches with AUFS semantics (FUSE).")
    p.add_argument("--foreground", action="store_true", help="serve in this process")
    p.add_argument("--entry-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="kernel cache time for names, found or not (default %(default)s)")
    p.add_argument("--attr-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="kernel cache time for attributes (default %(default)s)")
    p.add_argument("--keep-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep file pages cached across opens (default on)")
    p.add_argument("--passthrough", action=argparse.BooleanOptionalAction, default=True,
                   help="let the kernel read and write backing files directly where it can "
                        "(FUSE passthrough, Linux >= 6.9; default on)")
    p.add_argument("--dirren", action="store_true",
                   help="rename directories that exist in lower branches (AUFS's dirren) "
                        "instead of failing with EXDEV")
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


def _write_stats(fs: UnionFS, path: str | None) -> None:
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(fs.stats_json() + "\n")
    os.replace(tmp, path)


def _set_readahead(mountpoint: str, kb: int) -> None:
    """Raise the readahead of this mount's bdi (the kernel's default is 128 KiB).

    Reads served here are answered one request at a time, so a sequential
    reader is bound by round trips: 1 MiB of readahead keeps requests queued
    (bench/layerfs_bench/aufs_fuse.py seq_read). Files in passthrough use their backing
    filesystem's readahead instead. Needs root; without it the default stays.
    """
    dev = fp.device_of_mount(mountpoint)
    if dev is None:
        return
    try:
        with open(f"/sys/class/bdi/{dev[0]}:{dev[1]}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(kb))
    except OSError as err:
        log.info("cannot set the readahead of %s: %s", mountpoint, err)


class _Server:
    """Signals around :meth:`fuseproto.Session.serve`: SIGTERM, SIGINT and SIGHUP stop it
    between requests (a request in progress is finished first); SIGUSR1 writes the stats."""

    def __init__(self, fs: UnionFS, session: fp.Session, stats_file: str | None) -> None:
        self.fs = fs
        self.session = session
        self.stats_file = stats_file
        self.stopping = False

    def _signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1:
            _write_stats(self.fs, self.stats_file)
            return
        self.stopping = True
        if not self.session.busy:
            raise fp.Stop()

    def run(self) -> bool:
        """Serve until unmounted (False) or stopped by a signal (True)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._signal)
        self.session.stop_check = lambda: self.stopping
        try:
            self.session.serve()
        except fp.Stop:
            return True
        return self.stopping


def _run(args: argparse.Namespace, dirs: list[str], writable: bool,
         ready: Callable[[], None]) -> int:
    if args.log:  # here: the daemon has closed every fd it inherited
        logging.basicConfig(filename=args.log, level=logging.INFO,
                            format="%(asctime)s %(process)d %(levelname)s %(message)s")
    fs = UnionFS(dirs, writable=writable, entry_timeout=args.entry_timeout,
                 attr_timeout=args.attr_timeout, keep_cache=args.keep_cache,
                 copyup_fsync=args.copyup_fsync, dirren=args.dirren,
                 passthrough=args.passthrough)
    os.umask(0)  # modes come from the kernel with the caller's umask applied
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))  # redirect chains
    # One backing fd per open file in the union, and cached directory fds.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mountpoint = _real_dir(args.mountpoint)
    try:
        fd = fp.mount(mountpoint, FSTYPE, FSTYPE, readonly=not writable)
    except BaseException:
        fs.close()
        raise
    stopped = True
    try:
        session = fp.Session(fd, fs, want_passthrough=args.passthrough)
        fs.session = session
        session.between = fs.between_requests
        session.init()
        if args.readahead_kb > 0:
            # Only reads served here use it: set it when the first such file opens,
            # not on the way to reporting the mount live.
            kb = args.readahead_kb
            fs.on_first_cached_open = lambda: _set_readahead(mountpoint, kb)
        ready()
        stopped = _Server(fs, session, args.stats_file).run()
    finally:
        if stopped:
            with contextlib.suppress(OSError):
                fp.unmount(mountpoint)
        os.close(fd)
        _write_stats(fs, args.stats_file)
        fs.close()
    return 0


def _close_inherited(keep: int) -> None:
    max_fd = os.sysconf("SC_OPEN_MAX")
    os.closerange(3, keep)
    os.closerange(keep + 1, max_fd)


def _real_dir(path: str) -> str:
    """The canonical path of a directory, resolved by the kernel in one open (a realpath()
    in Python costs an lstat per component)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise ValueError(f"{path}: not a directory ({err.strerror})") from None
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _validate(args: argparse.Namespace) -> tuple[list[str], bool]:
    dirs, writable = parse_branches(args.branches)
    dirs = [os.path.abspath(d) for d in dirs]
    args.mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(args.mountpoint):
        raise ValueError(f"{args.mountpoint}: mount point is not a directory")
    real_mnt = _real_dir(args.mountpoint)
    for d in dirs:
        real = _real_dir(d)
        if real_mnt == real or real_mnt.startswith(real.rstrip("/") + "/"):
            # Serving a lookup would then wait for this very server.
            raise ValueError(f"{args.mountpoint}: mount point is inside branch {d}")
    return dirs, writable


def _serve_detached(args: argparse.Namespace, dirs: list[str], writable: bool,
                    notify_fd: int) -> NoReturn:
    """In a forked child: become a daemon, mount, report "R" (or "E" + the error) on
    ``notify_fd``, serve until unmounted, exit."""
    code = 1
    try:
        os.setsid()
        os.chdir("/")
        _close_inherited(notify_fd)
        null = os.open(os.devnull, os.O_RDWR)
        # stderr stays the caller's until the mount is live; then nothing of the caller's
        # stays open (it may be waiting for EOF on its pipes).
        os.dup2(null, 0)
        os.dup2(null, 1)

        def ready() -> None:
            os.dup2(null, 2)
            os.write(notify_fd, b"R")
            os.close(notify_fd)

        code = _run(args, dirs, writable, ready)
    except BaseException as err:  # report to whoever waits, never return to its caller
        if args.log:
            log.exception("unionfs server failed")
        # Nothing of the branches may stay open once the waiter hears of the failure
        # (it may unmount them at once: EBUSY), so close every fd before reporting.
        _close_inherited(notify_fd)
        with contextlib.suppress(OSError):
            os.write(notify_fd, b"E" + str(err).encode(errors="replace"))
    finally:
        os._exit(code)


_forked_parser: _ArgumentParser | None = None


def warm_up(*, touch: bool = False) -> None:
    """Do once, in a fork server, the work every forked server would repeat: building
    the argument parser costs ~5 ms the first time in a process (gettext lookups).
    ``touch``: in a server forked ahead of its request, run a parse now, so the memory
    pages it writes are copied from the fork server before the request, not during it."""
    global _forked_parser
    if _forked_parser is None:
        _forked_parser = _parser()
        _forked_parser.raise_errors = True
    if touch:
        _forked_parser.parse_args(["--readahead-kb", "1", "/:rw", "/:ro", "/"])


def serve_forked(argv: list[str], notify_fd: int) -> NoReturn:
    """The server side of a fork server: ``argv`` as for the helper (options, branches,
    mount point); reports on ``notify_fd`` like the helper's daemon child, then serves."""
    warm_up()
    parser = _forked_parser
    assert parser is not None
    try:
        args = parser.parse_args(argv)
        dirs, writable = _validate(args)
    except ValueError as err:
        with contextlib.suppress(OSError):
            os.write(notify_fd, b"E" + str(err).encode(errors="replace"))
        os._exit(2)
    _serve_detached(args, dirs, writable, notify_fd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        dirs, writable = _validate(args)
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
    if pid == 0:
        os.close(rfd)
        _serve_detached(args, dirs, writable, wfd)
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


if __name__ == "__main__":
    sys.exit(main())
