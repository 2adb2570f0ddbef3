"""The conformance suite: what every storage driver must do, as pytest tests.

Modeled on moby's graphtest and containerd's snapshot testsuite: create empty, base and
snapshot layers with exact modes and owners, read through a 128-layer chain, diff/apply
round trips with sizes, changes, whiteouts and opaque directories from tars, remove
refused with children or while mounted, mount counting, a failed apply leaves nothing,
usage; and regressions such as deleting a lower directory, renaming a lower file,
chown/chmod on lower files.

Every test takes the ``store`` fixture (a fresh :class:`~layerfs.layers.LayerStore` for
the driver under test, see :mod:`.fixtures`) and is a method of :class:`DriverTests`;
subclass it in a ``test_*.py`` module to run it (``class TestMyDriver(DriverTests):
pass``), or run ``pytest --pyargs layerfs.testing.conformance``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.changes import ChangeKind
from layerfs.driver import Capabilities
from layerfs.errors import InUse, InvalidArgument, NotFound, UnsafeArchive
from layerfs.layers import LayerStore
from layerfs.metastore import LayerRecord
from layerfs.testing.trees import Entry, tree_manifest

# --- helpers ----------------------------------------------------------------------------------


def tar_of(entries: list[tuple[str, str | bytes | None, int]], *, uid: int = 0) -> io.BytesIO:
    """A layer tar: (name, content or None for a dir, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.uid = info.gid = uid
            info.mtime = 1_700_000_000
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = content.encode() if isinstance(content, str) else content
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


BASE_ENTRIES: list[tuple[str, str | bytes | None, int]] = [
    ("etc", None, 0o755),
    ("etc/hostname", "base\n", 0o644),
    ("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644),
    ("etc/shadow", "root:*:1::::::\n", 0o600),
    ("bin", None, 0o755),
    ("bin/tool", b"\x7fELF" + b"\0" * 1000, 0o4755),
    ("tmp", None, 0o1777),
    ("data", None, 0o755),
    ("data/keep", "keep\n", 0o644),
    ("data/sub", None, 0o700),
    ("data/sub/deep", "deep\n", 0o640),
    ("var", None, 0o755),
    ("var/log", None, 0o755),
    ("var/log/old.log", "x" * 5000, 0o644),
]


def make_base(store: LayerStore) -> str:
    return store.apply(tar_of(BASE_ENTRIES)).id


def manifest_of(store: LayerStore, layer_id: str) -> dict[str, Entry]:
    with store.mounted(layer_id, readonly=True) as path:
        return tree_manifest(path)

def copy_of(store: LayerStore, layer_id: str, parent: str | None) -> LayerRecord:
    """A new layer on ``parent`` from ``layer_id``'s diff: the round trip every change
    must survive."""
    buf = io.BytesIO()
    store.diff(layer_id, buf)
    buf.seek(0)
    return store.apply(buf, parent)


def edit_child(path: Path) -> None:
    (path / "etc" / "hostname").write_text("child\n")          # modify
    (path / "etc" / "new.conf").write_text("new\n")            # add
    os.unlink(path / "etc" / "shadow")                         # delete a lower file
    (path / "data" / "newdir").mkdir()                        # add a dir
    (path / "data" / "newdir" / "inside").write_text("in\n")

def tree_manifest_of_entries() -> dict[str, str]:
    return {"etc/hostname": hashlib.sha256(b"base\n").hexdigest()}


class DriverTests:
    """The suite; ``store`` is the driver under test on a fresh root (see :mod:`.fixtures`)."""

    # --- create ----------------------------------------------------------------------------------

    def test_create_empty(self, store: LayerStore) -> None:
        rec = store.create()
        assert store.exists(rec.id)
        assert rec.parent is None and rec.depth == 1
        with store.mounted(rec.id) as path:
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o755
            assert (st.st_uid, st.st_gid) == (0, 0)
            assert os.listdir(path) == []
        assert store.driver.exists(rec.id)

    def test_create_base_exact_modes_and_owners(self, store: LayerStore) -> None:
        base = store.create()
        with store.mounted(base.id) as path:
            (path / "a").mkdir(mode=0o700)
            os.chown(path / "a", 1000, 1001)
            (path / "a" / "file").write_text("hello\n")
            os.chmod(path / "a" / "file", 0o4750)
            os.chown(path / "a" / "file", 1000, 1001)
            os.chmod(path / "a" / "file", 0o4750)  # chown clears setuid; set it again
            os.mkfifo(path / "fifo", 0o600)
            os.symlink("a/file", path / "link")
            os.mknod(path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        with store.mounted(base.id, readonly=True) as path:
            st = os.stat(path / "a")
            assert stat.S_IMODE(st.st_mode) == 0o700 and (st.st_uid, st.st_gid) == (1000, 1001)
            st = os.stat(path / "a" / "file")
            assert stat.S_IMODE(st.st_mode) == 0o4750 and (st.st_uid, st.st_gid) == (1000, 1001)
            assert stat.S_ISFIFO(os.lstat(path / "fifo").st_mode)
            assert os.readlink(path / "link") == "a/file"
            assert os.lstat(path / "null").st_rdev == os.makedev(1, 3)

    def test_create_snapshot_sees_parent(self, store: LayerStore) -> None:
        base = make_base(store)
        child = store.create(base)
        assert child.depth == 2 and child.parent == base
        assert manifest_of(store, child.id) == manifest_of(store, base)

    def test_readonly_layer_refuses_writes(self, store: LayerStore) -> None:
        base = make_base(store)
        with store.mounted(base, readonly=True) as path:
            with pytest.raises(OSError) as exc:
                (path / "new").write_text("x")
            assert exc.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)

    def test_parent_must_exist(self, store: LayerStore) -> None:
        with pytest.raises(NotFound):
            store.create("does-not-exist")

    def test_bad_layer_id(self, store: LayerStore) -> None:
        with pytest.raises(InvalidArgument):
            store.create(layer_id="../escape")

    # --- deep chains -----------------------------------------------------------------------------

    @pytest.mark.slow
    def test_deep_layer_read_128(self, store: LayerStore, capabilities: Capabilities) -> None:
        if capabilities.max_depth is not None and capabilities.max_depth < 129:
            pytest.skip(f"{store.driver.name} mounts at most {capabilities.max_depth} layers")
        parent = None
        ids = []
        for i in range(128):
            parent = store.apply(tar_of([(f"f{i:03d}", f"layer {i}\n", 0o644)]), parent).id
            ids.append(parent)
        assert parent is not None
        assert store.get(parent).depth == 128
        with store.mounted(parent, readonly=True) as path:
            assert (path / "f000").read_text() == "layer 0\n"
            assert (path / "f127").read_text() == "layer 127\n"
            assert len(os.listdir(path)) == 128
        # A writable layer on top of 128 also mounts (129 in the chain).
        top = store.create(parent)
        with store.mounted(top.id) as path:
            (path / "f000").write_text("changed\n")
        with store.mounted(ids[0], readonly=True) as path:
            assert (path / "f000").read_text() == "layer 0\n"

    # --- changes, diff, apply ------------------------------------------------------------------------



    def test_changes(self, store: LayerStore) -> None:
        base = make_base(store)
        child = store.create(base)
        with store.mounted(child.id) as path:
            edit_child(path)
        changes = {(c.kind, c.path) for c in store.changes(child.id)}
        assert (ChangeKind.MODIFY, "/etc/hostname") in changes
        assert (ChangeKind.ADD, "/etc/new.conf") in changes
        assert (ChangeKind.DELETE, "/etc/shadow") in changes
        assert (ChangeKind.ADD, "/data/newdir") in changes
        assert (ChangeKind.ADD, "/data/newdir/inside") in changes
        untouched = {"/etc/passwd", "/bin/tool", "/data/keep", "/var/log/old.log"}
        assert not untouched & {p for _, p in changes}

    def test_diff_apply_round_trip_with_sizes(self, store: LayerStore) -> None:
        base = make_base(store)
        child = store.create(base)
        with store.mounted(child.id) as path:
            edit_child(path)
        buf = io.BytesIO()
        size = store.diff(child.id, buf)
        assert size == len("child\n") + len("new\n") + len("in\n")
        assert store.diff_size(child.id) == size
        buf.seek(0)
        copy = store.apply(buf, base)
        assert copy.size == size
        assert manifest_of(store, copy.id) == manifest_of(store, child.id)
        # And the base is untouched by either.
        assert manifest_of(store, base)["etc/hostname"].sha256 == \
            tree_manifest_of_entries()["etc/hostname"]



    def test_diff_of_base_layer_is_whole_tree(self, store: LayerStore) -> None:
        base = make_base(store)
        other = copy_of(store, base, None)
        assert manifest_of(store, other.id) == manifest_of(store, base)

    def test_remove_lower_directory(self, store: LayerStore) -> None:
        base = make_base(store)
        child = store.create(base)
        with store.mounted(child.id) as path:
            shutil.rmtree(path / "data")
            assert not (path / "data").exists()
        with store.mounted(child.id, readonly=True) as path:
            assert not (path / "data").exists()
        assert (ChangeKind.DELETE, "/data") in {(c.kind, c.path) for c in store.changes(child.id)}
        buf = io.BytesIO()
        store.diff(child.id, buf)
        buf.seek(0)
        names = tarfile.open(fileobj=buf).getnames()
        assert ".wh.data" in names
        buf.seek(0)
        copy = store.apply(buf, base)
        assert manifest_of(store, copy.id) == manifest_of(store, child.id)

    def test_delete_and_recreate_directory(self, store: LayerStore) -> None:
        base = make_base(store)
        child = store.create(base)
        with store.mounted(child.id) as path:
            shutil.rmtree(path / "data")
            (path / "data").mkdir()
            (path / "data" / "fresh").write_text("fresh\n")
        with store.mounted(child.id, readonly=True) as path:
            assert sorted(os.listdir(path / "data")) == ["fresh"]
        copy = copy_of(store, child.id, base)
        with store.mounted(copy.id, readonly=True) as path:
            assert sorted(os.listdir(path / "data")) == ["fresh"]

    def test_rename_lower_file(self, store: LayerStore) -> None:
        base = make_base(store)
        child = store.create(base)
        with store.mounted(child.id) as path:
            os.rename(path / "etc" / "passwd", path / "etc" / "passwd.old")
            assert (path / "etc" / "passwd.old").read_text().startswith("root:")
        changes = {(c.kind, c.path) for c in store.changes(child.id)}
        assert (ChangeKind.DELETE, "/etc/passwd") in changes
        assert (ChangeKind.ADD, "/etc/passwd.old") in changes
        copy = copy_of(store, child.id, base)
        assert manifest_of(store, copy.id) == manifest_of(store, child.id)

    def test_chown_chmod_lower_files(self, store: LayerStore) -> None:
        base = make_base(store)
        child = store.create(base)
        with store.mounted(child.id) as path:
            os.chown(path / "etc" / "passwd", 1234, 5678)
            os.chmod(path / "data" / "keep", 0o600)
            os.chown(path / "data" / "sub", 42, 42)
        with store.mounted(child.id, readonly=True) as path:
            st = os.stat(path / "etc" / "passwd")
            assert (st.st_uid, st.st_gid) == (1234, 5678)
            assert (path / "etc" / "passwd").read_text().startswith("root:")
            assert stat.S_IMODE(os.stat(path / "data" / "keep").st_mode) == 0o600
            assert os.stat(path / "data" / "sub").st_uid == 42
            assert (path / "data" / "sub" / "deep").read_text() == "deep\n"
        with store.mounted(base, readonly=True) as path:
            assert os.stat(path / "etc" / "passwd").st_uid == 0
            assert stat.S_IMODE(os.stat(path / "data" / "keep").st_mode) == 0o644
        changes = {(c.kind, c.path) for c in store.changes(child.id)}
        assert {(ChangeKind.MODIFY, "/etc/passwd"), (ChangeKind.MODIFY, "/data/keep"),
                (ChangeKind.MODIFY, "/data/sub")} <= changes
        copy = copy_of(store, child.id, base)
        assert manifest_of(store, copy.id) == manifest_of(store, child.id)

    def test_whiteout_and_opaque_from_tar(self, store: LayerStore) -> None:
        base = make_base(store)
        layer = store.apply(tar_of([("etc/.wh.shadow", "", 0o644), ("data", None, 0o755),
                                    ("data/.wh..wh..opq", "", 0o644),
                                    ("data/only", "only\n", 0o644)]), base)
        with store.mounted(layer.id, readonly=True) as path:
            assert not (path / "etc" / "shadow").exists()
            assert (path / "etc" / "passwd").exists()
            assert sorted(os.listdir(path / "data")) == ["only"]
            assert ".wh.shadow" not in os.listdir(path / "etc")

    def test_writes_do_not_leak_to_parent(self, store: LayerStore) -> None:
        base = make_base(store)
        before = manifest_of(store, base)
        a = store.create(base)
        b = store.create(base)
        with store.mounted(a.id) as path:
            edit_child(path)
            with open(path / "var" / "log" / "old.log", "r+b") as f:
                f.write(b"Y")
        assert manifest_of(store, base) == before
        assert manifest_of(store, b.id) == before

    # --- remove -----------------------------------------------------------------------------------------

    def test_remove_refused_with_children(self, store: LayerStore) -> None:
        base = make_base(store)
        child = store.create(base)
        with pytest.raises(InUse):
            store.remove(base)
        store.remove(child.id)
        store.remove(base)
        assert not store.exists(base)
        assert not store.driver.exists(base)

    def test_remove_refused_while_mounted(self, store: LayerStore) -> None:
        base = make_base(store)
        with store.mounted(base), pytest.raises(InUse):
            store.remove(base)
        store.remove(base)

    def test_mount_counts_users(self, store: LayerStore) -> None:
        base = store.create()
        p1 = store.mount(base.id)
        p2 = store.mount(base.id)
        assert p1 == p2
        store.unmount(base.id)
        assert mountlib.is_mounted(p1)
        store.unmount(base.id)
        assert not mountlib.is_mounted(p1)

    def test_failed_apply_leaves_nothing(self, store: LayerStore) -> None:
        base = make_base(store)
        before = {r.id for r in store.layers()}
        bad = tar_of([("ok", "fine\n", 0o644), ("../escape", "x", 0o644)])
        with pytest.raises(UnsafeArchive):
            store.apply(bad, base, layer_id="hostile")
        assert {r.id for r in store.layers()} == before
        assert not store.driver.exists("hostile")
        assert store.store.get_layer("hostile") is None

    def test_usage_reports_bytes_and_inodes(self, store: LayerStore) -> None:
        base = make_base(store)
        usage = store.usage(base)
        assert usage.inodes >= len(BASE_ENTRIES)
        assert usage.bytes > 0
