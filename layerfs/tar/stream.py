"""Layer streams: the uncompressed tar inside a gzip, zstd or plain stream.

Compression is found by magic bytes, read from streams that cannot seek or peek (pipes,
sockets, HTTP bodies) and replayed. The image archive loader uses the same sniffing
(:func:`compression_of`).
"""

from __future__ import annotations

import gzip
import io
from typing import Protocol

import zstandard

from ..errors import InvalidArgument

#: Reads and writes of file data go in chunks this big; big enough that the
#: per-call cost of Python disappears, small enough to stay in cache.
COPY_BUFSIZE = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
class Readable(Protocol):
    """A byte stream to read from: a file, a pipe, an HTTP body, a verifying reader."""

    def read(self, n: int = -1, /) -> bytes: ...


#: Bytes :func:`compression_of` needs to see.
MAGIC_SIZE = 6


def compression_of(head: bytes) -> str:
    """``gzip``, ``zstd`` or ``""`` (none) for a stream starting with ``head``; bzip2 and
    xz (which old Docker versions accepted, but the OCI spec does not) are refused with a
    clear message rather than failing as "corrupt tar"."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise InvalidArgument(f"layer stream is {name}-compressed; only gzip, zstd and "
                                  f"uncompressed tars are supported")
    return ""


class _Prefixed(io.RawIOBase):
    """A raw stream that replays ``head`` and then reads ``raw``.

    Lets :func:`open_layer_stream` sniff magic bytes from streams that cannot
    seek or peek (pipes, sockets, HTTP bodies). Closing it leaves ``raw`` open:
    the caller owns that.
    """

    def __init__(self, head: bytes, raw: Readable) -> None:
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


def open_layer_stream(raw: Readable) -> io.BufferedIOBase:
    """The uncompressed tar inside ``raw``: gzip and zstd are detected by magic.

    Anything else is returned as is and must then parse as a tar. bzip2 and xz
    (which old Docker versions accepted, but the OCI spec does not) are refused
    with a clear message rather than failing as "corrupt tar". The result reads
    from ``raw`` lazily and does not close it.
    """
    return open_layer_stream_named(raw)[0]



def open_layer_stream_named(raw: Readable) -> tuple[io.BufferedIOBase, str]:
    """:func:`open_layer_stream`, also naming the compression found ("" for none)."""
    head = b""
    while len(head) < MAGIC_SIZE:
        chunk = raw.read(MAGIC_SIZE - len(head))
        if not chunk:
            break
        head += chunk
    buffered = io.BufferedReader(_Prefixed(head, raw), buffer_size=COPY_BUFSIZE)
    compression = compression_of(head)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=buffered, mode="rb"), "gzip"
    if compression == "zstd":
        # read_across_frames: multi-frame streams (pzstd, seekable zstd) are one layer.
        # The reader does not notice a stream cut short at the end; the tar
        # reader does, because the end-of-archive marker is then missing.
        reader = zstandard.ZstdDecompressor().stream_reader(
            buffered, read_size=COPY_BUFSIZE, read_across_frames=True, closefd=False)
        return io.BufferedReader(reader, buffer_size=COPY_BUFSIZE), "zstd"
    return buffered, ""
