"""btrfs: every layer is a subvolume; a child is a snapshot of its parent.

Copy-on-write happens per extent inside the filesystem, so a snapshot costs
the same whatever the layer's size, and a first write to a big lower file
copies only the blocks written — not the file (compare overlay's copy-up).

On-disk layout under the driver home (``ROOT/btrfs``, which must be on btrfs)::

    btrfs/
      subvolumes/
        <layer-id>/      a btrfs subvolume: a snapshot of the parent's subvolume
                         (or a new empty one), holding the layer's full contents.
                         Image layers are made read-only once applied.

Quotas: the ``size`` option (per layer, or a driver-wide default) enables btrfs
quotas on first use and puts a limit on the layer's qgroup ``0/<subvolume id>``;
removing the layer destroys that qgroup too (Docker leaked them: moby#29325).

Changes between a layer and its parent come from btrfs's own trees
(:mod:`.trees`): a tree search skips every block the layer still shares with
its parent, and the items in the blocks written since the snapshot name the
candidate paths, without reading unchanged directories. Each candidate is then
classified exactly as the naive walk would, so both agree. The option
``native_changes=false`` makes the driver walk both trees instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import btrfsutil

from layerfs import extents
from layerfs.changes import (
    Change,
    ChangeKind,
    entry_differs,
    lstat_or_none,
    with_parent_directories,
)
from layerfs.driver import Capabilities, Driver, Usage, scratch_prefix
from layerfs.errors import (
    DriverNotSupported,
    InUse,
    InvalidArgument,
    LayerfsError,
    NotFound,
    command_error,
    translate_errors,
)
from layerfs.fsinfo import backing_filesystem, layer_dir_usage
from layerfs.metastore import DriverState
from layerfs.mount import Mount, can_mount
from layerfs.options import DriverOptions

from .trees import FIRST_INODE, Candidates, changed_paths, highest_inode, link_group

#: Below this many inodes in the parent, walking both trees costs less than
#: flushing the layer for the tree search (``native_changes=auto``).
TREE_SEARCH_MIN_INODES = 5000


class BtrfsDriver(Driver):
    name = "btrfs"
    CAPABILITIES = Capabilities(native_changes=True, block_level_cow=True, quotas=True)
    known_options = {"size", "native_changes"}

    def __init__(self, home: Path, options: DriverOptions | None = None,
                 state: DriverState | None = None) -> None:
        super().__init__(home, options, state)
        self.subvolumes = self.home / "subvolumes"
        self.subvolumes.mkdir(exist_ok=True)
        self.default_size = self.options.get_size("size", None)
        self.tree_search = (self.options.get_str("native_changes") or "auto").lower()
        if self.tree_search in ("1", "yes", "on"):
            self.tree_search = "true"
        elif self.tree_search in ("0", "no", "off"):
            self.tree_search = "false"
        if self.tree_search not in ("auto", "true", "false"):
            raise InvalidArgument(f"btrfs: native_changes={self.tree_search!r}: use auto, "
                                  f"true or false")
        if self.tree_search == "false":
            self.capabilities = replace(self.CAPABILITIES, native_changes=False)

    @classmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        if not can_mount():
            raise DriverNotSupported(cls.name, "mounting a layer (a bind mount of its subvolume) needs root")
        probe = home if home.exists() else home.parent
        while not probe.exists():
            probe = probe.parent
        fs = backing_filesystem(probe)
        if fs != "btrfs":
            raise DriverNotSupported(
                cls.name, f"{probe} is on {fs}, not btrfs; make a btrfs pool with "
                          "`layerfs pool create btrfs --size 4G --image FILE --mount DIR` "
                          "and use --root DIR/layerfs")
        if shutil.which("btrfs") is None:
            raise DriverNotSupported(cls.name, "the btrfs tool is missing (btrfs-progs)")

    def _path(self, layer_id: str) -> Path:
        return self.subvolumes / layer_id

    # --- lifecycle -------------------------------------------------------------------------
    @translate_errors("btrfs create")
    def create(self, layer_id: str, parent: str | None, *, readonly: bool,
               size: int | None = None) -> None:
        path = self._path(layer_id)
        if parent is None:
            btrfsutil.create_subvolume(path)
        else:
            src = self._path(parent)
            if not src.is_dir():
                raise NotFound(f"btrfs: parent layer {parent} has no subvolume {src}")
            btrfsutil.create_snapshot(src, path, read_only=False)
        size = size if size is not None else self.default_size
        if size is not None:
            self._set_quota(path, size)

    def seal(self, layer_id: str) -> None:
        btrfsutil.set_subvolume_read_only(self._path(layer_id), True)

    @translate_errors("btrfs remove")
    def remove(self, layer_id: str) -> None:
        path = self._path(layer_id)
        if not path.exists():
            return
        try:
            subvol_id = btrfsutil.subvolume_id(path)
            is_subvol = btrfsutil.is_subvolume(path)
        except btrfsutil.BtrfsUtilError:
            is_subvol, subvol_id = False, None
        if not is_subvol:  # half-created: a plain directory at most
            shutil.rmtree(path)
            return
        _delete_subvolume_tree(path)
        if subvol_id is not None and self._quota_enabled():
            self._destroy_qgroup(subvol_id)

    @translate_errors("btrfs destroy")
    def destroy(self) -> list[str]:
        """Every subvolume under the home and the scratch folder first -- read-only ones
        too, which ``rm -rf`` cannot delete -- then the folders (``layerfs system reset``)."""
        done = []
        for base in (self.home, self.scratch):
            for path in _subvolumes_under(base):
                _delete_subvolume_tree(path)
                done.append(f"deleted subvolume {path}")
        return done + super().destroy()

    def _destroy_qgroup(self, subvol_id: int) -> None:
        """Docker left a qgroup behind for every removed layer (moby#29325). The
        kernel refuses to destroy it until the deleted subvolume is cleaned up,
        so wait for that first."""
        # A filesystem sync commits the deletion and wakes the cleaner; without
        # it `subvolume sync` can wait a whole commit interval or more.
        btrfsutil.sync(self.home)
        try:
            subprocess.run(["btrfs", "subvolume", "sync", str(self.home), str(subvol_id)],
                           capture_output=True, timeout=60)
        except subprocess.TimeoutExpired as err:
            raise InUse(f"btrfs: subvolume {subvol_id} still being cleaned after 60 s; "
                               f"its qgroup 0/{subvol_id} remains") from err
        proc = subprocess.run(["btrfs", "qgroup", "destroy", f"0/{subvol_id}", str(self.home)],
                              capture_output=True, text=True)
        # Linux >= 6.8 deletes a cleaned subvolume's qgroup by itself: ENOENT is fine.
        if proc.returncode != 0 and "No such file" not in proc.stderr:
            raise LayerfsError(f"btrfs: could not destroy qgroup 0/{subvol_id}: "
                               f"{proc.stderr.strip()}")

    def exists(self, layer_id: str) -> bool:
        return self._path(layer_id).is_dir()

    def mounts(self, layer_id: str, *, readonly: bool = False) -> list[Mount]:
        return [Mount("bind", str(self._path(layer_id)), ("rbind", "ro" if readonly else "rw"))]

    @contextlib.contextmanager
    def view(self, layer_id: str | None) -> Iterator[Path | None]:
        yield None if layer_id is None else self._path(layer_id)

    @contextlib.contextmanager
    def writable_view(self, layer_id: str) -> Iterator[Path]:
        yield self._path(layer_id)

    # --- quotas ------------------------------------------------------------------------------
    def _quota_enabled(self) -> bool:
        proc = subprocess.run(["btrfs", "qgroup", "show", str(self.home)], capture_output=True)
        return proc.returncode == 0

    def _set_quota(self, path: Path, size: int) -> None:
        try:
            if not self._quota_enabled():
                subprocess.run(["btrfs", "quota", "enable", str(self.home)], check=True,
                               capture_output=True)
            subvol_id = btrfsutil.subvolume_id(path)
            subprocess.run(["btrfs", "qgroup", "limit", str(size), f"0/{subvol_id}", str(path)],
                           check=True, capture_output=True)
        except subprocess.CalledProcessError as err:
            raise command_error(err) from err

    # --- changes -------------------------------------------------------------------------------
    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        if parent is None or not self._use_tree_search(layer_id, parent):
            return self.naive.changes(layer_id, parent)
        return self._native_changes(layer_id, parent)

    def diff(self, layer_id: str, parent: str | None, out: IO[bytes]) -> int:
        if parent is None or not self._use_tree_search(layer_id, parent):
            return self.naive.diff(layer_id, parent, out)
        from layerfs.tar import export_changes  # the tar codec loads when used

        return export_changes(self._path(layer_id), self._native_changes(layer_id, parent), out)

    def _use_tree_search(self, layer_id: str, parent: str) -> bool:
        """Whether the tree search is the cheaper way to this layer's changes.

        The search itself reads only what changed, but btrfs puts a file's new
        data and times into its trees at writeback, so the layer must be flushed
        first: its new data written and a transaction committed (a disk flush).
        The naive walk reads both trees instead, from the page cache. So: the
        search for a big parent with (relatively) few new files, the walk for a
        small parent or a layer of mostly new files. Inode numbers only grow, so
        the highest one in each tree tells their sizes without walking them.
        """
        if self.tree_search != "auto":
            return self.tree_search == "true"
        parent_inodes = highest_inode(self._path(parent)) - FIRST_INODE + 1
        new_inodes = highest_inode(self._path(layer_id)) - FIRST_INODE + 1 - parent_inodes
        return parent_inodes >= TREE_SEARCH_MIN_INODES and new_inodes * 4 <= parent_inodes

    def _native_changes(self, layer_id: str, parent: str) -> list[Change]:
        lower, upper = self._path(parent), self._path(layer_id)
        since = btrfsutil.subvolume_info(upper).otransid + 1
        with self._flushed(layer_id) as child, self._flushed(parent, sealed_ok=True) as base:
            candidates = changed_paths(str(child), str(base), since)
        return classify(lower, upper, candidates)

    @contextlib.contextmanager
    def _flushed(self, layer_id: str, *, sealed_ok: bool = False) -> Iterator[Path]:
        """The layer as a read-only snapshot, made now: making it writes the layer's
        pending data into its trees (the search reads trees, not the page cache).

        ``sealed_ok``: a sealed parent can be used as it is. It was flushed when its
        child was snapshotted from it and cannot have changed since. The child may
        be sealed too (an image layer), but its data can still be in the page cache.
        """
        path = self._path(layer_id)
        if sealed_ok and btrfsutil.get_subvolume_read_only(path):
            yield path
            return
        tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix("flush", layer_id), dir=self.scratch))
        snap = tmp / "snap"
        btrfsutil.create_snapshot(path, snap, read_only=True)
        try:
            yield snap
        finally:
            btrfsutil.delete_subvolume(snap)  # root may delete a read-only snapshot
            tmp.rmdir()

    # --- reporting -------------------------------------------------------------------------------
    def usage(self, layer_id: str) -> Usage:
        """Bytes and inodes the layer's tree holds, and from btrfs's extent accounting
        how many of its data bytes are exclusive to it vs shared with other layers
        (small files stored inline in metadata count in neither)."""
        path = self._path(layer_id)
        tree = layer_dir_usage(path)
        proc = subprocess.run(["btrfs", "filesystem", "du", "-s", "--raw", str(path)],
                              capture_output=True, text=True)
        exclusive = shared = None
        if proc.returncode == 0:
            fields = proc.stdout.strip().splitlines()[-1].split()
            exclusive, shared = int(fields[1]), int(fields[2])
        return Usage(tree.bytes, tree.inodes, exclusive_bytes=exclusive, shared_bytes=shared)

    def path_facts(self, layer_id: str, path: str) -> dict[str, Any]:
        """The file's extents in the layer's subvolume: bytes it shares with other
        subvolumes (the layers it was snapshotted from or to) and bytes only this layer
        holds (blocks written since), as the kernel flags them (FIEMAP)."""
        target = self._path(layer_id) / path
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        if not stat.S_ISREG(st.st_mode):
            return {}
        # A deleted subvolume (the read-only snapshot a diff of a writable layer sends
        # from) keeps its extents referenced until the cleaner gets to it: wait, or every
        # block of a freshly diffed layer would look shared.
        btrfsutil.sync(self.home)
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["btrfs", "subvolume", "sync", str(self.home)], capture_output=True,
                           timeout=60)
        try:
            return extents.sharing(target).as_dict()
        except OSError:
            return {}

    def qgroup_usage(self, layer_id: str) -> tuple[int, int]:
        """(referenced, exclusive) bytes of the layer's qgroup (quotas must be on)."""
        subvol_id = btrfsutil.subvolume_id(self._path(layer_id))
        btrfsutil.sync(self.home)
        subprocess.run(["btrfs", "quota", "rescan", "-w", str(self.home)], capture_output=True)
        proc = subprocess.run(["btrfs", "qgroup", "show", "--raw", str(self.home)],
                              capture_output=True, text=True, check=True)
        for line in proc.stdout.splitlines():
            fields = line.split()
            if fields and fields[0] == f"0/{subvol_id}":
                return int(fields[1]), int(fields[2])
        raise NotFound(f"btrfs: no qgroup 0/{subvol_id} for layer {layer_id}")

    def metadata(self, layer_id: str) -> dict[str, str]:
        path = self._path(layer_id)
        info = btrfsutil.subvolume_info(path)
        return {"Subvolume": str(path), "SubvolumeId": str(info.id),
                "Generation": str(info.generation),
                "ReadOnly": str(btrfsutil.get_subvolume_read_only(path)).lower()}

    def status(self) -> dict[str, str]:
        info = super().status()
        proc = subprocess.run(["btrfs", "--version"], capture_output=True, text=True)
        info["Build Version"] = proc.stdout.strip()
        info["Quotas"] = "enabled" if self._quota_enabled() else "disabled (on first size=)"
        return info


def _delete_subvolume_tree(path: Path) -> None:
    """Delete a subvolume and the ones below it, read-only or not."""
    btrfsutil.set_subvolume_read_only(path, False)
    # Subvolumes a container made inside itself must go first; delete_subvolume
    # with recursive=True walks them (and needs them writable too).
    for sub_path, _info in btrfsutil.SubvolumeIterator(path, post_order=True):
        with contextlib.suppress(btrfsutil.BtrfsUtilError):
            btrfsutil.set_subvolume_read_only(path / sub_path, False)
    btrfsutil.delete_subvolume(path, recursive=True)


def _subvolumes_under(base: Path) -> list[Path]:
    """The outermost subvolumes below ``base``; nested ones are deleted with them."""
    found: list[Path] = []
    for dirpath, dirnames, _files in os.walk(base):
        keep = []
        for name in dirnames:
            path = Path(dirpath) / name
            if _is_subvolume(path):
                found.append(path)
            else:
                keep.append(name)
        dirnames[:] = keep
    return found


def _is_subvolume(path: Path) -> bool:
    # A subvolume's root directory is inode 256: only those are asked about.
    try:
        return path.lstat().st_ino == 256 and btrfsutil.is_subvolume(path)
    except (OSError, btrfsutil.BtrfsUtilError):
        return False


def classify(lower: Path, upper: Path, candidates: Candidates) -> list[Change]:
    """Turn candidate paths into exactly the changes the naive walk reports.

    Each candidate is compared between the two trees with the naive walk's rules
    (:func:`~layerfs.changes.entry_differs`). Below a directory that moved, or
    that is another inode than the parent's at the same path (deleted and made
    again), every entry in either tree is a candidate too; new directories are
    listed whole, as the naive walk lists them. A hardlinked candidate pulls in
    its link partners in both trees (found through the inode), so a changed link
    group is reported as the naive walk reports it.
    """
    lo_root, up_root = str(lower), str(upper)
    paths = set(candidates.paths)
    # Every ancestor of a candidate may have been created by this layer.
    for path in list(paths):
        parent = path.rpartition("/")[0]
        while parent and parent not in paths:
            paths.add(parent)
            parent = parent.rpartition("/")[0]
    result: dict[str, ChangeKind] = {}
    covered: set[str] = set()  # subtrees already reported whole
    more: set[str] = set()     # candidates found on the way: link partners, replaced dirs

    def below_both(path: str) -> None:
        """Every entry below ``path`` in either tree becomes a candidate, one by one
        (not as a sub-walk), so that link groups crossing its border are seen."""
        if all(os.path.isdir(r + path) and not os.path.islink(r + path)
               for r in (lo_root, up_root)):
            for root in (lo_root, up_root):
                more.update(_all_below(root, path))

    def under_covered(path: str) -> bool:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in covered:
                return True
            parent = parent.rpartition("/")[0]
        return False

    def visit(path: str) -> None:
        if under_covered(path):
            return
        lo, up = lstat_or_none(lo_root + path), lstat_or_none(up_root + path)
        if up is None:
            if lo is not None:
                result[path] = ChangeKind.DELETE
                covered.add(path)
            return
        if lo is None or stat.S_IFMT(lo.st_mode) != stat.S_IFMT(up.st_mode):
            result[path] = ChangeKind.ADD if lo is None else ChangeKind.MODIFY
            if stat.S_ISDIR(up.st_mode):
                result.update((p, ChangeKind.ADD) for p in _all_below(up_root, path))
            if stat.S_ISDIR(up.st_mode) or (lo is not None and stat.S_ISDIR(lo.st_mode)):
                covered.add(path)
            return
        changed = entry_differs(lo_root + path, up_root + path, lo, up)
        if stat.S_ISDIR(up.st_mode):
            # A snapshot keeps inode numbers: another number is another directory.
            if lo.st_ino != up.st_ino:
                below_both(path)
        elif lo.st_nlink > 1 or up.st_nlink > 1:
            group_lo = link_group(lo_root, lo.st_ino) if lo.st_nlink > 1 else {path}
            group_up = link_group(up_root, up.st_ino) if up.st_nlink > 1 else {path}
            more.update(group_lo, group_up)
            changed = changed or group_lo != group_up
        if changed:
            result[path] = ChangeKind.MODIFY

    for path in candidates.subtrees:
        below_both(path)
    visited: set[str] = set()
    todo = paths | more
    while todo:
        for path in sorted(todo):
            visit(path)
        visited |= todo
        todo = more - visited
    return with_parent_directories(Change(p, k) for p, k in result.items())


def _all_below(root: str, path: str) -> Iterator[str]:
    """Every path below the directory ``path`` of the tree at ``root``."""
    stack = [path]
    while stack:
        current = stack.pop()
        with os.scandir(root + current) as it:
            for entry in it:
                child = f"{current}/{entry.name}"
                yield child
                if entry.is_dir(follow_symlinks=False):
                    stack.append(child)
