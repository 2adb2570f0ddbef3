"""Issue 19, points 3 and 5: fallocate, and reads and writes in FUSE passthrough.

fallocate runs on the FUSE union and, for comparison, on kernel overlayfs over
the same kind of branches. Passthrough: the kernel (Linux >= 6.9) reads and
writes the backing files itself, so no READ or WRITE request reaches the
server; the counters prove it, and a random operation sequence checks the data
against a model in both modes (passthrough, and served by the server).
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_unionfs_rename import OverlayStack
from .unionfs_fixtures import Union

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts filesystems: run as root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x1, 0x2, 0x8, 0x10, 0x20
MiB = 1 << 20


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """0, or the errno of fallocate(2)."""
    return 0 if _libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


# --- fallocate (point 3) -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["union", "overlay"])
def test_fallocate_modes_reach_the_copied_up_file(kind: str, tmp_path: Path) -> None:
    stack: Union | OverlayStack = (Union(tmp_path, lowers=1) if kind == "union"
                                   else OverlayStack(tmp_path, lowers=1))
    data = bytearray(random.Random(1).randbytes(MiB))
    (stack.lowers[0] / "db").write_bytes(data)
    try:
        with stack:
            path = stack.mnt / "db"
            fd = os.open(path, os.O_RDWR)  # copies the file up
            try:
                def check() -> None:
                    assert os.fstat(fd).st_size == len(data)
                    assert os.pread(fd, len(data) + 1, 0) == bytes(data)

                blocks = os.fstat(fd).st_blocks
                # allocate: extends the file with zeros
                assert fallocate(fd, 0, MiB, MiB) == 0
                data += bytes(MiB)
                check()
                assert os.fstat(fd).st_blocks >= blocks + MiB // 512
                # keep-size: blocks beyond EOF, size unchanged
                blocks = os.fstat(fd).st_blocks
                assert fallocate(fd, KEEP_SIZE, 2 * MiB, MiB) == 0
                check()
                assert os.fstat(fd).st_blocks >= blocks + MiB // 512
                # punch-hole: zeros, and the blocks are given back
                blocks = os.fstat(fd).st_blocks
                assert fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 64 << 10, 256 << 10) == 0
                data[64 << 10:320 << 10] = bytes(256 << 10)
                check()
                assert os.fstat(fd).st_blocks <= blocks - (256 << 10) // 512
                # zero-range
                assert fallocate(fd, ZERO_RANGE, 4096, 8192) == 0
                data[4096:12288] = bytes(8192)
                check()
                before = stack.stats()["fallocates"] if isinstance(stack, Union) else 0
                collapse = fallocate(fd, COLLAPSE_RANGE, 0, 4096)
                insert = fallocate(fd, INSERT_RANGE, 0, 4096)
                if kind == "overlay":
                    # overlay hands every mode to the upper file ...
                    assert collapse == insert == 0
                    data = data[4096:]
                    data[0:0] = bytes(4096)
                else:
                    # ... the FUSE kernel module refuses these two itself (only
                    # keep-size, punch-hole and zero-range are forwarded): the
                    # request never reaches the server.
                    assert collapse == insert == errno.EOPNOTSUPP
                    assert isinstance(stack, Union) and stack.stats()["fallocates"] == before
                check()
            finally:
                os.close(fd)
        assert (stack.top / "db").read_bytes() == bytes(data)
        assert (stack.lowers[0] / "db").stat().st_size == MiB  # the lower file is untouched
    finally:
        if isinstance(stack, Union):
            stack.force_cleanup()
        else:
            stack.unmount()


def test_posix_fallocate_on_a_new_file(tmp_path: Path) -> None:
    with Union(tmp_path, lowers=1) as u:
        fd = os.open(u.mnt / "new", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.posix_fallocate(fd, 0, 3 * MiB)
            assert os.fstat(fd).st_size == 3 * MiB and os.fstat(fd).st_blocks >= 6144
        finally:
            os.close(fd)
        assert u.stats()["fallocates"] >= 1


# --- passthrough (point 5) -----------------------------------------------------------------------

@pytest.fixture(params=["passthrough", "served"])
def io_union(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Union]:
    options = () if request.param == "passthrough" else ("--no-passthrough",)
    u = Union(tmp_path, lowers=2, options=options)
    rng = random.Random(7)
    (u.lowers[1] / "lower.bin").write_bytes(rng.randbytes(4 * MiB))
    (u.lowers[0] / "copied.bin").write_bytes(rng.randbytes(4 * MiB))
    with u:
        yield u


def test_reads_and_writes_of_lower_copied_up_and_new_files(io_union: Union) -> None:
    u = io_union
    m = u.mnt
    passthrough = "--no-passthrough" not in u.options
    u.reset_stats()
    # Sequential and random reads of a lower file, through one handle and several.
    lower = (u.lowers[1] / "lower.bin").read_bytes()
    assert (m / "lower.bin").read_bytes() == lower
    rng = random.Random(3)
    with open(m / "lower.bin", "rb") as f:
        for _ in range(200):
            off = rng.randrange(0, len(lower) - 4096)
            f.seek(off)
            assert f.read(4096) == lower[off:off + 4096]
    # Writes into a copied-up file and a new one, read back through other handles.
    with open(m / "copied.bin", "r+b") as f:
        f.seek(MiB)
        f.write(b"x" * MiB)
    with open(m / "new.bin", "wb") as f:
        f.write(b"y" * (3 * MiB))
    with open(m / "copied.bin", "rb") as f:
        f.seek(MiB - 1)
        assert f.read(2) == (u.lowers[0] / "copied.bin").read_bytes()[MiB - 1:MiB] + b"x"
    assert (m / "new.bin").read_bytes() == b"y" * (3 * MiB)
    assert (u.top / "new.bin").read_bytes() == b"y" * (3 * MiB)
    st = u.stats()
    assert st["passthrough"] == int(passthrough)
    if passthrough:
        # The kernel did every read and write itself.
        assert st["passthrough_opens"] >= 6 and st["cached_opens"] == 0
        assert st["reads_served"] == 0 and st["writes_served"] == 0
    else:
        assert st["passthrough_opens"] == 0 and st["cached_opens"] >= 6
        assert st["reads_served"] > 0 and st["writes_served"] > 0
    # Lookups still go through the server, counted.
    assert st["lookups"] >= 3


def test_random_operations_match_a_model(io_union: Union) -> None:
    """fsx in miniature: random writes, truncates, reads, reopens and fallocates on a file
    that starts in a lower branch, checked against a bytearray."""
    u = io_union
    path = u.mnt / "copied.bin"
    model = bytearray((u.lowers[0] / "copied.bin").read_bytes())
    rng = random.Random(11)
    fd = os.open(path, os.O_RDWR)
    try:
        for step in range(400):
            op = rng.randrange(6)
            if op == 0:
                off, n = rng.randrange(0, 6 * MiB), rng.randrange(1, 200_000)
                chunk = rng.randbytes(n)
                os.pwrite(fd, chunk, off)
                if off > len(model):
                    model += bytes(off - len(model))
                model[off:off + n] = chunk
            elif op == 1:
                size = rng.randrange(0, 6 * MiB)
                os.ftruncate(fd, size)
                del model[size:]
                model += bytes(size - len(model))
            elif op == 2:
                off, n = rng.randrange(0, 6 * MiB), rng.randrange(1, 300_000)
                assert os.pread(fd, n, off) == bytes(model[off:off + n]), step
            elif op == 3:
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
            elif op == 4:
                off, n = rng.randrange(0, 4 * MiB), rng.randrange(1, 100_000)
                assert fallocate(fd, PUNCH_HOLE | KEEP_SIZE, off, n) == 0
                end = min(off + n, len(model))
                if off < end:
                    model[off:end] = bytes(end - off)
            else:
                assert os.fstat(fd).st_size == len(model)
        assert path.read_bytes() == bytes(model)
    finally:
        os.close(fd)
    assert (u.top / "copied.bin").read_bytes() == bytes(model)


def test_copy_up_on_btrfs_is_a_reflink(btrfs_pool: Path, tmp_path: Path) -> None:
    """On a reflink-capable backing filesystem a copy-up shares the lower file's extents
    (FICLONE): constant work whatever the size (bench: layerfs bench --scenario io-throughput)."""
    base = btrfs_pool / f"union-{tmp_path.name}"
    base.mkdir()
    u = Union(tmp_path, lowers=1, branch_base=base)
    try:
        with open(u.lowers[0] / "big", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(MiB))
        os.sync()
        with u:
            with open(u.mnt / "big", "ab") as f:
                f.write(b"!")
            st = u.stats()
            assert st["copy_ups"] == 1
        out = subprocess.run(["btrfs", "filesystem", "du", "--raw", str(u.top / "big")],
                             capture_output=True, text=True, check=True).stdout.split("\n")[1]
        total, exclusive = (int(x) for x in out.split()[:2])
        assert total >= 64 * MiB and exclusive <= MiB, out  # the data is shared, not copied
    finally:
        u.force_cleanup()
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def test_copy_up_under_an_open_passthrough_reader_of_a_hard_link(tmp_path: Path) -> None:
    """The kernel holds one backing file per inode: writing through another name of a
    lower file that a passthrough handle has open moves the names to a new inode (the
    request is retried after ESTALE); every later open, by either name, sees the copy."""
    u = Union(tmp_path, lowers=1)
    x = u.lowers[0] / "x"
    x.write_bytes(b"lower data")
    os.link(x, u.lowers[0] / "y")
    with u:
        m = u.mnt
        reader = os.open(m / "x", os.O_RDONLY)
        try:
            assert os.pread(reader, 5, 0) == b"lower"
            os.stat(m / "y")  # both names cached by the kernel
            with open(m / "y", "r+b") as f:
                f.write(b"UPPER")
            assert os.pread(reader, 10, 0) == b"lower data"  # opened before: the lower file
            assert (m / "y").read_bytes() == b"UPPER data"
            assert (m / "x").read_bytes() == b"UPPER data"
            assert os.stat(m / "x").st_ino == os.stat(m / "y").st_ino
        finally:
            os.close(reader)
        assert u.stats()["passthrough_opens"] >= 3
    assert os.stat(u.top / "x").st_ino == os.stat(u.top / "y").st_ino  # linked up together
