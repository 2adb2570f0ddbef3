"""Per-layer file indexes: what each layer's diff holds, read once and kept in the store.

A layer's *index* is the list of entries its diff carries, as an OCI layer tar would
carry them: files, directories, links and devices with their mode, owner, size and
mtime, and the deletions, whiteouts (``.wh.NAME``: NAME is deleted below this layer) and
opaque directories (``.wh..wh..opq``: nothing below shows through). Everything
``layerfs explain``, ``image explore`` and ``image diff`` say is computed from indexes;
no command reads a layer's files to answer.

Where an index comes from, cheapest first:

* **tar-split**: an image layer keeps the record of its tar's headers that ``save``
  replays (:mod:`layerfs.tar.split`); read with the layer reader over a skeleton of the
  tar, it lists the members without opening one file of the layer.
* **diff**: any other layer (made with ``layer apply``, a container's read-write layer)
  is read through the driver's own diff (:meth:`LayerStore.diff`), streamed through the
  same reader as it is produced and never stored.

A read-only layer never changes, so its index is kept in the metastore (tables
``layer_index`` and ``layer_files``, schema 2), written in one transaction and removed
with the layer (ON DELETE CASCADE). A read-write layer changes whenever it is written:
it is read afresh on every call and never cached.

Entries are normalized the way :func:`~layerfs.tar.apply_layer` applies them: names
relative, without ``.``/empty components; a directory the tar implies but does not list
gets an *implicit* entry, so every entry's parent is in the index (as it is on disk).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ..changes import AUFS_META_PREFIX, WHITEOUT_OPAQUE, WHITEOUT_PREFIX
from ..errors import CorruptState, LayerfsError
from ..layers import LayerStore
from ..tar import header as tarh
from ..tar.apply import _split_name
from ..tar.reader import TarReader
from ..tar.split import TarSplitSkeleton

if TYPE_CHECKING:
    from ..images.catalog import Catalog

#: Version of what an index row means; a stored index of another format is rebuilt.
INDEX_FORMAT = 1

FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO, WHITEOUT = "f", "d", "l", "h", "c", "b", "p", "w"
KIND_NAMES = {FILE: "file", DIR: "directory", SYMLINK: "symlink", HARDLINK: "hardlink",
              CHAR: "char device", BLOCK: "block device", FIFO: "fifo", WHITEOUT: "whiteout"}
_TAR_KINDS = {tarh.REG: FILE, tarh.DIR: DIR, tarh.SYM: SYMLINK, tarh.LNK: HARDLINK,
              tarh.CHR: CHAR, tarh.BLK: BLOCK, tarh.FIFO: FIFO}
_MODE_BITS = {FILE: 0o100000, DIR: 0o040000, SYMLINK: 0o120000, HARDLINK: 0o100000,
              CHAR: 0o020000, BLOCK: 0o060000, FIFO: 0o010000, WHITEOUT: 0}

OPAQUE_FLAG = 1
IMPLICIT_FLAG = 2


class Entry(NamedTuple):
    """One entry of a layer's diff. ``path`` is relative: ``usr/bin/env``.

    A named tuple, not a dataclass: an image holds tens of thousands and the explorer
    loads them all from the store on every start.
    """

    path: str
    kind: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    link: str = ""
    flags: int = 0

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def is_whiteout(self) -> bool:
        return self.kind == WHITEOUT

    @property
    def opaque(self) -> bool:
        return bool(self.flags & OPAQUE_FLAG)

    @property
    def implicit(self) -> bool:
        return bool(self.flags & IMPLICIT_FLAG)

    @property
    def st_mode(self) -> int:
        """Type and permission bits, as ``stat`` reports them."""
        return _MODE_BITS[self.kind] | self.mode

    def as_row(self) -> tuple[Any, ...]:
        return (os.fsencode(self.path), self.kind, self.mode, self.uid, self.gid, self.size,
                self.mtime_ns, os.fsencode(self.link) if self.link else None, self.flags)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Entry:
        path, kind, mode, uid, gid, size, mtime, link, flags = row
        return cls(path.decode("utf-8", "surrogateescape"), kind, mode, uid, gid, size, mtime,
                   link.decode("utf-8", "surrogateescape") if link else "", flags)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": "/" + self.path, "kind": KIND_NAMES[self.kind]}
        if self.kind != WHITEOUT:
            d.update(mode=f"{self.mode:04o}", uid=self.uid, gid=self.gid, size=self.size,
                     mtime=self.mtime_ns // 1_000_000_000)
        if self.link:
            d["link"] = self.link
        if self.opaque:
            d["opaque"] = True
        if self.implicit:
            d["implicit"] = True
        return d


@dataclass
class LayerIndex:
    """A layer's entries by path, with where they were read and their total bytes."""

    layer_id: str
    entries: dict[str, Entry]
    source: str
    bytes: int

    def get(self, path: str) -> Entry | None:
        return self.entries.get(path)


def _corrupt(what: str, msg: str) -> CorruptState:
    return CorruptState(f"{what}: {msg}")


def entries_from_tar(stream: io.BufferedIOBase, what: str) -> list[Entry]:
    """The entries of a layer tar, in archive order (whiteouts and opaque markers turned
    into entries and flags, implicit parents added). ``what`` names the layer in errors.

    A tar that a layer could not have been applied from (a whiteout that is a directory,
    a whiteout of ``.``, a hardlink out of the layer) means the layer's record or files
    are damaged: :class:`CorruptState`, naming the entry.
    """
    reader = TarReader(stream)
    out: dict[str, Entry] = {}
    opaque: set[str] = set()
    seen_dirs: set[str] = set()

    def add_parents(parts: tuple[str, ...]) -> None:
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen_dirs:
                seen_dirs.add(parent)
                if parent not in out:
                    out[parent] = Entry(parent, DIR, flags=IMPLICIT_FLAG)

    while True:
        try:
            h = reader.next()
        except LayerfsError as err:
            raise _corrupt(what, str(err)) from err
        if h is None:
            break
        try:
            parts = _split_name(h.name)
        except LayerfsError as err:
            raise _corrupt(what, str(err)) from err
        if not parts:
            continue  # the layer root ("./")
        if any(part.startswith(WHITEOUT_PREFIX) for part in parts[:-1]):
            raise _corrupt(what, f"corrupt whiteout: {h.name!r} is inside a whiteout "
                                 f"(a whiteout is an empty file, it holds nothing)")
        name = parts[-1]
        kind = _TAR_KINDS.get(h.kind)
        if name.startswith(WHITEOUT_PREFIX):
            if kind == DIR:
                raise _corrupt(what, f"corrupt whiteout {h.name!r}: a whiteout is a file, "
                                     f"not a directory")
            dir_parts = parts[:-1]
            add_parents(parts)
            if name == WHITEOUT_OPAQUE:
                target = "/".join(dir_parts)
                if not target:
                    raise _corrupt(what, f"corrupt whiteout {h.name!r}: the layer root "
                                         f"cannot be opaque")
                opaque.add(target)
                continue
            if name.startswith(AUFS_META_PREFIX):
                continue  # aufs bookkeeping (.wh..wh.plnk, ...), not a deletion
            hidden = name[len(WHITEOUT_PREFIX):]
            if hidden in ("", ".", ".."):
                raise _corrupt(what, f"corrupt whiteout {h.name!r}: it names no entry")
            path = "/".join((*dir_parts, hidden))
            if path not in out or out[path].implicit:
                out[path] = Entry(path, WHITEOUT, 0, 0, 0, 0, h.mtime_ns)
            continue
        if kind is None:
            raise _corrupt(what, f"entry {h.name!r} has unsupported type {h.kind!r}")
        path = "/".join(parts)
        add_parents(parts)
        size = h.size
        link = h.linkname
        if kind == HARDLINK:
            try:
                target = "/".join(_split_name(link))
            except LayerfsError as err:
                raise _corrupt(what, str(err)) from err
            linked = out.get(target)
            if linked is None or linked.kind not in (FILE, HARDLINK):
                raise _corrupt(what, f"hardlink {h.name!r} points at {link!r}, which is not "
                                     f"a file of this layer")
            link, size = target, linked.size
        if kind == DIR:
            seen_dirs.add(path)
        out[path] = Entry(path, kind, h.mode, h.uid, h.gid, size, h.mtime_ns, link)
    for path in opaque:
        e = out[path]
        if e.kind != DIR:
            raise _corrupt(what, f"corrupt whiteout {path + '/' + WHITEOUT_OPAQUE!r}: "
                                 f"{path!r} is not a directory in this layer")
        out[path] = e._replace(flags=e.flags | OPAQUE_FLAG)
    return list(out.values())


def data_bytes(entries: list[Entry]) -> int:
    """Bytes of file data the entries carry (hardlinks carry none): a layer tar's payload,
    and the layer size dive reports."""
    return sum(e.size for e in entries if e.kind == FILE)


class Indexer:
    """Builds, caches and loads layer indexes of one root. With the root's images, image
    layers are read from their tar-split records."""

    def __init__(self, layers: LayerStore, images: Catalog | None = None) -> None:
        self.layers = layers
        self.store = layers.store
        self.images = images

    def tar_split_of(self, layer_id: str) -> tuple[bytes, int | None] | None:
        return None if self.images is None else self.images.tar_split_of(layer_id)

    def cached(self, layer_id: str) -> bool:
        info = self.store.index_info(layer_id)
        return info is not None and info.format == INDEX_FORMAT

    def index(self, layer_id: str) -> LayerIndex:
        """The layer's index: from the store if kept, else read (and kept if read-only)."""
        rec = self.layers.get(layer_id)
        if rec.readonly:
            info = self.store.index_info(layer_id)
            if info is not None and info.format == INDEX_FORMAT:
                entries = [Entry.from_row(r) for r in self.store.index_rows(layer_id)]
                return LayerIndex(layer_id, {e.path: e for e in entries}, info.source,
                                  info.bytes)
        entries, source = self.read(layer_id)
        total = data_bytes(entries)
        if rec.readonly:
            self.store.save_index(layer_id, format=INDEX_FORMAT, source=source,
                                  rows=[e.as_row() for e in entries], total_bytes=total)
        return LayerIndex(layer_id, {e.path: e for e in entries}, source, total)

    def lookup(self, layer_id: str, paths: list[str]) -> LayerIndex:
        """Only the entries of ``paths`` in the layer (indexing it first if needed)."""
        rec = self.layers.get(layer_id)
        if not rec.readonly or not self.cached(layer_id):
            full = self.index(layer_id)
            wanted = {p: full.entries[p] for p in paths if p in full.entries}
            return LayerIndex(layer_id, wanted, full.source, full.bytes)
        info = self.store.index_info(layer_id)
        assert info is not None
        rows = self.store.index_lookup(layer_id, [os.fsencode(p) for p in paths])
        entries = [Entry.from_row(r) for r in rows]
        return LayerIndex(layer_id, {e.path: e for e in entries}, info.source, info.bytes)

    def read(self, layer_id: str) -> tuple[list[Entry], str]:
        """Read a layer's entries afresh: (entries, source)."""
        what = f"layer {layer_id[:12]}"
        split = self.tar_split_of(layer_id)
        if split is not None:
            record, tar_size = split
            skeleton = TarSplitSkeleton(record, tar_size if tar_size is not None else 1 << 62,
                                        what)
            with io.BufferedReader(skeleton, buffer_size=1 << 20) as stream:
                return entries_from_tar(stream, what), "tar-split"
        with self._diff_stream(layer_id) as stream:
            return entries_from_tar(stream, what), "diff"

    @contextlib.contextmanager
    def _diff_stream(self, layer_id: str) -> Iterator[io.BufferedIOBase]:
        """The layer's diff tar as a stream, produced by the driver in a thread.

        ``LayerStore.diff`` writes; the tar reader reads. A pipe joins them so the tar is
        never stored whole; if the reader stops early (a corrupt entry), closing the read
        end makes the writer fail with EPIPE and end.
        """
        rfd, wfd = os.pipe()
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                with open(wfd, "wb", buffering=1 << 20) as out:
                    self.layers.diff(layer_id, out)
            except BrokenPipeError:
                pass
            except BaseException as err:
                failure.append(err)

        thread = threading.Thread(target=produce, name=f"diff-{layer_id[:12]}", daemon=True)
        reader = io.BufferedReader(io.FileIO(rfd, "rb"), buffer_size=1 << 20)
        thread.start()
        try:
            yield reader
        except LayerfsError:
            reader.close()
            thread.join()
            if failure:
                raise self._failed(layer_id, failure[0]) from failure[0]
            raise
        finally:
            reader.close()
            thread.join()
        if failure:
            raise self._failed(layer_id, failure[0]) from failure[0]

    @staticmethod
    def _failed(layer_id: str, err: BaseException) -> LayerfsError:
        if isinstance(err, LayerfsError):
            return err
        return CorruptState(f"layer {layer_id[:12]}: cannot read its diff: {err}")
