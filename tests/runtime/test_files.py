"""Reading hostile files of a container's root from the host (layerfs.runtime.files)."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from layerfs.errors import InvalidArgument
from layerfs.runtime.files import read_small_file


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "etc").mkdir(parents=True)
    return tmp_path / "root"


def test_regular_file_and_missing(root: Path) -> None:
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    assert read_small_file(root, "etc/passwd") == b"root:x:0:0::/root:/bin/sh\n"
    assert read_small_file(root, "etc/group") is None


def test_fifo_is_refused_without_blocking(root: Path) -> None:
    os.mkfifo(root / "etc" / "passwd")
    # A hang would be stopped by this alarm (the old code blocked in open() forever).
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked on the FIFO"))
    signal.alarm(5)
    try:
        with pytest.raises(InvalidArgument, match="is a FIFO, not a regular file"):
            read_small_file(root, "etc/passwd")
    finally:
        signal.alarm(0)


@pytest.mark.parametrize(("kind", "what"), [(stat.S_IFBLK, "block device"),
                                            (stat.S_IFCHR, "character device")])
def test_device_nodes_are_refused_unopened(root: Path, kind: int, what: str) -> None:
    # The host's root disk, and /dev/watchdog's numbers (opening it would arm it).
    st = os.stat("/")
    dev = os.makedev(os.major(st.st_dev), os.minor(st.st_dev)) if kind == stat.S_IFBLK \
        else os.makedev(10, 130)
    os.mknod(root / "etc" / "passwd", kind | 0o644, dev)
    with pytest.raises(InvalidArgument, match=f"is a {what}"):
        read_small_file(root, "etc/passwd")


def test_symlinks_stay_inside_the_root(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("host:x:0:0::/:/bin/sh\n")
    os.symlink(str(outside / "passwd"), root / "etc" / "passwd")
    with pytest.raises(InvalidArgument, match="symbolic link"):
        read_small_file(root, "etc/passwd")
    # A directory on the way that points out: resolved as if the root were /.
    (root / "etc" / "passwd").unlink()
    (root / "etc").rmdir()
    os.symlink(str(outside), root / "etc")
    assert read_small_file(root, "etc/passwd") is None       # root/<outside>/passwd: absent
    (root / outside.relative_to("/")).mkdir(parents=True)
    (root / outside.relative_to("/") / "passwd").write_text("inside\n")
    assert read_small_file(root, "etc/passwd") == b"inside\n"
    assert read_small_file(root, "../../../../" + str(outside.relative_to("/")) + "/passwd") \
        == b"inside\n"


def test_size_is_bounded(root: Path) -> None:
    with open(root / "etc" / "passwd", "wb") as f:
        f.truncate(2 << 20)                       # sparse: costs nothing to make
    with pytest.raises(InvalidArgument, match="larger than"):
        read_small_file(root, "etc/passwd")
    assert read_small_file(root, "etc/passwd", limit=4 << 20) is not None
