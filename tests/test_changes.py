"""The change model: naive tree comparison and union drivers' diff directories."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from layerfs.changes import (
    Change,
    ChangeKind,
    changes_from_diff_dir,
    naive_changes,
    with_parent_directories,
)
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
        "C /bin", "C /bin/sh", "C /etc", "C /etc/group", "A /etc/new", "C /etc/passwd",
        "A /opt", "A /opt/app", "A /opt/app/bin", "A /opt/app/bin/tool",
        "C /var", "D /var/log",
    ]
    # Sorted by path, parents first.
    paths = [c.path for c in naive_changes(lower, upper)]
    assert paths == sorted(paths)


def test_parent_directories_of_changes_are_modified(tmp_path: Path) -> None:
    """moby's rule: every directory above a change is listed, the root never."""
    lower, upper = pair(tmp_path)
    (upper / "etc/ssl/new").write_bytes(b"x")          # /etc/ssl's mtime moves
    os.utime(upper / "var/lib", ns=(1, 1))              # mtime alone: not a change
    assert diff(lower, upper) == ["C /etc", "C /etc/ssl", "A /etc/ssl/new"]
    os.chmod(upper / "var/lib", 0o700)                  # its own metadata: a change
    (upper / "top").write_bytes(b"t")                   # in the root: no parent listed
    assert diff(lower, upper) == ["C /etc", "C /etc/ssl", "A /etc/ssl/new", "A /top",
                                  "C /var", "C /var/lib"]


def test_with_parent_directories() -> None:
    assert with_parent_directories([Change("/a/b/c", D), Change("/x/y", A), Change("/x", A),
                                    Change("/top", C)]) == [
        Change("/a", C), Change("/a/b", C), Change("/a/b/c", D), Change("/top", C),
        Change("/x", A), Change("/x/y", A)]


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
    assert diff(lower, upper) == ["C /bin", "C /bin/link", "C /dev", "C /dev/null", "C /etc",
                                  "C /etc/group", "C /etc/passwd"]


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
    assert diff(lower, upper) == ["C /bin", "C /bin/sh", "C /etc", "C /etc/passwd",
                                  "A /etc/passwd/inside", "C /var", "C /var/log"]


def test_hardlink_groups(tmp_path: Path) -> None:
    lower, upper = pair(tmp_path)
    os.link(upper / "etc/group", upper / "etc/group-")       # new link to an unchanged file
    assert diff(lower, upper) == ["C /etc", "C /etc/group", "A /etc/group-"]
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


def test_overlay_diff_dir(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", {
        "etc/passwd": File(b"old", mtime_ns=NS), "etc/gone": b"g", "etc/same": File(b"s"),
        "opaque/kept": b"k", "opaque/hidden": b"h", "opaque/sub/deep": b"d",
        "untouched/x": b"x",
    })
    upper = make_tree(tmp_path / "upper", {
        "etc/": Dir(), "etc/passwd": b"changed", "etc/new": b"n",
        "etc/gone": Device("chr", 0, 0), "etc/never-was": Device("chr", 0, 0),
        "real-dev": Device("chr", 1, 3),
        "opaque/": Dir(xattrs={"trusted.overlay.opaque": b"y"}), "opaque/kept": b"k",
    })
    # A copy-up that changed nothing (same owner, mode, size, mtime) is no change.
    subprocess.run(["cp", "-a", str(lower / "etc/same"), str(upper / "etc/same")], check=True)
    got = changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY, [lower])
    assert [str(c) for c in got] == [
        "C /etc", "D /etc/gone", "A /etc/new", "C /etc/passwd",
        "C /opaque", "D /opaque/hidden", "C /opaque/kept", "D /opaque/sub", "A /real-dev"]


def test_diff_dir_agrees_with_the_naive_walk_of_the_merged_trees(tmp_path: Path) -> None:
    """Three branches, whiteouts and opaque directories in the lowers too: the diff
    directory's reading equals naive_changes over the kernel's own overlay mounts."""
    bottom = make_tree(tmp_path / "bottom", {"a/x": b"x", "a/y": b"y", "b/z": b"z", "c": b"c",
                                              "d/deep/e": b"e"})
    middle = make_tree(tmp_path / "middle", {
        "a/": Dir(xattrs={"trusted.overlay.opaque": b"y"}), "a/only": b"o",
        "b/z": Device("chr", 0, 0), "c/": Dir(), "c/now-dir": b"n"})
    upper = make_tree(tmp_path / "upper", {
        "a/": Dir(xattrs={"trusted.overlay.opaque": b"y"}), "a/x": b"new x",
        "b/": Dir(), "b/z": b"back", "c/": Dir(), "c/now-dir": Device("chr", 0, 0),
        "d/": Dir(), "d/deep/": Dir(mode=0o700)})
    views = tmp_path / "views"
    parent, child = views / "parent", views / "child"
    for view, lowers in ((parent, [middle, bottom]), (child, [upper, middle, bottom])):
        view.mkdir(parents=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={':'.join(map(str, lowers))}", str(view)], check=True)
    try:
        want = naive_changes(parent, child)
    finally:
        for view in (parent, child):
            subprocess.run(["umount", str(view)], check=True)
    got = changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY, [middle, bottom])
    assert [str(c) for c in got] == [str(c) for c in want] == [
        "C /a", "D /a/only", "A /a/x", "C /b", "A /b/z", "C /c", "D /c/now-dir",
        "C /d", "C /d/deep"]


def test_overlay_user_diff_dir_and_redirects(tmp_path: Path) -> None:
    upper = make_tree(tmp_path / "upper", {"d/": Dir(xattrs={"user.overlay.redirect": b"/x"})})
    with pytest.raises(InvalidArgument, match="redirect"):
        changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY_USER, [])
    # For the trusted.* flavour the user.* name is ordinary content.
    assert [str(c) for c in changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY, [])] == [
        "A /d"]


def test_aufs_diff_dir(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", {"d/x": b"x", "d/y": b"y", "gone": b"g",
                                            ".wh..wh.plnk/": Dir()})
    branch = make_tree(tmp_path / "branch", {
        ".wh..wh.aufs": b"", ".wh..wh.plnk/": Dir(), ".wh..wh.plnk/1.2": b"x",
        ".wh..wh.orph/": Dir(), ".wh.gone": Hardlink(".wh..wh.aufs"), ".wh.never-was": b"",
        "d/": Dir(), "d/.wh..wh..opq": b"", "d/.wh.x": b"", "d/new": b"n",
    })
    got = changes_from_diff_dir(branch, WhiteoutFormat.AUFS, [lower])
    assert [str(c) for c in got] == ["C /d", "A /d/new", "D /d/x", "D /d/y", "D /gone"]


def test_diff_dir_hardlinks(tmp_path: Path) -> None:
    lower = make_tree(tmp_path / "lower", {"one": File(b"1", mtime_ns=NS),
                                            "pair1": File(b"p", mtime_ns=NS),
                                            "pair2": Hardlink("pair1")})
    upper = tmp_path / "upper"
    upper.mkdir()
    for name in ("one", "pair1"):   # copied up unchanged
        subprocess.run(["cp", "-a", str(lower / name), str(upper / name)], check=True)
    assert changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY, [lower]) == [
        Change("/pair1", C)]        # split from /pair2 by the copy-up
    os.link(upper / "one", upper / "one-link")
    assert [str(c) for c in changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY, [lower])] == [
        "C /one", "A /one-link", "C /pair1"]


def test_diff_dir_refuses_in_place(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        changes_from_diff_dir(tmp_path, WhiteoutFormat.IN_PLACE, [])
