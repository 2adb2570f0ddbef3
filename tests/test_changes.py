"""The change model: naive tree comparison and union drivers' diff directories."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from layerfs.changes import Change, ChangeKind, changes_from_diff_dir, naive_changes
from layerfs.errors import InvalidArgument, NotFound
from layerfs.tar import WhiteoutFormat
from layerfs.testing.trees import Device, Dir, File, Hardlink, Symlink, make_tree

A, C, D = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE
NS = 1_600_000_000_000_000_001

PARENT = {
    "etc/": Dir(),
    "etc/passwd": File(b"root:x:0:0", mtime_ns=NS),
    "etc/group": File(b"root:x:0:", mtime_ns=NS),
    "etc/ssl/cert": File(b"cert", mtime_ns=NS),
    "bin/sh": File(b"sh", mode=0o755, mtime_ns=NS),
    "bin/link": Symlink("sh", mtime_ns=NS),
    "var/log/old": File(b"log", mtime_ns=NS),
    "var/lib/": Dir(),
    "dev/null": Device("chr", 1, 3),
    "h1": File(b"hard", mtime_ns=NS),
    "h2": Hardlink("h1"),
}


def pair(tmp_path: Path) -> tuple[Path, Path]:
    lower = make_tree(tmp_path / "lower", PARENT)
    upper = tmp_path / "upper"
    subprocess.run(["cp", "-a", str(lower), str(upper)], check=True)
    return lower, upper


def diff(lower: Path | None, upper: Path) -> list[str]:
    return [str(c) for c in naive_changes(lower, upper)]


def test_identical_copies_have_no_changes(tmp_path: Path) -> None:
    lower, upper = pair(tmp_path)
    assert naive_changes(lower, upper) == []


def test_empty_lower_lists_everything_as_added(tmp_path: Path) -> None:
    lower, _ = pair(tmp_path)
    changes = naive_changes(None, lower)
    assert all(c.kind is A for c in changes)
    assert [c.path for c in changes] == sorted(c.path for c in changes)
    assert {"/etc", "/etc/ssl", "/etc/ssl/cert", "/h2"} <= {c.path for c in changes}


def test_add_modify_delete(tmp_path: Path) -> None:
    lower, upper = pair(tmp_path)
    (upper / "etc/passwd").write_bytes(b"root:x:0:0\nuser")          # content: size+mtime
    (upper / "etc/new").write_bytes(b"n")
    (upper / "opt/app/bin").mkdir(parents=True)
    (upper / "opt/app/bin/tool").write_bytes(b"t")
    shutil.rmtree(upper / "var/log")
    os.chmod(upper / "bin/sh", 0o4755)
    os.chown(upper / "etc/group", 1000, 1000)
    assert diff(lower, upper) == [
        "C /bin/sh", "C /etc/group", "A /etc/new", "C /etc/passwd",
        "A /opt", "A /opt/app", "A /opt/app/bin", "A /opt/app/bin/tool",
        "D /var/log",
    ]
    # Sorted by path, parents first.
    paths = [c.path for c in naive_changes(lower, upper)]
    assert paths == sorted(paths)


def test_directories_change_only_for_their_own_metadata(tmp_path: Path) -> None:
    lower, upper = pair(tmp_path)
    (upper / "etc/ssl/new").write_bytes(b"x")          # /etc/ssl's mtime moves
    os.utime(upper / "var/lib", ns=(1, 1))              # mtime alone: not a change
    assert diff(lower, upper) == ["A /etc/ssl/new"]
    os.chmod(upper / "var/lib", 0o700)
    os.setxattr(upper / "etc", "user.x", b"1")
    assert diff(lower, upper) == ["C /etc", "A /etc/ssl/new", "C /var/lib"]


def test_file_metadata_changes(tmp_path: Path) -> None:
    lower, upper = pair(tmp_path)
    os.utime(upper / "etc/passwd", ns=(NS, NS + 1))                # mtime, nanoseconds
    os.setxattr(upper / "etc/group", "user.k", b"\x00")            # xattr
    os.setxattr(upper / "etc/ssl/cert", "trusted.overlay.origin", b"x")  # ignored
    os.unlink(upper / "bin/link")                                  # same length, same mtime
    os.symlink("hs", upper / "bin/link")
    os.utime(upper / "bin/link", ns=(NS, NS), follow_symlinks=False)
    os.unlink(upper / "dev/null")
    os.mknod(upper / "dev/null", 0o20644, os.makedev(1, 5))
    os.chmod(upper / "dev/null", os.lstat(lower / "dev/null").st_mode & 0o7777)
    assert diff(lower, upper) == ["C /bin/link", "C /dev/null", "C /etc/group", "C /etc/passwd"]


def test_content_change_with_forged_mtime_is_not_seen(tmp_path: Path) -> None:
    """Documented limit, shared with Docker: content is not read."""
    lower, upper = pair(tmp_path)
    (upper / "etc/passwd").write_bytes(b"ROOT:x:0:0")
    os.utime(upper / "etc/passwd", ns=(NS, NS))
    assert diff(lower, upper) == []


def test_type_changes(tmp_path: Path) -> None:
    lower, upper = pair(tmp_path)
    os.unlink(upper / "etc/passwd")
    (upper / "etc/passwd").mkdir()
    (upper / "etc/passwd/inside").write_bytes(b"i")
    shutil.rmtree(upper / "var/log")
    (upper / "var/log").write_bytes(b"now a file")
    os.unlink(upper / "bin/sh")
    os.symlink("busybox", upper / "bin/sh")
    # Old children of /var/log are not listed: replacing the path removes them.
    assert diff(lower, upper) == ["C /bin/sh", "C /etc/passwd", "A /etc/passwd/inside",
                                  "C /var/log"]


def test_hardlink_groups(tmp_path: Path) -> None:
    lower, upper = pair(tmp_path)
    os.link(upper / "etc/group", upper / "etc/group-")       # new link to an unchanged file
    assert diff(lower, upper) == ["C /etc/group", "A /etc/group-"]
    # Splitting a pair (same content and metadata, new inode) is a change too.
    os.unlink(upper / "etc/group-")
    os.unlink(upper / "h2")
    shutil.copy2(upper / "h1", upper / "h2")
    assert diff(lower, upper) == ["C /h1", "C /h2"]  # /etc/group is back to one link


def test_missing_trees(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        naive_changes(None, tmp_path / "nope")
    with pytest.raises(NotFound):
        naive_changes(tmp_path / "nope", tmp_path)


def test_change_ordering_and_str() -> None:
    assert sorted([Change("/b", A), Change("/a/b", D), Change("/a", C)]) == [
        Change("/a", C), Change("/a/b", D), Change("/b", A)]
    assert str(Change("/etc", C)) == "C /etc"
    assert ChangeKind("D") is D and ChangeKind.ADD == "A"


# ---------------------------------------------------------------------------
# changes_from_diff_dir


def below(*paths: str) -> Callable[[str], bool]:
    present = set(paths)
    return lambda p: p in present


def test_overlay_diff_dir(tmp_path: Path) -> None:
    upper = make_tree(tmp_path / "upper", {
        "etc/": Dir(), "etc/passwd": b"changed", "etc/new": b"n",
        "etc/gone": Device("chr", 0, 0), "real-dev": Device("chr", 1, 3),
        "opaque/": Dir(xattrs={"trusted.overlay.opaque": b"y"}), "opaque/kept": b"k",
    })
    got = changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY,
                                below("/etc", "/etc/passwd", "/etc/gone", "/opaque",
                                      "/opaque/kept"))
    assert [str(c) for c in got] == [
        "C /etc", "D /etc/gone", "A /etc/new", "C /etc/passwd",
        "C /opaque", "C /opaque/kept", "A /real-dev"]


def test_overlay_user_diff_dir_and_redirects(tmp_path: Path) -> None:
    upper = make_tree(tmp_path / "upper", {"d/": Dir(xattrs={"user.overlay.redirect": b"/x"})})
    with pytest.raises(InvalidArgument, match="redirect"):
        changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY_USER, below())
    # For the trusted.* flavour the user.* name is ordinary content.
    assert [str(c) for c in changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY, below())] == [
        "A /d"]


def test_aufs_diff_dir(tmp_path: Path) -> None:
    branch = make_tree(tmp_path / "branch", {
        ".wh..wh.aufs": b"", ".wh..wh.plnk/": Dir(), ".wh..wh.plnk/1.2": b"x",
        ".wh..wh.orph/": Dir(), ".wh.gone": Hardlink(".wh..wh.aufs"),
        "d/": Dir(), "d/.wh..wh..opq": b"", "d/.wh.x": b"", "d/new": b"n",
    })
    got = changes_from_diff_dir(branch, WhiteoutFormat.AUFS, below("/d", "/gone", "/d/x"))
    assert [str(c) for c in got] == ["C /d", "A /d/new", "D /d/x", "D /gone"]


def test_diff_dir_refuses_in_place(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        changes_from_diff_dir(tmp_path, WhiteoutFormat.IN_PLACE, below())
