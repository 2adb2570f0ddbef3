"""Indexing a seekable tar: where each member's data is, read once with ``pread``.

Image archives (``docker save``, OCI layout tars) are read in the order their manifest
names members, not in archive order, so the loader indexes the whole tar first
(:func:`members`) and then reads members by offset. The format is :mod:`.header`'s, the
same the layer reader uses: a bad checksum or number, a malformed PAX record, a member
running past the end of the file or a missing end-of-archive marker each say the
archive is corrupt or truncated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import InvalidArgument
from .header import (
    BLOCK,
    MAX_EXTENDED_SIZE,
    ZERO_BLOCK,
    BadChecksum,
    Extended,
    TarFormatError,
    decode,
    padding,
)


@dataclass(frozen=True)
class Member:
    kind: bytes     # header.REG, DIR, LNK, SYM, ...
    offset: int     # of the data in the file
    size: int       # of the data (0 for kinds without data)
    link: str = ""


def members(fd: int, description: str) -> Iterator[tuple[str, Member]]:
    """Every member of the tar open at ``fd``, in archive order, as (name, member)."""
    total = os.fstat(fd).st_size

    def corrupt(msg: str) -> InvalidArgument:
        return InvalidArgument(f"{description}: archive is corrupt: {msg}")

    def truncated(msg: str) -> InvalidArgument:
        return InvalidArgument(f"{description}: archive is truncated: {msg}")

    pos = 0
    ext = Extended()
    while True:
        block = os.pread(fd, BLOCK, pos)
        if len(block) < BLOCK:
            if pos == 0:
                raise InvalidArgument(f"{description}: not an image archive (empty or not a "
                                      f"tar)")
            raise truncated("it ends without an end-of-archive marker")
        if block == ZERO_BLOCK:
            return
        try:
            raw = decode(block)
        except BadChecksum:
            if pos == 0:
                raise InvalidArgument(f"{description}: not an image archive (not a tar, or "
                                      f"compressed with something other than gzip or zstd)") \
                    from None
            raise corrupt(f"bad header checksum at offset {pos}") from None
        except TarFormatError as err:
            raise corrupt(str(err)) from None
        data = pos + BLOCK
        try:
            if raw.extended:
                if raw.size > MAX_EXTENDED_SIZE:
                    raise corrupt(f"extended header of {raw.size} bytes")
                if data + raw.size > total:
                    raise truncated(f"member {os.fsdecode(raw.name)!r} is cut short")
                ext.add(raw.flag, os.pread(fd, raw.size, data))
                pos = data + raw.size + padding(raw.size)
                continue
            h = ext.member(raw)
        except TarFormatError as err:
            raise corrupt(str(err)) from None
        if data + h.size > total:
            raise truncated(f"member {h.name!r} is cut short")
        yield h.name, Member(h.kind, data, h.size, h.linkname)
        pos = data + h.size + padding(h.size)
