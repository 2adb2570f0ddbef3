"""What only the overlay drivers have: deep stacks, mount methods, features,
the inode cost of legacy overlay, and the copy-up semantics that break in
real life."""

from __future__ import annotations

import errno
import io
import os
import stat
import time
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.errors import LayerfsError
from layerfs.layers import LayerStore
from layerfs.testing.conformance import close_and_check
from layerfs.testing.conformance.suite import BASE_ENTRIES, tar_of

from ..conftest import open_store_or_skip


@pytest.fixture
def ov2(tmp_path: Path):
    s = open_store_or_skip("overlay2", tmp_path / "root")
    yield s
    close_and_check(s)


def overlay2_with(tmp_path: Path, *opts: str) -> LayerStore:
    return open_store_or_skip("overlay2", tmp_path / "root", list(opts))


def build_chain(store: LayerStore, depth: int) -> list[str]:
    """A chain of `depth` layers with realistic 64-hex ids, each adding one file."""
    ids: list[str] = []
    parent = None
    for i in range(depth):
        parent = store.create(parent, readonly=True).id
        with open(store.driver.home / parent / "diff" / f"f{i:03d}", "w") as f:
            f.write(f"layer {i}\n")
        ids.append(parent)
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("depth,method", [(128, "auto"), (128, "relative"), (500, "auto"),
                                          (500, "fsconfig")])
def test_deep_stacks_mount_and_read(ov2: LayerStore, depth: int, method: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ids = build_chain(ov2, depth)
    assert all(len(i) == 64 for i in ids)
    mounts = ov2.driver.mounts(ids[-1], readonly=True)
    option_bytes = len(",".join(mounts[0].options))
    if depth == 500:
        assert option_bytes > mountlib.PAGE_SIZE  # l/ links alone don't fit 500 layers
    if method != "auto":
        real = mountlib.mount_overlay
        monkeypatch.setattr(mountlib, "mount_overlay",
                            lambda options, target, method="auto": real(options, target,
                                                                        method=METHOD))
        METHOD = method
    start = time.perf_counter()
    with ov2.mounted(ids[-1], readonly=True) as path:
        elapsed = time.perf_counter() - start
        assert (path / "f000").read_text() == "layer 0\n"
        assert (path / f"f{depth - 1:03d}").read_text() == f"layer {depth - 1}\n"
        assert len(os.listdir(path)) == depth
    print(f"overlay2 mount of {depth} layers ({method}): {elapsed * 1000:.1f} ms, "
          f"{option_bytes} option bytes")


def test_501_layers_refused(ov2: LayerStore) -> None:
    from layerfs.errors import InvalidArgument
    ids = build_chain(ov2, 500)
    with pytest.raises(InvalidArgument):
        ov2.create(ids[-1])


def test_short_links_layout(ov2: LayerStore) -> None:
    base = ov2.create(readonly=True).id
    child = ov2.create(base).id
    home = ov2.driver.home
    short = (home / child / "link").read_text()
    assert len(short) == 26
    assert os.readlink(home / "l" / short) == f"../{child}/diff"
    assert (home / child / "lower").read_text() == f"l/{(home / base / 'link').read_text()}"
    assert (home / child / "work").is_dir()
    ov2.remove(child)
    assert not (home / "l" / short).exists()


def test_native_diff_uses_overlay_whiteouts(ov2: LayerStore) -> None:
    base = ov2.apply(tar_of(BASE_ENTRIES)).id
    child = ov2.create(base).id
    with ov2.mounted(child) as path:
        os.unlink(path / "etc" / "shadow")
        import shutil
        shutil.rmtree(path / "data")
        (path / "data").mkdir()
    diff = ov2.driver.home / child / "diff"
    wh = os.lstat(diff / "etc" / "shadow")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(diff / "data", "trusted.overlay.opaque") == b"y"
    buf = io.BytesIO()
    ov2.diff(child, buf)
    buf.seek(0)
    import tarfile
    names = tarfile.open(fileobj=buf).getnames()
    assert "etc/.wh.shadow" in names
    assert "data/.wh..wh..opq" in names
    # apply converts back to overlay's native form
    buf.seek(0)
    copy = ov2.apply(buf, base).id
    cdiff = ov2.driver.home / copy / "diff"
    assert stat.S_ISCHR(os.lstat(cdiff / "etc" / "shadow").st_mode)
    assert os.getxattr(cdiff / "data", "trusted.overlay.opaque") == b"y"


def test_copy_up_keeps_data_modes_owners_xattrs_mtimes(ov2: LayerStore) -> None:
    base = ov2.create().id
    with ov2.mounted(base) as path:
        f = path / "file"
        f.write_bytes(b"A" * 100_000)
        os.chown(f, 1000, 2000)
        os.chmod(f, 0o640)
        os.setxattr(f, "user.note", b"kept")
        os.utime(f, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    child = ov2.create(base).id
    with ov2.mounted(child) as path:
        f = path / "file"
        os.setxattr(f, "user.other", b"x")  # metadata-only change → copy-up
    upper = ov2.driver.home / child / "diff" / "file"
    st = os.lstat(upper)
    assert st.st_size == 100_000  # full data copy (no metacopy)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 2000, 0o640)
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert os.getxattr(upper, "user.note") == b"kept"
    assert upper.read_bytes() == b"A" * 100_000


def test_rename_lower_dir_exdev_without_redirect_dir(ov2: LayerStore) -> None:
    base = ov2.apply(tar_of(BASE_ENTRIES)).id
    child = ov2.create(base).id
    with ov2.mounted(child) as path:
        with pytest.raises(OSError) as exc:
            os.rename(path / "data", path / "data2")
        assert exc.value.errno == errno.EXDEV


def test_rename_lower_dir_works_with_redirect_dir(tmp_path: Path) -> None:
    store = overlay2_with(tmp_path, "redirect_dir=true")
    try:
        assert not store.driver.native_diff_ok  # falls back to the naive diff
        base = store.apply(tar_of(BASE_ENTRIES)).id
        child = store.create(base).id
        with store.mounted(child) as path:
            os.rename(path / "data", path / "data2")
            assert (path / "data2" / "sub" / "deep").read_text() == "deep\n"
        changes = {(c.kind.value, c.path) for c in store.changes(child)}
        assert ("D", "/data") in changes and ("A", "/data2/sub/deep") in changes
        buf = io.BytesIO()
        store.diff(child, buf)
        buf.seek(0)
        copy = store.apply(buf, base).id
        with store.mounted(copy, readonly=True) as path:
            assert (path / "data2" / "sub" / "deep").read_text() == "deep\n"
            assert not (path / "data").exists()
    finally:
        close_and_check(store)


@pytest.mark.parametrize(("options", "native"), [((), True), (("redirect_dir=true",), False),
                                                 (("metacopy=true",), False)])
def test_capabilities_are_what_the_instance_does(tmp_path: Path, options: tuple[str, ...],
                                                 native: bool) -> None:
    """The class says what overlay2 can do; the instance what it does with its options
    (the bench records the instance's)."""
    store = overlay2_with(tmp_path, *options)
    try:
        assert type(store.driver).CAPABILITIES.native_diff
        caps = store.driver.capabilities
        assert caps.native_diff == caps.native_changes == native == store.driver.native_diff_ok
    finally:
        close_and_check(store)


def test_metacopy_chmod_copies_no_data(tmp_path: Path) -> None:
    store = overlay2_with(tmp_path, "metacopy=true", "redirect_dir=true")
    try:
        base = store.create().id
        with store.mounted(base) as path:
            (path / "big").write_bytes(b"B" * (4 << 20))
        child = store.create(base).id
        with store.mounted(child) as path:
            os.chmod(path / "big", 0o600)
            assert (path / "big").read_bytes()[:1] == b"B"
        upper = store.driver.home / child / "diff" / "big"
        # metadata only: a 4 MiB file whose upper copy holds no data blocks
        assert os.lstat(upper).st_size == 4 << 20
        assert os.lstat(upper).st_blocks * 512 <= 8192  # at most an xattr block
        assert "trusted.overlay.metacopy" in os.listxattr(upper)
        assert stat.S_IMODE(os.lstat(upper).st_mode) == 0o600
    finally:
        close_and_check(store)


def test_index_keeps_lower_hardlinks_consistent(tmp_path: Path) -> None:
    store = overlay2_with(tmp_path, "index=true")
    try:
        base = store.create().id
        with store.mounted(base) as path:
            (path / "a").write_text("one\n")
            os.link(path / "a", path / "b")
        child = store.create(base).id
        with store.mounted(child) as path:
            with open(path / "a", "a") as f:
                f.write("two\n")
            assert (path / "b").read_text() == "one\ntwo\n"  # still one inode
            assert os.stat(path / "a").st_ino == os.stat(path / "b").st_ino
    finally:
        close_and_check(store)


def test_quota_not_supported_off_xfs(ov2: LayerStore) -> None:
    from layerfs.errors import DriverNotSupported
    with pytest.raises(DriverNotSupported, match="xfs"):
        ov2.create(size="10M")


@pytest.fixture
def xfs_prjquota(tmp_path: Path):
    """A loop-mounted xfs with project quotas, made and removed by exact name."""
    import subprocess
    image, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        try:
            mountlib.mount(mountlib.Mount("xfs", loop, ("prjquota",)), mnt)
        except LayerfsError:
            if os.environ.get("LAYERFS_IN_GUEST") == "1":
                raise
            pytest.skip("this kernel's xfs has no quota support (CONFIG_XFS_QUOTA); "
                        "the test runs in the qemu guest: tests/vm/test_overlay_quota_in_guest.py")
        try:
            yield mnt
        finally:
            mountlib.unmount_all_under(mnt)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_quota_on_xfs_with_project_quotas(xfs_prjquota: Path) -> None:
    store = open_store_or_skip("overlay2", xfs_prjquota / "root")
    try:
        base = store.create().id
        box = store.create(base, size="10M").id
        with store.mounted(box) as path:
            (path / "fits").write_bytes(b"x" * (5 << 20))
            with pytest.raises(OSError) as exc, open(path / "too-big", "wb") as f:
                for _ in range(20):
                    f.write(b"y" * (1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
            assert exc.value.errno in (errno.EDQUOT, errno.ENOSPC)
        # an unlimited sibling can write past 10M
        free = store.create(base).id
        with store.mounted(free) as path:
            (path / "big").write_bytes(b"z" * (12 << 20))
        for layer in (free, box, base):
            store.remove(layer)
    finally:
        close_and_check(store)


def test_info_shows_features(ov2: LayerStore) -> None:
    status = ov2.status()
    assert status["Supports d_type"] == "true"
    assert "metacopy=yes" in status["Features (kernel)"]
    assert status["Native Overlay Diff"] == "true"


# --- legacy overlay ----------------------------------------------------------------------------


def twenty_layer_image(store: LayerStore) -> list[str]:
    """A base with 60 directories, then 19 layers adding one file each."""
    entries = [(f"d{i}", None, 0o755) for i in range(60)]
    entries += [(f"d{i}/file", f"{i}\n", 0o644) for i in range(60)]
    ids = [store.apply(tar_of(entries)).id]
    for i in range(19):
        ids.append(store.apply(tar_of([(f"d{i}/new{i}", "x\n", 0o644)]), ids[-1]).id)
    return ids


def test_overlay_inode_cost_vs_overlay2(tmp_path: Path) -> None:
    costs = {}
    for name in ("overlay", "overlay2"):
        store = open_store_or_skip(name, tmp_path / name)
        try:
            ids = twenty_layer_image(store)
            costs[name] = sum(store.usage(i).inodes for i in ids)
            with store.mounted(ids[-1], readonly=True) as path:
                assert (path / "d18" / "new18").read_text() == "x\n"
                assert (path / "d0" / "file").read_text() == "0\n"
        finally:
            close_and_check(store)
    print(f"inodes for a 20-layer image: overlay {costs['overlay']}, "
          f"overlay2 {costs['overlay2']}")
    # overlay: every layer re-creates all 61 directories; overlay2 only the changes.
    assert costs["overlay"] > 5 * costs["overlay2"]
    assert costs["overlay"] >= 20 * 60


def test_overlay_image_layers_are_hardlinked_trees(tmp_path: Path) -> None:
    store = open_store_or_skip("overlay", tmp_path / "root")
    try:
        base = store.apply(tar_of(BASE_ENTRIES)).id
        top = store.apply(tar_of([("etc/hostname", "changed\n", 0o644)]), base).id
        home = store.driver.home
        same = os.stat(home / base / "root" / "etc" / "passwd")
        linked = os.stat(home / top / "root" / "etc" / "passwd")
        assert same.st_ino == linked.st_ino and linked.st_nlink == 2
        # the changed file broke its link, and the parent's copy is untouched
        assert (home / base / "root" / "etc" / "hostname").read_text() == "base\n"
        assert os.stat(home / top / "root" / "etc" / "hostname").st_nlink == 1
        box = store.create(top).id
        assert (home / box / "lower-id").read_text() == top
        with store.mounted(box) as path:
            (path / "etc" / "passwd").write_text("copied up\n")
        assert (home / top / "root" / "etc" / "passwd").read_text().startswith("root:")
    finally:
        close_and_check(store)


# --- rootless building blocks ----------------------------------------------------------------


def test_userxattr_uses_user_overlay_namespace(tmp_path: Path) -> None:
    store = overlay2_with(tmp_path, "userxattr=true")
    try:
        base = store.apply(tar_of(BASE_ENTRIES)).id
        child = store.create(base).id
        with store.mounted(child) as path:
            import shutil
            shutil.rmtree(path / "data")
            (path / "data").mkdir()
            (path / "data" / "new").write_text("n")
        diff = store.driver.home / child / "diff"
        assert os.getxattr(diff / "data", "user.overlay.opaque") == b"y"
        buf = io.BytesIO()
        store.diff(child, buf)
        buf.seek(0)
        copy = store.apply(buf, base).id
        with store.mounted(copy, readonly=True) as path:
            assert os.listdir(path / "data") == ["new"]
    finally:
        close_and_check(store)


def test_fuse_overlayfs_as_mount_program(tmp_path: Path) -> None:
    import shutil
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("fuse-overlayfs not installed (scripts/setup installs it)")
    store = overlay2_with(tmp_path, "mount_program=fuse-overlayfs")
    try:
        base = store.apply(tar_of(BASE_ENTRIES)).id
        child = store.create(base).id
        with store.mounted(child) as path:
            assert any(m.fstype == "fuse.fuse-overlayfs" and m.target == str(path)
                       for m in mountlib.mountinfo())
            (path / "etc" / "hostname").write_text("fuse\n")
            os.unlink(path / "etc" / "shadow")
        changes = {(c.kind.value, c.path) for c in store.changes(child)}
        assert ("D", "/etc/shadow") in changes and ("C", "/etc/hostname") in changes
        with store.mounted(child, readonly=True) as path:
            assert (path / "etc" / "hostname").read_text() == "fuse\n"
            assert not (path / "etc" / "shadow").exists()
    finally:
        close_and_check(store)


def test_options_are_kept_with_the_root(tmp_path: Path) -> None:
    store = overlay2_with(tmp_path, "metacopy=true")  # redirect_dir comes with it
    assert store.driver.enabled["metacopy"] and store.driver.enabled["redirect_dir"]
    store.close()
    again = LayerStore.open(tmp_path / "root")  # no options: the root's own apply
    try:
        assert again.driver.enabled["metacopy"]
        assert "metacopy" in again.status()["Enabled"]
    finally:
        close_and_check(again)
