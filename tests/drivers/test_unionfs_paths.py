"""Issue 19, point 1: the FUSE union at NAME_MAX and PATH_MAX, with branches deep down.

The kernel hands the server one name at a time, so a union path is limited by
the union's own mount point, never by where its branches live. Each test puts
the branches about 3,800 bytes deep (a backing path of the form ``branch +
union path`` would pass PATH_MAX long before the union path does) and runs
every operation on a name of NAME_MAX (255) bytes and on a union path of
PATH_MAX - 1 (4,095) bytes, the longest the kernel takes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from .unionfs_fixtures import Union

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE filesystems: run as root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

PATH_MAX = 4096
NAME_MAX = 255
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1


def _mkdirs_at(root: Path, parts: list[str]) -> int:
    """mkdir -p of ``parts`` under ``root`` one component at a time (the whole path is
    longer than PATH_MAX); returns an O_PATH fd of the last directory."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    for part in parts:
        try:
            os.mkdir(part, 0o755, dir_fd=fd)
        except FileExistsError:
            pass
        nfd = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _deep_dir(base: Path, total: int) -> Path:
    """A directory whose absolute path is about ``total`` bytes long."""
    parts = []
    length = len(str(base))
    while length + 201 < total:
        parts.append("b" * 200)
        length += 201
    path = base.joinpath(*parts)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def deep_union(tmp_path: Path) -> Iterator[Union]:
    union = Union(tmp_path, lowers=2, branch_base=_deep_dir(tmp_path / "deep", 3800))
    assert len(str(union.top)) > 3600
    yield union


def _components(prefix_len: int, total: int, leaf: int = 200) -> tuple[list[str], str]:
    """Directory names and a leaf name of ``leaf`` (or one more) bytes so that
    ``prefix/dirs.../leaf`` is exactly ``total`` bytes."""
    room = total - prefix_len - 1 - leaf  # bytes of "/dir" components
    if room % 251 == 1:
        leaf, room = leaf + 1, room - 1
    dirs = ["d" * 250] * (room // 251)
    if room % 251:
        dirs.append("e" * (room % 251 - 1))
    return dirs, "f" * leaf


def _exercise(parent: Path, name: str, partner: str) -> None:
    """Every operation on ``parent/name`` (``partner``: a second name in ``parent``)."""
    p = parent / name
    q = parent / partner
    # create, open, stat, truncate, chmod, chown, utimens, xattrs
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    try:
        assert os.write(fd, b"hello") == 5
    finally:
        os.close(fd)
    assert os.stat(p).st_size == 5 and p.read_bytes() == b"hello"
    os.truncate(p, 2)
    assert p.read_bytes() == b"he"
    os.chmod(p, 0o600)
    os.chown(p, 1000, 1001)
    os.utime(p, ns=(1, 2))
    st = os.lstat(p)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o600, 1000,
                                                                             1001, 2)
    os.setxattr(p, "user.k", b"v")
    assert os.getxattr(p, "user.k") == b"v" and "user.k" in os.listxattr(p)
    os.removexattr(p, "user.k")
    assert name in os.listdir(parent)
    # link, rename (plain and RENAME_NOREPLACE), unlink
    os.link(p, q)
    assert os.stat(q).st_ino == os.stat(p).st_ino and os.stat(p).st_nlink == 2
    os.unlink(q)
    os.rename(p, q)
    assert q.read_bytes() == b"he" and not os.path.lexists(p)
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(q), AT_FDCWD, os.fsencode(p), RENAME_NOREPLACE)
    assert rc == 0, os.strerror(ctypes.get_errno())
    os.unlink(p)
    # mkdir, rmdir, symlink, readlink, mkfifo, mknod
    os.mkdir(p, 0o750)
    assert stat.S_ISDIR(os.stat(p).st_mode) and os.listdir(p) == []
    os.rmdir(p)
    os.symlink("target", p)
    assert os.readlink(p) == "target"
    os.unlink(p)
    os.mkfifo(p, 0o600)
    assert stat.S_ISFIFO(os.lstat(p).st_mode)
    os.unlink(p)
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert os.lstat(p).st_rdev == os.makedev(1, 3)
    os.unlink(p)
    assert not os.path.lexists(p) and not os.path.lexists(q)


def test_every_operation_on_a_255_byte_name(deep_union: Union) -> None:
    union = deep_union
    middle = "c" * 250  # union paths of ~520 bytes; backing ones would be ~4,300
    (union.lowers[1] / "sub" / middle).mkdir(parents=True)
    with union:
        (union.mnt / "top" / middle).mkdir(parents=True)
        for parent in (union.mnt / "top", union.mnt / "sub"):  # top-only, and a lower dir
            _exercise(parent / middle, "n" * NAME_MAX, "m" * NAME_MAX)
        # Renaming to a 255-byte name, a lower file and a directory.
        (union.lowers[0] / "lowerfile").write_bytes(b"L")
        (union.mnt / "top/dir").mkdir()
        deep = union.mnt / "sub" / middle
        os.rename(union.mnt / "lowerfile", deep / ("r" * NAME_MAX))
        os.rename(union.mnt / "top/dir", deep / ("s" * NAME_MAX))
        assert (deep / ("r" * NAME_MAX)).read_bytes() == b"L"
        assert {"r" * NAME_MAX, "s" * NAME_MAX} <= set(os.listdir(deep))
        assert "lowerfile" not in os.listdir(union.mnt)
        assert (union.top / ".wh.lowerfile").exists()


def test_every_operation_at_path_max(deep_union: Union) -> None:
    union = deep_union
    mnt_len = len(os.fsencode(str(union.mnt)))
    dirs, leaf = _components(mnt_len, PATH_MAX - 1)
    partner = "g" * len(leaf)
    # A lower file and a lower file to delete at the same depth, made below PATH_MAX
    # only relative to a directory fd: their backing paths are ~7,000 bytes.
    fd = _mkdirs_at(union.lowers[1], dirs)
    try:
        for name, data in ((leaf, b"lower data"), (partner, b"to delete")):
            wfd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
            os.write(wfd, data)
            os.close(wfd)
    finally:
        os.close(fd)
    with union:
        parent = union.mnt.joinpath(*dirs)
        p = parent / leaf
        assert len(os.fsencode(str(p))) == PATH_MAX - 1
        # Reading, then writing (copy-up creates every parent in the top branch).
        assert p.read_bytes() == b"lower data"
        with open(p, "ab") as f:
            f.write(b"+")
        assert p.read_bytes() == b"lower data+"
        assert union.stats()["copy_ups"] == 1
        # Deleting a lower file: a whiteout at the same depth in the top branch.
        os.unlink(parent / partner)
        assert not os.path.lexists(parent / partner)
        assert sorted(os.listdir(parent)) == [leaf]
        os.unlink(p)
        assert os.listdir(parent) == []
        _exercise(parent, leaf, partner)
        # Renamed to a 255-byte name at PATH_MAX - 1, in another directory chain.
        dirs2, name255 = _components(mnt_len, PATH_MAX - 1, NAME_MAX - 1)
        dirs2[0] = "x" * len(dirs2[0])
        os.makedirs(union.mnt.joinpath(*dirs2))
        (parent / leaf).write_bytes(b"moved")
        target = union.mnt.joinpath(*dirs2, name255)
        assert len(os.fsencode(str(target))) == PATH_MAX - 1 and len(name255) >= NAME_MAX - 1
        os.rename(parent / leaf, target)
        assert target.read_bytes() == b"moved" and not os.path.lexists(parent / leaf)
        os.rename(target, parent / leaf)
        os.unlink(parent / leaf)
        # One component longer than PATH_MAX allows is refused by the kernel, not by us.
        with pytest.raises(OSError) as info:
            os.stat(str(p) + "x")
        assert info.value.errno == errno.ENAMETOOLONG
    # What the top branch holds there (read through a directory fd): the whiteouts.
    fd = _mkdirs_at(union.top, dirs)
    try:
        assert sorted(os.listdir(f"/proc/self/fd/{fd}")) == sorted([".wh." + partner, ".wh." + leaf])
    finally:
        os.close(fd)
