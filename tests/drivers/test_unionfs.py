"""The FUSE union filesystem (layerfs_drivers.aufs.unionfs) on real mounts.

Every test mounts its own union under ``tmp_path`` through the real mount
helper (daemon mode) and unmounts it at the end; the fixture checks that the
server exited 0 by itself after the unmount, so no process is left behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .unionfs_fixtures import Union, is_mounted, server_pids, wait_gone

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE filesystems: run as root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
SCRATCH = Path("/tmp/lfs-aufs")


@pytest.fixture
def union(tmp_path: Path) -> Iterator[Union]:
    """Two lower branches; fill them, then ``with union:`` mounts."""
    yield Union(tmp_path, lowers=2)


def listing(path: Path) -> set[str]:
    return set(os.listdir(path))


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno  # type: ignore[return-value]


def as_user(uid: int, gid: int, cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", cmd], user=uid, group=gid, extra_groups=[],
                          capture_output=True, text=True, timeout=30)


def renameat2(old: Path, new: Path, flags: int) -> int:
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(str(old)), AT_FDCWD, os.fsencode(str(new)),
                         flags)
    return 0 if rc == 0 else ctypes.get_errno()


# --- lookup and readdir -----------------------------------------------------------------------

def test_merge_whiteouts_opaque_and_internals(union: Union) -> None:
    l1, l2 = union.lowers
    for rel in ("d/x", "d/y", "d/sub/z", "gone", "shadow/inner", "opq/old", "same"):
        union.put(l2, rel, rel.encode())
    union.put(l1, "d/.wh.x")
    union.put(l1, ".wh.gone")
    union.put(l1, "shadow", b"a file hides the directory below")
    union.put(l1, "opq/.wh..wh..opq")
    union.put(l1, "opq/new", b"new")
    union.put(l1, ".wh..wh.plnk/123")
    union.put(l1, ".wh..wh.aufs")
    union.put(l1, "same", b"hidden by its own branch's whiteout")
    union.put(l1, ".wh.same")
    union.put(union.top, "d/w", b"top")
    # A directory too big for one readdir reply, merged from three branches.
    for i in range(600):
        union.put(l2, f"big/f{i:04d}")
    for i in range(0, 600, 3):
        union.put(l1, f"big/.wh.f{i:04d}")
    for i in range(600, 900):
        union.put(union.top, f"big/f{i:04d}")
    odd = os.fsencode("odd\nname-") + b"\xff"
    (l2 / os.fsdecode(odd)).write_bytes(b"odd")
    with union:
        m = union.mnt
        assert listing(m) == {"d", "shadow", "opq", "big", os.fsdecode(odd)}
        assert (m / os.fsdecode(odd)).read_bytes() == b"odd"
        want = {f"f{i:04d}" for i in range(900) if i >= 600 or i % 3}
        assert listing(m / "big") == want
        assert len(os.listdir(m / "big")) == len(want)  # nothing listed twice
        assert listing(m / "d") == {"y", "sub", "w"}
        assert (m / "d/sub/z").read_bytes() == b"d/sub/z"
        assert (m / "shadow").is_file()
        assert listing(m / "opq") == {"new"}
        for hidden in ("gone", ".wh.gone", "d/x", "d/.wh.x", "same", ".wh..wh.plnk",
                       ".wh..wh.aufs", ".wh..wh.orph", "opq/old", "opq/.wh..wh..opq"):
            assert not os.path.lexists(m / hidden), hidden
        # Names that look like whiteouts cannot be made through the union.
        assert errno_of(os.mkdir, m / ".wh.x") == errno.EPERM
        assert errno_of((m / ".wh.y").write_bytes, b"") == errno.EPERM
        st = union.stats()
        assert st["lookups"] > 0 and st["backing_stats"] > 0


# --- copy-up ----------------------------------------------------------------------------------

def _lower_tree(union: Union) -> tuple[Path, int, int]:
    l1 = union.lowers[0]
    p = l1 / "p"
    p.mkdir()
    t1, t2 = 1_500_000_000_123_456_789, 1_600_000_000_987_654_321
    for name in ("f", "chmod", "chown", "utime", "setx", "rmx", "trunc", "rdwr"):
        f = union.put(l1, f"p/{name}", os.urandom(1 << 20), 0o640)
        os.chown(f, 1000, 1000)
        os.setxattr(f, "user.k", b"v")
        os.setxattr(f, "trusted.t", b"1")
        os.setxattr(f, "security.layerfs", b"s")
        os.utime(f, ns=(t2, t2))
    os.chmod(p, 0o750)
    os.chown(p, 1234, 2345)
    os.setxattr(p, "user.dir", b"1")
    os.utime(p, ns=(t1, t1))
    return p, t1, t2


def _same_meta(a: Path, b: Path, *, times: bool = True) -> None:
    sa, sb = os.lstat(a), os.lstat(b)
    assert (sa.st_mode, sa.st_uid, sa.st_gid) == (sb.st_mode, sb.st_uid, sb.st_gid), (a, b)
    assert sorted(os.listxattr(a)) == sorted(os.listxattr(b))
    for name in os.listxattr(a):
        assert os.getxattr(a, name) == os.getxattr(b, name)
    if times:
        assert sa.st_mtime_ns == sb.st_mtime_ns, (a, b)


def test_copy_up_on_write_preserves_data_and_metadata(union: Union) -> None:
    lower_p, _, _ = _lower_tree(union)
    lower_f = lower_p / "f"
    before = lower_f.read_bytes()
    with union:
        m = union.mnt
        union.reset_stats()
        with open(m / "p/f", "ab") as f:
            f.write(b"!")
        st = union.stats()
        assert st["copy_ups"] == 1 and st["copy_up_bytes"] == len(before)
        assert st["dir_copy_ups"] == 1
        top_f = union.top / "p/f"
        assert top_f.read_bytes() == before + b"!"
        assert (m / "p/f").read_bytes() == before + b"!"
        assert lower_f.read_bytes() == before  # the lower branch is untouched
        _same_meta(lower_f, top_f, times=False)
        # The parent was created with the lower one's mode, owner, xattrs and times.
        _same_meta(lower_p, union.top / "p")
        # Later writes go to the copy, without another copy-up.
        with open(m / "p/f", "r+b") as f:
            f.write(b"XY")
        assert union.stats()["copy_ups"] == 1
        assert top_f.read_bytes()[:2] == b"XY"


@pytest.mark.parametrize("trigger", ["chmod", "chown", "utime", "setx", "rmx", "trunc", "rdwr"])
def test_copy_up_triggers(union: Union, trigger: str) -> None:
    lower_p, _, t2 = _lower_tree(union)
    lower = lower_p / trigger
    data = lower.read_bytes()
    with union:
        path = union.mnt / "p" / trigger
        union.reset_stats()
        if trigger == "chmod":
            os.chmod(path, 0o604)
        elif trigger == "chown":
            os.chown(path, 1001, 1002)
        elif trigger == "utime":
            os.utime(path, ns=(5, 7))
        elif trigger == "setx":
            os.setxattr(path, "user.new", b"n")
        elif trigger == "rmx":
            os.removexattr(path, "user.k")
        elif trigger == "trunc":
            os.truncate(path, 10)
        elif trigger == "rdwr":
            os.close(os.open(path, os.O_RDWR))
        st = union.stats()
        assert st["copy_ups"] == 1
        top = union.top / "p" / trigger
        assert top.exists()
        got = os.lstat(top)
        if trigger == "trunc":
            assert top.read_bytes() == data[:10]
            assert st["copy_up_bytes"] == 10  # only what survives the truncate is copied
        else:
            assert top.read_bytes() == data
            assert st["copy_up_bytes"] == len(data)
        expect_mode = 0o604 if trigger == "chmod" else 0o640
        assert stat.S_IMODE(got.st_mode) == expect_mode
        assert (got.st_uid, got.st_gid) == ((1001, 1002) if trigger == "chown" else (1000, 1000))
        if trigger == "utime":
            assert got.st_mtime_ns == 7
        elif trigger != "trunc":
            assert got.st_mtime_ns == t2  # copy-up itself keeps the mtime
        xattrs = set(os.listxattr(top))
        assert ("user.k" in xattrs) == (trigger != "rmx")
        assert {"trusted.t", "security.layerfs"} <= xattrs
        assert ("user.new" in xattrs) == (trigger == "setx")
        assert os.getxattr(path, "trusted.t") == b"1"
        _same_meta(lower_p, union.top / "p")


def test_directory_copy_up_and_setuid_file(union: Union) -> None:
    l1, l2 = union.lowers
    union.put(l2, "dir/a", b"a")
    union.put(l1, "dir/b", b"b")
    os.chmod(l1 / "dir", 0o755)
    suid = union.put(l1, "bin/tool", b"#!/bin/sh\necho tool\n", 0o4755)
    os.chown(suid, 1000, 1000)
    os.chmod(suid, 0o4755)
    with union:
        m = union.mnt
        os.chmod(m / "dir", 0o700)
        assert stat.S_IMODE(os.stat(union.top / "dir").st_mode) == 0o700
        assert listing(m / "dir") == {"a", "b"}  # contents stay where they are
        assert listing(union.top / "dir") == set()
        os.setxattr(m / "dir", "user.d", b"1")
        assert os.getxattr(union.top / "dir", "user.d") == b"1"
        os.close(os.open(m / "bin/tool", os.O_RDWR))
        st = os.stat(union.top / "bin/tool")
        assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 1000
        out = subprocess.run([str(m / "bin/tool")], capture_output=True, text=True, check=True)
        assert out.stdout == "tool\n"


def test_shared_mmap_writes_reach_the_copy(union: Union) -> None:
    import mmap

    union.put(union.lowers[0], "mapped", b"0" * 8192)
    with union:
        with open(union.mnt / "mapped", "r+b") as f, mmap.mmap(f.fileno(), 8192) as mm:
            mm[4096:4101] = b"hello"
            mm.flush()
        assert (union.top / "mapped").read_bytes()[4096:4101] == b"hello"
        assert (union.mnt / "mapped").read_bytes()[4090:4101] == b"000000hello"


@pytest.mark.parametrize("passthrough", [False, True], ids=["served", "passthrough"])
def test_open_handles_across_copy_up_and_sparse_files(tmp_path: Path, passthrough: bool) -> None:
    union = Union(tmp_path, lowers=2, options=() if passthrough else ("--no-passthrough",))
    l1 = union.lowers[0]
    union.put(l1, "shared", b"old contents")
    with open(l1 / "sparse", "wb") as f:
        f.truncate(1 << 30)
        f.seek(1 << 29)
        f.write(b"data in the middle")
    with union:
        m = union.mnt
        reader = os.open(m / "shared", os.O_RDONLY)
        try:
            ino = os.fstat(reader).st_ino
            assert os.pread(reader, 3, 0) == b"old"
            with open(m / "shared", "r+b") as w:
                w.write(b"NEW")
            assert (m / "shared").read_bytes() == b"NEW contents"
            if passthrough:
                # The kernel reads the lower file for handles opened before the copy-up
                # (one backing file per inode): the name moved to a new inode instead.
                assert os.pread(reader, 12, 0) == b"old contents"
                assert os.stat(m / "shared").st_ino != ino
            else:
                # Served here: the handle was switched to the copy.
                assert os.pread(reader, 12, 0) == b"NEW contents"
                assert os.stat(m / "shared").st_ino == ino
        finally:
            os.close(reader)
        st = union.stats()
        assert st["passthrough"] == int(passthrough)
        assert (st["passthrough_opens"] > 0) == passthrough
        dev = os.stat(m).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
            # Raised when the first file served here (not in passthrough) was opened.
            assert (f.read().strip() == "1024") == (not passthrough)
        union.reset_stats()
        with open(m / "sparse", "r+b") as f:
            f.seek(0)
            f.write(b"head")
        st = union.stats()
        assert st["copy_ups"] == 1 and st["copy_up_bytes"] < 1 << 20
        top = os.stat(union.top / "sparse")
        assert top.st_size == 1 << 30 and top.st_blocks * 512 < 1 << 20
        with open(m / "sparse", "rb") as f:
            f.seek(1 << 29)
            assert f.read(18) == b"data in the middle"


# --- deleting ---------------------------------------------------------------------------------

def test_unlink_rmdir_whiteouts_and_opaque_recreate(union: Union) -> None:
    l1, l2 = union.lowers
    union.put(l1, "full/a")
    union.put(l2, "full/b")
    (l1 / "empty").mkdir()
    (l2 / "empty").mkdir()
    union.put(l2, "f", b"lower")
    with union:
        m, top = union.mnt, union.top
        union.reset_stats()
        os.unlink(m / "f")
        assert (top / ".wh.f").is_file() and not os.path.lexists(m / "f")
        assert union.stats()["whiteouts_created"] == 1
        assert errno_of(os.rmdir, m / "full") == errno.ENOTEMPTY
        os.unlink(m / "full/a")
        os.unlink(m / "full/b")
        assert listing(m / "full") == set()
        os.rmdir(m / "full")
        assert (top / ".wh.full").exists() and not (top / "full").exists()
        os.rmdir(m / "empty")
        assert (top / ".wh.empty").exists()
        assert "empty" not in listing(m)
        # Recreated after deletion: opaque, so the lower contents stay hidden.
        os.mkdir(m / "full")
        assert (top / "full/.wh..wh..opq").exists() and not (top / ".wh.full").exists()
        assert listing(m / "full") == set()
        (m / "full/new").write_bytes(b"n")
        assert listing(m / "full") == {"new"}
        # A file can come back too: the whiteout goes, nothing below shows.
        (m / "f").write_bytes(b"again")
        assert not (top / ".wh.f").exists() and (m / "f").read_bytes() == b"again"
        # An emptied opaque directory goes away like any other.
        os.unlink(m / "full/new")
        os.rmdir(m / "full")
        assert (top / ".wh.full").exists() and not (top / "full").exists()
        # Top-only entries leave no whiteout.
        os.mkdir(m / "mine")
        (m / "mine/x").write_bytes(b"")
        os.unlink(m / "mine/x")
        os.rmdir(m / "mine")
        assert not os.path.lexists(top / ".wh.mine") and not os.path.lexists(top / "mine")
        assert union.stats()["whiteouts_created"] == 6


def test_rm_rf_of_a_lower_tree(union: Union) -> None:
    l1, l2 = union.lowers
    for i in range(40):
        union.put(l2 if i % 2 else l1, f"usr/share/p{i % 5}/sub{i % 3}/f{i}", b"x")
    union.put(union.top, "usr/share/p0/mine", b"top")
    os.symlink("p1", l1 / "usr/share/link")
    with union:
        m = union.mnt
        shutil.rmtree(m / "usr/share")
        assert listing(m / "usr") == set()
        assert (union.top / "usr/.wh.share").exists()
        assert not (union.top / "usr/share").exists()
        os.makedirs(m / "usr/share/p0")
        assert listing(m / "usr/share") == {"p0"} and listing(m / "usr/share/p0") == set()


# --- rename -----------------------------------------------------------------------------------

def test_rename_files_and_directories(union: Union) -> None:
    l1 = union.lowers[0]
    union.put(l1, "a", b"A")
    union.put(l1, "over", b"O")
    union.put(l1, "ld/x", b"x")
    (l1 / "emptydir").mkdir()
    with union:
        m, top = union.mnt, union.top
        ino_a = os.stat(m / "a").st_ino
        os.rename(m / "a", m / "b")
        assert (m / "b").read_bytes() == b"A" and not os.path.lexists(m / "a")
        assert (top / ".wh.a").exists() and (top / "b").read_bytes() == b"A"
        assert os.stat(m / "b").st_ino == ino_a
        os.rename(m / "b", m / "over")  # over an existing lower file
        assert (m / "over").read_bytes() == b"A" and "b" not in listing(m)
        assert renameat2(m / "over", m / "ld", RENAME_NOREPLACE) == errno.EEXIST
        # Exchanging with a lower directory would move it: EXDEV without dirren.
        assert renameat2(m / "over", m / "ld", RENAME_EXCHANGE) == errno.EXDEV
        # A directory with lower contents: EXDEV, like aufs without dirren ...
        assert errno_of(os.rename, m / "ld", m / "ld2") == errno.EXDEV
        # ... which mv (and shutil.move) handle by copying.
        subprocess.run(["mv", str(m / "ld"), str(m / "ld2")], check=True)
        assert listing(m / "ld2") == {"x"} and not os.path.lexists(m / "ld")
        assert (top / ".wh.ld").exists()
        # A directory that lives in the top branch only is renamed natively.
        os.makedirs(m / "t/deep")
        (m / "t/deep/f").write_bytes(b"f")
        ino_f = os.stat(m / "t/deep/f").st_ino
        os.rename(m / "t", m / "t2")
        assert (m / "t2/deep/f").read_bytes() == b"f"
        assert os.stat(m / "t2/deep/f").st_ino == ino_f
        os.mkdir(m / "full")
        (m / "full/x").write_bytes(b"")
        assert errno_of(os.rename, m / "t2", m / "full") == errno.ENOTEMPTY
        assert errno_of(os.rename, m / "t2", m / "over") == errno.ENOTDIR
        assert errno_of(os.rename, m / "over", m / "t2") == errno.EISDIR
        # Over an empty lower directory: the moved one turns opaque.
        os.rename(m / "t2", m / "emptydir")
        assert (top / "emptydir/.wh..wh..opq").exists()
        assert listing(m / "emptydir") == {"deep"}
        assert (m / "emptydir/deep/f").read_bytes() == b"f"
        assert "t2" not in listing(m)


# --- links and special files ------------------------------------------------------------------

def test_hardlinks(union: Union) -> None:
    union.put(union.lowers[0], "h", b"one")
    with union:
        m, top = union.mnt, union.top
        os.link(m / "h", m / "h2")
        a, b = os.stat(m / "h"), os.stat(m / "h2")
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
        assert os.stat(top / "h").st_ino == os.stat(top / "h2").st_ino
        with open(m / "h2", "ab") as f:
            f.write(b"+two")
        assert (m / "h").read_bytes() == b"one+two"
        os.unlink(m / "h")
        assert os.stat(m / "h2").st_nlink == 1 and (top / ".wh.h").exists()
        (m / "n").write_bytes(b"new")
        os.link(m / "n", m / "n2")
        os.link(m / "n2", m / "n3")
        assert {os.stat(m / x).st_nlink for x in ("n", "n2", "n3")} == {3}
        os.unlink(m / "n2")
        assert os.stat(m / "n").st_nlink == 2


def test_lower_hardlinks_stay_linked_through_copy_up(union: Union) -> None:
    l1 = union.lowers[0]
    x = union.put(l1, "x", b"shared")
    os.link(x, l1 / "y")
    os.link(x, l1 / "sub_z")
    with union:
        m, top = union.mnt, union.top
        sx, sy = os.stat(m / "x"), os.stat(m / "y")
        assert sx.st_ino == sy.st_ino and sx.st_nlink == 3
        with open(m / "x", "ab") as f:
            f.write(b"+more")
        # The names the kernel knew are linked up together ...
        assert (m / "y").read_bytes() == b"shared+more"
        assert os.stat(top / "x").st_ino == os.stat(top / "y").st_ino
        assert os.stat(m / "y").st_ino == sx.st_ino
        # ... one first looked up afterwards is a separate file (as overlayfs
        # without index=on).
        assert (m / "sub_z").read_bytes() == b"shared"
        assert os.stat(m / "sub_z").st_ino != sx.st_ino


def test_symlinks_fifos_and_device_nodes(union: Union) -> None:
    l1 = union.lowers[0]
    union.put(l1, "dir/target", b"T")
    os.symlink("dir/target", l1 / "lower_link")
    os.symlink("dir", l1 / "dir_link")
    with union:
        m = union.mnt
        assert os.readlink(m / "lower_link") == "dir/target"
        assert (m / "lower_link").read_bytes() == b"T"
        assert (m / "dir_link/target").read_bytes() == b"T"
        os.symlink("nowhere", m / "dangling")
        assert os.readlink(m / "dangling") == "nowhere"
        assert stat.S_ISLNK(os.lstat(m / "dangling").st_mode)
        os.chown(m / "lower_link", 1000, 1000, follow_symlinks=False)  # copies up the link
        st = os.lstat(union.top / "lower_link")
        assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (1000, 1000)
        assert os.readlink(union.top / "lower_link") == "dir/target"
        os.mkfifo(m / "fifo", 0o600)
        assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode)
        os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.stat(m / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        with open(m / "null", "wb") as f:  # the mount allows device nodes (dev)
            f.write(b"discarded")
        os.mknod(m / "sock", stat.S_IFSOCK | 0o600)
        assert stat.S_ISSOCK(os.stat(m / "sock").st_mode)


def test_xattrs_and_virtual_stats_xattr(union: Union) -> None:
    f = union.put(union.lowers[0], "f", b"x")
    os.setxattr(f, "user.lower", b"L")
    with union:
        m = union.mnt
        assert os.getxattr(m / "f", "user.lower") == b"L"
        for name in ("user.a", "trusted.b", "security.c"):
            os.setxattr(m / "f", name, name.encode())
        assert {"user.lower", "user.a", "trusted.b", "security.c"} <= set(os.listxattr(m / "f"))
        assert os.getxattr(union.top / "f", "trusted.b") == b"trusted.b"
        assert errno_of(os.setxattr, m / "f", "user.a", b"", os.XATTR_CREATE) == errno.EEXIST
        assert errno_of(os.setxattr, m / "f", "user.zz", b"", os.XATTR_REPLACE) == errno.ENODATA
        os.removexattr(m / "f", "user.a")
        assert errno_of(os.getxattr, m / "f", "user.a") == errno.ENODATA
        (m / "g").write_bytes(b"")
        os.setxattr(m / "g", "user.top", b"T")
        assert os.listxattr(m / "g") == ["user.top"]
        # The counters: readable, resettable, never listed.
        assert "user.layerfs.stats" not in os.listxattr(m)
        assert union.stats()["lookups"] > 0
        union.reset_stats()
        assert union.stats()["lookups"] == 0
        assert errno_of(os.setxattr, m, "user.layerfs.stats", b"{}") == errno.EPERM


def test_statfs_and_fsync(union: Union) -> None:
    with union:
        m = union.mnt
        a, b = os.statvfs(m), os.statvfs(union.top)
        assert (a.f_bsize, a.f_blocks, a.f_files) == (b.f_bsize, b.f_blocks, b.f_files)
        assert a.f_namemax == 255
        fd = os.open(m / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"durable")
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        assert (union.top / "f").read_bytes() == b"durable"


def test_open_unlinked_files(union: Union) -> None:
    union.put(union.lowers[0], "ro", b"read me after unlink")
    union.put(union.lowers[0], "rw", b"lower")
    with union:
        m = union.mnt
        fd = os.open(m / "ro", os.O_RDONLY)
        try:
            os.unlink(m / "ro")
            assert not os.path.lexists(m / "ro")
            assert os.pread(fd, 100, 0) == b"read me after unlink"
            assert os.fstat(fd).st_size == 20
        finally:
            os.close(fd)
        for name in ("rw", "top"):
            if name == "top":
                (m / name).write_bytes(b"top")
            fd = os.open(m / name, os.O_RDWR)
            try:
                os.unlink(m / name)
                os.pwrite(fd, b"written after unlink", 0)
                assert os.pread(fd, 100, 0) == b"written after unlink"
                assert os.fstat(fd).st_size == 20
                os.ftruncate(fd, 7)
                assert os.fstat(fd).st_size == 7
                os.fchmod(fd, 0o600)
                assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
                # Reachable again through /proc while open.
                with open(f"/proc/self/fd/{fd}", "rb") as again:
                    assert again.read() == b"written"
            finally:
                os.close(fd)
            assert not os.path.lexists(m / name)
        assert not os.path.lexists(union.top / "rw") and (union.top / ".wh.rw").exists()


@pytest.fixture
def public_union() -> Iterator[Union]:
    """A union other users can reach: pytest's tmp_path is private to root."""
    SCRATCH.mkdir(mode=0o755, parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="perm-", dir=SCRATCH))
    os.chmod(base, 0o755)
    try:
        yield Union(base, lowers=1)
    finally:
        shutil.rmtree(base)


def test_permissions_sticky_and_setgid(public_union: Union) -> None:
    union = public_union
    l1 = union.lowers[0]
    union.put(l1, "secret", b"s", 0o600)
    tmp = l1 / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    mine = union.put(l1, "tmp/of1000", b"x", 0o666)
    os.chown(mine, 1000, 1000)
    sg = l1 / "sg"
    sg.mkdir()
    os.chown(sg, 0, 3000)
    os.chmod(sg, 0o2777)
    with union:
        m = union.mnt
        r = as_user(1000, 1000, f"cat {m}/secret")
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = as_user(1001, 1001, f"rm -f {m}/tmp/of1000")
        assert r.returncode != 0 and "Operation not permitted" in r.stderr
        assert (m / "tmp/of1000").exists()
        r = as_user(1000, 1000, f"rm {m}/tmp/of1000 && touch {m}/tmp/new && mkdir {m}/sg/d "
                                f"&& touch {m}/sg/f")
        assert r.returncode == 0, r.stderr
        assert not (m / "tmp/of1000").exists() and (union.top / "tmp/.wh.of1000").exists()
        st = os.stat(m / "tmp/new")
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        assert stat.S_IMODE(os.stat(union.top / "tmp").st_mode) == 0o1777
        for name in ("sg/d", "sg/f"):
            st = os.stat(m / name)
            assert (st.st_uid, st.st_gid) == (1000, 3000), name
        assert os.stat(m / "sg/d").st_mode & stat.S_ISGID


def test_long_names_and_paths(union: Union) -> None:
    l1 = union.lowers[0]
    n255, n251 = "n" * 255, "m" * 251
    union.put(l1, n255, b"255")
    union.put(l1, n251, b"251")
    deep = "/".join(["d" * 200] * 15)  # 3014 bytes
    union.put(l1, deep + "/leaf", b"deep")
    with union:
        m = union.mnt
        assert (m / n255).read_bytes() == b"255"
        assert {n255, n251} <= listing(m)
        # A whiteout for a 255-byte name would be 259 bytes: as aufs, refused.
        assert errno_of(os.unlink, m / n255) == errno.ENAMETOOLONG
        os.unlink(m / n251)
        assert (union.top / (".wh." + n251)).exists()
        os.mkdir(m / "top")
        (m / "top" / n255).write_bytes(b"mine")
        assert listing(m / "top") == {n255}
        os.unlink(m / "top" / n255)
        with open(m / deep / "leaf", "ab") as f:  # copy-up creates 15 parents
            f.write(b"+")
        assert (union.top / deep / "leaf").read_bytes() == b"deep+"
        longer = deep + "/" + "/".join(["e" * 250] * 3)
        os.makedirs(m / longer)
        (m / longer / "x").write_bytes(b"x")
        assert (m / longer / "x").read_bytes() == b"x"
        assert len(str(m / longer / "x")) > 3700


def test_append_trunc_and_ftruncate(union: Union) -> None:
    l1 = union.lowers[0]
    union.put(l1, "a", b"0123456789")
    union.put(l1, "b", b"lower contents")
    with union:
        m = union.mnt
        fd = os.open(m / "a", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"X")
            os.pwrite(fd, b"Y", 0)  # O_APPEND wins over the offset, as on Linux
        finally:
            os.close(fd)
        assert (m / "a").read_bytes() == b"0123456789XY"
        union.reset_stats()
        fd = os.open(m / "b", os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        st = union.stats()
        assert st["copy_ups"] == 1 and st["copy_up_bytes"] == 0
        assert (m / "b").read_bytes() == b""
        with open(m / "b", "r+b") as f:
            f.write(b"abc")
            f.truncate(6)
            f.flush()
            assert os.fstat(f.fileno()).st_size == 6
        assert (m / "b").read_bytes() == b"abc\0\0\0"
        assert (union.top / "b").read_bytes() == b"abc\0\0\0"


# --- inode numbers and the cost of a lookup ---------------------------------------------------

def test_inode_numbers_are_stable(union: Union) -> None:
    l1, l2 = union.lowers
    union.put(l2, "d/f", b"f")
    union.put(l1, "d/g", b"g")
    with union:
        m = union.mnt
        before = {n: os.lstat(m / n).st_ino for n in ("d", "d/f", "d/g")}
        assert len(set(before.values())) == 3
        assert {e.name: e.inode() for e in os.scandir(m / "d")} == {
            "f": before["d/f"], "g": before["d/g"]}
        with open(m / "d/f", "ab") as f:  # copy-up: new backing inode, same number
            f.write(b"+")
        assert os.lstat(m / "d/f").st_ino == before["d/f"]
        assert os.lstat(m / "d").st_ino == before["d"]
        live = union.stats()["inodes_live"]
        # Make the kernel forget every inode it can (our numbers must survive).
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        assert union.stats()["inodes_live"] < live
        assert {n: os.lstat(m / n).st_ino for n in before} == before
        os.rename(m / "d/g", m / "d/g2")
        assert os.lstat(m / "d/g2").st_ino == before["d/g"]
        (m / "d/new").write_bytes(b"")
        assert os.lstat(m / "d/new").st_ino not in before.values()


def test_lookup_cost_of_a_deep_path_through_five_layers(tmp_path: Path) -> None:
    """The claim "a path of 5 components through 5 layers costs 25 stat() calls", measured.

    Layout: directories a/b/c/d exist in all L=5 branches (top included), the
    file e only in the bottom one, no whiteouts. A cold lookup of each of the
    D=5 components probes every branch of its parent for .wh.NAME and NAME:
    L*D = 25 stats of NAME and L*D = 25 whiteout probes. Each directory is
    checked for .wh..wh..opq once, when first used as a parent, in every branch
    but the bottom one: (L-1)*(D-1) = 16 opaque probes. 66 in all, on a fresh
    mount; a second stat costs nothing (the kernel caches entries), and with
    entry/attr timeouts of 0 every stat looks every component up again: 25 + 25
    (the opaque checks are cached per directory inode).
    """
    layers, depth = 5, 5
    for timeouts in ((), ("--entry-timeout", "0", "--attr-timeout", "0")):
        u = Union(tmp_path / f"u{len(timeouts)}", lowers=layers - 1, options=timeouts)
        for branch in u.branches:
            (branch / "a/b/c/d").mkdir(parents=True)
        u.put(u.lowers[-1], "a/b/c/d/e", b"bottom")
        with u:
            u.reset_stats()
            os.stat(u.mnt / "a/b/c/d/e")
            st = u.stats()
            assert st["lookups"] == depth
            assert st["lookup_name_stats"] == layers * depth == 25
            assert st["lookup_whiteout_probes"] == layers * depth == 25
            assert st["lookup_opaque_probes"] == (layers - 1) * (depth - 1) == 16
            u.reset_stats()
            os.stat(u.mnt / "a/b/c/d/e")
            st = u.stats()
            if not timeouts:
                assert st["lookups"] == 0 and st["backing_stats"] == 0
            else:
                assert st["lookups"] == depth
                assert st["lookup_name_stats"] == st["lookup_whiteout_probes"] == 25
                assert st["lookup_opaque_probes"] == 0


# --- real work inside the union ---------------------------------------------------------------

HELLO_C = r"""
#include <stdio.h>
#include "msg.h"
int main(void) { printf("%s\n", MSG); return 0; }
"""


def test_make_builds_and_runs_a_c_program(union: Union) -> None:
    if shutil.which("gcc") is None or shutil.which("make") is None:
        pytest.skip("gcc/make not installed")
    l1, l2 = union.lowers
    union.put(l2, "src/hello.c", HELLO_C.encode())
    union.put(l2, "src/msg.h", b'#define MSG "old"\n')
    union.put(l1, "src/msg.h", b'#define MSG "hello from the union"\n')
    union.put(l1, "src/Makefile",
              b"hello: hello.o\n\t$(CC) -o $@ $^\nhello.o: hello.c msg.h\n\t$(CC) -c hello.c\n")
    with union:
        src = union.mnt / "src"
        subprocess.run(["make", "-s", "-C", str(src)], check=True, capture_output=True)
        out = subprocess.run([str(src / "hello")], check=True, capture_output=True, text=True)
        assert out.stdout == "hello from the union\n"
        assert (union.top / "src/hello").exists() and (union.top / "src/hello.o").exists()
        assert not (union.top / "src/hello.c").exists()  # read, never copied up


def test_git_commit_inside_the_union(union: Union) -> None:
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    union.put(union.lowers[0], "proj/README", b"from a lower layer\n")
    union.put(union.lowers[1], "proj/lib/code.py", b"print('hi')\n")
    with union:
        repo = union.mnt / "proj"
        git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com",
               "-c", "init.defaultBranch=main", "-c", "safe.directory=*"]
        env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(union.base)}
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "first"]):
            subprocess.run(git + args, check=True, capture_output=True, env=env)
        (repo / "README").write_text("changed\n")
        subprocess.run([*git, "commit", "-qam", "second"], check=True, capture_output=True,
                       env=env)
        log = subprocess.run([*git, "log", "--format=%s"], check=True, capture_output=True,
                             text=True, env=env).stdout.split()
        assert log == ["second", "first"]
        status = subprocess.run([*git, "status", "--porcelain"], check=True,
                                capture_output=True, text=True, env=env).stdout
        assert status == ""
        subprocess.run([*git, "fsck", "--strict"], check=True, capture_output=True, env=env)


# --- the mount helper and the server process --------------------------------------------------

def test_read_only_union(tmp_path: Path) -> None:
    u = Union(tmp_path, lowers=1, top_mode="ro")
    u.put(u.top, "t", b"top")
    u.put(u.lowers[0], "l", b"lower")
    with u:
        assert (u.mnt / "t").read_bytes() == b"top" and (u.mnt / "l").read_bytes() == b"lower"
        assert errno_of((u.mnt / "new").write_bytes, b"") == errno.EROFS
        assert errno_of(os.unlink, u.mnt / "l") == errno.EROFS
    assert sorted(os.listdir(u.top)) == ["t"]  # not even the scratch dir was made


def test_helper_reports_a_failed_mount(tmp_path: Path) -> None:
    u = Union(tmp_path, lowers=1)
    r = subprocess.run([*u.argv()[:-1], str(tmp_path / "missing")], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 and "missing" in r.stderr
    (u.top / "sub").mkdir()  # a mount point inside a branch would deadlock the server
    r = subprocess.run([*u.argv()[:-1], str(u.top / "sub")], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "inside branch" in r.stderr
    # A failure inside the daemon (here: the top branch is on a read-only
    # mount) comes back through the ready pipe.
    rotop = tmp_path / "rotop"
    rotop.mkdir()
    subprocess.run(["mount", "--bind", str(rotop), str(rotop)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(rotop)], check=True)
        argv = u.argv()
        argv[argv.index(f"{u.top}:rw")] = f"{rotop}:rw"
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "Read-only file system" in r.stderr
        assert not is_mounted(u.mnt) and server_pids(u.mnt) == []
    finally:
        subprocess.run(["umount", str(rotop)], check=True)


@pytest.mark.parametrize("cleanup", ["layerfs.mount.unmount", "umount -l", "fusermount3 -uz"])
def test_killed_server_leaves_a_mount_cleanup_can_remove(tmp_path: Path, cleanup: str) -> None:
    u = Union(tmp_path, lowers=1)
    u.put(u.lowers[0], "f", b"x")
    u.mount()
    try:
        pid = u.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid) == -signal.SIGKILL
        u.pid = None
        assert errno_of(os.stat, u.mnt / "f") == errno.ENOTCONN
        assert is_mounted(u.mnt)
        if cleanup == "layerfs.mount.unmount":
            from layerfs import mount as mountlib

            mountlib.unmount(u.mnt, lazy=True)
        else:
            subprocess.run([*cleanup.split(), str(u.mnt)], check=True, capture_output=True)
        assert not is_mounted(u.mnt)
        assert server_pids(u.mnt) == []
        assert os.listdir(u.mnt) == []
    finally:
        u.force_cleanup()


def test_server_exits_on_sigterm_and_unmounts(tmp_path: Path) -> None:
    u = Union(tmp_path, lowers=1, options=("--stats-file", str(tmp_path / "stats.json")))
    u.mount()
    try:
        os.listdir(u.mnt)
        pid = u.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid) == 0
        u.pid = None
        assert not is_mounted(u.mnt)
        assert '"lookups"' in (tmp_path / "stats.json").read_text()
    finally:
        u.force_cleanup()
