"""The tar header codec: the one place that knows how a tar header is laid out.

A tar is a sequence of 512-byte blocks: a header block per member, then its data padded
to a whole block; two zero blocks end the archive. On top of the ustar header
(``name``, ``mode``, ``uid``, ``gid``, ``size``, ``mtime``, ``chksum``, ``typeflag``,
``linkname``, ``magic``, ..., ``devmajor``, ``devminor``, ``prefix``), two extensions
carry what does not fit:

* **PAX** extended headers (typeflag ``x``, or ``g`` for global ones) hold records
  ``"LEN KEY=VALUE\\n"`` for the next member: ``path``, ``linkpath``, ``size``, ``uid``,
  ``gid``, ``mtime``, ``atime``, ``SCHILY.xattr.NAME`` (values are bytes: xattrs are
  binary);
* **GNU** long names and long link names (typeflags ``L`` and ``K``) hold the next
  member's name or link target; GNU also writes numbers too big for octal in base-256.

This module decodes a block into a :class:`RawHeader` (checksum verified, numbers
strict), collects extended headers in :class:`Extended` and merges them into the next
member's :class:`Header`; it also encodes ustar blocks and PAX records for the writer.
The readers built on it (:mod:`.reader` for layer streams, :mod:`.index` for seekable
image archives, :mod:`.split` for tar-split records) differ in how they get blocks, not
in what a block means. Policy (which member types are allowed, what a NUL in a name
means) is the reader's, not the codec's.

Strict where :mod:`tarfile` is lenient: a bad checksum or number, or a malformed PAX
record, raises :class:`TarFormatError`; nothing is silently skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import InvalidArgument

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
#: The most a PAX header or GNU long name may hold. Go's archive/tar uses the same bound;
#: without one a 10 GB "header" would be read into memory.
MAX_EXTENDED_SIZE = 1 << 20
#: The most extended headers one member may have, and their total size. Each alone is
#: bounded above, but PAX records with new keys pile up until the next member: 39 MB of
#: gzip held 1.6 GB of them. A real writer puts one PAX header, one long name and one
#: long link before a member (and maybe a global header before the first).
MAX_EXTENDED_PER_MEMBER = 8
MAX_EXTENDED_TOTAL = MAX_EXTENDED_SIZE

# Member kinds, as tar typeflags. AREGTYPE ("\0") and CONTTYPE ("7") read as REG.
REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
KIND_NAMES = {REG: "regular file", LNK: "hardlink", SYM: "symlink", CHR: "char device",
              BLK: "block device", DIR: "directory", FIFO: "fifo"}
_KINDS = {b"0": REG, b"\0": REG, b"7": REG, b"1": LNK, b"2": SYM, b"3": CHR, b"4": BLK,
          b"5": DIR, b"6": FIFO}
#: Kinds that never carry data, whatever their size field says.
HEADER_ONLY = frozenset({LNK, SYM, CHR, BLK, DIR, FIFO})
#: Typeflags of extended headers: they describe the next member and are not members.
PAX, GLOBAL_PAX, GNU_LONGNAME, GNU_LONGLINK = b"x", b"g", b"L", b"K"
EXTENDED = frozenset({PAX, GLOBAL_PAX, GNU_LONGNAME, GNU_LONGLINK})
_POSIX_MAGIC = b"ustar\x0000"


class TarFormatError(InvalidArgument):
    """A block or record that breaks the tar format. The message says what is wrong;
    the reader that raises it on says where (which archive, which entry)."""


class BadChecksum(TarFormatError):
    """A header block whose checksum does not match (or cannot be read): corruption, or
    not a tar at all. ``name`` is the member name the block claims, for messages."""

    def __init__(self, message: str, name: bytes, *, unreadable: bool = False) -> None:
        super().__init__(message)
        self.name = name
        self.unreadable = unreadable


def nts(field_: bytes) -> bytes:
    """A NUL-terminated string field: everything up to the first NUL."""
    i = field_.find(b"\0")
    return field_ if i < 0 else field_[:i]


def parse_number(field_: bytes, what: str) -> int:
    """An octal field, or GNU base-256 (high bit set: 0x80 positive, 0xff negative)."""
    if field_ and field_[0] & 0x80:
        if field_[0] == 0x80:
            return int.from_bytes(field_[1:], "big")
        if field_[0] == 0xFF:
            return int.from_bytes(field_, "big", signed=True)
        raise TarFormatError(f"bad base-256 {what} field {field_!r}")
    digits = nts(field_).strip(b" ")
    if not digits:
        return 0
    # isdigit() first: int() alone would also take "+7", "1_0" and spaces inside.
    if not digits.isdigit():
        raise TarFormatError(f"bad octal {what} field {field_!r}")
    try:
        return int(digits, 8)
    except ValueError:
        raise TarFormatError(f"bad octal {what} field {field_!r}") from None


def parse_decimal(value: bytes, what: str) -> int:
    if not value.isdigit():
        raise TarFormatError(f"bad PAX {what} {value!r}")
    return int(value)


def parse_pax_time(value: bytes, what: str) -> int:
    """A PAX timestamp ("1700000000.123456789", maybe negative) in nanoseconds."""
    negative = value.startswith(b"-")
    body = value[1:] if negative else value
    secs, _, frac = body.partition(b".")
    if not secs.isdigit() or (frac and not frac.isdigit()):
        raise TarFormatError(f"bad PAX {what} {value!r}")
    ns = int(secs) * 1_000_000_000 + int((frac + b"000000000")[:9])
    return -ns if negative else ns


def parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX records ``"LEN KEY=VALUE\\n"``; LEN counts the whole record.

    Values stay bytes: xattr values are binary, and path values are decoded like ustar
    names, with the filesystem encoding.
    """
    records: dict[str, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record
        space = data.find(b" ", pos, pos + 24)
        if space < 0:
            raise TarFormatError(f"bad PAX record at offset {pos}")
        length = parse_decimal(data[pos:space], "record length")
        if length <= space - pos + 1 or pos + length > end or data[pos + length - 1] != 0x0A:
            raise TarFormatError(f"bad PAX record length at offset {pos}")
        key, eq, value = data[space + 1:pos + length - 1].partition(b"=")
        if not eq or not key:
            raise TarFormatError(f"bad PAX record at offset {pos}")
        records[os.fsdecode(key)] = value
        pos += length
    return records


@dataclass(frozen=True, slots=True)
class RawHeader:
    """One header block as it is, before extended headers are merged in."""

    block: bytes
    name: bytes       # with the ustar prefix joined
    flag: bytes       # the typeflag byte
    size: int         # the size field: how much data follows (for members that have data)

    @property
    def extended(self) -> bool:
        return self.flag in EXTENDED


def decode(block: bytes) -> RawHeader:
    """Decode one (non-zero) header block; BadChecksum if its checksum is wrong."""
    name = nts(block[0:100])
    if block[257:265] == _POSIX_MAGIC:
        prefix = nts(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    try:
        stored = parse_number(block[148:156], "checksum")
    except TarFormatError as err:
        raise BadChecksum(str(err), name, unreadable=True) from None
    unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
    if stored != unsigned:
        # Some old writers summed signed chars.
        high = sum(1 for b in block[:148] + block[156:] if b > 127)
        if stored != unsigned - 256 * high:
            raise BadChecksum("bad header checksum", name)
    size = parse_number(block[124:136], "size")
    if size < 0:
        raise TarFormatError(f"negative size for entry {os.fsdecode(name)!r}")
    return RawHeader(block, name, block[156:157], size)


@dataclass(slots=True)
class Header:
    """One archive member, after GNU long names and PAX records are merged in."""

    name: str
    kind: bytes                  # REG, LNK, ..., or the typeflag itself if unknown
    flag: bytes                  # the typeflag as written
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0                # data bytes that follow; 0 for all but regular files
    mtime_ns: int = 0
    atime_ns: int | None = None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[str, bytes] = field(default_factory=dict)   # the records merged in


@dataclass
class Extended:
    """Extended headers seen since the last member; they apply to the next one."""

    pax: dict[str, bytes] = field(default_factory=dict)
    long_name: bytes | None = None
    long_link: bytes | None = None
    count: int = 0       # extended headers taken in for the next member
    total: int = 0       # and their bytes

    @property
    def pending(self) -> bool:
        return bool(self.pax) or self.long_name is not None or self.long_link is not None

    def add(self, flag: bytes, payload: bytes) -> None:
        """Take in the data of an extended header (``x``, ``g``, ``L`` or ``K``).

        Global PAX records are checked and ignored, as Go's archive/tar and therefore
        Docker do (``git archive`` writes one). More than
        :data:`MAX_EXTENDED_PER_MEMBER` headers or :data:`MAX_EXTENDED_TOTAL` bytes of
        them before one member is a format error."""
        self.count += 1
        self.total += len(payload)
        if self.count > MAX_EXTENDED_PER_MEMBER:
            raise TarFormatError(f"more than {MAX_EXTENDED_PER_MEMBER} extended headers "
                                 f"before one entry")
        if self.total > MAX_EXTENDED_TOTAL:
            raise TarFormatError(f"extended headers of more than {MAX_EXTENDED_TOTAL} bytes "
                                 f"before one entry")
        if flag in (PAX, GLOBAL_PAX):
            records = parse_pax(payload)
            if flag == PAX:
                self.pax.update(records)
        elif flag == GNU_LONGNAME:
            self.long_name = payload.rstrip(b"\0")
        elif flag == GNU_LONGLINK:
            self.long_link = payload.rstrip(b"\0")

    def member(self, raw: RawHeader) -> Header:
        """The member ``raw`` describes, with the collected extensions applied; resets."""
        block = raw.block
        pax, long_name, long_link = self.pax, self.long_name, self.long_link
        self.pax, self.long_name, self.long_link = {}, None, None
        self.count = self.total = 0
        name = long_name if long_name is not None else raw.name
        link = long_link if long_link is not None else nts(block[157:257])
        h = Header(name=os.fsdecode(name), kind=_KINDS.get(raw.flag, raw.flag),
                   flag=raw.flag, size=raw.size,
                   mode=parse_number(block[100:108], "mode") & 0o7777,
                   uid=parse_number(block[108:116], "uid"),
                   gid=parse_number(block[116:124], "gid"),
                   mtime_ns=parse_number(block[136:148], "mtime") * 1_000_000_000,
                   linkname=os.fsdecode(link), pax=pax)
        for key, value in pax.items():
            if key in ("path", "linkpath"):
                if not value:
                    continue  # an empty record means "use the header field"
                if key == "path":
                    h.name = os.fsdecode(value)
                else:
                    h.linkname = os.fsdecode(value)
            elif key == "size":
                h.size = parse_decimal(value, "size")
            elif key == "uid":
                h.uid = parse_decimal(value, "uid")
            elif key == "gid":
                h.gid = parse_decimal(value, "gid")
            elif key == "mtime":
                h.mtime_ns = parse_pax_time(value, "mtime")
            elif key == "atime":
                h.atime_ns = parse_pax_time(value, "atime")
            elif key.startswith("SCHILY.xattr."):
                h.xattrs[key[len("SCHILY.xattr."):]] = value
        if raw.flag == b"\0" and h.name.endswith("/"):
            h.kind = DIR  # pre-POSIX tars mark directories by the trailing slash only
        if h.kind in (CHR, BLK):
            h.devmajor = parse_number(block[329:337], "devmajor")
            h.devminor = parse_number(block[337:345], "devminor")
        if h.kind in HEADER_ONLY:
            # Links, directories and devices never carry data (as in Go's and Python's
            # readers); a size field on them is ignored. Unknown types keep theirs.
            h.size = 0
        return h


def padding(size: int) -> int:
    """Zero bytes after ``size`` bytes of data, up to the next block."""
    return -size % BLOCK


# --- encoding (the writer's side) ------------------------------------------------------------

def octal(value: int, width: int) -> bytes:
    """A NUL-terminated octal field of ``width`` bytes."""
    return b"%0*o\0" % (width - 1, value)


def pax_record(key: str, value: bytes) -> bytes:
    """One PAX record ``"LEN KEY=VALUE\\n"``; LEN counts itself."""
    payload = b" " + os.fsencode(key) + b"=" + value + b"\n"
    length = len(payload) + len(str(len(payload)))
    if len(str(length)) != len(str(len(payload))):
        length = len(payload) + len(str(length))
    return str(length).encode() + payload


def pax_time(ns: int) -> bytes:
    """A timestamp in nanoseconds as a PAX time (decimal seconds, no trailing zeros)."""
    sign = "-" if ns < 0 else ""
    secs, frac = divmod(abs(ns), 1_000_000_000)
    if not frac:
        return f"{sign}{secs}".encode()
    return f"{sign}{secs}.{frac:09d}".rstrip("0").encode()


def ustar_block(name: bytes, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                link: bytes, devmajor: int, devminor: int) -> bytes:
    """A POSIX ustar header block with its checksum; fields must already fit."""
    block = bytearray(b"".join((
        name.ljust(100, b"\0"), octal(mode & 0o7777, 8), octal(uid, 8), octal(gid, 8),
        octal(size, 12), octal(mtime, 12), b" " * 8, kind, link.ljust(100, b"\0"),
        _POSIX_MAGIC, bytes(64), octal(devmajor, 8), octal(devminor, 8), bytes(167))))
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)
