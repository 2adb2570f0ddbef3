"""tar-split: re-creating a layer tar byte for byte.

An image's config names each layer by the sha256 of its tar (the diff id). To save an
image again with the same digests, layerfs must write the *same* bytes, and a tar
generated afresh from the files would differ (order, header fields, padding). Like
Docker's tar-split, the loader records every byte of the tar except file contents, plus
(path, size) where contents go (:class:`TarSplitRecorder`); the saver replays that,
reading contents from the layer itself (:class:`TarSplitAssembler`). The record is
small (headers and padding: about 1 KiB per file before compression).

Record format (zstd-compressed): the magic ``LFTS1\\n``, then segments: ``R`` + u32
length + raw bytes, or ``F`` + u64 size + u32 path length + path (the file's contents
go there).
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Any

import zstandard

from ..digests import hasher_for
from ..errors import CorruptState
from .header import BLOCK, REG, ZERO_BLOCK, Extended, TarFormatError, decode, padding

_TS_MAGIC = b"LFTS1\n"
_TS_RAW = b"R"
_TS_FILE = b"F"


def _layer_rel(name: str) -> str:
    """A member name as :func:`~layerfs.tar.apply_layer` resolves it ("./a//b" → "a/b")."""
    return "/".join(p for p in name.split("/") if p and p != ".")



class TarSplitRecorder:
    """Records a layer tar as it streams past, minus the contents of regular files.

    It follows the tar with the same codec as the layer reader (:mod:`.header`); link,
    directory and device entries carry no data. If the stream is not a tar it stops
    recording (``broken``); the apply fails anyway.
    """

    def __init__(self) -> None:
        self._out = bytearray(_TS_MAGIC)
        self._raw = bytearray()
        self._hdr = bytearray()
        self._skip = 0          # file content still to pass (not recorded)
        self._after = 0         # padding after that content (recorded)
        self._rawleft = 0       # bytes to record as they are
        self._capture: bytearray | None = None
        self._capture_left = 0
        self._capture_flag = b""
        self._ext = Extended()
        self._ended = False
        self.broken = False
        self.files = 0

    def feed(self, view: memoryview) -> None:
        p, n = 0, len(view)
        while p < n:
            if self._ended:
                self._raw += view[p:]
                return
            if self._skip:
                t = min(self._skip, n - p)
                self._skip -= t
                p += t
                if not self._skip:
                    self._rawleft, self._after = self._after, 0
                continue
            if self._rawleft:
                t = min(self._rawleft, n - p)
                chunk = view[p:p + t]
                self._raw += chunk
                if self._capture is not None and self._capture_left:
                    c = min(self._capture_left, t)
                    self._capture += chunk[:c]
                    self._capture_left -= c
                    if not self._capture_left:
                        self._special_done()
                self._rawleft -= t
                p += t
                continue
            t = min(BLOCK - len(self._hdr), n - p)
            self._hdr += view[p:p + t]
            p += t
            if len(self._hdr) == BLOCK:
                block = bytes(self._hdr)
                self._hdr.clear()
                self._header(block)


    def _header(self, block: bytes) -> None:
        self._raw += block
        if block == ZERO_BLOCK:
            self._ended = True
            return
        try:
            raw = decode(block)
            if raw.extended:
                self._capture, self._capture_left, self._capture_flag = \
                    bytearray(), raw.size, raw.flag
                self._rawleft = raw.size + padding(raw.size)
                if not raw.size:
                    self._special_done()
                return
            h = self._ext.member(raw)
        except TarFormatError:
            self._ended = self.broken = True
            return
        size = h.size
        if h.kind != REG:
            self._rawleft = size + padding(size)  # header-only kinds have size 0
            return
        rel = _layer_rel(h.name)
        if size and rel and not any(part.startswith(".wh.") for part in rel.split("/")):
            self._flush_raw()
            path = os.fsencode(rel)
            self._out += _TS_FILE + struct.pack(">QI", size, len(path)) + path
            self._skip, self._after = size, padding(size)
            self.files += 1
        else:
            self._rawleft = size + padding(size)

    def _special_done(self) -> None:
        data = bytes(self._capture or b"")
        self._capture = None
        try:
            self._ext.add(self._capture_flag, data)
        except TarFormatError:
            self._ended = self.broken = True

    def _flush_raw(self) -> None:
        raw = self._raw
        for start in range(0, len(raw), 1 << 30):
            piece = raw[start:start + (1 << 30)]
            self._out += _TS_RAW + struct.pack(">I", len(piece)) + piece
        self._raw = bytearray()

    def result(self) -> bytes:
        """The record, zstd-compressed."""
        self._flush_raw()
        return zstandard.ZstdCompressor(level=3).compress(bytes(self._out))


def _open_beneath(root_fd: int, rel: str) -> int:
    """Open ``rel`` under the directory ``root_fd`` without following any symlink."""
    parts = rel.split("/")
    fd = root_fd
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nfd
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)


def _decompress(record: bytes, what: str) -> bytes:
    try:
        data = zstandard.ZstdDecompressor().decompress(record, max_output_size=1 << 34)
    except zstandard.ZstdError as err:
        raise CorruptState(f"{what}: tar-split record is damaged: {err}") from err
    if data[:len(_TS_MAGIC)] != _TS_MAGIC:
        raise CorruptState(f"{what}: tar-split record is damaged")
    return data


class TarSplitAssembler(io.RawIOBase):
    """Replays a :class:`TarSplitRecorder` record, reading file contents from ``root``.

    Produces exactly the bytes that were loaded, or fails: the output is
    hashed and compared with ``expected`` (the diff id) when the last byte is
    produced, before it is handed out.
    """

    def __init__(self, record: bytes, root: Path, expected: str, size: int, what: str) -> None:
        self._data = memoryview(_decompress(record, what))
        self._pos = len(_TS_MAGIC)
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fd = -1
        self._left = 0          # bytes left in the current segment
        self._raw_at = 0        # position of the current raw segment's next byte
        self._path = ""
        self._hash: Any = hasher_for(expected)
        self.expected = expected
        self.size = size
        self.produced = 0
        self.what = what

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
        super().close()

    def _next_segment(self) -> bool:
        if self._pos >= len(self._data):
            return False
        kind = bytes(self._data[self._pos:self._pos + 1])
        if kind == _TS_RAW:
            (length,) = struct.unpack_from(">I", self._data, self._pos + 1)
            self._raw_at = self._pos + 5
            self._pos = self._raw_at + length
            self._left = length
            self._path = ""
        elif kind == _TS_FILE:
            size, plen = struct.unpack_from(">QI", self._data, self._pos + 1)
            start = self._pos + 13
            rel = os.fsdecode(bytes(self._data[start:start + plen]))
            self._pos = start + plen
            self._fd = self._open_content(rel)
            self._path = rel
            self._left = size
        else:
            raise CorruptState(f"{self.what}: tar-split record is damaged")
        return True

    def _open_content(self, rel: str) -> int:
        try:
            return _open_beneath(self._root_fd, rel)
        except OSError as err:
            raise CorruptState(f"{self.what}: cannot re-create the layer tar: /{rel}: "
                               f"{err.strerror}") from err

    def _read_content(self, view: memoryview) -> int:
        got = os.readv(self._fd, [view])
        if got == 0:
            raise CorruptState(f"{self.what}: /{self._path} is shorter than when the "
                               f"layer was loaded")
        return got

    def read(self, n: int = -1, /) -> bytes:
        return super().read(n) or b""  # never None: this stream does not block

    def readinto(self, buf: Any) -> int:
        """Fill ``buf`` as far as the tar goes (short only at the end)."""
        view = memoryview(buf).cast("B")
        filled = 0
        while filled < len(view):
            got = self._read_some(view[filled:])
            if not got:
                break
            filled += got
        return filled

    def _read_some(self, view: memoryview) -> int:
        while not self._left:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self._next_segment():
                return 0
        want = min(len(view), self._left)
        if self._path:
            got = self._read_content(view[:want])
        else:
            view[:want] = self._data[self._raw_at:self._raw_at + want]
            self._raw_at += want
            got = want
        self._left -= got
        if self._hash is not None:
            self._hash.update(view[:got])
        self.produced += got
        if self.produced > self.size:
            raise CorruptState(f"{self.what}: re-created tar is longer than recorded")
        if self.produced == self.size and self._hash is not None:
            digest = f"{self.expected.split(':', 1)[0]}:{self._hash.hexdigest()}"
            if digest != self.expected:
                raise CorruptState(f"{self.what}: re-created layer tar has digest {digest}, "
                                   f"not {self.expected}: the layer changed on disk")
        return got


class TarSplitSkeleton(TarSplitAssembler):
    """The tar a record describes, with every file's contents read as zeros.

    The members, their headers and their sizes are exactly the loaded tar's, so a
    :class:`~layerfs.tar.reader.TarReader` lists them without the layer's files being
    read (layerfs.inspect indexes image layers this way); no digest is checked, since
    the contents are not there.
    """

    def __init__(self, record: bytes, size: int, what: str) -> None:
        self._data = memoryview(_decompress(record, what))
        self._pos = len(_TS_MAGIC)
        self._root_fd = -1
        self._fd = -1
        self._left = 0
        self._raw_at = 0
        self._path = ""
        self._hash = None
        self.expected = ""
        self.size = size
        self.produced = 0
        self.what = what

    def _open_content(self, rel: str) -> int:
        return -1

    def _read_content(self, view: memoryview) -> int:
        view[:] = bytes(len(view))
        return len(view)
