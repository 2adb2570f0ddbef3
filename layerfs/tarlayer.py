"""OCI / Docker layer tars: write them from a tree, apply them onto a layer directory.

A layer tar is an ordinary POSIX tar with two conventions (the OCI image spec,
"Representing Changes"):

* a regular file ``DIR/.wh.NAME`` means "``DIR/NAME`` is deleted";
* a regular file ``DIR/.wh..wh..opq`` means "``DIR`` is opaque": nothing from
  the layers below shows through it, only what this layer puts in it.

Producers differ in how they say "directory replaced". Docker's overlay2 and
aufs drivers write the opaque marker; Docker's naive differ (vfs, btrfs,
devicemapper) and umoci write one ``.wh.`` per deleted child instead. Both are
accepted everywhere.

Three operations:

* :func:`export_changes` turns a tree plus a list of :class:`~layerfs.changes.Change`
  into a tar (the naive diff, any driver).
* :func:`export_native` tars a union driver's diff directory, translating its
  on-disk whiteouts into the OCI ones.
* :func:`apply_layer` extracts a (possibly gzip or zstd compressed) tar into a
  layer directory, translating OCI whiteouts into the destination's
  :class:`~layerfs.changes.WhiteoutFormat`.

Safety. Layer tars come from registries, so :func:`apply_layer` treats every
byte as hostile. It never resolves a name through a symlink: each directory on
the way to an entry is checked with ``lstat`` (and remembered, so the check is
done once per directory, not once per entry). Absolute names, ``..``
components, NUL bytes, duplicate entries, whiteouts of ``.``/``..``, device
nodes posing as whiteouts, hardlinks to anything that is not an existing
non-directory inside the layer, and truncated or corrupt archives all raise
:class:`~layerfs.errors.UnsafeArchive` or :class:`~layerfs.errors.InvalidArgument`
naming the entry. Symlink *targets* are data: ``/bin/sh -> /usr/bin/bash`` is
fine, the container resolves it, extraction never does. Partial content may be
left in the destination on error (the store deletes a layer that failed to
apply); nothing is ever written outside it.

The tar reader and writer are implemented here rather than with :mod:`tarfile`:
``tarfile`` silently treats a corrupt or truncated header in the middle of an
archive as its end (a layer would be half-applied without an error), applies
global PAX headers to later entries, and its stream mode copies data through
small buffers. What is read: ustar, GNU and PAX headers (``path``,
``linkpath``, ``size``, ``uid``, ``gid``, ``mtime``, ``atime``,
``SCHILY.xattr.*``), GNU long names and long link names, base-256 numbers.
Refused as unsupported: sparse files, multi-volume archives and other vendor
types. Global PAX headers (``git archive`` writes one) are read and ignored,
as Go's archive/tar and therefore Docker do.
"""

from __future__ import annotations

import errno
import gzip
import io
import logging
import os
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

import zstandard

from .changes import (
    AUFS_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    Change,
    ChangeKind,
    WhiteoutFormat,
    check_overlay_features,
    is_private_xattr,
    read_xattrs,
)
from .errors import InvalidArgument, LayerfsError, NotFound, UnsafeArchive

__all__ = [
    "WhiteoutFormat",
    "apply_layer",
    "export_changes",
    "export_native",
    "open_layer_stream",
]

log = logging.getLogger(__name__)

BLOCK = 512
#: Reads and writes of file data go in chunks this big; big enough that the
#: per-call cost of Python disappears, small enough to stay in cache.
COPY_BUFSIZE = 1 << 20
#: The most a PAX header or GNU long name may hold. Go's archive/tar uses the
#: same bound; without one a 10 GB "header" would be read into memory.
MAX_SPECIAL_SIZE = 1 << 20
_ZERO_BLOCK = bytes(BLOCK)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}

# Entry kinds, as tar typeflags. AREGTYPE ("\0") and CONTTYPE ("7") are read as
# REG; GNU long names, PAX headers and the like never leave the reader.
REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_KIND_NAMES = {REG: "regular file", LNK: "hardlink", SYM: "symlink", CHR: "char device",
               BLK: "block device", DIR: "directory", FIFO: "fifo"}
_READ_KINDS = {b"0": REG, b"\0": REG, b"7": REG, b"1": LNK, b"2": SYM, b"3": CHR,
               b"4": BLK, b"5": DIR, b"6": FIFO}
_UNSUPPORTED_KINDS = {b"S": "GNU sparse file", b"M": "multi-volume continuation",
                      b"V": "volume label", b"N": "GNU old long name", b"D": "GNU dump dir"}
_IFMT_KIND = {stat.S_IFREG: REG, stat.S_IFLNK: SYM, stat.S_IFCHR: CHR, stat.S_IFBLK: BLK,
              stat.S_IFDIR: DIR, stat.S_IFIFO: FIFO}

_DECOMPRESS_ERRORS: tuple[type[Exception], ...] = (
    EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)

# apply_layer turns these OSErrors into InvalidArgument: they mean the archive
# asks for something this filesystem cannot hold, not that the host failed.
_ARCHIVE_ERRNOS = {errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
                   errno.ELOOP, errno.EMLINK, errno.EINVAL, errno.ENOTEMPTY}


# ---------------------------------------------------------------------------
# Compression


class _Prefixed(io.RawIOBase):
    """A raw stream that replays ``head`` and then reads ``raw``.

    Lets :func:`open_layer_stream` sniff magic bytes from streams that cannot
    seek or peek (pipes, sockets, HTTP bodies). Closing it leaves ``raw`` open:
    the caller owns that.
    """

    def __init__(self, head: bytes, raw: IO[bytes]) -> None:
        self._head = head
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview | bytearray) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        readinto = getattr(self._raw, "readinto", None)
        if readinto is not None:
            return readinto(buf) or 0
        data = self._raw.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def open_layer_stream(raw: IO[bytes]) -> BinaryIO:
    """The uncompressed tar inside ``raw``: gzip and zstd are detected by magic.

    Anything else is returned as is and must then parse as a tar. bzip2 and xz
    (which old Docker versions accepted, but the OCI spec does not) are refused
    with a clear message rather than failing as "corrupt tar". The result reads
    from ``raw`` lazily and does not close it.
    """
    return _open_layer_stream(raw)[0]


def _open_layer_stream(raw: IO[bytes]) -> tuple[BinaryIO, str]:
    """:func:`open_layer_stream`, also naming the compression found ("" for none)."""
    head = b""
    while len(head) < 6:
        chunk = raw.read(6 - len(head))
        if not chunk:
            break
        head += chunk
    buffered = io.BufferedReader(_Prefixed(head, raw), buffer_size=COPY_BUFSIZE)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb"), "gzip"  # type: ignore[return-value]
    if head.startswith(_ZSTD_MAGIC):
        # read_across_frames: multi-frame streams (pzstd, seekable zstd) are one layer.
        # The reader does not notice a stream cut short at the end; the tar
        # reader does, because the end-of-archive marker is then missing.
        reader = zstandard.ZstdDecompressor().stream_reader(
            buffered, read_size=COPY_BUFSIZE, read_across_frames=True, closefd=False)
        return io.BufferedReader(reader, buffer_size=COPY_BUFSIZE), "zstd"
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise InvalidArgument(f"layer stream is {name}-compressed; only gzip, zstd and "
                                  f"uncompressed tars are supported")
    return buffered, ""


# ---------------------------------------------------------------------------
# Reading tars


@dataclass(slots=True)
class _Header:
    """One archive member, after GNU long names and PAX records are merged in."""

    name: str
    kind: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    atime_ns: int | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _corrupt(msg: str) -> InvalidArgument:
    return InvalidArgument(f"layer tar is corrupt: {msg}")


def _nts(field: bytes) -> bytes:
    """A NUL-terminated string field: everything up to the first NUL."""
    i = field.find(b"\0")
    return field if i < 0 else field[:i]


def _parse_number(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        # GNU base-256: 0x80 marks a positive big-endian number, 0xff a
        # negative two's-complement one (used for pre-1970 mtimes).
        if field[0] == 0x80:
            return int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        raise _corrupt(f"bad base-256 {what} field {field!r}")
    digits = _nts(field).strip(b" ")
    if not digits:
        return 0
    # isdigit() first: int() alone would also take "+7", "1_0" and spaces inside.
    if not digits.isdigit():
        raise _corrupt(f"bad octal {what} field {field!r}")
    try:
        return int(digits, 8)
    except ValueError:
        raise _corrupt(f"bad octal {what} field {field!r}") from None


def _parse_decimal(value: bytes, what: str) -> int:
    if not value.isdigit():
        raise _corrupt(f"bad PAX {what} {value!r}")
    return int(value)


def _parse_pax_time(value: bytes, what: str) -> int:
    """A PAX timestamp ("1700000000.123456789", maybe negative) in nanoseconds."""
    negative = value.startswith(b"-")
    body = value[1:] if negative else value
    secs, _, frac = body.partition(b".")
    if not secs.isdigit() or (frac and not frac.isdigit()):
        raise _corrupt(f"bad PAX {what} {value!r}")
    ns = int(secs) * 1_000_000_000 + int((frac + b"000000000")[:9])
    return -ns if negative else ns


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX records ``"LEN KEY=VALUE\\n"``; LEN counts the whole record.

    Values stay bytes: xattr values are binary, and path values are decoded
    like ustar names, with the filesystem encoding.
    """
    records: dict[str, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record
        space = data.find(b" ", pos, pos + 24)
        if space < 0:
            raise _corrupt(f"bad PAX record at offset {pos}")
        length = _parse_decimal(data[pos:space], "record length")
        if length <= space - pos + 1 or pos + length > end or data[pos + length - 1] != 0x0A:
            raise _corrupt(f"bad PAX record length at offset {pos}")
        key, eq, value = data[space + 1:pos + length - 1].partition(b"=")
        if not eq or not key:
            raise _corrupt(f"bad PAX record at offset {pos}")
        records[os.fsdecode(key)] = value
        pos += length
    return records


class _TarReader:
    """Streams the members of a tar; the caller consumes or skips each one's data.

    Strict where :mod:`tarfile` is lenient: every header's checksum is checked,
    a truncated archive (no end-of-archive marker) is an error, and so is a bad
    header after the first.
    """

    def __init__(self, stream: BinaryIO, compression: str = "") -> None:
        self._f = stream
        self._compression = compression
        self._remaining = 0   # data bytes of the current member not yet read
        self._padding = 0     # padding after them, up to the next block
        self._buf = bytearray(COPY_BUFSIZE)
        self.current = ""     # name of the current member, for messages
        self._seen = False    # any block read yet
        self._members = 0     # members returned so far

    # -- raw reads --------------------------------------------------------

    def _read(self, n: int) -> bytes:
        try:
            data = self._f.read(n)
            if len(data) < n:
                parts = [data]
                got = len(data)
                while got < n:
                    more = self._f.read(n - got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
        except _DECOMPRESS_ERRORS as err:
            raise InvalidArgument(f"layer stream is corrupt{self._where()}: {err}") from err
        except OSError as err:
            raise LayerfsError(f"reading layer stream{self._where()}: {err}") from err
        return data

    def _readinto(self, view: memoryview) -> int:
        try:
            return self._f.readinto(view) or 0  # type: ignore[attr-defined]
        except _DECOMPRESS_ERRORS as err:
            raise InvalidArgument(f"layer stream is corrupt{self._where()}: {err}") from err
        except OSError as err:
            raise LayerfsError(f"reading layer stream{self._where()}: {err}") from err

    def _where(self) -> str:
        return f" (in entry {_show(self.current)})" if self.current else ""

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise InvalidArgument(f"layer tar is truncated{self._where()}: {what} cut short")
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            got = self._readinto(memoryview(self._buf)[:min(n, COPY_BUFSIZE)])
            if not got:
                raise InvalidArgument(f"layer tar is truncated{self._where()}: data cut short")
            n -= got

    # -- data of the current member ---------------------------------------

    def copy_data(self, fd: int) -> None:
        """Write the current member's data to ``fd``."""
        view = memoryview(self._buf)
        n = self._remaining
        while n > 0:
            got = self._readinto(view[:min(n, COPY_BUFSIZE)])
            if not got:
                raise InvalidArgument(f"layer tar is truncated{self._where()}: data cut short")
            written = 0
            while written < got:
                written += os.write(fd, view[written:got])
            n -= got
        self._remaining = 0

    def _finish_member(self) -> None:
        self._skip(self._remaining + self._padding)
        self._remaining = self._padding = 0

    def drain(self) -> None:
        """Read the stream to its end: lets gzip verify its trailing CRC and length."""
        while self._readinto(memoryview(self._buf)):
            pass

    # -- headers ----------------------------------------------------------

    def _special(self, size: int, what: str) -> bytes:
        if size > MAX_SPECIAL_SIZE:
            raise InvalidArgument(f"layer tar: {what} of {size} bytes{self._where()} exceeds "
                                  f"the {MAX_SPECIAL_SIZE}-byte limit")
        data = self._read_exact(size, what)
        self._skip(-size % BLOCK)
        return data

    def next(self) -> _Header | None:
        """The next member's header, or None at the end-of-archive marker."""
        self._finish_member()
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        self.current = ""
        while True:
            block = self._read(BLOCK)
            if len(block) < BLOCK:
                if not block and not self._seen:
                    if self._compression:
                        raise InvalidArgument(f"layer stream is truncated: {self._compression} "
                                              f"data ends before any tar content")
                    raise InvalidArgument("layer stream is empty: not a tar archive")
                if not self._seen and not self._compression:
                    raise InvalidArgument(f"layer stream is not a tar archive ({len(block)} "
                                          f"bytes: less than one {BLOCK}-byte tar header)")
                if not block and not pax and long_name is None and long_link is None:
                    raise InvalidArgument("layer tar is truncated: the stream ends without "
                                          "an end-of-archive marker")
                raise InvalidArgument("layer tar is truncated: the stream ends inside a header")
            self._seen = True
            if block == _ZERO_BLOCK:
                if pax or long_name is not None or long_link is not None:
                    raise _corrupt("end-of-archive marker right after an extended header")
                # The marker is two zero blocks; tolerate a lone one at the very
                # end (GNU tar does), but not a zero block followed by data.
                second = self._read(BLOCK)
                if second.strip(b"\0"):
                    raise _corrupt("a zero block followed by more data")
                return None
            first = not self._members
            raw_name = _nts(block[0:100])
            if block[257:265] == b"ustar\x0000":
                prefix = _nts(block[345:500])
                if prefix:
                    raw_name = prefix + b"/" + raw_name
            self.current = os.fsdecode(raw_name)
            try:
                stored = _parse_number(block[148:156], "checksum")
            except InvalidArgument:
                if first:
                    raise InvalidArgument("layer stream is not a tar archive (no valid "
                                          "header checksum)") from None
                raise
            unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
            if stored != unsigned:
                # Some old writers summed signed chars.
                high = sum(1 for b in block[:148] + block[156:] if b > 127)
                if stored != unsigned - 256 * high:
                    if first:
                        raise InvalidArgument("layer stream is not a tar archive (the first "
                                              "header's checksum is wrong)")
                    raise _corrupt(f"bad header checksum for entry {_show(self.current)}")
            flag = block[156:157]
            size = _parse_number(block[124:136], "size")
            if size < 0:
                raise _corrupt(f"negative size for entry {_show(self.current)}")
            if flag in (b"x", b"g"):
                records = _parse_pax(self._special(size, "PAX header"))
                if flag == b"x":
                    pax.update(records)
                continue
            if flag in (b"L", b"K"):
                data = self._special(size, "GNU long name").rstrip(b"\0")
                if b"\0" in data:
                    raise UnsafeArchive(f"layer tar: GNU long name {_show(os.fsdecode(data))} "
                                        f"contains a NUL byte")
                if flag == b"L":
                    long_name = data
                else:
                    long_link = data
                continue
            self._members += 1
            return self._member(block, flag, raw_name, size, pax, long_name, long_link)

    def _member(self, block: bytes, flag: bytes, raw_name: bytes, size: int,
                pax: dict[str, bytes], long_name: bytes | None,
                long_link: bytes | None) -> _Header:
        raw_link = long_link if long_link is not None else _nts(block[157:257])
        if long_name is not None:
            raw_name = long_name
        h = _Header(name=os.fsdecode(raw_name), kind=b"", size=size,
                    mode=_parse_number(block[100:108], "mode") & 0o7777,
                    uid=_parse_number(block[108:116], "uid"),
                    gid=_parse_number(block[116:124], "gid"),
                    mtime_ns=_parse_number(block[136:148], "mtime") * 1_000_000_000,
                    linkname=os.fsdecode(raw_link))
        for key, value in pax.items():
            if key in ("path", "linkpath"):
                if not value:
                    continue  # an empty record means "use the header field"
                if b"\0" in value:
                    raise UnsafeArchive(f"layer tar: PAX {key} {_show(os.fsdecode(value))} "
                                        f"contains a NUL byte")
                if key == "path":
                    h.name = os.fsdecode(value)
                else:
                    h.linkname = os.fsdecode(value)
            elif key == "size":
                h.size = _parse_decimal(value, "size")
            elif key == "uid":
                h.uid = _parse_decimal(value, "uid")
            elif key == "gid":
                h.gid = _parse_decimal(value, "gid")
            elif key == "mtime":
                h.mtime_ns = _parse_pax_time(value, "mtime")
            elif key == "atime":
                h.atime_ns = _parse_pax_time(value, "atime")
            elif key.startswith("SCHILY.xattr."):
                h.xattrs[key[len("SCHILY.xattr."):]] = value
            elif key.startswith("GNU.sparse."):
                raise InvalidArgument(f"layer tar: entry {_show(h.name)} is a sparse file, "
                                      f"which is not supported")
        self.current = h.name
        if flag in _UNSUPPORTED_KINDS:
            raise InvalidArgument(f"layer tar: entry {_show(h.name)} is a "
                                  f"{_UNSUPPORTED_KINDS[flag]}, which is not supported")
        kind = _READ_KINDS.get(flag)
        if kind is None:
            raise InvalidArgument(f"layer tar: entry {_show(h.name)} has unknown type {flag!r}")
        if flag == b"\0" and h.name.endswith("/"):
            kind = DIR  # pre-POSIX tars mark directories by the trailing slash only
        h.kind = kind
        if kind in (CHR, BLK):
            h.devmajor = _parse_number(block[329:337], "devmajor")
            h.devminor = _parse_number(block[337:345], "devminor")
        if kind == REG:
            self._remaining = h.size
            self._padding = -h.size % BLOCK
        else:
            # Links, directories and devices never carry data (as in Go's and
            # Python's readers); a size field on them is ignored.
            h.size = 0
        return h


# ---------------------------------------------------------------------------
# Names


def _show(name: str) -> str:
    """``repr(name)``, shortened in the middle if very long (messages stay readable)."""
    if len(name) > 160:
        name = name[:80] + "..." + name[-60:]
    return repr(name)


def _split_name(name: str, what: str = "entry") -> tuple[str, ...]:
    """Validate a member name and split it into components ("" and "." dropped).

    The empty tuple is the layer root (``.`` or ``./``).
    """
    if not name:
        raise UnsafeArchive(f"layer tar: {what} has an empty name")
    if "\0" in name:
        raise UnsafeArchive(f"layer tar: {what} {_show(name)} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchive(f"layer tar: {what} {_show(name)} is an absolute path")
    raw = name.split("/")
    if ".." in raw:
        raise UnsafeArchive(f"layer tar: {what} {_show(name)} contains a '..' component")
    return tuple(p for p in raw if p and p != ".")


# ---------------------------------------------------------------------------
# Applying


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

    def __init__(self, dest: str, fmt: WhiteoutFormat, reader: _TarReader) -> None:
        self.root = dest
        self.fmt = fmt
        self.reader = reader
        self.size = 0
        #: every path this tar named (entries, whiteouts, markers): duplicates
        #: are refused, and opaque directories keep exactly these.
        self.written: set[str] = set()
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
                    raise UnsafeArchive(f"layer tar: entry {_show(self.entry_name)} goes through "
                                        f"the symlink {_show(cur)}; extraction never follows "
                                        f"symlinks")
                if not stat.S_ISDIR(st.st_mode):
                    raise InvalidArgument(f"layer tar: entry {_show(self.entry_name)} needs "
                                          f"{_show(cur)} to be a directory, but it is not")
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

    def set_xattrs(self, target: str | int, h: _Header, merge: bool = False) -> None:
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
                raise
        if merge:
            assert isinstance(target, str)
            for key in os.listxattr(target, follow_symlinks=False):
                if (key not in h.xattrs and key != "security.selinux"
                        and not is_private_xattr(key)):
                    os.removexattr(target, key, follow_symlinks=False)

    # -- entries -------------------------------------------------------------

    def entry(self, h: _Header) -> None:
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
                raise UnsafeArchive(f"layer tar: entry {_show(h.name)} has the whiteout {part!r} "
                                    f"as a directory")
        rel = "/".join(parts)
        if rel in self.written:
            raise UnsafeArchive(f"layer tar: duplicate entry {_show(h.name)}")
        self.written.add(rel)
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
                raise InvalidArgument(f"layer tar: symlink {_show(h.name)} has an empty target")
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
    def set_times(target: str | int, h: _Header) -> None:
        atime = h.atime_ns if h.atime_ns is not None else h.mtime_ns
        if isinstance(target, int):
            os.utime(target, ns=(atime, h.mtime_ns))
        else:
            os.utime(target, ns=(atime, h.mtime_ns), follow_symlinks=False)

    def regular(self, rel: str, path: str, h: _Header) -> None:
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

    def directory(self, rel: str, path: str, h: _Header, opaque: bool) -> None:
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

    def hardlink(self, rel: str, path: str, h: _Header) -> None:
        target_parts = _split_name(h.linkname, f"hardlink {_show(h.name)} -> target")
        if not target_parts:
            raise UnsafeArchive(f"layer tar: hardlink {_show(h.name)} points at the layer root")
        if any(p.startswith(WHITEOUT_PREFIX) for p in target_parts):
            raise UnsafeArchive(f"layer tar: hardlink {_show(h.name)} points at the whiteout "
                                f"{_show(h.linkname)}")
        target_rel = "/".join(target_parts)
        if target_rel == rel:
            raise UnsafeArchive(f"layer tar: hardlink {_show(h.name)} points at itself")
        missing = InvalidArgument(f"layer tar: hardlink {_show(h.name)} -> {_show(h.linkname)}: the "
                                  f"target does not exist in the layer")
        if not self.ensure_dir(target_parts[:-1], create=False):
            raise missing
        target = self.path(target_rel)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise missing from None
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"layer tar: hardlink {_show(h.name)} -> {_show(h.linkname)}: the "
                                  f"target is a directory")
        if target_rel in self.markers or (
                self.fmt.is_overlay and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            raise missing  # a whiteout marker stands for a deleted file
        # follow_symlinks=False: a link to a symlink links the symlink itself,
        # as tar means it, instead of whatever the symlink points at.
        self.replace(rel, lambda: os.link(target, path, follow_symlinks=False))

    def root_entry(self, h: _Header) -> None:
        if h.kind != DIR:
            raise UnsafeArchive(f"layer tar: entry {_show(h.name)} would replace the layer root "
                                f"with a {_KIND_NAMES[h.kind]}")
        if "" in self.written:
            raise UnsafeArchive(f"layer tar: duplicate entry {_show(h.name)} (the layer root)")
        self.written.add("")
        os.chown(self.root, h.uid, h.gid, follow_symlinks=False)
        self.set_xattrs(self.root, h, merge=True)
        self.dir_meta[""] = (h.mode, h.atime_ns if h.atime_ns is not None else h.mtime_ns,
                             h.mtime_ns)

    # -- whiteouts -------------------------------------------------------------

    def whiteout(self, parts: tuple[str, ...], h: _Header) -> None:
        # Docker writes whiteouts as empty regular files; aufs-made ones can be
        # hardlinks to each other. Anything else named .wh.* is an attack or a bug.
        if h.kind not in (REG, LNK):
            raise UnsafeArchive(f"layer tar: entry {_show(h.name)} has a whiteout name but is a "
                                f"{_KIND_NAMES[h.kind]}")
        base = parts[-1]
        dir_parts = parts[:-1]
        if base == WHITEOUT_OPAQUE:
            self.opaque_marker(dir_parts, h)
            return
        hidden = base[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise UnsafeArchive(f"layer tar: whiteout {_show(h.name)} names {hidden!r}")
        target_parts = (*dir_parts, hidden)
        target_rel = "/".join(target_parts)
        if self.fmt is WhiteoutFormat.IN_PLACE:
            if self.ensure_dir(dir_parts, create=False):
                self.remove(target_rel)
            return
        self.ensure_dir(dir_parts, create=True)
        self.remove(target_rel)  # including anything this tar wrote there before
        if self.fmt is WhiteoutFormat.AUFS:
            wh_rel = "/".join(parts)
            self.remove(wh_rel)
            self.empty_file(self.path(wh_rel), h, mode=0o444)
        else:
            path = self.path(target_rel)
            os.mknod(path, stat.S_IFCHR, 0)
            os.chown(path, h.uid, h.gid, follow_symlinks=False)
        self.markers.add(target_rel)

    def opaque_marker(self, dir_parts: tuple[str, ...], h: _Header) -> None:
        rel = "/".join(dir_parts)
        if self.fmt is WhiteoutFormat.IN_PLACE:
            self.opaque.append(rel)  # pruned at the end: entries may still follow
            return
        self.ensure_dir(dir_parts, create=True)
        self.make_opaque(rel, h)

    def make_opaque(self, rel: str, h: _Header) -> None:
        if self.fmt is WhiteoutFormat.AUFS:
            marker = f"{rel}/{WHITEOUT_OPAQUE}" if rel else WHITEOUT_OPAQUE
            self.remove(marker)
            self.empty_file(self.path(marker), h, mode=0o444)
        else:
            key = self.fmt.opaque_xattr
            assert key is not None
            os.setxattr(self.path(rel), key, b"y", follow_symlinks=False)

    @staticmethod
    def empty_file(path: str, h: _Header, mode: int) -> None:
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


def apply_layer(dest: Path, stream: IO[bytes], fmt: WhiteoutFormat) -> int:
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

    In the native formats a whiteout also removes anything this tar wrote at
    that path before it, and a directory written where this tar put a whiteout
    (delete, then re-create) is made opaque, so the old contents stay hidden.

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
    reader = _TarReader(*_open_layer_stream(stream))
    applier = _Applier(dest_s, fmt, reader)
    try:
        while (h := reader.next()) is not None:
            applier.entry(h)
        applier.finish()
        reader.drain()
    except LayerfsError:
        raise
    except OSError as err:
        where = f"entry {_show(applier.entry_name)}" if applier.entry_name else dest_s
        cls = InvalidArgument if err.errno in _ARCHIVE_ERRNOS else LayerfsError
        raise cls(f"applying layer to {dest_s}: {where}: {err.strerror or err}"
                  f"{' (' + err.filename + ')' if err.filename else ''}") from err
    return applier.size


# ---------------------------------------------------------------------------
# Writing tars


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_record(key: str, value: bytes) -> bytes:
    payload = b" " + os.fsencode(key) + b"=" + value + b"\n"
    length = len(payload) + len(str(len(payload)))
    if len(str(length)) != len(str(len(payload))):
        length = len(payload) + len(str(length))
    return str(length).encode() + payload


def _pax_time(ns: int) -> bytes:
    sign = "-" if ns < 0 else ""
    secs, frac = divmod(abs(ns), 1_000_000_000)
    if not frac:
        return f"{sign}{secs}".encode()
    return f"{sign}{secs}.{frac:09d}".rstrip("0").encode()


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
                records.append(_pax_record(key, value))
                binary = binary or not _is_utf8(value)
        for key, num in (("uid", uid), ("gid", gid)):
            if num >= 8 ** 7:
                records.append(_pax_record(key, str(num).encode()))
        if size >= 8 ** 11:
            records.append(_pax_record("size", str(size).encode()))
        secs = mtime_ns // 1_000_000_000
        if mtime_ns % 1_000_000_000 or not 0 <= secs < 8 ** 11:
            records.append(_pax_record("mtime", _pax_time(mtime_ns)))
        for key, value in sorted((xattrs or {}).items()):
            records.append(_pax_record("SCHILY.xattr." + key, value))
        if records:
            if binary:
                # Names that are not UTF-8 are stored as raw bytes; say so (GNU tar
                # does the same), so that readers don't "fix" the encoding.
                records.insert(0, _pax_record("hdrcharset", b"BINARY"))
            data = b"".join(records)
            base = name_b.rstrip(b"/").rsplit(b"/", 1)[-1]
            pax_name = (b"PaxHeaders.0/" + base)[:100]
            self._emit(self._ustar(pax_name, b"x", 0o644, 0, 0, len(data),
                                   max(0, min(secs, 8 ** 11 - 1)), b"", 0, 0))
            self._emit(data)
            self._emit(bytes(-len(data) % BLOCK))
        self._emit(self._ustar(name_b[:100], kind, mode, min(uid, 8 ** 7 - 1),
                               min(gid, 8 ** 7 - 1), size if size < 8 ** 11 else 0,
                               max(0, min(secs, 8 ** 11 - 1)), link_b[:100], devmajor, devminor))

    @staticmethod
    def _ustar(name: bytes, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
               link: bytes, devmajor: int, devminor: int) -> bytes:
        block = bytearray(b"".join((
            name.ljust(100, b"\0"), _octal(mode & 0o7777, 8), _octal(uid, 8), _octal(gid, 8),
            _octal(size, 12), _octal(mtime, 12), b" " * 8, kind, link.ljust(100, b"\0"),
            b"ustar\x0000", bytes(64), _octal(devmajor, 8), _octal(devminor, 8), bytes(167))))
        block[148:156] = b"%06o\0 " % sum(block)
        return bytes(block)

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


def export_changes(tree: Path, changes: Iterable[Change], out: IO[bytes]) -> int:
    """Write the changeset ``changes`` of the full tree ``tree`` to ``out`` as a PAX tar.

    ADD and MODIFY entries are copied from ``tree``; a DELETE becomes an empty
    ``.wh.NAME`` file in its parent directory. Every changed path's parent
    directories are written before it (unchanged ones included), so that
    applying the tar onto another driver's empty diff directory gives them
    their real owner, mode and xattrs. For one path a DELETE goes before an
    ADD/MODIFY, so "delete then re-create" applies in that order.

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
    # DELETE sorts last among equal paths in Change's own order; here it must
    # come first.
    ordered = sorted(changes, key=lambda c: (c.path, c.kind is not ChangeKind.DELETE))
    for change in ordered:
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

    Entries are written in sorted order, parents first; the diff's root itself
    is not written. Returns the size, as :func:`export_changes` does.
    """
    if fmt is WhiteoutFormat.IN_PLACE:
        raise InvalidArgument("export_native: an IN_PLACE layer has no native diff; "
                              "use export_changes with naive_changes")
    root = os.fspath(diff_dir)
    if not os.path.isdir(root):
        raise NotFound(f"export_native: {root} is not a directory")
    ex = _Exporter(root, out)
    opaque_key = fmt.opaque_xattr

    # Pre-order, sorted, without recursion: a stack of iterators over sorted listings.
    def listing(rel: str) -> Iterator[tuple[str, os.stat_result]]:
        with os.scandir(ex.path(rel)) as it:
            return iter(sorted((e.name, e.stat(follow_symlinks=False)) for e in it))

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
