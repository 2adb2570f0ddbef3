"""One parser per format: the cases where the copies that used to exist disagreed.

Tar headers (the layer reader, the image archive index and the tar-split recorder now
share :mod:`layerfs.tar.header`), image references (local names and registry
references share :mod:`layerfs.reference`), descriptors (:func:`layerfs.oci.parse_descriptor`),
sizes (:mod:`layerfs.units`) and mountinfo (:func:`layerfs.mount.parse_mountinfo_line`).
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.errors import InvalidArgument
from layerfs.oci import parse_descriptor
from layerfs.reference import RemoteReference, parse_reference
from layerfs.tar import WhiteoutFormat, apply_layer
from layerfs.tar.header import BLOCK, REG, SYM
from layerfs.tar.index import members
from layerfs.tar.split import TarSplitRecorder
from layerfs.units import parse_size

from .hostile_tars import header, member, pad, pax

END = bytes(2 * BLOCK)


def index_of(data: bytes, tmp_path: Path) -> list[tuple[str, bytes, int]]:
    path = tmp_path / "archive.tar"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(name, m.kind, m.size) for name, m in members(fd, "archive.tar")]
    finally:
        os.close(fd)


def applied(data: bytes, tmp_path: Path) -> list[str]:
    dest = tmp_path / "layer"
    apply_layer(dest, io.BytesIO(data), WhiteoutFormat.IN_PLACE)
    return sorted(p.name for p in dest.iterdir())


def recorded(data: bytes) -> TarSplitRecorder:
    rec = TarSplitRecorder()
    rec.feed(memoryview(data))
    return rec


# --- tar: the image archive index reads what the layer reader reads ---------------------------

def test_a_symlink_with_a_size_field_carries_no_data_for_every_reader(tmp_path: Path) -> None:
    # Go's archive/tar and Python's tarfile ignore the size of header-only members; the
    # old image archive index skipped that many bytes and lost the next member.
    data = (header(b"link", b"2", size=BLOCK, linkname=b"target")
            + member(b"file", data=b"hello\n") + END)
    assert index_of(data, tmp_path) == [("link", SYM, 0), ("file", REG, 6)]
    assert applied(data, tmp_path) == ["file", "link"]
    rec = recorded(data)
    assert not rec.broken and rec.files == 1


def test_a_malformed_pax_record_is_corrupt_for_every_reader(tmp_path: Path) -> None:
    # The old index stopped reading PAX records at the first bad one and went on.
    data = pax({b"path": b"renamed"})[:BLOCK] + pad(b"99 path=x\n") + member(b"f") + END
    with pytest.raises(InvalidArgument, match="corrupt"):
        index_of(data, tmp_path)
    with pytest.raises(InvalidArgument, match="corrupt"):
        applied(data, tmp_path)
    assert recorded(data).broken


def test_pax_path_and_size_apply_alike(tmp_path: Path) -> None:
    body = b"x" * 700
    data = pax({b"path": b"long/" + b"n" * 150, b"size": b"700"}) + \
        header(b"short", size=0) + pad(body) + member(b"after") + END
    names = index_of(data, tmp_path)
    assert names == [("long/" + "n" * 150, REG, 700), ("after", REG, 0)]
    rec = recorded(data)
    assert not rec.broken and rec.files == 1


def test_a_signed_checksum_is_accepted_by_the_index_too(tmp_path: Path) -> None:
    # Old writers summed signed chars: a name byte > 127 makes the sums differ.
    name = "caf\u00e9".encode("latin-1")
    block = bytearray(header(name))
    high = sum(1 for b in block[:148] + block[156:] if b > 127)
    block[148:156] = b"%06o\0 " % (sum(block[:148]) + sum(block[156:]) + 256 - 256 * high)
    data = bytes(block) + END
    assert [kind for _, kind, _ in index_of(data, tmp_path)] == [REG]


def test_gnu_headers_have_no_prefix_field(tmp_path: Path) -> None:
    # GNU tar keeps atime/ctime where ustar has its prefix; only POSIX magic means prefix.
    data = header(b"file", magic=b"ustar  \0", prefix=b"00000000000\x0000000000000") + END
    assert index_of(data, tmp_path) == [("file", REG, 0)]


def test_a_negative_base256_size_is_refused_not_read_as_huge(tmp_path: Path) -> None:
    data = header(b"file", size_field=b"\xff" * 12) + END
    with pytest.raises(InvalidArgument, match="negative size"):
        index_of(data, tmp_path)
    with pytest.raises(InvalidArgument, match="negative size"):
        applied(data, tmp_path)


# --- references: one grammar for local names and registry references -----------------------

@pytest.mark.parametrize(("text", "registry", "repository", "local"), [
    ("[::1]:5000/lab/app:v1", "[::1]:5000", "lab/app", "[::1]:5000/lab/app:v1"),
    ("[fe80::1]/app", "[fe80::1]", "app", "[fe80::1]/app:latest"),
    ("localhost:5000/a", "localhost:5000", "a", "localhost:5000/a:latest"),
    ("reg.example.com/x/y:1.0", "reg.example.com", "x/y", "reg.example.com/x/y:1.0"),
    ("busybox", "docker.io", "library/busybox", "busybox:latest"),
])
def test_local_names_and_registry_references_agree(text: str, registry: str,
                                                   repository: str, local: str) -> None:
    ref = RemoteReference.parse(text)
    assert (ref.registry, ref.repository) == (registry, repository)
    assert ref.local_name == local == parse_reference(text)


@pytest.mark.parametrize("text", ["host-.example/app", "Upper/app", "[::1/app", "app:-x"])
def test_bad_references_are_refused_by_both_readings(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)
    with pytest.raises(InvalidArgument):
        RemoteReference.parse(text)


# --- descriptors ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [True, False, -1, 1.5, "12", None])
def test_descriptor_sizes_must_be_integers(size: object) -> None:
    desc = {"mediaType": "x", "digest": "sha256:" + "a" * 64, "size": size}
    with pytest.raises(InvalidArgument, match="bad size"):
        parse_descriptor(desc, "manifest")


def test_descriptor_fields() -> None:
    d = parse_descriptor({"digest": "sha256:" + "b" * 64, "size": 3}, "config")
    assert (d.media_type, d.digest, d.size) == ("", "sha256:" + "b" * 64, 3)
    with pytest.raises(InvalidArgument, match="not a sha256"):
        parse_descriptor({"digest": "md5:00", "size": 3}, "config")


# --- sizes: the union of what the three old grammars took, and nothing worse --------------

@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("64m", 64 << 20), ("1.5k", 1536), ("10G", 10 << 30),
    ("1.5GiB", 3 << 29), ("512MB", 512 << 20), (" 4 G ", 4 << 30), ("1t", 1 << 40),
])
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "4 gallons", "-1", "inf", "nan", "1e3", "", "0x10"])
def test_bad_sizes_name_what_they_are(text: str) -> None:
    # "inf" crashed the driver option parser (int(float("inf"))); "1e3" was 1000 there.
    with pytest.raises(InvalidArgument, match="option size"):
        parse_size(text, what="option size")


# --- mountinfo -----------------------------------------------------------------------------

def test_mountinfo_line_fields() -> None:
    info = mountlib.parse_mountinfo_line(
        r"36 35 98:0 /mnt\0401 /a\040b\011c\134 rw,noatime master:1 shared:2 - "
        r"ext3 /dev/root rw,errors=continue,prjquota" "\n")
    assert (info.mount_id, info.parent_id, info.devno) == (36, 35, os.makedev(98, 0))
    assert (info.root, info.target) == ("/mnt 1", "/a b\tc\\")
    assert (info.fstype, info.source) == ("ext3", "/dev/root")
    assert info.mount_options == "rw,noatime"
    assert "prjquota" in info.super_option_set


def test_a_mount_point_with_a_space_is_found(tmp_path: Path) -> None:
    # overlay2 compared the raw (escaped) field with the path, so this never matched.
    from layerfs_drivers.overlay2 import mount_of, xfs_project_quotas

    target = tmp_path / "with space"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "lfs-formats", str(target)],
                   check=True)
    try:
        info = mount_of(target / "inside")
        assert info.target == str(target) and info.fstype == "tmpfs"
        assert "size=1024k" in info.super_option_set
        assert info.devno == os.stat(target).st_dev
        assert not xfs_project_quotas(target)
    finally:
        mountlib.unmount(target)
    assert not mountlib.is_mounted(target)
