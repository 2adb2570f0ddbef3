"""The aufs driver with ``dirren``: a renamed lower directory in a layer's diff.

A dirren rename leaves a redirect in the container layer's branch (its contents
stay in the layers below), so the branch alone no longer describes the layer.
Its diff, changes and size must still come out as plain OCI changes — a
whiteout of the old path and the whole tree under the new one — and applying
that diff onto the parent must reproduce the container's view exactly.
"""

from __future__ import annotations

import errno
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.changes import ChangeKind
from layerfs.layers import LayerStore
from layerfs.testing.conformance import close_and_check
from layerfs.testing.conformance.suite import make_base, manifest_of

from ..conftest import open_store_or_skip

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts filesystems: run as root")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LayerStore]:
    s = open_store_or_skip("aufs", tmp_path / "root", ["mode=fuse", "dirren=true"])
    try:
        yield s
    finally:
        close_and_check(s)


def test_renamed_lower_directory_diffs_as_whiteout_plus_tree(store: LayerStore) -> None:
    base = make_base(store)
    child = store.create(base).id
    with store.mounted(child) as path:
        os.rename(path / "data", path / "stuff")  # data/keep, data/sub/deep: lower only
        (path / "stuff/added").write_text("added\n")
        os.rename(path / "var/log", path / "logs")
    branch = Path(store.metadata(child)["Branch"])
    assert (branch / ".wh..wh.dirren").exists()  # the branch holds redirects
    changes = {(c.kind, c.path) for c in store.changes(child)}
    for gone in ("/data", "/var/log"):
        assert (ChangeKind.DELETE, gone) in changes
    for new in ("/stuff", "/stuff/keep", "/stuff/sub", "/stuff/sub/deep", "/stuff/added",
                "/logs", "/logs/old.log"):
        assert (ChangeKind.ADD, new) in changes
    buf = io.BytesIO()
    size = store.diff(child, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        names = set(tar.getnames())
    assert {".wh.data", "var/.wh.log", "stuff/keep", "stuff/sub/deep", "stuff/added",
            "logs/old.log"} <= names
    assert not any(".wh..wh." in n for n in names)  # no aufs internals, no redirects
    assert size == len("keep\n") + len("deep\n") + len("added\n") + 5000
    assert store.diff_size(child) == size
    buf.seek(0)
    copy = store.apply(buf, base).id
    assert manifest_of(store, copy) == manifest_of(store, child)
    # The applied layer is an ordinary branch again: no redirects to follow.
    assert not (Path(store.metadata(copy)["Branch"]) / ".wh..wh.dirren").exists()


def test_without_dirren_the_branch_stays_native(tmp_path: Path) -> None:
    plain = open_store_or_skip("aufs", tmp_path / "plain", ["mode=fuse"])
    try:
        base = make_base(plain)
        child = plain.create(base).id
        with plain.mounted(child) as path:
            with pytest.raises(OSError) as info:
                os.rename(path / "data", path / "stuff")
            assert info.value.errno == errno.EXDEV  # as AUFS without dirren
            os.rename(path / "etc/hostname", path / "etc/name")
        assert not (Path(plain.metadata(child)["Branch"]) / ".wh..wh.dirren").exists()
        assert {(c.kind, c.path) for c in plain.changes(child)} >= {
            (ChangeKind.DELETE, "/etc/hostname"), (ChangeKind.ADD, "/etc/name")}
    finally:
        close_and_check(plain)
