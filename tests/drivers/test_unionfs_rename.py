"""Issue 19, points 2 and 4: renameat2 flags and directory renames, next to kernel overlay.

Every test that states how a rename behaves runs twice: on the FUSE union
(``union``) and on kernel overlayfs (``overlay``) over the same branches, so
the expectation is proven on the kernel's own union filesystem. The union's
default is AUFS's: a directory that exists in a lower branch (even empty) is
EXDEV, as on overlay with ``redirect_dir=off``; with ``--dirren`` (AUFS's
opt-in) it is renamed in place, as on overlay with ``redirect_dir=on``,
including after the layers are rotated (the top branch committed and stacked
below a new one).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .unionfs_fixtures import Union, is_mounted

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts filesystems: run as root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def renameat2(old: Path, new: Path, flags: int) -> int:
    """0, or the errno of renameat2(2)."""
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(str(old)), AT_FDCWD, os.fsencode(str(new)),
                         flags)
    return 0 if rc == 0 else ctypes.get_errno()


class OverlayStack:
    """Kernel overlayfs over the same kind of branches as :class:`Union`."""

    def __init__(self, base: Path, lowers: int = 2, options: tuple[str, ...] = ()) -> None:
        self.base = base
        self.top = base / "upper"
        self.work = base / "work"
        self.lowers = [base / f"l{i + 1}" for i in range(lowers)]
        self.mnt = base / "mnt"
        self.options = options
        for d in (self.top, self.work, *self.lowers, self.mnt):
            d.mkdir(parents=True, exist_ok=True)

    def mount(self) -> None:
        opts = (f"lowerdir={':'.join(map(str, self.lowers))},upperdir={self.top},"
                f"workdir={self.work}")
        opts += "".join(f",{o}" for o in self.options)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.mnt)],
                       check=True, capture_output=True)

    def unmount(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=True, capture_output=True)

    def rotate(self) -> None:
        old = self.top
        self.top = old.with_name(f"{old.name}.{len(self.lowers)}")
        self.top.mkdir()
        subprocess.run(["rm", "-rf", str(self.work)], check=True)
        self.work.mkdir()
        self.lowers = [old, *self.lowers]

    def __enter__(self) -> OverlayStack:
        self.mount()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unmount()


Stack = Union | OverlayStack
KINDS = ("union", "overlay")


def make_stack(kind: str, base: Path, *, dirren: bool) -> Stack:
    if kind == "union":
        return Union(base, lowers=2, options=("--dirren",) if dirren else ())
    return OverlayStack(base, lowers=2,
                        options=("redirect_dir=on",) if dirren else ("redirect_dir=off",))


def put(branch: Path, rel: str, data: bytes | None = b"") -> None:
    path = branch / rel
    if data is None:
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def tree(root: Path) -> dict[str, Any]:
    """What a union shows: every path with its type and contents, and which names are
    hard links of one another (same st_ino)."""
    out: dict[str, Any] = {}
    first_name: dict[int, str] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                link = first_name.setdefault(st.st_ino, rel)
                out[rel] = (path.read_bytes(), link if st.st_nlink > 1 else None)
            else:
                out[rel] = stat.S_IFMT(st.st_mode)
    return out


def listing(path: Path) -> set[str]:
    return set(os.listdir(path))


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cleanup() -> Iterator[list[Stack]]:
    stacks: list[Stack] = []
    yield stacks
    for s in stacks:
        if isinstance(s, Union):
            s.force_cleanup()
        else:
            s.unmount()


# --- renameat2 flags (point 2) -------------------------------------------------------------------

def test_rename_noreplace_and_exchange(kind: str, tmp_path: Path, cleanup: list[Stack]) -> None:
    s = make_stack(kind, tmp_path, dirren=False)
    cleanup.append(s)
    l1, l2 = s.lowers
    put(l2, "a", b"A")
    put(l1, "b", b"B")
    put(l2, "gone", b"deleted below")
    put(l1, "ldir/x", b"x")
    put(l2, "ldir/y", b"y")
    with s:
        m = s.mnt
        (m / "top").write_bytes(b"T")
        os.makedirs(m / "tdir/sub")
        (m / "tdir/sub/f").write_bytes(b"F")
        os.unlink(m / "gone")
        # RENAME_NOREPLACE: EEXIST over any existing entry, lower or top ...
        assert renameat2(m / "a", m / "b", RENAME_NOREPLACE) == errno.EEXIST
        assert renameat2(m / "top", m / "a", RENAME_NOREPLACE) == errno.EEXIST
        assert renameat2(m / "a", m / "tdir", RENAME_NOREPLACE) == errno.EEXIST
        # ... but a deleted lower name is free.
        assert renameat2(m / "top", m / "gone", RENAME_NOREPLACE) == 0
        assert (m / "gone").read_bytes() == b"T" and not os.path.lexists(m / "top")
        assert renameat2(m / "gone", m / "top", RENAME_NOREPLACE) == 0
        # RENAME_EXCHANGE of two lower files, of a top and a lower file.
        assert renameat2(m / "a", m / "b", RENAME_EXCHANGE) == 0
        assert (m / "a").read_bytes() == b"B" and (m / "b").read_bytes() == b"A"
        assert renameat2(m / "top", m / "a", RENAME_EXCHANGE) == 0
        assert (m / "top").read_bytes() == b"B" and (m / "a").read_bytes() == b"T"
        # A file and a directory that lives only in the top layer swap too ...
        assert renameat2(m / "b", m / "tdir", RENAME_EXCHANGE) == 0
        assert (m / "tdir").read_bytes() == b"A" and (m / "b/sub/f").read_bytes() == b"F"
        # ... a directory with lower parts cannot move without redirects.
        assert renameat2(m / "top", m / "ldir", RENAME_EXCHANGE) == errno.EXDEV
        assert renameat2(m / "top", m / "missing", RENAME_EXCHANGE) == errno.ENOENT
        assert renameat2(m / "a", m / "b", RENAME_EXCHANGE | RENAME_NOREPLACE) == errno.EINVAL
        assert renameat2(m / "a", m / "b", 1 << 5) == errno.EINVAL
        want = {"a": (b"T", None), "b": "dir", "b/sub": "dir", "b/sub/f": (b"F", None),
                "ldir": "dir", "ldir/x": (b"x", None), "ldir/y": (b"y", None),
                "tdir": (b"A", None), "top": (b"B", None)}
        assert tree(m) == want
    with s:  # the same after a remount
        assert tree(s.mnt) == want


def test_rename_whiteout_leaves_an_aufs_whiteout(tmp_path: Path) -> None:
    """RENAME_WHITEOUT (what overlayfs asks of its upper filesystem): the rename, plus a
    whiteout at the old name, in AUFS's form (overlay itself answers EINVAL)."""
    u = Union(tmp_path, lowers=1)
    put(u.lowers[0], "lower", b"L")
    put(u.lowers[0], "shadowed", b"S")
    with u:
        m = u.mnt
        (m / "mine").write_bytes(b"M")
        os.mkdir(m / "mydir")
        # A top-only file: a plain rename leaves no whiteout, RENAME_WHITEOUT does.
        os.rename(m / "mine", m / "mine2")
        assert not os.path.lexists(u.top / ".wh.mine")
        assert renameat2(m / "mine2", m / "mine3", RENAME_WHITEOUT) == 0
        assert (u.top / ".wh.mine2").is_file() and os.stat(u.top / ".wh.mine2").st_size == 0
        assert (m / "mine3").read_bytes() == b"M" and not os.path.lexists(m / "mine2")
        # A lower file and a top-only directory.
        assert renameat2(m / "lower", m / "lower2", RENAME_WHITEOUT) == 0
        assert renameat2(m / "mydir", m / "mydir2", RENAME_WHITEOUT) == 0
        assert (u.top / ".wh.lower").is_file() and (u.top / ".wh.mydir").is_file()
        assert listing(m) == {"mine3", "lower2", "mydir2", "shadowed"}
        # The whiteout hides the name like any deletion: a new entry can take it.
        (m / "mine2").write_bytes(b"again")
        assert (m / "mine2").read_bytes() == b"again" and not (u.top / ".wh.mine2").exists()
        assert renameat2(m / "shadowed", m / "lower", RENAME_WHITEOUT | RENAME_EXCHANGE) \
            == errno.EINVAL


# --- directory renames (point 4) -----------------------------------------------------------------

def test_lower_directories_are_exdev_by_default(kind: str, tmp_path: Path,
                                               cleanup: list[Stack]) -> None:
    """Without dirren (overlay: redirect_dir=off) any directory with a lower part, even an
    empty one, is EXDEV; one made in the top layer moves — until that layer is committed
    and stacked below a new one."""
    s = make_stack(kind, tmp_path, dirren=False)
    cleanup.append(s)
    put(s.lowers[1], "empty", None)
    put(s.lowers[0], "full/f", b"f")
    with s:
        m = s.mnt
        assert renameat2(m / "empty", m / "empty2", 0) == errno.EXDEV
        assert renameat2(m / "full", m / "full2", 0) == errno.EXDEV
        os.makedirs(m / "made/sub")
        assert renameat2(m / "made", m / "made2", 0) == 0
    s.rotate()
    with s:
        assert renameat2(s.mnt / "made2", s.mnt / "made3", 0) == errno.EXDEV
        assert listing(s.mnt) == {"empty", "full", "made2"}


def branch_tree(branch: Path) -> dict[str, Any]:
    """A branch as it is on disk, whiteouts and markers included, with modes and times."""
    out: dict[str, Any] = {}
    for dirpath, dirs, files in os.walk(branch):
        for name in dirs + files:
            path = Path(dirpath) / name
            st = os.lstat(path)
            out[str(path.relative_to(branch))] = (st.st_mode, st.st_uid, st.st_mtime_ns,
                                                  st.st_size, st.st_nlink)
    return out


def test_an_exdev_rename_changes_nothing(kind: str, tmp_path: Path,
                                         cleanup: list[Stack]) -> None:
    """A rename that fails with EXDEV leaves the union and its top branch as they were: no
    copy-up, no whiteout, no target removed (the one-answer property test saw a target
    vanish on aufs: the edit had removed it before the rename)."""
    s = make_stack(kind, tmp_path, dirren=False)
    cleanup.append(s)
    put(s.lowers[1], "ldir/f", b"f")
    put(s.lowers[0], "ldir/g", b"g")
    put(s.lowers[1], "lempty", None)
    put(s.lowers[1], "lfile", b"L")
    with s:
        m = s.mnt
        (m / "tfile").write_bytes(b"T")
        os.makedirs(m / "tdir")
        os.makedirs(m / "sub/deeper")
        before, top_before = tree(m), branch_tree(s.top)
        for target, flags in (("ldir2", 0), ("sub/ldir", 0), ("tdir", 0), ("lempty", 0),
                              ("tdir", RENAME_NOREPLACE), ("sub/new", RENAME_WHITEOUT),
                              ("tfile", RENAME_EXCHANGE), ("lfile", RENAME_EXCHANGE),
                              ("tdir", RENAME_EXCHANGE)):
            got = renameat2(m / "ldir", m / target, flags)
            if flags & RENAME_NOREPLACE:
                assert got == errno.EEXIST, target
            elif flags & RENAME_WHITEOUT and kind == "overlay":
                assert got == errno.EINVAL, target  # overlay has no RENAME_WHITEOUT
            else:
                assert got == errno.EXDEV, (target, flags)
            assert tree(m) == before, (target, flags)
            assert branch_tree(s.top) == top_before, (target, flags)
        # The lower directory's contents were not copied up, its parts still show.
        assert listing(m / "ldir") == {"f", "g"}


def _dirren_suite(s: Stack) -> None:
    l1, l2 = s.lowers
    for rel, data in (("pop/a", b"a"), ("pop/sub/b", b"b"), ("empty", None), ("mv/x", b"x"),
                      ("dst/p", None), ("tgt", None), ("lnk/f", b"f")):
        put(l2, rel, data)
    put(l1, "pop/c", b"c")
    put(l1, "keep/k", b"k")
    with s:
        m = s.mnt
        # An empty lower directory, a populated one merged from two layers.
        os.rename(m / "empty", m / "empty2")
        assert listing(m / "empty2") == set() and not os.path.lexists(m / "empty")
        os.rename(m / "pop", m / "pop2")
        assert listing(m / "pop2") == {"a", "c", "sub"}
        assert (m / "pop2/sub/b").read_bytes() == b"b"
        # Across parents, into a lower directory; then over an empty lower directory.
        os.rename(m / "mv", m / "dst/p/mv")
        assert listing(m / "dst/p") == {"mv"} and (m / "dst/p/mv/x").read_bytes() == b"x"
        os.rename(m / "pop2", m / "tgt")
        assert listing(m / "tgt") == {"a", "c", "sub"}
        # Changing a renamed directory: copy-up from where its contents really are.
        with open(m / "tgt/a", "ab") as f:
            f.write(b"!")
        (m / "tgt/new").write_bytes(b"n")
        os.unlink(m / "tgt/c")
        assert listing(m / "tgt") == {"a", "sub", "new"} and (m / "tgt/a").read_bytes() == b"a!"
        # A directory made in this layer, renamed only after the layer is committed.
        os.makedirs(m / "made")
        (m / "made/m").write_bytes(b"m")
        # Hard links into (and out of) a renamed directory.
        os.rename(m / "lnk", m / "lnk2")
        os.link(m / "lnk2/f", m / "lnk2/f2")
        os.link(m / "lnk2/f", m / "f3")
        with open(m / "f3", "ab") as f:
            f.write(b"+")
        assert (m / "lnk2/f").read_bytes() == b"f+" and os.stat(m / "lnk2/f2").st_nlink == 3
        before = tree(m)
    assert "pop" not in before and "mv" not in before and "lnk" not in before
    # The layer is committed and stacked below a new one: the renames still read right.
    s.rotate()
    with s:
        m = s.mnt
        assert tree(m) == before
        os.rename(m / "tgt", m / "tgt2")  # renamed again, its rename now in a lower layer
        assert listing(m / "tgt2") == {"a", "sub", "new"}
        assert (m / "tgt2/a").read_bytes() == b"a!"
        os.rename(m / "made", m / "made2")
        assert (m / "made2/m").read_bytes() == b"m"
        os.rename(m / "tgt2/sub", m / "sub_out")  # out of a renamed directory
        assert (m / "sub_out/b").read_bytes() == b"b" and listing(m / "tgt2") == {"a", "new"}
        os.rename(m / "empty2", m / "empty")  # back to its first name
        assert listing(m / "empty") == set() and not os.path.lexists(m / "empty2")
        os.rmdir(m / "empty")
        os.mkdir(m / "empty")
        (m / "empty/e").write_bytes(b"e")
        os.rename(m / "keep", m / "dst/keep")
        after = tree(m)
    want = {"dst": "dir", "dst/keep": "dir", "dst/keep/k": (b"k", None), "dst/p": "dir",
            "dst/p/mv": "dir", "dst/p/mv/x": (b"x", None), "empty": "dir",
            "empty/e": (b"e", None), "f3": (b"f+", "f3"), "lnk2": "dir",
            "lnk2/f": (b"f+", "f3"), "lnk2/f2": (b"f+", "f3"), "made2": "dir",
            "made2/m": (b"m", None), "sub_out": "dir", "sub_out/b": (b"b", None),
            "tgt2": "dir", "tgt2/a": (b"a!", None), "tgt2/new": (b"n", None)}
    assert after == want
    s.rotate()
    with s:
        assert tree(s.mnt) == want


def test_directory_renames_with_dirren(kind: str, tmp_path: Path,
                                       cleanup: list[Stack]) -> None:
    s = make_stack(kind, tmp_path, dirren=True)
    cleanup.append(s)
    _dirren_suite(s)


def test_exchange_of_lower_directories_with_dirren(kind: str, tmp_path: Path,
                                                   cleanup: list[Stack]) -> None:
    s = make_stack(kind, tmp_path, dirren=True)
    cleanup.append(s)
    put(s.lowers[1], "x/1", b"1")
    put(s.lowers[0], "x/2", b"2")
    put(s.lowers[1], "y/3", b"3")
    with s:
        m = s.mnt
        assert renameat2(m / "x", m / "y", RENAME_EXCHANGE) == 0
        assert listing(m / "x") == {"3"} and listing(m / "y") == {"1", "2"}
        (m / "y/4").write_bytes(b"4")
        want = tree(m)
    s.rotate()
    with s:
        assert tree(s.mnt) == want


def test_dirren_branch_layout(tmp_path: Path) -> None:
    """What a dirren rename leaves in the top branch: the moved directory's own part with
    the redirect in its .wh..wh..opq, a whiteout of the old name, the branch's flag."""
    u = Union(tmp_path, lowers=1, options=("--dirren",))
    put(u.lowers[0], "old/f", b"f")
    with u:
        os.rename(u.mnt / "old", u.mnt / "new")
        st = u.stats()
        assert st["dir_renames"] == 1 and st["copy_ups"] == 0  # nothing copied
    assert sorted(os.listdir(u.top)) == [".wh..wh.dirren", ".wh..wh.orph", ".wh.old", "new"]
    assert os.listdir(u.top / "new") == [".wh..wh..opq"]
    assert (u.top / "new/.wh..wh..opq").read_bytes() == b"layerfs-dirren:/old"
    # A malformed record reads as a plain opaque marker: nothing below shows.
    (u.top / "new/.wh..wh..opq").write_bytes(b"layerfs-dirren:/../etc")
    with u:
        assert listing(u.mnt / "new") == set()


