"""What only the btrfs driver has: subvolumes and read-only snapshots, nested
subvolumes on remove, qgroup quotas, block-level sharing, and changes found in
btrfs's own trees (layerfs_drivers.btrfs.trees) that must equal the naive walk's."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import btrfsutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs import mount as mountlib
from layerfs.changes import naive_changes
from layerfs.layers import LayerStore
from layerfs.testing.conformance import close_and_check

from ..conftest import open_store_or_skip


@pytest.fixture
def bt(btrfs_pool: Path, tmp_path: Path):
    """A btrfs root that always takes the tree search (``auto`` walks small trees)."""
    root = btrfs_pool / f"bt-{tmp_path.name}"
    s = open_store_or_skip("btrfs", root, ["native_changes=true"])
    yield s
    close_and_check(s)
    shutil.rmtree(root, ignore_errors=True)


def test_layers_are_subvolumes_and_image_layers_read_only(bt: LayerStore) -> None:
    base = bt.create(readonly=True).id
    box = bt.create(base).id
    for layer in (base, box):
        assert btrfsutil.is_subvolume(bt.driver.home / "subvolumes" / layer)
    assert btrfsutil.get_subvolume_read_only(bt.driver.home / "subvolumes" / base)
    assert not btrfsutil.get_subvolume_read_only(bt.driver.home / "subvolumes" / box)
    info = btrfsutil.subvolume_info(bt.driver.home / "subvolumes" / box)
    parent_info = btrfsutil.subvolume_info(bt.driver.home / "subvolumes" / base)
    assert info.parent_uuid == parent_info.uuid  # a snapshot of its parent


def test_remove_handles_nested_subvolumes(bt: LayerStore) -> None:
    box = bt.create().id
    with bt.mounted(box) as path:
        btrfsutil.create_subvolume(path / "inner")
        btrfsutil.create_subvolume(path / "inner" / "deeper")
        (path / "inner" / "deeper" / "f").write_text("x")
        btrfsutil.create_snapshot(path / "inner", path / "snap", read_only=True)
    bt.remove(box)
    assert not (bt.driver.home / "subvolumes" / box).exists()


def qgroups(path: Path) -> set[str]:
    proc = subprocess.run(["btrfs", "qgroup", "show", "--raw", str(path)], capture_output=True,
                          text=True, check=True)
    return {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("0/")}


@pytest.fixture
def bt_quota(tmp_path: Path):
    """Its own small pool: quotas slow every later operation on a filesystem."""
    from layerfs import pool
    handle = pool.create_btrfs(tmp_path / "q.img", tmp_path / "q", size=512 << 20)
    s = open_store_or_skip("btrfs", handle.mountpoint / "layerfs")
    try:
        yield s
    finally:
        close_and_check(s)
        pool.destroy_btrfs(handle.mountpoint)


def test_quota_limits_writes_and_qgroup_is_removed(bt_quota: LayerStore) -> None:
    bt = bt_quota
    layer = bt.create(size="50M").id
    subvol = bt.driver.home / "subvolumes" / layer
    subvol_id = btrfsutil.subvolume_id(subvol)
    assert f"0/{subvol_id}" in qgroups(bt.driver.home)
    with bt.mounted(layer) as path:
        chunk = os.urandom(1 << 20)
        with open(path / "ok", "wb") as f:
            for _ in range(25):
                f.write(chunk)
        with pytest.raises(OSError) as exc, open(path / "too-much", "wb") as f:
            for _ in range(60):
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        assert exc.value.errno in (errno.EDQUOT, errno.ENOSPC)
    referenced, exclusive = bt.driver.qgroup_usage(layer)
    assert 25 << 20 <= referenced <= 51 << 20 and exclusive > 0
    bt.remove(layer)
    assert f"0/{subvol_id}" not in qgroups(bt.driver.home)  # not leaked (moby#29325)


def test_usage_shows_shared_and_exclusive_bytes(bt: LayerStore) -> None:
    base = bt.create().id
    with bt.mounted(base) as path:
        (path / "big").write_bytes(os.urandom(8 << 20))
    subprocess.run(["sync"], check=True)
    box = bt.create(base).id
    with bt.mounted(box) as path:
        with open(path / "big", "r+b") as f:  # change one 4 KiB block of 8 MiB
            f.seek(4096)
            f.write(b"z" * 4096)
        (path / "own").write_bytes(os.urandom(1 << 20))
    subprocess.run(["sync"], check=True)
    usage = bt.usage(box)
    assert usage.shared_bytes is not None and usage.exclusive_bytes is not None
    assert usage.shared_bytes >= (8 << 20) - 8192   # the big file is still shared...
    assert (1 << 20) <= usage.exclusive_bytes <= (1 << 20) + 256 * 1024  # ...but not the block


# --- native changes vs the naive walk -------------------------------------------------------------

EDITS = st.lists(st.tuples(st.sampled_from(["write", "append", "add", "rm", "rmdir", "mkdir",
                                            "chmod", "chown", "xattr", "symlink", "link",
                                            "rename", "rename_dir", "replace_dir", "link_into_sub"]),
                           st.integers(0, 10_000)), min_size=1, max_size=12)


def populate(path: Path, rng: random.Random) -> None:
    for d in range(6):
        (path / f"d{d}" / "sub").mkdir(parents=True)
        for f in range(5):
            (path / f"d{d}" / f"f{f}").write_bytes(rng.randbytes(rng.randint(0, 3000)))
            (path / f"d{d}" / "sub" / f"g{f}").write_text(f"{d}{f}")
    os.link(path / "d0" / "f0", path / "d1" / "hard")
    os.symlink("d0/f1", path / "sym")


def apply_edits(path: Path, edits: list[tuple[str, int]]) -> None:
    for op, n in edits:
        d = path / f"d{n % 6}"
        if not d.exists():
            d.mkdir()
        f = d / f"f{n % 5}"
        try:
            if op == "write":
                f.write_bytes(os.urandom(n % 5000))
            elif op == "append":
                with open(f, "ab") as fh:
                    fh.write(b"+")
            elif op == "add":
                (d / f"new{n}").write_text("new")
            elif op == "rm":
                f.unlink()
            elif op == "rmdir":
                shutil.rmtree(d / "sub")
            elif op == "mkdir":
                (d / f"nd{n}" / "x").mkdir(parents=True)
                (d / f"nd{n}" / "x" / "y").write_text("y")
            elif op == "chmod":
                os.chmod(f, 0o600 + (n % 0o100))
            elif op == "chown":
                os.chown(f, n % 3000, n % 2000)
            elif op == "xattr":
                os.setxattr(f, "user.k", str(n).encode())
            elif op == "symlink":
                (d / f"ln{n}").symlink_to(f"../x{n}")
            elif op == "link":
                os.link(f, d / f"hl{n}")
            elif op == "rename":
                os.rename(f, d / f"renamed{n}")
            elif op == "link_into_sub":  # a link group that crosses a renamed dir's border
                os.link(f, d / "sub" / f"hl{n}")
            elif op == "rename_dir":
                os.rename(d / "sub", path / f"moved{n}")
            elif op == "replace_dir":
                shutil.rmtree(d / "sub")
                (d / "sub").mkdir()
                (d / "sub" / "fresh").write_text("fresh")
        except (FileNotFoundError, FileExistsError, OSError):
            pass  # an edit made impossible by an earlier one


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS, seed=st.integers(0, 2**16))
def test_tree_search_changes_equal_naive_walk(bt: LayerStore, edits: list[tuple[str, int]],
                                       seed: int) -> None:
    base = bt.create().id
    with bt.mounted(base) as path:
        populate(path, random.Random(seed))
    box = bt.create(base).id
    with bt.mounted(box) as path:
        apply_edits(path, edits)
    home = bt.driver.home / "subvolumes"
    # The tree search first: the naive walk reads the parent's directories, and the
    # atime updates that writes there would hand the search candidates of their own.
    got = bt.changes(box)
    assert got == naive_changes(home / base, home / box)
    bt.remove(box)
    bt.remove(base)


def test_tree_search_changes_of_sealed_parent(bt: LayerStore) -> None:
    base = bt.create().id
    with bt.mounted(base) as path:
        populate(path, random.Random(1))
    image = bt.create(base, readonly=True).id  # sealed, read-only
    box = bt.create(image).id
    with bt.mounted(box) as path:
        apply_edits(path, [("write", 1), ("rmdir", 2), ("rename_dir", 3), ("link", 4)])
    home = bt.driver.home / "subvolumes"
    got = bt.changes(box)
    assert got == naive_changes(home / image, home / box)


def test_auto_walks_small_trees_and_searches_big_ones(btrfs_pool: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import layerfs_drivers.btrfs as btrfs_driver

    monkeypatch.setattr(btrfs_driver, "TREE_SEARCH_MIN_INODES", 40)
    root = btrfs_pool / f"auto-{tmp_path.name}"
    store = open_store_or_skip("btrfs", root)
    try:
        assert store.driver.tree_search == "auto"
        small = store.create().id
        with store.mounted(small) as path:
            populate(path, random.Random(3))  # 6 x (5 files + sub with 5) + 2: 74 inodes
        few = store.create(small).id
        with store.mounted(few) as path:
            apply_edits(path, [("write", 1), ("add", 2), ("rm", 3)])
        many = store.create(small).id
        with store.mounted(many) as path:
            for i in range(40):
                (path / f"new{i}").write_text("n")
        searched = []
        real = btrfs_driver.BtrfsDriver._native_changes

        def spy(self: btrfs_driver.BtrfsDriver, layer_id: str, parent: str) -> list:
            searched.append(layer_id)
            return real(self, layer_id, parent)

        monkeypatch.setattr(btrfs_driver.BtrfsDriver, "_native_changes", spy)
        home = store.driver.home / "subvolumes"
        for layer in (few, many):
            assert store.changes(layer) == naive_changes(home / small, home / layer)
        assert searched == [few]  # 1 new inode of 75: search; 40 new: walk
        monkeypatch.setattr(btrfs_driver, "TREE_SEARCH_MIN_INODES", 1000)
        store.changes(few)
        assert searched == [few]  # a small parent: walk
    finally:
        close_and_check(store)
        shutil.rmtree(root, ignore_errors=True)


def test_native_changes_option(tmp_path: Path) -> None:
    from layerfs_drivers.btrfs import BtrfsDriver

    from layerfs.driver import DriverOptions
    from layerfs.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="native_changes='maybe'"):
        BtrfsDriver(tmp_path / "btrfs", DriverOptions({"native_changes": "maybe"}))


# --- pool create / destroy through the CLI ------------------------------------------------------------


def test_pool_create_and_destroy_cli(tmp_path: Path) -> None:
    image, mnt = tmp_path / "pool.img", tmp_path / "mnt"
    layerfs = [sys.executable, "-m", "layerfs"]
    subprocess.run([*layerfs, "pool", "create", "btrfs", "--size", "300M", "--image", str(image),
                    "--mount", str(mnt)], check=True, capture_output=True)
    try:
        proc = subprocess.run([*layerfs, "--root", str(mnt / "layerfs"), "--driver", "btrfs",
                               "info", "--json"], check=True, capture_output=True, text=True)
        assert '"driver": "btrfs"' in proc.stdout
        loops = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        assert loops.stdout.strip()
    finally:
        subprocess.run([*layerfs, "pool", "destroy", "btrfs", str(mnt)], check=True,
                       capture_output=True)
    assert not image.exists()
    assert not subprocess.run(["losetup", "-j", str(image)], capture_output=True,
                              text=True).stdout.strip()
    assert not any(str(mnt) in m.target for m in mountlib.mountinfo())


def test_not_on_btrfs_is_not_supported(tmp_path: Path) -> None:
    from layerfs import plugins
    probe = plugins.probe("btrfs", tmp_path)
    assert not probe.supported and "pool create btrfs" in (probe.reason or "")
