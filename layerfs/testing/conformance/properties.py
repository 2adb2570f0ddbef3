"""A property of the conformance suite (needs hypothesis): for random trees and random
edits made through a driver's mount, diff then apply on the parent reproduces the child
exactly — contents, modes, owners, xattrs, hardlinks, symlinks, devices, fifos.

Subclass :class:`PropertyTests` like :class:`~layerfs.testing.conformance.DriverTests`.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs.layers import LayerStore
from layerfs.testing.trees import tree_manifest

NAMES = st.sampled_from(["a", "b", "c", "dir", "sub", "x y", "ü"])
EDIT = st.tuples(st.sampled_from(["write", "append", "mkdir", "rm", "rmtree", "chmod", "chown",
                                  "xattr", "rmxattr", "symlink", "hardlink", "fifo", "chardev",
                                  "rename", "replace_with_dir", "replace_with_file", "recreate"]),
                 st.lists(NAMES, min_size=1, max_size=3), st.integers(0, 2**16))


def build_parent(path: Path) -> None:
    (path / "dir" / "sub").mkdir(parents=True)
    (path / "a").write_bytes(b"a" * 100)
    (path / "dir" / "b").write_text("b")
    (path / "dir" / "sub" / "c").write_text("c")
    os.chown(path / "dir" / "b", 10, 20)
    os.setxattr(path / "a", "user.tag", b"\x00\xffbinary")
    os.link(path / "a", path / "dir" / "a-link")
    os.symlink("../a", path / "dir" / "sym")
    os.chmod(path / "dir" / "sub", 0o2775)


def apply_edit(root: Path, op: str, parts: list[str], n: int) -> None:
    target = root.joinpath(*parts)
    if op in ("write", "append") and target.exists() and not target.is_file():
        return  # never open a fifo or device for writing: it would block or hit a device
    if op in ("rmtree", "recreate") and target.exists() and not (
            target.is_dir() and not target.is_symlink()):
        return  # shutil.rmtree (3.11) opens its argument before it checks for a directory:
        #         a fifo there blocks the test forever
    try:
        if op == "write":
            target.write_bytes(os.urandom(n % 3000))
        elif op == "append":
            with open(target, "ab") as f:
                f.write(b"+")
        elif op == "mkdir":
            target.mkdir(mode=0o700 | (n & 0o77))
        elif op == "rm":
            target.unlink()
        elif op == "rmtree":
            shutil.rmtree(target)
        elif op == "chmod":
            os.chmod(target, (n & 0o7777) | 0o400, follow_symlinks=False)
        elif op == "chown":
            os.chown(target, n % 5000, n % 3000, follow_symlinks=False)
        elif op == "xattr":
            os.setxattr(target, f"user.k{n % 3}", str(n).encode(), follow_symlinks=False)
        elif op == "rmxattr":
            os.removexattr(target, "user.tag", follow_symlinks=False)
        elif op == "symlink":
            os.symlink(f"t{n}", target)
        elif op == "hardlink":
            os.link(root / "a", target)
        elif op == "fifo":
            os.mkfifo(target)
        elif op == "chardev":
            os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 3 + n % 3))
        elif op == "rename":
            os.rename(target, root / f"renamed{n % 4}")
        elif op == "replace_with_dir":
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
            target.mkdir()
            (target / "inside").write_text("in")
        elif op == "replace_with_file":
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
            target.write_text("now a file")
        elif op == "recreate":
            shutil.rmtree(target)
            target.mkdir()
            (target / "fresh").write_text("fresh")
    except OSError:
        pass  # an edit an earlier one made impossible (or EXDEV for a lower dir rename)


class PropertyTests:
    """Diff/apply round trips of random edits; ``store`` as in the suite."""

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(edits=st.lists(EDIT, min_size=1, max_size=10))
    def test_diff_apply_reproduces_child(self, store: LayerStore,
                                         edits: list[tuple[str, list[str], int]]) -> None:
        base = store.create().id
        with store.mounted(base) as path:
            build_parent(path)
        child = store.create(base).id
        with store.mounted(child) as path:
            for op, parts, n in edits:
                apply_edit(path, op, parts, n)
        buf = io.BytesIO()
        size = store.diff(child, buf)
        assert store.diff_size(child) == size
        buf.seek(0)
        copy = store.apply(buf, base)
        assert copy.size == size
        with store.mounted(child, readonly=True) as a:
            want = tree_manifest(a)
        with store.mounted(copy.id, readonly=True) as b:
            got = tree_manifest(b)
        assert got == want
        for layer in (copy.id, child, base):
            store.remove(layer)
