"""Property: diff a child against its parent, apply the diff to a fresh parent, get the child.

Hypothesis builds a random parent tree (files, directories, symlinks, hardlinks,
fifos, modes with setuid/sticky bits, owners, xattrs, mtimes), copies it with
``cp -a`` into a child, and edits the child at random (see
:data:`layerfs.testing.trees.EDIT_KINDS`: add, rewrite, chmod, chown, set and
remove xattrs, rename, delete, file to directory and back, delete a directory
and re-create it). Then ``naive_changes`` + ``export_changes`` must produce a
tar that, applied to another copy of the parent, reproduces the child exactly
as :func:`~layerfs.testing.trees.tree_manifest` sees it.

Deliberately not compared (see ``tree_manifest``): directory mtimes and sizes
(naive_changes does not treat them as changes, as Docker does not), the layer
root's own metadata (a changeset never carries it), inode numbers, ctimes and
atimes.

The same tar applied in OVERLAY format to an empty upper directory, mounted
over the parent, must show the child too: that checks the whiteout translation
against the kernel's own reading of it.

One answer (issue 22): that overlay upper directory, and the same tar applied in
AUFS format to an empty branch, read back by the union drivers' own
``changes_from_diff_dir`` against the parent, must give exactly the naive
walk's change list.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from layerfs.changes import changes_from_diff_dir, naive_changes
from layerfs.tar import WhiteoutFormat, apply_layer, export_changes
from layerfs.testing.trees import EDIT_KINDS, Edit, apply_edit, tree_manifest

BUILD_KINDS = ("add_file", "add_file", "add_file", "add_dir", "add_dir", "add_symlink",
               "add_hardlink", "add_fifo", "chmod", "chown", "setxattr", "touch")


def edits(kinds: tuple[str, ...]) -> st.SearchStrategy[Edit]:
    return st.builds(Edit, kind=st.sampled_from(kinds), pick=st.integers(0, 60),
                     pick2=st.integers(0, 60), name=st.sampled_from("abcde"),
                     value=st.integers(0, 5000))


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def build(base: Path, parent_edits: list[Edit], child_edits: list[Edit]) -> tuple[Path, Path]:
    parent = base / "parent"
    parent.mkdir()
    for e in parent_edits:
        note(f"parent: {apply_edit(parent, e)}")
    child = base / "child"
    run(["cp", "-a", str(parent), str(child)])
    for e in child_edits:
        note(f"child: {apply_edit(child, e)}")
    return parent, child


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(parent_edits=st.lists(edits(BUILD_KINDS), min_size=1, max_size=25),
       child_edits=st.lists(edits(EDIT_KINDS), min_size=1, max_size=12))
def test_diff_then_apply_reproduces_the_child(tmp_path_factory: pytest.TempPathFactory,
                                               parent_edits: list[Edit],
                                               child_edits: list[Edit]) -> None:
    base = tmp_path_factory.mktemp("prop")
    try:
        parent, child = build(base, parent_edits, child_edits)
        changes = naive_changes(parent, child)
        note(f"changes: {[str(c) for c in changes]}")
        buf = io.BytesIO()
        size = export_changes(child, changes, buf)

        applied = base / "applied"
        run(["cp", "-a", str(parent), str(applied)])
        assert apply_layer(applied, io.BytesIO(buf.getvalue()), WhiteoutFormat.IN_PLACE) == size
        want = tree_manifest(child)
        assert tree_manifest(applied) == want

        upper, work, merged = base / "upper", base / "work", base / "merged"
        assert apply_layer(upper, io.BytesIO(buf.getvalue()), WhiteoutFormat.OVERLAY) == size
        assert changes_from_diff_dir(upper, WhiteoutFormat.OVERLAY, [parent]) == changes
        branch = base / "aufs-branch"
        assert apply_layer(branch, io.BytesIO(buf.getvalue()), WhiteoutFormat.AUFS) == size
        assert changes_from_diff_dir(branch, WhiteoutFormat.AUFS, [parent]) == changes
        work.mkdir()
        merged.mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={parent},upperdir={upper},workdir={work}", str(merged)])
        try:
            assert tree_manifest(merged) == want
        finally:
            run(["umount", str(merged)])
    finally:
        shutil.rmtree(base)
