"""Applying a layer tar onto a layer directory: :func:`apply_layer`.

Safety. Layer tars come from registries, so :func:`apply_layer` treats every byte as
hostile. It never resolves a name through a symlink: each directory on the way to an
entry is checked with ``lstat`` (and remembered, so the check is done once per
directory, not once per entry). Absolute names, ``..`` components, NUL bytes, duplicate
entries, whiteouts of ``.``/``..``, device nodes posing as whiteouts, hardlinks to
anything that is not an existing non-directory inside the layer, and truncated or
corrupt archives all raise :class:`~layerfs.errors.UnsafeArchive` or
:class:`~layerfs.errors.InvalidArgument` naming the entry. Symlink *targets* are data:
``/bin/sh -> /usr/bin/bash`` is fine, the container resolves it, extraction never does.
Partial content may be left in the destination on error (the store deletes a layer that
failed to apply); nothing is ever written outside it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ..changes import (
    AUFS_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    WhiteoutFormat,
    is_private_xattr,
)
from ..errors import InvalidArgument, LayerfsError, UnsafeArchive
from .header import BLK, CHR, DIR, FIFO, KIND_NAMES, LNK, REG, SYM, Header
from .reader import TarReader, show_name
from .stream import Readable, open_layer_stream_named

log = logging.getLogger(__name__)

# apply_layer turns these OSErrors into InvalidArgument: they mean the archive
# asks for something this filesystem cannot hold, not that the host failed.
_ARCHIVE_ERRNOS = {errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
                   errno.ELOOP, errno.EMLINK, errno.EINVAL, errno.ENOTEMPTY}



def _split_name(name: str, what: str = "entry") -> tuple[str, ...]:
    """Validate a member name and split it into components ("" and "." dropped).

    The empty tuple is the layer root (``.`` or ``./``).
    """
    if not name:
        raise UnsafeArchive(f"layer tar: {what} has an empty name")
    if "\0" in name:
        raise UnsafeArchive(f"layer tar: {what} {show_name(name)} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchive(f"layer tar: {what} {show_name(name)} is an absolute path")
    raw = name.split("/")
    if ".." in raw:
        raise UnsafeArchive(f"layer tar: {what} {show_name(name)} contains a '..' component")
    return tuple(p for p in raw if p and p != ".")



def _rmtree(path: str) -> None:
    """Remove a directory tree without following symlinks and without recursion.

    :func:`shutil.rmtree` recurses once per level, and a layer may nest deeper
    (up to PATH_MAX, ~2000 levels) than Python's recursion limit.
    """
    stack = [(path, False)]
    while stack:
        current, emptied = stack.pop()
        if emptied:
            os.rmdir(current)
            continue
        stack.append((current, True))
        with os.scandir(current) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, False))
                else:
                    os.unlink(e.path)


class _Applier:
    """State of one :func:`apply_layer` run. Paths are relative ("a/b"), "" is dest."""

    def __init__(self, dest: str, fmt: WhiteoutFormat, reader: TarReader) -> None:
        self.root = dest
        self.fmt = fmt
        self.reader = reader
        self.size = 0
        #: every path this tar named (entries, whiteouts, markers): duplicates
        #: are refused, and opaque directories keep exactly these.
        self.written: set[str] = set()
        #: the directories above those paths: this tar has them too, made or not.
        self.written_parents: set[str] = set()
        #: directories verified (by lstat) or made by us to be real directories.
        #: Closed under parents, so removing a path that is not here needs no
        #: cache update.
        self.dirs_ok: set[str] = {""}
        #: directory mode and times, applied after all entries (children change
        #: a directory's mtime; a read-only mode would block non-root writers).
        self.dir_meta: dict[str, tuple[int, int, int]] = {}
        #: IN_PLACE: opaque directories, pruned at the end.
        self.opaque: list[str] = []
        #: native formats: paths hidden by a whiteout marker this tar wrote.
        self.markers: set[str] = set()
        self.entry_name = ""

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    # -- path resolution ---------------------------------------------------

    def ensure_dir(self, parts: tuple[str, ...], create: bool) -> bool:
        """Check that ``parts`` is a real directory inside dest, component by component.

        Missing directories are made (mode 0755, like Docker) when ``create``;
        otherwise a missing one returns False. A symlink anywhere on the way is
        refused: following it could lead out of dest.
        """
        rel = "/".join(parts)
        if rel in self.dirs_ok:
            return True
        cur = ""
        for part in parts:
            cur = f"{cur}/{part}" if cur else part
            if cur in self.dirs_ok:
                continue
            path = self.path(cur)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return False
                os.mkdir(path, 0o755)
                os.chmod(path, 0o755)  # independent of the umask
            else:
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafeArchive(f"layer tar: entry {show_name(self.entry_name)} goes through "
                                        f"the symlink {show_name(cur)}; extraction never follows "
                                        f"symlinks")
                if not stat.S_ISDIR(st.st_mode):
                    raise InvalidArgument(f"layer tar: entry {show_name(self.entry_name)} needs "
                                          f"{show_name(cur)} to be a directory, but it is not")
            self.dirs_ok.add(cur)
        return True

    def forget(self, rel: str) -> None:
        """Drop cached facts about ``rel`` and below after it was removed."""
        self.markers.discard(rel)
        if rel not in self.dirs_ok:
            return
        prefix = rel + "/"
        self.dirs_ok = {d for d in self.dirs_ok if d != rel and not d.startswith(prefix)}
        self.dir_meta = {d: m for d, m in self.dir_meta.items()
                         if d != rel and not d.startswith(prefix)}
        self.markers = {m for m in self.markers if not m.startswith(prefix)}

    def remove(self, rel: str, st: os.stat_result | None = None) -> None:
        """Remove whatever is at ``rel`` (parent already verified), without following it."""
        path = self.path(rel)
        if st is None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
        if stat.S_ISDIR(st.st_mode):
            _rmtree(path)
        else:
            os.unlink(path)
        self.forget(rel)

    def replace(self, rel: str, make: Callable[[], object]) -> None:
        """Run ``make()`` to create ``rel``; if something is there, remove it first."""
        try:
            make()
        except FileExistsError:
            self.remove(rel)
            make()

    # -- metadata ------------------------------------------------------------

    def set_xattrs(self, target: str | int, h: Header, merge: bool = False) -> None:
        """Set the entry's xattrs; with ``merge`` also drop ones it does not list."""
        fd_mode = isinstance(target, int)
        for key, value in h.xattrs.items():
            if is_private_xattr(key):
                # overlay's own xattrs (redirect, origin, metacopy, opaque) would make
                # the kernel look elsewhere; only this module writes them, from whiteouts.
                log.warning("layer tar: dropping xattr %s on %r", key, h.name)
                continue
            try:
                if fd_mode:
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as err:
                # The kernel refuses user.* on symlinks and devices, and some
                # filesystems have no xattrs at all; Docker ignores both.
                if err.errno == errno.EOPNOTSUPP or (
                        err.errno == errno.EPERM and key.startswith("user.")
                        and h.kind not in (REG, DIR)):
                    log.warning("layer tar: cannot set xattr %s on %r: %s", key, h.name,
                                err.strerror)
                    continue
                if err.errno in (errno.E2BIG, errno.ERANGE, errno.ENOSPC):
                    raise InvalidArgument(f"layer tar: entry {show_name(h.name)}: xattr {key} "
                                          f"of {len(value)} bytes does not fit: "
                                          f"{err.strerror}") from None
                raise
        if merge:
            assert isinstance(target, str)
            for key in os.listxattr(target, follow_symlinks=False):
                if (key not in h.xattrs and key != "security.selinux"
                        and not is_private_xattr(key)):
                    os.removexattr(target, key, follow_symlinks=False)

    # -- entries -------------------------------------------------------------

    def entry(self, h: Header) -> None:
        self.entry_name = h.name
        parts = _split_name(h.name)
        if not parts:
            self.root_entry(h)
            return
        if parts[0].startswith(AUFS_META_PREFIX) and parts[0] != WHITEOUT_OPAQUE:
            # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs, ...) that old Docker
            # versions leaked into tars; never layer content. Docker skips it too.
            log.debug("layer tar: skipping aufs metadata %r", h.name)
            return
        for part in parts[:-1]:
            if part.startswith(WHITEOUT_PREFIX):
                raise UnsafeArchive(f"layer tar: entry {show_name(h.name)} has the whiteout {part!r} "
                                    f"as a directory")
        rel = "/".join(parts)
        if rel in self.written:
            raise UnsafeArchive(f"layer tar: duplicate entry {show_name(h.name)}")
        self.written.add(rel)
        parent = rel.rpartition("/")[0]
        while parent and parent not in self.written_parents:
            self.written_parents.add(parent)
            parent = parent.rpartition("/")[0]
        if parts[-1].startswith(WHITEOUT_PREFIX):
            self.whiteout(parts, h)
            return
        self.ensure_dir(parts[:-1], create=True)
        path = self.path(rel)
        kind = h.kind
        was_marker = rel in self.markers
        if was_marker:
            # This tar deleted the path and now writes it again.
            self.markers.discard(rel)
            if self.fmt is WhiteoutFormat.AUFS:
                self.remove("/".join([*parts[:-1], WHITEOUT_PREFIX + parts[-1]]))
        if kind == REG:
            self.regular(rel, path, h)
        elif kind == DIR:
            self.directory(rel, path, h, opaque=was_marker)
        elif kind == LNK:
            self.hardlink(rel, path, h)
        elif kind == SYM:
            if not h.linkname:
                raise InvalidArgument(f"layer tar: symlink {show_name(h.name)} has an empty target")
            self.replace(rel, lambda: os.symlink(h.linkname, path))
            os.chown(path, h.uid, h.gid, follow_symlinks=False)
            self.set_xattrs(path, h)
            self.set_times(path, h)
        else:
            ifmt = {CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}[kind]
            dev = os.makedev(h.devmajor, h.devminor) if kind != FIFO else 0
            self.replace(rel, lambda: os.mknod(path, ifmt | 0o600, dev))
            os.chown(path, h.uid, h.gid, follow_symlinks=False)
            self.set_xattrs(path, h)
            os.chmod(path, h.mode)
            self.set_times(path, h)

    @staticmethod
    def set_times(target: str | int, h: Header) -> None:
        atime = h.atime_ns if h.atime_ns is not None else h.mtime_ns
        if isinstance(target, int):
            os.utime(target, ns=(atime, h.mtime_ns))
        else:
            os.utime(target, ns=(atime, h.mtime_ns), follow_symlinks=False)

    def regular(self, rel: str, path: str, h: Header) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = -1

        def make() -> None:
            nonlocal fd
            fd = os.open(path, flags, 0o600)

        self.replace(rel, make)
        try:
            self.reader.copy_data(fd)
            # chown before chmod (chown clears setuid/setgid) and before the
            # xattrs (chown clears security.capability).
            os.fchown(fd, h.uid, h.gid)
            self.set_xattrs(fd, h)
            os.fchmod(fd, h.mode)
            self.set_times(fd, h)
        finally:
            os.close(fd)
        self.size += h.size

    def directory(self, rel: str, path: str, h: Header, opaque: bool) -> None:
        merge = False
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                merge = True  # a directory onto a directory: take the new metadata
            else:
                self.remove(rel, st)
                os.mkdir(path, 0o700)
        os.chown(path, h.uid, h.gid, follow_symlinks=False)
        self.set_xattrs(path, h, merge=merge)
        self.dirs_ok.add(rel)
        self.dir_meta[rel] = (h.mode, h.atime_ns if h.atime_ns is not None else h.mtime_ns,
                              h.mtime_ns)
        if opaque:
            # Deleted and re-created in this layer: the new directory must not
            # show the old one's contents from below.
            self.make_opaque(rel, h)

    def hardlink(self, rel: str, path: str, h: Header) -> None:
        target_parts = _split_name(h.linkname, f"hardlink {show_name(h.name)} -> target")
        if not target_parts:
            raise UnsafeArchive(f"layer tar: hardlink {show_name(h.name)} points at the layer root")
        if any(p.startswith(WHITEOUT_PREFIX) for p in target_parts):
            raise UnsafeArchive(f"layer tar: hardlink {show_name(h.name)} points at the whiteout "
                                f"{show_name(h.linkname)}")
        target_rel = "/".join(target_parts)
        if target_rel == rel:
            raise UnsafeArchive(f"layer tar: hardlink {show_name(h.name)} points at itself")
        missing = InvalidArgument(f"layer tar: hardlink {show_name(h.name)} -> {show_name(h.linkname)}: the "
                                  f"target does not exist in the layer")
        if not self.ensure_dir(target_parts[:-1], create=False):
            raise missing
        target = self.path(target_rel)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"layer tar: hardlink {show_name(h.name)} -> {show_name(h.linkname)}: the "
                                  f"target is a directory")
        if target_rel in self.markers or (
                self.fmt.is_overlay and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            raise missing  # a whiteout marker stands for a deleted file
        # follow_symlinks=False: a link to a symlink links the symlink itself,
        # as tar means it, instead of whatever the symlink points at.
        self.replace(rel, lambda: os.link(target, path, follow_symlinks=False))

    def root_entry(self, h: Header) -> None:
        if h.kind != DIR:
            raise UnsafeArchive(f"layer tar: entry {show_name(h.name)} would replace the layer root "
                                f"with a {KIND_NAMES[h.kind]}")
        if "" in self.written:
            raise UnsafeArchive(f"layer tar: duplicate entry {show_name(h.name)} (the layer root)")
        self.written.add("")
        os.chown(self.root, h.uid, h.gid, follow_symlinks=False)
        self.set_xattrs(self.root, h, merge=True)
        self.dir_meta[""] = (h.mode, h.atime_ns if h.atime_ns is not None else h.mtime_ns,
                             h.mtime_ns)

    # -- whiteouts -------------------------------------------------------------

    def whiteout(self, parts: tuple[str, ...], h: Header) -> None:
        # Docker writes whiteouts as empty regular files; aufs-made ones can be
        # hardlinks to each other. Anything else named .wh.* is an attack or a bug.
        if h.kind not in (REG, LNK):
            raise UnsafeArchive(f"layer tar: entry {show_name(h.name)} has a whiteout name but is a "
                                f"{KIND_NAMES[h.kind]}")
        base = parts[-1]
        dir_parts = parts[:-1]
        if base == WHITEOUT_OPAQUE:
            self.opaque_marker(dir_parts, h)
            return
        hidden = base[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise UnsafeArchive(f"layer tar: whiteout {show_name(h.name)} names {hidden!r}")
        target_parts = (*dir_parts, hidden)
        target_rel = "/".join(target_parts)
        if target_rel in self.written or target_rel in self.written_parents:
            self.whiteout_below_own(target_rel, h)
            return
        if self.fmt is WhiteoutFormat.IN_PLACE:
            if self.ensure_dir(dir_parts, create=False):
                self.remove(target_rel)
            return
        self.ensure_dir(dir_parts, create=True)
        self.remove(target_rel)
        if self.fmt is WhiteoutFormat.AUFS:
            wh_rel = "/".join(parts)
            self.remove(wh_rel)
            self.empty_file(self.path(wh_rel), h, mode=0o444)
        else:
            path = self.path(target_rel)
            os.mknod(path, stat.S_IFCHR, 0)
            os.chown(path, h.uid, h.gid, follow_symlinks=False)
        self.markers.add(target_rel)

    def whiteout_below_own(self, rel: str, h: Header) -> None:
        """A whiteout of a path this tar already wrote (or wrote below).

        The OCI layer spec: a whiteout hides the *lower* layers' entries only;
        what the same layer has at that path stays, whichever comes first in the
        tar. So ``[x, .wh.x]`` keeps this layer's ``x``, as ``[.wh.x, x]`` does.
        A file of this layer already replaces the parent's; a directory of this
        layer becomes opaque: the parent's entries below it are hidden, this
        layer's stay. (Docker's applier removes the path, this layer's entries
        included: ``[x, .wh.x]`` deletes ``x`` there.)
        """
        try:
            st = os.lstat(self.path(rel))
        except FileNotFoundError:
            return  # this tar only wrote whiteouts below: nothing of the parent shows
        if not stat.S_ISDIR(st.st_mode):
            return
        if self.fmt is WhiteoutFormat.IN_PLACE:
            self.opaque.append(rel)  # pruned at the end: this tar's entries are kept
        else:
            self.make_opaque(rel, h)

    def opaque_marker(self, dir_parts: tuple[str, ...], h: Header) -> None:
        rel = "/".join(dir_parts)
        if self.fmt is WhiteoutFormat.IN_PLACE:
            self.opaque.append(rel)  # pruned at the end: entries may still follow
            return
        self.ensure_dir(dir_parts, create=True)
        self.make_opaque(rel, h)

    def make_opaque(self, rel: str, h: Header) -> None:
        if self.fmt is WhiteoutFormat.AUFS:
            marker = f"{rel}/{WHITEOUT_OPAQUE}" if rel else WHITEOUT_OPAQUE
            self.remove(marker)
            self.empty_file(self.path(marker), h, mode=0o444)
        else:
            key = self.fmt.opaque_xattr
            assert key is not None
            os.setxattr(self.path(rel), key, b"y", follow_symlinks=False)

    @staticmethod
    def empty_file(path: str, h: Header, mode: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.fchown(fd, h.uid, h.gid)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(h.mtime_ns, h.mtime_ns))
        finally:
            os.close(fd)

    # -- the end -----------------------------------------------------------

    def finish(self) -> None:
        if self.opaque:
            self.entry_name = ""
            # What the tar wrote, and every directory above it.
            keep = set(self.written)
            done: set[str] = set()
            for rel in self.written:
                cur = rel
                while cur and cur not in done:
                    done.add(cur)
                    cur = cur.rpartition("/")[0]
                    keep.add(cur)
            for rel in self.opaque:
                dir_parts = tuple(rel.split("/")) if rel else ()
                self.entry_name = f"{rel}/{WHITEOUT_OPAQUE}" if rel else WHITEOUT_OPAQUE
                if self.ensure_dir(dir_parts, create=False):
                    self.prune(rel, keep)
        for rel, (mode, atime, mtime) in self.dir_meta.items():
            path = self.path(rel)
            # By construction (forget() drops removed paths) this is still the
            # directory we made; checked anyway, since chmod follows symlinks.
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise LayerfsError(f"applying layer: {path} is no longer a directory")
            os.chmod(path, mode)
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    def prune(self, rel: str, keep: set[str]) -> None:
        """Remove everything below the opaque directory ``rel`` that this tar did not write."""
        stack = [rel]
        while stack:
            cur = stack.pop()
            with os.scandir(self.path(cur)) as it:
                entries = list(it)
            for e in entries:
                crel = f"{cur}/{e.name}" if cur else e.name
                if crel in keep:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(crel)
                else:
                    self.remove(crel)


def apply_layer(dest: Path, stream: Readable, fmt: WhiteoutFormat) -> int:
    """Extract the layer tar ``stream`` into ``dest``; return its size.

    ``stream`` may be gzip or zstd compressed (see :func:`open_layer_stream`).
    ``dest`` is created if missing. The size is the sum of the regular files'
    sizes, each hardlinked inode counted once, the same number
    :func:`export_changes` and :func:`export_native` return for the tar they
    wrote.

    Whiteouts become ``fmt``'s encoding:

    * IN_PLACE (``dest`` holds a full copy of the parent): ``.wh.NAME`` removes
      ``NAME`` (recursively); an opaque marker removes everything below its
      directory that this tar did not write, whether the marker comes before or
      after the directory's other entries.
    * OVERLAY / OVERLAY_USER: ``.wh.NAME`` becomes a char device 0/0, the opaque
      marker an ``opaque=y`` xattr on the directory.
    * AUFS: ``.wh.NAME`` and ``.wh..wh..opq`` are written as aufs expects (empty
      files, mode 0444).

    A whiteout hides only the parent's entries, never this tar's own (the OCI
    layer spec; Docker differs, see ``_Applier.whiteout_below_own``): ``x`` and
    ``.wh.x`` in one tar, in either order, leave this tar's ``x``; if that is a
    directory, the parent's entries below it are hidden (in the native formats
    it is made opaque). A bare ``.wh.`` and a path named twice are refused.

    An entry replaces whatever is at its path, except that a directory written
    onto a directory is merged: it takes the new owner, mode, times and xattrs
    and keeps its contents. Owners are numeric (names in the tar are ignored).
    Directory modes and times are set last, after their contents. Hardlinks
    get no metadata of their own (it belongs to the inode they share).

    Raises :class:`UnsafeArchive` for hostile content and
    :class:`InvalidArgument` for corrupt, truncated or unsupported archives,
    both naming the entry. On error ``dest`` may hold part of the layer.
    """
    os.makedirs(dest, exist_ok=True)
    # dest itself is the caller's and may sit behind symlinks; resolve it once so
    # that the root entry's lchown/xattrs act on the directory, not on a link.
    dest_s = os.path.realpath(dest)
    reader = TarReader(*open_layer_stream_named(stream))
    applier = _Applier(dest_s, fmt, reader)
    try:
        while (h := reader.next()) is not None:
            applier.entry(h)
        applier.finish()
        reader.drain()
    except LayerfsError:
        raise
    except OSError as err:
        where = f"entry {show_name(applier.entry_name)}" if applier.entry_name else dest_s
        cls = InvalidArgument if err.errno in _ARCHIVE_ERRNOS else LayerfsError
        raise cls(f"applying layer to {dest_s}: {where}: {err.strerror or err}"
                  f"{f' ({err.filename})' if isinstance(err.filename, str) else ''}"
                  ) from err
    return applier.size

