"""Reading a layer tar as a stream: :class:`TarReader` hands out one member at a time.

Strict where :mod:`tarfile` is lenient: every header's checksum is checked, a truncated
archive (no end-of-archive marker) is an error, and so is a bad header after the first.
The format is :mod:`.header`'s; what this reader adds is the policy for layers: GNU
sparse files, multi-volume archives and other vendor types are refused, and names with
a NUL byte are unsafe.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib

import zstandard

from ..errors import InvalidArgument, LayerfsError, UnsafeArchive
from .header import (
    BLOCK,
    GNU_LONGLINK,
    GNU_LONGNAME,
    KIND_NAMES,
    MAX_EXTENDED_SIZE,
    REG,
    ZERO_BLOCK,
    BadChecksum,
    Extended,
    Header,
    TarFormatError,
    decode,
    padding,
)
from .stream import COPY_BUFSIZE

DECOMPRESS_ERRORS: tuple[type[Exception], ...] = (
    EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)

#: Most bytes accepted after the end-of-archive marker (see :meth:`TarReader.drain`).
MAX_TRAILER = 1 << 20

_UNSUPPORTED_KINDS = {b"S": "GNU sparse file", b"M": "multi-volume continuation",
                      b"V": "volume label", b"N": "GNU old long name", b"D": "GNU dump dir"}


def show_name(name: str) -> str:
    """``repr(name)``, shortened in the middle if very long (messages stay readable)."""
    if len(name) > 160:
        name = name[:80] + "..." + name[-60:]
    return repr(name)


def _corrupt(msg: str) -> InvalidArgument:
    return InvalidArgument(f"layer tar is corrupt: {msg}")


class TarReader:
    """Streams the members of a tar; the caller consumes or skips each one's data.

    Strict where :mod:`tarfile` is lenient: every header's checksum is checked,
    a truncated archive (no end-of-archive marker) is an error, and so is a bad
    header after the first.
    """

    def __init__(self, stream: io.BufferedIOBase, compression: str = "") -> None:
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
        except DECOMPRESS_ERRORS as err:
            raise InvalidArgument(f"layer stream is corrupt{self._where()}: {err}") from err
        except OSError as err:
            raise LayerfsError(f"reading layer stream{self._where()}: {err}") from err
        return data

    def _readinto(self, view: memoryview) -> int:
        try:
            return self._f.readinto(view) or 0
        except DECOMPRESS_ERRORS as err:
            raise InvalidArgument(f"layer stream is corrupt{self._where()}: {err}") from err
        except OSError as err:
            raise LayerfsError(f"reading layer stream{self._where()}: {err}") from err

    def _where(self) -> str:
        return f" (in entry {show_name(self.current)})" if self.current else ""

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
        """Read the stream to its end: lets gzip verify its trailing CRC and length.

        At most :data:`MAX_TRAILER` bytes may follow the end-of-archive marker (writers
        pad to their record size, 10 KiB for tar's default): 4 GiB of zeros gzip to
        4 MB, and would cost a quarter of a minute of CPU before being accepted."""
        left = MAX_TRAILER
        while got := self._readinto(memoryview(self._buf)[:min(COPY_BUFSIZE, left + 1)]):
            left -= got
            if left < 0:
                raise InvalidArgument(f"layer tar: more than {MAX_TRAILER} bytes follow the "
                                      f"end-of-archive marker")

    # -- headers ----------------------------------------------------------

    def _special(self, size: int, what: str) -> bytes:
        if size > MAX_EXTENDED_SIZE:
            raise InvalidArgument(f"layer tar: {what} of {size} bytes{self._where()} exceeds "
                                  f"the {MAX_EXTENDED_SIZE}-byte limit")
        data = self._read_exact(size, what)
        self._skip(padding(size))
        return data


    def next(self) -> Header | None:
        """The next member's header, or None at the end-of-archive marker."""
        self._finish_member()
        ext = Extended()
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
                if not block and not ext.pending:
                    raise InvalidArgument("layer tar is truncated: the stream ends without "
                                          "an end-of-archive marker")
                raise InvalidArgument("layer tar is truncated: the stream ends inside a header")
            self._seen = True
            if block == ZERO_BLOCK:
                if ext.pending:
                    raise _corrupt("end-of-archive marker right after an extended header")
                # The marker is two zero blocks; tolerate a lone one at the very
                # end (GNU tar does), but not a zero block followed by data.
                second = self._read(BLOCK)
                if second.strip(b"\0"):
                    raise _corrupt("a zero block followed by more data")
                return None
            first = not self._members
            try:
                raw = decode(block)
            except BadChecksum as err:
                self.current = os.fsdecode(err.name)
                if first:
                    raise InvalidArgument(
                        "layer stream is not a tar archive (no valid header checksum)"
                        if err.unreadable else "layer stream is not a tar archive (the first "
                        "header's checksum is wrong)") from None
                if err.unreadable:
                    raise _corrupt(str(err)) from None
                raise _corrupt(f"bad header checksum for entry {show_name(self.current)}") \
                    from None
            except TarFormatError as err:
                raise _corrupt(str(err)) from None
            self.current = os.fsdecode(raw.name)
            if raw.extended:
                if raw.flag in (GNU_LONGNAME, GNU_LONGLINK):
                    data = self._special(raw.size, "GNU long name").rstrip(b"\0")
                    if b"\0" in data:
                        raise UnsafeArchive(f"layer tar: GNU long name "
                                            f"{show_name(os.fsdecode(data))} contains a NUL byte")
                else:
                    data = self._special(raw.size, "PAX header")
                try:
                    ext.add(raw.flag, data)
                except TarFormatError as err:
                    raise _corrupt(str(err)) from None
                continue
            self._members += 1
            try:
                h = ext.member(raw)
            except TarFormatError as err:
                raise _corrupt(str(err)) from None
            return self._check(h)

    def _check(self, h: Header) -> Header:
        """Refuse what a layer may not hold; arrange to read the member's data."""
        for key in ("path", "linkpath"):
            value = h.pax.get(key)
            if value and b"\0" in value:
                raise UnsafeArchive(f"layer tar: PAX {key} {show_name(os.fsdecode(value))} "
                                    f"contains a NUL byte")
        if any(key.startswith("GNU.sparse.") for key in h.pax):
            raise InvalidArgument(f"layer tar: entry {show_name(h.name)} is a sparse file, "
                                  f"which is not supported")
        self.current = h.name
        if h.flag in _UNSUPPORTED_KINDS:
            raise InvalidArgument(f"layer tar: entry {show_name(h.name)} is a "
                                  f"{_UNSUPPORTED_KINDS[h.flag]}, which is not supported")
        if h.kind not in KIND_NAMES:
            raise InvalidArgument(f"layer tar: entry {show_name(h.name)} has unknown type "
                                  f"{h.flag!r}")
        if h.kind == REG:
            self._remaining = h.size
            self._padding = padding(h.size)
        return h
