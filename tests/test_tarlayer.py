"""Layer tars: round trips, interop with GNU tar and tarfile, whiteout formats, compression."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from layerfs.changes import Change, ChangeKind, naive_changes
from layerfs.errors import InvalidArgument, NotFound
from layerfs.tar import (
    WhiteoutFormat,
    apply_layer,
    export_changes,
    export_native,
    open_layer_stream,
)
from layerfs.tar.apply import _rmtree
from layerfs.testing.trees import (
    Device,
    Dir,
    Entry,
    Fifo,
    File,
    Hardlink,
    Symlink,
    make_tree,
    tree_manifest,
)

from .hostile_tars import gnu_long, header, member, pad, pax, tar

CAP = (b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
       b"\x00\x00\x00\x00")  # security.capability v2: cap_net_bind_service+ep
NS = 1_700_000_000_123_456_789
NON_UTF8 = os.fsdecode(b"caf\xe9-latin1")

EVERYTHING = {
    "bin/": Dir(mode=0o755),
    "bin/su": File(b"#!suid\n", mode=0o4755, uid=1000, gid=1000, mtime_ns=NS),
    "bin/sg": File(b"sgid", mode=0o2711, uid=0, gid=50, mtime_ns=NS + 1),
    "bin/ping": File(b"ping" * 100, mode=0o755, xattrs={"security.capability": CAP},
                     mtime_ns=NS + 2),
    "bin/ping-link": Hardlink("bin/ping"),
    "bin/ping-link2": Hardlink("bin/ping"),
    "tmp/": Dir(mode=0o1777),
    "shared/": Dir(mode=0o2775, uid=1000, gid=1000, xattrs={"user.dir": b"d"}),
    "shared/f": File(b"", mode=0o600, uid=123456, gid=3_000_000, mtime_ns=-1_500_000_000),
    "data/big": File(os.urandom(3 << 20) + b"tail", mtime_ns=NS),
    "data/xattrs": File(b"x", xattrs={"user.bin": bytes(range(256)), "user.empty": b"",
                                      "trusted.t": b"\xff\x00\xfe"}, mtime_ns=NS),
    "data/" + "long-name-" * 15: File(b"long", mtime_ns=NS),
    "data/" + "deep/" * 30 + "leaf": File(b"deep", mtime_ns=NS),
    "data/ünïcødé": File(b"utf8", mtime_ns=NS),
    "data/" + NON_UTF8: File(b"latin1", mtime_ns=NS),
    "links/abs": Symlink("/etc/passwd", uid=1000, gid=1000, mtime_ns=NS),
    "links/rel": Symlink("../bin/su", mtime_ns=NS),
    "links/dangling": Symlink("nowhere/at/all", xattrs={"trusted.s": b"1"}, mtime_ns=NS),
    "links/long": Symlink("/" + "x" * 200, mtime_ns=NS),
    "links/hard-symlink": Hardlink("links/rel"),
    "dev/null": Device("chr", 1, 3, mode=0o666, mtime_ns=NS),
    "dev/sda": Device("blk", 8, 0, mode=0o660, gid=6, mtime_ns=NS),
    "dev/big": Device("chr", 4000, 1 << 19, mtime_ns=NS),
    "dev/fifo": Fifo(mode=0o620, uid=7, mtime_ns=NS),
    "empty-dir/": Dir(mode=0o700, uid=65534, gid=65534),
    "ro-dir/": Dir(mode=0o555),
    "ro-dir/inside": File(b"in a read-only dir", mtime_ns=NS),
}
EVERYTHING_SIZE = sum(len(v.content) for k, v in EVERYTHING.items() if isinstance(v, File))


@pytest.fixture
def everything(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src", EVERYTHING)


def export_all(tree: Path) -> tuple[bytes, int]:
    buf = io.BytesIO()
    size = export_changes(tree, naive_changes(None, tree), buf)
    return buf.getvalue(), size


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, compresslevel=1)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def names(data: bytes) -> list[str]:
    """Member names, read back with tarfile (an independent reader)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getnames()


@contextlib.contextmanager
def overlay(lower: Path, upper: Path, work: Path, target: Path,
            user: bool = False) -> Iterator[Path]:
    work.mkdir(exist_ok=True)
    target.mkdir(exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}" + (",userxattr" if user else "")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


# ---------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("how", ["plain", "gzip", "zstd"])
def test_round_trip_every_kind_of_entry(tmp_path: Path, everything: Path, how: str) -> None:
    data, size = export_all(everything)
    assert size == EVERYTHING_SIZE  # hardlinks counted once
    dest = tmp_path / "dest"
    assert apply_layer(dest, io.BytesIO(compress(data, how)), WhiteoutFormat.IN_PLACE) == size
    assert tree_manifest(dest) == tree_manifest(everything)


def test_manifest_sees_what_matters(everything: Path) -> None:
    m = tree_manifest(everything)
    assert m["bin/su"].mode == 0o4755 and m["bin/su"].uid == 1000
    assert m["tmp"].mode == 0o1777 and m["shared"].mode == 0o2775
    assert m["bin/ping"].hardlinks == ("bin/ping", "bin/ping-link", "bin/ping-link2")
    assert dict(m["bin/ping"].xattrs)["security.capability"] == CAP
    assert m["dev/null"].rdev == (1, 3) and m["dev/fifo"].type == "fifo"
    assert m["shared/f"].mtime_us == -1_500_000
    assert m["links/long"].target == "/" + "x" * 200


def test_directory_mtimes_are_set_after_children(tmp_path: Path, everything: Path) -> None:
    data, _ = export_all(everything)
    dest = tmp_path / "dest"
    apply_layer(dest, io.BytesIO(data), WhiteoutFormat.IN_PLACE)
    for d in ("bin", "data", "ro-dir", "links"):
        assert os.lstat(dest / d).st_mtime_ns == os.lstat(everything / d).st_mtime_ns, d
    assert stat.S_IMODE(os.lstat(dest / "ro-dir").st_mode) == 0o555


def test_setuid_and_capabilities_survive_chown(tmp_path: Path) -> None:
    data = tar(pax({b"SCHILY.xattr.security.capability": CAP}),
               member(b"cap", data=b"c", mode=0o755, uid=1000, gid=1000),
               member(b"suid", data=b"s", mode=0o6755, uid=1000, gid=1000))
    dest = tmp_path / "dest"
    apply_layer(dest, io.BytesIO(data), WhiteoutFormat.IN_PLACE)
    assert os.getxattr(dest / "cap", "security.capability") == CAP
    st = os.lstat(dest / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o6755, 1000, 1000)


# ---------------------------------------------------------------------------
# Interoperability


def _coarse(m: dict[str, Entry], xattrs: bool = True) -> dict[str, Entry]:
    """The manifest as a format without sub-second mtimes (and maybe xattrs) keeps it."""
    out = {}
    for k, e in m.items():
        # Writers round pre-1970 times differently (floor or toward zero): skip those.
        mt = None if e.mtime_us is None or e.mtime_us < 0 else e.mtime_us // 1_000_000
        out[k] = Entry(**{**e.__dict__, "mtime_us": mt,
                          "xattrs": e.xattrs if xattrs else ()})
    return out


def test_gnu_tar_extracts_our_tars(tmp_path: Path, everything: Path) -> None:
    data, _ = export_all(everything)
    dest = tmp_path / "gnu"
    dest.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-",
                    "-C", str(dest)], input=data, check=True)
    got, want = tree_manifest(dest), tree_manifest(everything)
    assert got == want


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar-via-tarfile", "gnu-via-tarfile",
                                 "pax-via-tarfile"])
def test_we_apply_other_writers_tars(tmp_path: Path, fmt: str) -> None:
    spec = {k: v for k, v in EVERYTHING.items() if not k.startswith("data/deep")
            and "long" not in k and "big" not in k
            # ids too big for ustar; tarfile writes hardlinked symlinks as two symlinks
            and not (fmt.startswith("ustar") and k == "shared/f")
            and not (fmt.endswith("tarfile") and k == "links/hard-symlink")}
    src = make_tree(tmp_path / "src", spec)
    if fmt in ("pax", "gnu"):
        data = subprocess.run(
            ["tar", f"--format={fmt}", "--numeric-owner", "-cf", "-", "-C", str(src), "."]
            + (["--xattrs", "--xattrs-include=*"] if fmt == "pax" else []),
            check=True, capture_output=True).stdout
    else:
        buf = io.BytesIO()
        tf_format = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT,
                     "pax": tarfile.PAX_FORMAT}[fmt.split("-")[0]]
        with tarfile.open(fileobj=buf, mode="w", format=tf_format) as tf:
            tf.add(src, arcname=".")
        data = buf.getvalue()
    dest = tmp_path / "dest"
    apply_layer(dest, io.BytesIO(data), WhiteoutFormat.IN_PLACE)
    want = tree_manifest(src)
    got = tree_manifest(dest)
    if fmt == "pax":
        assert got == want
    else:
        # No xattrs; whole-second mtimes (tarfile's PAX writes float mtimes).
        assert _coarse(got, xattrs=False) == _coarse(want, xattrs=False)


def test_tarfile_reads_our_binary_xattrs(everything: Path) -> None:
    data, _ = export_all(everything)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        info = tf.getmember("data/xattrs")
        raw = {k: v.encode("utf-8", "surrogateescape") for k, v in info.pax_headers.items()}
    assert raw["SCHILY.xattr.user.bin"] == bytes(range(256))
    assert raw["SCHILY.xattr.trusted.t"] == b"\xff\x00\xfe"


def test_reader_details(tmp_path: Path) -> None:
    """Global PAX headers ignored, v7 directories, base-256 ids, GNU long names, padding."""
    big_uid = bytearray(header(b"big-uid", size=1))
    big_uid[108:116] = b"\x80" + (5_000_000).to_bytes(7, "big")
    big_uid[148:156] = b" " * 8
    big_uid[148:156] = b"%06o\0 " % sum(big_uid)
    long_name = b"g/" + (b"n" * 50 + b"/") * 5 + b"leaf"
    data = tar(
        pax({b"comment": b"from git archive", b"path": b"ignored"}, name=b"pax_global_header",
            flag=b"g"),
        member(b"v7dir/", b"\0", magic=b"\0" * 8),
        member(b"v7dir/f", data=b"v7", magic=b"\0" * 8),
        gnu_long(long_name), member(b"short", data=b"gnu"),
        bytes(big_uid) + pad(b"u"),
    ) + bytes(20 * 512)  # GNU tar pads to a 10 KiB record
    dest = tmp_path / "dest"
    assert apply_layer(dest, io.BytesIO(data), WhiteoutFormat.IN_PLACE) == 6
    assert (dest / "v7dir").is_dir() and (dest / "v7dir/f").read_bytes() == b"v7"
    assert (dest / os.fsdecode(long_name)).read_bytes() == b"gnu"
    assert os.lstat(dest / "big-uid").st_uid == 5_000_000
    assert sorted(os.listdir(dest)) == ["big-uid", "g", "v7dir"]


# ---------------------------------------------------------------------------
# Compression


def test_open_layer_stream_detects_compression() -> None:
    data = tar(member(b"f", data=b"x"))
    assert open_layer_stream(io.BytesIO(data)).read() == data
    assert open_layer_stream(io.BytesIO(gzip.compress(data))).read() == data
    two_members = gzip.compress(data[:700]) + gzip.compress(data[700:])
    assert open_layer_stream(io.BytesIO(two_members)).read() == data
    two_frames = (zstandard.ZstdCompressor().compress(data[:600])
                  + zstandard.ZstdCompressor().compress(data[600:]))
    assert open_layer_stream(io.BytesIO(two_frames)).read() == data
    with pytest.raises(InvalidArgument, match="bzip2"):
        open_layer_stream(io.BytesIO(b"BZh91AY&SY" + bytes(50)))


def test_apply_from_a_pipe(tmp_path: Path, everything: Path) -> None:
    data, size = export_all(everything)
    proc = subprocess.Popen(["zstd", "-q", "-c"] if shutil.which("zstd") else ["gzip", "-c"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(data)
    proc.stdin.close()
    assert apply_layer(tmp_path / "dest", proc.stdout, WhiteoutFormat.IN_PLACE) == size
    proc.wait()
    assert tree_manifest(tmp_path / "dest") == tree_manifest(everything)


def test_trailing_garbage_and_lone_zero_block(tmp_path: Path) -> None:
    body = member(b"f", data=b"x")
    apply_layer(tmp_path / "a", io.BytesIO(body + bytes(512)), WhiteoutFormat.IN_PLACE)
    apply_layer(tmp_path / "b", io.BytesIO(tar(body) + b"junk after the end"),
                WhiteoutFormat.IN_PLACE)
    assert (tmp_path / "a/f").read_bytes() == (tmp_path / "b/f").read_bytes() == b"x"


# ---------------------------------------------------------------------------
# Whiteouts and opaque directories, in every format

PARENT = {"d/a": b"a", "d/b": b"b", "d/sub/c": b"c", "keep/x": b"x", "gone/y": b"y",
          "file-to-dir": b"f", "dir-to-file/z": b"z"}
# What the merged view must be after the layer (paths, files' content).
EXPECTED = {"d": None, "d/new": b"new", "keep": None, "keep/x": b"x",
            "file-to-dir": None, "file-to-dir/in": b"in", "dir-to-file": b"now a file"}


def _layer(opaque_form: str) -> bytes:
    common_tail = [member(b"dir-to-file", data=b"now a file"),
                   member(b"file-to-dir/", b"5"), member(b"file-to-dir/in", data=b"in"),
                   member(b".wh.gone")]
    if opaque_form == "opq-first":
        d = [member(b"d/", b"5"), member(b"d/.wh..wh..opq"), member(b"d/new", data=b"new")]
    elif opaque_form == "opq-last":
        d = [member(b"d/", b"5"), member(b"d/new", data=b"new"), member(b"d/.wh..wh..opq")]
    else:  # one whiteout per deleted child, as Docker's naive differ and umoci write
        d = [member(b"d/", b"5"), member(b"d/.wh.a"), member(b"d/.wh.b"), member(b"d/.wh.sub"),
             member(b"d/new", data=b"new")]
    return tar(*d, *common_tail)


def _view(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for k, e in tree_manifest(root).items():
        out[k] = None if e.type == "dir" else (root / k).read_bytes()
    return out


FORMS = ["opq-first", "opq-last", "per-file"]


@pytest.mark.parametrize("form", FORMS)
def test_in_place_whiteouts(tmp_path: Path, form: str) -> None:
    dest = make_tree(tmp_path / "dest", PARENT)
    apply_layer(dest, io.BytesIO(_layer(form)), WhiteoutFormat.IN_PLACE)
    assert _view(dest) == EXPECTED


@pytest.mark.parametrize("user", [False, True], ids=["overlay", "overlay-user"])
@pytest.mark.parametrize("form", FORMS)
def test_overlay_whiteouts_mount_correctly(tmp_path: Path, form: str, user: bool) -> None:
    fmt = WhiteoutFormat.OVERLAY_USER if user else WhiteoutFormat.OVERLAY
    lower = make_tree(tmp_path / "lower", PARENT)
    upper = tmp_path / "upper"
    apply_layer(upper, io.BytesIO(_layer(form)), fmt)
    gone = os.lstat(upper / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    xattr = "user.overlay.opaque" if user else "trusted.overlay.opaque"
    if form == "per-file":
        assert stat.S_ISCHR(os.lstat(upper / "d/a").st_mode)
        assert xattr not in os.listxattr(upper / "d")
    else:
        assert os.getxattr(upper / "d", xattr) == b"y"
    with overlay(lower, upper, tmp_path / "work", tmp_path / "merged", user) as merged:
        assert _view(merged) == EXPECTED


@pytest.mark.parametrize("form", FORMS)
def test_aufs_whiteouts(tmp_path: Path, form: str) -> None:
    dest = tmp_path / "branch"
    apply_layer(dest, io.BytesIO(_layer(form)), WhiteoutFormat.AUFS)
    files = {k for k, e in tree_manifest(dest).items() if e.type == "file"}
    assert ".wh.gone" in files
    if form == "per-file":
        assert {"d/.wh.a", "d/.wh.b", "d/.wh.sub"} <= files
    else:
        assert "d/.wh..wh..opq" in files
    assert stat.S_IMODE(os.lstat(dest / ".wh.gone").st_mode) == 0o444


def test_whiteout_then_recreate_in_one_tar(tmp_path: Path) -> None:
    """Delete-then-create: IN_PLACE replaces; native formats make the new dir opaque."""
    data = tar(member(b".wh.d"), member(b"d/", b"5"), member(b"d/fresh", data=b"f"),
               member(b"f", data=b"1"), member(b".wh.f"))
    dest = make_tree(tmp_path / "inplace", {"d/old": b"o", "f": b"0"})
    apply_layer(dest, io.BytesIO(data), WhiteoutFormat.IN_PLACE)
    assert _view(dest) == {"d": None, "d/fresh": b"f", "f": b"1"}

    upper = tmp_path / "upper"
    apply_layer(upper, io.BytesIO(data), WhiteoutFormat.OVERLAY)
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    assert (upper / "f").read_bytes() == b"1"  # the whiteout hides only the parent's f

    branch = tmp_path / "branch"
    apply_layer(branch, io.BytesIO(data), WhiteoutFormat.AUFS)
    names_ = set(tree_manifest(branch))
    assert {"d/.wh..wh..opq", "d/fresh", "f"} <= names_
    assert ".wh.d" not in names_ and ".wh.f" not in names_


# The OCI layer spec: "Whiteout files MUST only apply to resources in lower/parent
# layers. Files that are present in the same layer as a whiteout file can only be
# hidden by whiteout files in subsequent layers." Order in the tar does not matter.
OWN_ENTRY_LAYERS = {
    "file, then whiteout": (tar(member(b"x", data=b"new"), member(b".wh.x")),
                            {"x": b"new", "keep": b"k"}),
    "whiteout, then file": (tar(member(b".wh.x"), member(b"x", data=b"new")),
                            {"x": b"new", "keep": b"k"}),
    "dir, then whiteout": (tar(member(b"d/", b"5"), member(b"d/a", data=b"a"), member(b".wh.d")),
                           {"d": None, "d/a": b"a", "x": b"old", "keep": b"k"}),
    "whiteout, then dir": (tar(member(b".wh.d"), member(b"d/", b"5"), member(b"d/a", data=b"a")),
                           {"d": None, "d/a": b"a", "x": b"old", "keep": b"k"}),
    "entry below, then whiteout": (tar(member(b"d/a", data=b"a"), member(b".wh.d")),
                                   {"d": None, "d/a": b"a", "x": b"old", "keep": b"k"}),
}
OWN_ENTRY_PARENT = {"x": b"old", "d/b": b"b", "d/sub/c": b"c", "keep": b"k"}


@pytest.mark.parametrize("layer", OWN_ENTRY_LAYERS)
@pytest.mark.parametrize("fmt", [WhiteoutFormat.IN_PLACE, WhiteoutFormat.OVERLAY,
                                 WhiteoutFormat.AUFS], ids=lambda f: f.value)
def test_a_whiteout_hides_only_the_lower_layers(tmp_path: Path, fmt: WhiteoutFormat,
                                                layer: str) -> None:
    data, expected = OWN_ENTRY_LAYERS[layer]
    if "d" not in expected:  # the layer did not touch d: the parent's stays
        expected = {**expected, "d": None, "d/b": b"b", "d/sub": None, "d/sub/c": b"c"}
    if fmt is WhiteoutFormat.IN_PLACE:
        dest = make_tree(tmp_path / "dest", OWN_ENTRY_PARENT)
        apply_layer(dest, io.BytesIO(data), fmt)
        assert _view(dest) == expected
        return
    upper = tmp_path / "upper"
    apply_layer(upper, io.BytesIO(data), fmt)
    if fmt is WhiteoutFormat.AUFS:
        # No kernel aufs here: the branch must hold this layer's entries, and no
        # whiteout of them (aufs would hide the lower ones behind the opaque marker).
        branch = set(tree_manifest(upper))
        assert not {".wh.x", ".wh.d"} & branch
        assert ("d/.wh..wh..opq" in branch) == ("d/a" in expected)
        assert ({"x"} if expected["x"] == b"new" else {"d/a"}) <= branch
        return
    lower = make_tree(tmp_path / "lower", OWN_ENTRY_PARENT)
    with overlay(lower, upper, tmp_path / "work", tmp_path / "merged") as merged:
        assert _view(merged) == expected


def test_hardlinked_whiteouts_and_aufs_metadata(tmp_path: Path) -> None:
    """Docker's tar of an aufs branch: whiteouts hardlinked together, .wh..wh.plnk leaked."""
    data = tar(member(b".wh..wh.plnk/", b"5"), member(b".wh..wh.plnk/1.2", data=b"x"),
               member(b".wh.a"), member(b".wh.b", b"1", linkname=b".wh.a"))
    dest = make_tree(tmp_path / "dest", {"a": b"a", "b": b"b", "c": b"c"})
    apply_layer(dest, io.BytesIO(data), WhiteoutFormat.IN_PLACE)
    assert sorted(tree_manifest(dest)) == ["c"]


def test_entry_replaces_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = make_tree(tmp_path / "dest", {"l": Symlink(str(outside / "target")),
                                         "dl": Symlink(str(outside))})
    apply_layer(dest, io.BytesIO(tar(member(b"l", data=b"mine"), member(b"dl/", b"5"))),
                WhiteoutFormat.IN_PLACE)
    assert not (outside / "target").exists()
    assert (dest / "l").read_bytes() == b"mine" and not (dest / "l").is_symlink()
    assert (dest / "dl").is_dir() and not (dest / "dl").is_symlink()


def test_dir_merge_takes_new_metadata_and_drops_stale_xattrs(tmp_path: Path) -> None:
    dest = make_tree(tmp_path / "dest", {"d/": Dir(mode=0o700, uid=5, xattrs={"user.old": b"1"}),
                                         "d/keep": b"k"})
    data = tar(pax({b"SCHILY.xattr.user.new": b"2"}),
               member(b"d/", b"5", mode=0o751, uid=7, gid=8, mtime=1234567890))
    apply_layer(dest, io.BytesIO(data), WhiteoutFormat.IN_PLACE)
    st = os.lstat(dest / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o751, 7, 8)
    assert st.st_mtime_ns == 1234567890 * 10**9
    assert os.listxattr(dest / "d") == ["user.new"]
    assert (dest / "d/keep").read_bytes() == b"k"


def test_overlay_private_xattrs_in_a_tar_are_dropped(tmp_path: Path) -> None:
    data = tar(pax({b"SCHILY.xattr.trusted.overlay.redirect": b"/etc",
                    b"SCHILY.xattr.user.overlay.metacopy": b"",
                    b"SCHILY.xattr.user.ok": b"1"}), member(b"d/", b"5"))
    for fmt in WhiteoutFormat:
        apply_layer(tmp_path / fmt.value, io.BytesIO(data), fmt)
        assert os.listxattr(tmp_path / fmt.value / "d") == ["user.ok"]


def test_hardlink_to_a_whiteout_is_refused(tmp_path: Path) -> None:
    data = tar(member(b".wh.f"), member(b"h", b"1", linkname=b"f"))
    for fmt in WhiteoutFormat:
        dest = make_tree(tmp_path / fmt.value, {"f": b"parent's"})
        with pytest.raises(InvalidArgument, match="does not exist"):
            apply_layer(dest, io.BytesIO(data), fmt)
    # A whiteout does not delete the layer's own f (OCI): a link to it is fine.
    data = tar(member(b"f", data=b"x"), member(b".wh.f"), member(b"h", b"1", linkname=b"f"))
    for fmt in WhiteoutFormat:
        dest = tmp_path / f"own-{fmt.value}"
        apply_layer(dest, io.BytesIO(data), fmt)
        assert os.lstat(dest / "h").st_ino == os.lstat(dest / "f").st_ino


def test_export_native_refuses_names_that_read_as_whiteouts(tmp_path: Path) -> None:
    upper = make_tree(tmp_path / "upper", {".wh.real-file": b"made by a container"})
    with pytest.raises(InvalidArgument, match="whiteout"):
        export_native(upper, WhiteoutFormat.OVERLAY, io.BytesIO())


def test_root_entry_sets_layer_root_metadata(tmp_path: Path) -> None:
    apply_layer(tmp_path / "dest", io.BytesIO(tar(member(b"./", b"5", mode=0o711, uid=3))),
                WhiteoutFormat.IN_PLACE)
    st = os.lstat(tmp_path / "dest")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o711, 3)


def test_hardlink_to_a_file_of_the_parent_layer(tmp_path: Path) -> None:
    dest = make_tree(tmp_path / "dest", {"etc/passwd": b"root"})
    apply_layer(dest, io.BytesIO(tar(member(b"etc/pw", b"1", linkname=b"etc/passwd"))),
                WhiteoutFormat.IN_PLACE)
    assert os.path.samefile(dest / "etc/pw", dest / "etc/passwd")


# ---------------------------------------------------------------------------
# export_native


def test_export_native_overlay(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", PARENT)
    upper = make_tree(tmp_path / "upper", {
        "d/": Dir(mode=0o750, xattrs={"trusted.overlay.opaque": b"y", "user.keep": b"k"}),
        "d/new": b"new", "keep/": Dir(), "file-to-dir/in": b"in", "dir-to-file": b"now a file",
        "gone": Device("chr", 0, 0), "keep/hl": b"h", "keep/hl2": Hardlink("keep/hl"),
    })
    buf = io.BytesIO()
    size = export_native(upper, WhiteoutFormat.OVERLAY, buf)
    assert size == len(b"new" + b"in" + b"now a file" + b"h")
    got = names(buf.getvalue())
    assert got.index("d") < got.index("d/.wh..wh..opq") < got.index("d/new")
    assert ".wh.gone" in got and "gone" not in got
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        assert tf.getmember("keep/hl2").islnk()
        assert "SCHILY.xattr.trusted.overlay.opaque" not in tf.getmember("d").pax_headers
        assert "SCHILY.xattr.user.keep" in tf.getmember("d").pax_headers
    # Applying the exported tar onto the parent gives what overlay shows.
    applied = tmp_path / "applied"
    subprocess.run(["cp", "-a", str(lower), str(applied)], check=True)
    assert apply_layer(applied, io.BytesIO(buf.getvalue()), WhiteoutFormat.IN_PLACE) == size
    with overlay(lower, upper, tmp_path / "work", tmp_path / "merged") as merged:
        assert tree_manifest(applied) == tree_manifest(merged)


def test_export_native_overlay_user(tmp_path: Path) -> None:
    upper = make_tree(tmp_path / "upper", {"d/": Dir(xattrs={"user.overlay.opaque": b"y"}),
                                           "d/x": b"x"})
    buf = io.BytesIO()
    export_native(upper, WhiteoutFormat.OVERLAY_USER, buf)
    assert names(buf.getvalue()) == ["d", "d/.wh..wh..opq", "d/x"]


def test_export_native_aufs(tmp_path: Path) -> None:
    branch = make_tree(tmp_path / "branch", {
        ".wh..wh.aufs": File(b"", mode=0o444), ".wh..wh.plnk/": Dir(), ".wh..wh.plnk/9.9": b"p",
        ".wh..wh.orph/": Dir(), ".wh.gone": Hardlink(".wh..wh.aufs"),
        "d/.wh..wh..opq": Hardlink(".wh..wh.aufs"), "d/.wh.x": Hardlink(".wh..wh.aufs"),
        "d/new": b"new",
    })
    buf = io.BytesIO()
    assert export_native(branch, WhiteoutFormat.AUFS, buf) == 3
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert sorted(members) == [".wh.gone", "d", "d/.wh..wh..opq", "d/.wh.x", "d/new"]
    assert all(m.isreg() for n, m in members.items() if ".wh." in n)


def test_export_native_refuses_redirects(tmp_path: Path) -> None:
    upper = make_tree(tmp_path / "upper", {"d/": Dir(xattrs={"trusted.overlay.redirect": b"/x"})})
    with pytest.raises(InvalidArgument, match="redirect"):
        export_native(upper, WhiteoutFormat.OVERLAY, io.BytesIO())
    with pytest.raises(InvalidArgument):
        export_native(upper, WhiteoutFormat.IN_PLACE, io.BytesIO())


# ---------------------------------------------------------------------------
# export_changes


def test_export_emits_parents_first_and_whiteouts(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", {"a/b/c/file": b"x", "a/other": b"o", "z/": Dir()})
    changes = [Change("/a/b/c/file", ChangeKind.MODIFY), Change("/z/gone", ChangeKind.DELETE),
               Change("/", ChangeKind.MODIFY)]
    buf = io.BytesIO()
    export_changes(tree, changes, buf)
    assert names(buf.getvalue()) == ["a", "a/b", "a/b/c", "a/b/c/file", "z", "z/.wh.gone"]


# The issue-22 layer: /b and /file1 deleted, a/ changed (a/file2 deleted, a/new
# added), file4 added. Before, the root's whiteouts came after a/'s entries.
WHITEOUTS_FIRST = [".wh.b", ".wh.file1", "a", "a/.wh.file2", "a/new", "file4"]


def test_export_changes_puts_each_directorys_whiteouts_first(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", {"a/new": b"n", "a-b": b"x", "file4": b"4"})
    changes = [Change("/a", ChangeKind.MODIFY), Change("/a/file2", ChangeKind.DELETE),
               Change("/a/new", ChangeKind.ADD), Change("/b", ChangeKind.DELETE),
               Change("/file1", ChangeKind.DELETE), Change("/file4", ChangeKind.ADD)]
    buf = io.BytesIO()
    export_changes(tree, changes, buf)
    assert names(buf.getvalue()) == WHITEOUTS_FIRST
    # Without deletions: plain path order, as before ("a-b" before "a/new").
    buf = io.BytesIO()
    export_changes(tree, [Change("/a", ChangeKind.MODIFY), Change("/a/new", ChangeKind.ADD),
                          Change("/a-b", ChangeKind.ADD)], buf)
    assert names(buf.getvalue()) == ["a", "a-b", "a/new"]


@pytest.mark.parametrize("fmt", [WhiteoutFormat.OVERLAY, WhiteoutFormat.AUFS],
                         ids=lambda f: f.value)
def test_export_native_puts_each_directorys_whiteouts_first(tmp_path: Path,
                                                            fmt: WhiteoutFormat) -> None:
    def gone(name: str) -> dict[str, object]:
        if fmt is WhiteoutFormat.AUFS:
            parent, _, base = name.rpartition("/")
            return {f"{parent}/.wh.{base}" if parent else f".wh.{base}": b""}
        return {name: Device("chr", 0, 0)}

    upper = make_tree(tmp_path / "upper", {
        "a/new": b"n", **gone("a/file2"), **gone("b"), **gone("file1"),  # type: ignore[dict-item]
        "file4": b"4", "-first": b"sorts before .wh."})
    buf = io.BytesIO()
    export_native(upper, fmt, buf)
    assert names(buf.getvalue()) == [*WHITEOUTS_FIRST[:2], "-first", *WHITEOUTS_FIRST[2:]]


def test_export_delete_before_add_of_the_same_path(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", {"p/": Dir(), "p/q": b"new"})
    buf = io.BytesIO()
    export_changes(tree, [Change("/p", ChangeKind.ADD), Change("/p", ChangeKind.DELETE)], buf)
    assert names(buf.getvalue()) == [".wh.p", "p"]


def test_export_errors(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", {"f": b"x", ".wh.sneaky": b""})
    with pytest.raises(NotFound):
        export_changes(tree, [Change("/missing", ChangeKind.ADD)], io.BytesIO())
    with pytest.raises(InvalidArgument):
        export_changes(tree, [Change("relative", ChangeKind.ADD)], io.BytesIO())
    with pytest.raises(InvalidArgument):
        export_changes(tree, [Change("/a/../f", ChangeKind.ADD)], io.BytesIO())
    with pytest.raises(InvalidArgument, match="whiteout"):
        export_changes(tree, [Change("/.wh.sneaky", ChangeKind.ADD)], io.BytesIO())
    with pytest.raises(InvalidArgument, match="not a directory"):
        export_changes(tree, [Change("/f/x", ChangeKind.DELETE)], io.BytesIO())


def test_export_skips_sockets(tmp_path: Path) -> None:
    import socket

    tree = tmp_path / "t"
    tree.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tree / "sock"))
        buf = io.BytesIO()
        export_changes(tree, [Change("/sock", ChangeKind.ADD)], buf)
    assert names(buf.getvalue()) == []


def test_export_is_deterministic(everything: Path) -> None:
    assert export_all(everything) == export_all(everything)


def test_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    """Deeper than the recursion limit (PATH_MAX allows ~2000 levels): no step recurses."""
    src = tmp_path / "src"
    os.mkdir(src)
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1050):  # relative to a dir fd: cheap, and nothing recurses
            os.mkdir("d", dir_fd=fd)
            fd, old = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(old)
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"bottom")
        os.close(leaf)
        os.close(fd)
        data, size = export_all(src)
        dest = tmp_path / "dest"
        assert apply_layer(dest, io.BytesIO(data), WhiteoutFormat.IN_PLACE) == size
        assert tree_manifest(dest) == tree_manifest(src)
        # A root-level opaque marker prunes the whole deep tree, a whiteout removes it.
        apply_layer(dest, io.BytesIO(tar(member(b".wh..wh..opq"), member(b"new", data=b"n"))),
                    WhiteoutFormat.IN_PLACE)
        assert os.listdir(dest) == ["new"]
        apply_layer(tmp_path / "dest2", io.BytesIO(data), WhiteoutFormat.IN_PLACE)
        apply_layer(tmp_path / "dest2", io.BytesIO(tar(member(b".wh.d"))),
                    WhiteoutFormat.IN_PLACE)
        assert os.listdir(tmp_path / "dest2") == []
    finally:
        # pytest's own cleanup uses shutil.rmtree, which recurses.
        for p in ("src", "dest", "dest2"):
            if (tmp_path / p).exists():
                _rmtree(str(tmp_path / p))
