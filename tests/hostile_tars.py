"""A corpus of hostile and broken layer tars, built in memory.

Each :class:`HostileCase` is one attack (or one kind of damage) that
:func:`layerfs.tar.apply_layer` must refuse without writing outside the
layer directory. Cases that try to escape aim at ``outside``, a sibling of the
layer directory that the test fills with a canary, so a failure is visible and
harmless. Headers are assembled byte by byte (:func:`header`), because
:mod:`tarfile` refuses or normalises several of these tricks.

Run ``python tests/hostile_tars.py DIR`` to write the corpus as ``DIR/NAME.tar``
(aimed at ``DIR/outside``) for trying it against other extractors.
"""

from __future__ import annotations

import functools
import gzip
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from layerfs.errors import InvalidArgument, UnsafeArchive
from layerfs.testing.trees import Spec, Symlink

BLOCK = 512
END = bytes(2 * BLOCK)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def header(name: bytes, typeflag: bytes = b"0", *, size: int = 0, mode: int = 0o644,
           uid: int = 0, gid: int = 0, mtime: int = 1_600_000_000, linkname: bytes = b"",
           devmajor: int = 0, devminor: int = 0, magic: bytes = b"ustar\x0000",
           size_field: bytes | None = None, checksum_delta: int = 0,
           prefix: bytes = b"") -> bytes:
    """One 512-byte ustar header with a correct checksum (unless ``checksum_delta``)."""
    block = bytearray(b"".join((
        name[:100].ljust(100, b"\0"), _octal(mode, 8), _octal(uid, 8), _octal(gid, 8),
        size_field if size_field is not None else _octal(size, 12), _octal(mtime, 12),
        b" " * 8, typeflag, linkname[:100].ljust(100, b"\0"), magic, bytes(64),
        _octal(devmajor, 8), _octal(devminor, 8), prefix[:155].ljust(155, b"\0"), bytes(12))))
    assert len(block) == BLOCK
    block[148:156] = b"%06o\0 " % (sum(block) + checksum_delta)
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes, typeflag: bytes = b"0", data: bytes = b"", **kw: object) -> bytes:
    """A header plus its (padded) data; ``size`` defaults to ``len(data)``.

    A name or link name longer than ustar's 100 bytes (an escape aimed at a long temp
    folder) goes whole into a PAX record before the header, as real tar writers do;
    cut at 100 bytes it would aim somewhere else and the case would test nothing."""
    kw.setdefault("size", len(data))
    linkname = kw.get("linkname", b"")
    assert isinstance(linkname, bytes)
    long = {key: value for key, value in ((b"path", name), (b"linkpath", linkname))
            if len(value) > 100}
    prefix = pax(long) if long else b""
    return prefix + header(name, typeflag, **kw) + pad(data)  # type: ignore[arg-type]


def pax(records: dict[bytes, bytes], name: bytes = b"PaxHeaders.0/x",
        flag: bytes = b"x") -> bytes:
    """A PAX extended header ('x', or global 'g') carrying ``records``."""
    body = b""
    for key, value in records.items():
        payload = b" " + key + b"=" + value + b"\n"
        length = len(payload) + len(str(len(payload)))
        if len(str(length)) != len(str(len(payload))):
            length = len(payload) + len(str(length))
        body += str(length).encode() + payload
    return member(name, flag, body)


def gnu_long(value: bytes, flag: bytes = b"L") -> bytes:
    """A GNU long name ('L') or long link name ('K') for the next member."""
    return member(b"././@LongLink", flag, value + b"\0", magic=b"ustar  \0")


def tar(*members: bytes) -> bytes:
    return b"".join(members) + END


@dataclass(frozen=True)
class HostileCase:
    name: str
    data: bytes
    #: exception apply_layer must raise (UnsafeArchive is an InvalidArgument)
    expect: type[Exception] = UnsafeArchive
    #: absolute paths that must not exist afterwards
    aims: tuple[Path, ...] = ()
    #: a substring the error message must contain (usually the entry's name)
    mentions: str = ""
    #: make_tree spec for the layer directory before applying (a "parent layer")
    setup: Spec = field(default_factory=dict)
    #: applies only to these formats (None: all)
    formats: tuple[str, ...] | None = None


def hostile_cases(outside: Path) -> list[HostileCase]:
    """The corpus, with escapes aimed at ``outside`` (which should hold ``canary``)."""
    out = bytes(outside)
    canary = out + b"/canary"
    ok_file = member(b"ok", data=b"fine")
    cases: list[HostileCase] = []

    def case(name: str, data: bytes, expect: type[Exception] = UnsafeArchive,
             aims: tuple[str, ...] = (), mentions: str = "", **kw: object) -> None:
        cases.append(HostileCase(name, data, expect, tuple(outside / a for a in aims),
                                 mentions, **kw))  # type: ignore[arg-type]

    # -- names that escape ------------------------------------------------------
    case("absolute_name", tar(member(out + b"/abs-evil", data=b"x")),
         aims=("abs-evil",), mentions="abs-evil")
    case("dotdot_leading", tar(member(b"../outside/dotdot-evil", data=b"x")),
         aims=("dotdot-evil",), mentions="../outside/dotdot-evil")
    case("dotdot_inner", tar(member(b"a/../../outside/inner-evil", data=b"x")),
         aims=("inner-evil",), mentions="inner-evil")
    case("dotdot_staying_inside", tar(member(b"a/b/../c", data=b"x")), mentions="a/b/../c")
    case("dotdot_dir_entry", tar(member(b"..", b"5", mode=0o777)), mentions="..")
    case("root_as_file", tar(member(b"./", b"0", data=b"x")), mentions="./")
    case("root_as_symlink", tar(member(b".", b"2", linkname=out)), mentions=".")
    case("empty_name", tar(member(b"", data=b"x")), mentions="empty name")

    # -- symlinks followed during extraction ----------------------------------
    case("symlink_abs_then_file",
         tar(member(b"a", b"2", linkname=out), member(b"a/sym-evil", data=b"x")),
         aims=("sym-evil",), mentions="a/sym-evil")
    case("symlink_rel_then_file",
         tar(member(b"a", b"2", linkname=b"../outside"), member(b"a/sym-evil2", data=b"x")),
         aims=("sym-evil2",), mentions="a/sym-evil2")
    case("symlink_chain",
         tar(member(b"a", b"2", linkname=b"b"), member(b"b", b"2", linkname=b"../outside"),
             member(b"a/chain-evil", data=b"x")),
         aims=("chain-evil",), mentions="a/chain-evil")
    case("symlink_deep",
         tar(member(b"d", b"5"), member(b"d/l", b"2", linkname=b"../../outside"),
             member(b"d/l/deep-evil", data=b"x")),
         aims=("deep-evil",), mentions="d/l/deep-evil")
    case("symlink_to_root",
         tar(member(b"r", b"2", linkname=b"/"), member(b"r" + out + b"/root-evil", data=b"x")),
         aims=("root-evil",), mentions="root-evil")
    case("symlink_then_dir",
         tar(member(b"a", b"2", linkname=out), member(b"a/evil-sub/", b"5")),
         aims=("evil-sub",), mentions="a/evil-sub")
    case("symlink_loop_then_file",
         tar(member(b"loop", b"2", linkname=b"loop"), member(b"loop/x", data=b"x")),
         mentions="loop/x")
    case("symlink_replaced_by_dup",
         tar(member(b"a", b"5"), member(b"a", b"2", linkname=out),
             member(b"a/dup-evil", data=b"x")),
         aims=("dup-evil",), mentions="duplicate")
    case("parent_symlink_in_layer",
         tar(member(b"lib/pre-evil", data=b"x")),
         aims=("pre-evil",), mentions="lib", setup={"lib": Symlink(str(outside))})

    # -- hardlinks ------------------------------------------------------------
    case("hardlink_absolute", tar(member(b"h", b"1", linkname=canary)), mentions="h")
    case("hardlink_dotdot", tar(member(b"h", b"1", linkname=b"../outside/canary")),
         mentions="../outside/canary")
    case("hardlink_through_symlink",
         tar(member(b"l", b"2", linkname=out), member(b"h", b"1", linkname=b"l/canary")),
         mentions="h")
    case("hardlink_through_symlink_then_write",
         tar(member(b"l", b"2", linkname=b"../outside"),
             member(b"h", b"1", linkname=b"l/canary"), member(b"h", data=b"overwritten")),
         mentions="h")
    case("hardlink_missing_target", tar(member(b"h", b"1", linkname=b"nope")),
         expect=InvalidArgument, mentions="nope")
    case("hardlink_to_directory",
         tar(member(b"d", b"5"), member(b"h", b"1", linkname=b"d")),
         expect=InvalidArgument, mentions="h")
    case("hardlink_to_itself", tar(member(b"h", b"1", linkname=b"h")), mentions="h")
    case("hardlink_then_rewrite",
         tar(member(b"f", data=b"orig"), member(b"h", b"1", linkname=b"f"),
             member(b"h", data=b"clobber")),
         mentions="duplicate")
    case("pax_linkpath_dotdot",
         tar(pax({b"linkpath": b"../outside/canary"}), member(b"h", b"1", linkname=b"ok")),
         mentions="../outside/canary")
    case("gnu_longlink_absolute",
         tar(gnu_long(canary, b"K"), member(b"h", b"1", linkname=b"short")),
         mentions="canary")

    # -- whiteouts ------------------------------------------------------------
    case("whiteout_dotdot", tar(member(b".wh...")), mentions=".wh...")
    case("whiteout_dot", tar(member(b".wh..")), mentions=".wh..")
    case("whiteout_empty", tar(member(b".wh.")), mentions=".wh.")
    case("whiteout_nested_empty", tar(member(b"a/", b"5"), member(b"a/.wh.")),
         mentions="a/.wh.")
    case("whiteout_escape", tar(member(b"../outside/.wh.canary")), mentions=".wh.canary")
    case("whiteout_absolute", tar(member(out + b"/.wh.canary")), mentions=".wh.canary")
    case("whiteout_through_symlink",
         tar(member(b"l", b"2", linkname=b"../outside"), member(b"l/.wh.canary")),
         mentions="l/.wh.canary")
    case("whiteout_through_layer_symlink", tar(member(b"lib/.wh.canary")),
         mentions="lib/.wh.canary", setup={"lib": Symlink(str(outside))})
    case("opaque_through_symlink",
         tar(member(b"l", b"2", linkname=b"../outside"), member(b"l/.wh..wh..opq")),
         mentions="l/.wh..wh..opq")
    case("opaque_through_layer_symlink", tar(ok_file, member(b"lib/.wh..wh..opq")),
         mentions="lib", setup={"lib": Symlink(str(outside))})
    case("whiteout_char_device", tar(member(b".wh.x", b"3")), mentions=".wh.x")
    case("whiteout_block_device", tar(member(b"d/", b"5"), member(b"d/.wh.y", b"4",
                                                                  devmajor=8)),
         mentions="d/.wh.y")
    case("whiteout_as_directory", tar(member(b".wh.d/", b"5"), member(b".wh.d/x", data=b"x")),
         mentions=".wh.d")
    case("whiteout_of_whiteout", tar(member(b"a/", b"5"), member(b"a/.wh..wh.x")),
         mentions=".wh..wh.x")

    # -- duplicates and odd names ---------------------------------------------
    case("duplicate_entry", tar(member(b"f", data=b"1"), member(b"f", data=b"2")),
         mentions="duplicate")
    case("duplicate_normalised", tar(member(b"f", data=b"1"), member(b"./f", data=b"2")),
         mentions="duplicate")
    case("duplicate_slashes",
         tar(member(b"d/", b"5"), member(b"d//x", data=b"1"), member(b"d/x", data=b"2")),
         mentions="duplicate")
    case("duplicate_whiteout", tar(member(b".wh.a"), member(b"./.wh.a")), mentions="duplicate")
    # A whiteout between them does not make a path named twice acceptable (OCI: it
    # hides only the lower layers' entry, never this layer's).
    case("duplicate_around_whiteout",
         tar(member(b"f", data=b"1"), member(b".wh.f"), member(b"f", data=b"2")),
         mentions="duplicate")
    case("nul_in_pax_path",
         tar(pax({b"path": b"ok\0/../../outside/nul-evil"}), member(b"ok", data=b"x")),
         aims=("nul-evil",), mentions="NUL")
    case("nul_in_gnu_longname",
         tar(gnu_long(b"ok\0/../../outside/nul-evil2"), member(b"ok", data=b"x")),
         aims=("nul-evil2",), mentions="NUL")
    case("pax_path_dotdot",
         tar(pax({b"path": b"../outside/pax-evil"}), member(b"innocent", data=b"x")),
         aims=("pax-evil",), mentions="../outside/pax-evil")
    case("pax_path_absolute",
         tar(pax({b"path": out + b"/pax-abs"}), member(b"innocent", data=b"x")),
         aims=("pax-abs",), mentions="pax-abs")
    case("gnu_longname_dotdot",
         tar(gnu_long(b"x/" + b"y/" * 60 + b"../" * 62 + b"outside/long-evil"),
             member(b"short", data=b"x")),
         aims=("long-evil",), mentions="long-evil")
    case("ustar_prefix_dotdot",
         tar(header(b"prefix-evil", size=1, prefix=b"../outside") + pad(b"x")),
         aims=("prefix-evil",), mentions="../outside/prefix-evil")

    # -- damaged archives -------------------------------------------------------
    good = tar(member(b"dir/", b"5"), member(b"dir/file", data=b"y" * 3000))
    case("truncated_in_header", good[:BLOCK + 200], expect=InvalidArgument,
         mentions="truncated")
    case("truncated_in_data", good[:BLOCK * 3], expect=InvalidArgument, mentions="truncated")
    case("no_end_marker", good[:-2 * BLOCK], expect=InvalidArgument, mentions="end-of-archive")
    case("bad_checksum", tar(header(b"f", size=0, checksum_delta=1)), expect=InvalidArgument,
         mentions="checksum")
    case("bad_checksum_later", good[:-2 * BLOCK] + tar(header(b"g", checksum_delta=7)),
         expect=InvalidArgument, mentions="checksum")
    case("garbage", bytes(range(256)) * 8, expect=InvalidArgument)
    case("empty_stream", b"", expect=InvalidArgument, mentions="empty")
    case("zero_block_then_data", bytes(BLOCK) + good, expect=InvalidArgument,
         mentions="zero block")
    case("bad_octal_size", tar(header(b"f", size_field=b"99999999999\0")),
         expect=InvalidArgument, mentions="octal")
    case("negative_size", tar(header(b"f", size_field=b"\xff" * 12)), expect=InvalidArgument,
         mentions="negative")
    case("huge_size_short_data", tar(member(b"big", size=5 * 10**9, data=b"x" * 100)),
         expect=InvalidArgument, mentions="truncated")
    case("pax_header_too_large", tar(member(b"PaxHeaders.0/x", b"x", size=2 << 20)),
         expect=InvalidArgument, mentions="limit")
    case("pax_bad_record", tar(member(b"PaxHeaders.0/x", b"x", data=b"99 path=x\n"),
                               member(b"f")),
         expect=InvalidArgument, mentions="PAX")
    case("sparse_member", tar(member(b"sparse", b"S", data=b"x")), expect=InvalidArgument,
         mentions="sparse")
    case("unknown_type", tar(member(b"weird", b"Z", data=b"x")), expect=InvalidArgument,
         mentions="weird")
    case("gzip_truncated", gzip.compress(good)[:60], expect=InvalidArgument)
    zst = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(good))
    zst[len(zst) // 2] ^= 0xFF
    case("zstd_corrupt", bytes(zst), expect=InvalidArgument)
    case("zstd_truncated", zstandard.ZstdCompressor().compress(good)[:-20],
         expect=InvalidArgument)
    case("xz_stream", b"\xfd7zXZ\x00" + bytes(100), expect=InvalidArgument, mentions="xz")

    # -- costly archives (issue 20, items 11 and 12) ------------------------------------
    # PAX headers, each under the 1 MiB limit, with new keys: they used to pile up until
    # the next member (1.6 GB from 39 MB of gzip).
    case("pax_headers_pile_up",
         tar(*(pax({b"SCHILY.xattr.user.k%d" % i: b"v" * (600 << 10)}) for i in range(3)),
             ok_file),
         expect=InvalidArgument, mentions="extended headers")
    case("pax_header_flood", tar(*(pax({b"comment": b"x"}) for _ in range(50)), ok_file),
         expect=InvalidArgument, mentions="extended headers")
    # Larger than any filesystem takes (64 KiB on Linux): was a TypeError traceback.
    case("xattr_too_large",
         tar(pax({b"SCHILY.xattr.user.big": b"x" * 200_000}), member(b"f", data=b"x")),
         expect=InvalidArgument, mentions="xattr user.big")
    case("trailing_zeros", _trailing_zeros(good), expect=InvalidArgument,
         mentions="end-of-archive")
    return cases


@functools.cache
def _trailing_zeros(archive: bytes) -> bytes:
    """A valid tar followed by 64 MiB of zeros, gzipped (to 64 KB): a reader that reads
    to the end spends the CPU of decompressing all of it (4 GiB took 15.6 s)."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return z.compress(archive) + b"".join(z.compress(zeros) for _ in range(64)) + z.flush()


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    for c in hostile_cases(target / "outside"):
        (target / f"{c.name}.tar").write_bytes(c.data)
    print(f"wrote {len(hostile_cases(target))} cases to {target}")
