"""Writing layer tars: from a tree plus its changes (:func:`export_changes`, the naive
diff of any driver), or from a union driver's diff directory (:func:`export_native`,
translating its on-disk whiteouts into the OCI ones).

The writer produces PAX tars: a ustar header per member, plus a PAX header whenever
ustar cannot hold a value (:mod:`.header` encodes both).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from ..changes import (
    AUFS_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    Change,
    ChangeKind,
    WhiteoutFormat,
    check_overlay_features,
    read_xattrs,
)
from ..errors import InvalidArgument, LayerfsError, NotFound
from .header import BLK, BLOCK, CHR, DIR, FIFO, LNK, REG, SYM, pax_record, pax_time, ustar_block
from .stream import COPY_BUFSIZE

log = logging.getLogger(__name__)

_IFMT_KIND = {stat.S_IFREG: REG, stat.S_IFLNK: SYM, stat.S_IFCHR: CHR, stat.S_IFBLK: BLK,
              stat.S_IFDIR: DIR, stat.S_IFIFO: FIFO}


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _TarWriter:
    """Writes PAX tars: ustar headers, plus a PAX header whenever ustar cannot hold a value.

    Small headers and file contents are gathered into one buffer and written in
    large pieces; big files go straight from the file to ``out``.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._buf = bytearray()

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= COPY_BUFSIZE:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._out.write(self._buf)
            self._buf = bytearray()

    def header(self, name: str, kind: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
               size: int = 0, mtime_ns: int = 0, linkname: str = "", devmajor: int = 0,
               devminor: int = 0, xattrs: dict[str, bytes] | None = None) -> None:
        records: list[bytes] = []
        binary = False
        name_b = os.fsencode(name)
        link_b = os.fsencode(linkname)
        for key, value in (("path", name_b), ("linkpath", link_b)):
            if len(value) > 100 or not value.isascii():
                records.append(pax_record(key, value))
                binary = binary or not _is_utf8(value)
        for key, num in (("uid", uid), ("gid", gid)):
            if num >= 8 ** 7:
                records.append(pax_record(key, str(num).encode()))
        if size >= 8 ** 11:
            records.append(pax_record("size", str(size).encode()))
        secs = mtime_ns // 1_000_000_000
        if mtime_ns % 1_000_000_000 or not 0 <= secs < 8 ** 11:
            records.append(pax_record("mtime", pax_time(mtime_ns)))
        for key, value in sorted((xattrs or {}).items()):
            records.append(pax_record("SCHILY.xattr." + key, value))
        if records:
            if binary:
                # Names that are not UTF-8 are stored as raw bytes; say so (GNU tar
                # does the same), so that readers don't "fix" the encoding.
                records.insert(0, pax_record("hdrcharset", b"BINARY"))
            data = b"".join(records)
            base = name_b.rstrip(b"/").rsplit(b"/", 1)[-1]
            pax_name = (b"PaxHeaders.0/" + base)[:100]
            self._emit(ustar_block(pax_name, b"x", 0o644, 0, 0, len(data),
                                   max(0, min(secs, 8 ** 11 - 1)), b"", 0, 0))
            self._emit(data)
            self._emit(bytes(-len(data) % BLOCK))
        self._emit(ustar_block(name_b[:100], kind, mode, min(uid, 8 ** 7 - 1),
                               min(gid, 8 ** 7 - 1), size if size < 8 ** 11 else 0,
                               max(0, min(secs, 8 ** 11 - 1)), link_b[:100], devmajor, devminor))

    def data(self, fd: int, size: int, what: str) -> None:
        """Copy exactly ``size`` bytes of file data from ``fd``, then the padding."""
        left = size
        if size < COPY_BUFSIZE:
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                self._emit(chunk)
                left -= len(chunk)
        else:
            self.flush()
            buf = bytearray(COPY_BUFSIZE)
            view = memoryview(buf)
            while left > 0:
                got = os.readv(fd, [view[:min(left, COPY_BUFSIZE)]])
                if not got:
                    break
                self._out.write(view[:got])
                left -= got
        if left:
            raise LayerfsError(f"exporting layer: {what} shrank while being read")
        self._emit(bytes(-size % BLOCK))

    def close(self) -> None:
        self._emit(bytes(2 * BLOCK))
        self.flush()


class _Exporter:
    """Writes tree entries into a tar, once each, tracking hardlinks and the size."""

    def __init__(self, root: str, out: IO[bytes]) -> None:
        self.root = root
        self.w = _TarWriter(out)
        self.size = 0
        self.emitted: set[str] = set()
        self.links: dict[tuple[int, int], str] = {}
        self.dir_mtimes: dict[str, int] = {}

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def ancestors(self, rel: str) -> None:
        """Emit the directories above ``rel`` that are not in the tar yet, top-down."""
        missing: list[str] = []
        parent = rel.rpartition("/")[0]
        while parent and parent not in self.emitted:
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        for parent in reversed(missing):
            st = self.lstat(parent)
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"exporting layer: /{parent} is not a directory in "
                                      f"{self.root}, but /{rel} is below it")
            self.entry(parent, st)

    def lstat(self, rel: str) -> os.stat_result:
        try:
            return os.lstat(self.path(rel))
        except FileNotFoundError:
            raise NotFound(f"exporting layer: /{rel} does not exist in {self.root}") from None

    def entry(self, rel: str, st: os.stat_result | None = None) -> None:
        if rel in self.emitted:
            return
        base = rel.rsplit("/", 1)[-1]
        if base.startswith(WHITEOUT_PREFIX):
            raise InvalidArgument(f"exporting layer: /{rel} cannot be represented in a layer "
                                  f"tar (its name would read as a whiteout)")
        if st is None:
            st = self.lstat(rel)
        self.emitted.add(rel)
        path = self.path(rel)
        kind = _IFMT_KIND.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            log.warning("exporting layer: skipping socket /%s (tar cannot hold sockets)", rel)
            return
        xattrs = read_xattrs(path)
        if kind == DIR:
            self.dir_mtimes[rel] = st.st_mtime_ns
            self.header(rel + "/", DIR, st, xattrs)
            return
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.links.get(key)
            if first is not None:
                self.header(rel, LNK, st, xattrs, linkname=first)
                return
            self.links[key] = rel
        if kind == REG:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                self.header(rel, REG, st, xattrs, size=st.st_size)
                self.w.data(fd, st.st_size, f"/{rel}")
            finally:
                os.close(fd)
            self.size += st.st_size
        elif kind == SYM:
            self.header(rel, SYM, st, xattrs, linkname=os.readlink(path))
        elif kind in (CHR, BLK):
            self.header(rel, kind, st, xattrs, devmajor=os.major(st.st_rdev),
                        devminor=os.minor(st.st_rdev))
        else:
            self.header(rel, kind, st, xattrs)

    def header(self, name: str, kind: bytes, st: os.stat_result, xattrs: dict[str, bytes],
               *, size: int = 0, linkname: str = "", devmajor: int = 0,
               devminor: int = 0) -> None:
        self.w.header(name, kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                      mtime_ns=st.st_mtime_ns, xattrs=xattrs, size=size, linkname=linkname,
                      devmajor=devmajor, devminor=devminor)

    def whiteout(self, rel: str, name: str | None = None, mtime_ns: int | None = None) -> None:
        """Write the OCI whiteout for ``rel`` (``name`` overrides the member name)."""
        parts = rel.rsplit("/", 1)
        parent = parts[0] if len(parts) == 2 else ""
        member = name or (f"{parent}/" if parent else "") + WHITEOUT_PREFIX + parts[-1]
        if member in self.emitted:
            return
        self.emitted.add(member)
        if mtime_ns is None:
            # The parent's mtime rather than "now" (Docker): the same tree always
            # gives the same tar.
            mtime_ns = self.dir_mtimes.get(parent)
            if mtime_ns is None:
                mtime_ns = self.lstat(parent).st_mtime_ns
        self.w.header(member, REG, mode=0o644, mtime_ns=mtime_ns)


def _change_rel(change: Change) -> str:
    path = change.path
    if not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"exporting layer: change path {path!r} is not absolute")
    parts = path.split("/")[1:]
    if path == "/":
        return ""
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"exporting layer: change path {path!r} is not normalised")
    return "/".join(parts)


def _export_order(change: Change) -> str:
    """Sort key of a change in an exported tar: by path, except that a directory's
    whiteouts come right after the directory's own entry, before its other entries.

    The OCI layer spec asks for whiteouts before their sibling entries (an applier
    that hides the parent's names when it meets the whiteout, as Docker's does,
    then never deletes what this layer wrote). A NUL after the parent's path sorts
    below any name. Without deletions this is plain path order, the order every
    layer was exported in before, so ids of such layers did not move.
    """
    if change.kind is ChangeKind.DELETE:
        parent, _, name = change.path.rpartition("/")
        return f"{parent}/\0{name}"
    return change.path


def export_changes(tree: Path, changes: Iterable[Change], out: IO[bytes]) -> int:
    """Write the changeset ``changes`` of the full tree ``tree`` to ``out`` as a PAX tar.

    ADD and MODIFY entries are copied from ``tree``; a DELETE becomes an empty
    ``.wh.NAME`` file in its parent directory. Every changed path's parent
    directories are written before it (unchanged ones included), so that
    applying the tar onto another driver's empty diff directory gives them
    their real owner, mode and xattrs. Entries go in path order, except that
    each directory's whiteouts come right after the directory, before its
    other entries (the OCI spec's order); so for one path a DELETE goes before
    an ADD/MODIFY, and "delete then re-create" applies in that order.

    Hardlinks: the first path of an inode is written with its content, later
    ones as hardlink members pointing at it. xattrs go in ``SCHILY.xattr.*``
    PAX records (binary values kept byte for byte), except overlay's private
    ``trusted.overlay.*`` and ``user.overlay.*``. mtimes keep nanoseconds. Sockets are skipped (tar
    cannot hold them). Owner names are left empty: ids are what counts.

    Returns the layer size: the sum of ``st_size`` of the regular files whose
    content was written (each hardlinked inode once).
    """
    root = os.fspath(tree)
    ex = _Exporter(root, out)
    for change in sorted(changes, key=_export_order):
        rel = _change_rel(change)
        if not rel:
            continue  # the layer root itself is not part of a changeset
        ex.ancestors(rel)
        if change.kind is ChangeKind.DELETE:
            ex.whiteout(rel)
        else:
            ex.entry(rel)
    ex.w.close()
    return ex.size


def export_native(diff_dir: Path, fmt: WhiteoutFormat, out: IO[bytes]) -> int:
    """Tar a union driver's diff directory, translating its whiteouts to OCI ones.

    * OVERLAY / OVERLAY_USER: a char device 0/0 becomes ``.wh.NAME``; a
      directory with the opaque xattr is written, followed at once by
      ``DIR/.wh..wh..opq`` (as Docker's overlay2 does). overlay's private
      xattrs are not copied. Directories using ``redirect`` or ``metacopy`` are
      refused (see :func:`~layerfs.changes.check_overlay_features`).
    * AUFS: ``.wh.NAME`` and ``.wh..wh..opq`` are kept (as empty files, never as
      hardlinks to aufs's shared whiteout inode); aufs's root-level
      bookkeeping (``.wh..wh.plnk``, ``.wh..wh.aufs``, ``.wh..wh.orph``) is left out.

    Entries are written in sorted order, parents first, and in each directory
    its whiteouts (opaque marker included) before its other entries; the diff's
    root itself is not written. Returns the size, as :func:`export_changes` does.
    """
    if fmt is WhiteoutFormat.IN_PLACE:
        raise InvalidArgument("export_native: an IN_PLACE layer has no native diff; "
                              "use export_changes with naive_changes")
    root = os.fspath(diff_dir)
    if not os.path.isdir(root):
        raise NotFound(f"export_native: {root} is not a directory")
    ex = _Exporter(root, out)
    opaque_key = fmt.opaque_xattr

    def is_whiteout(name: str, st: os.stat_result) -> bool:
        if fmt is WhiteoutFormat.AUFS:
            return name.startswith(WHITEOUT_PREFIX)
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    # Pre-order, without recursion: a stack of iterators over sorted listings, each
    # directory's whiteouts first (the OCI spec's order; see _export_order).
    def listing(rel: str) -> Iterator[tuple[str, os.stat_result]]:
        with os.scandir(ex.path(rel)) as it:
            entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        return iter(sorted(entries, key=lambda e: (not is_whiteout(*e), e[0])))

    stack = [("", listing(""))]
    while stack:
        rel, entries = stack[-1]
        item = next(entries, None)
        if item is None:
            stack.pop()
            continue
        name, st = item
        crel = f"{rel}/{name}" if rel else name
        if fmt is WhiteoutFormat.AUFS:
            if not rel and name.startswith(AUFS_META_PREFIX) and name != WHITEOUT_OPAQUE:
                continue
            if name.startswith(WHITEOUT_PREFIX):
                ex.whiteout(crel, name=crel, mtime_ns=st.st_mtime_ns)
                continue
            ex.entry(crel, st)
        else:
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                ex.whiteout(crel, mtime_ns=st.st_mtime_ns)
                continue
            check_overlay_features(ex.path(crel), fmt)
            ex.entry(crel, st)
            if stat.S_ISDIR(st.st_mode):
                assert opaque_key is not None
                try:
                    value = os.getxattr(ex.path(crel), opaque_key, follow_symlinks=False)
                except OSError:
                    value = b""
                if value == b"y":
                    ex.w.header(f"{crel}/{WHITEOUT_OPAQUE}", REG, mode=stat.S_IMODE(st.st_mode),
                                uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)
        if stat.S_ISDIR(st.st_mode):
            stack.append((crel, listing(crel)))

    ex.w.close()
    return ex.size
