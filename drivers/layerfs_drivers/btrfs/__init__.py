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

Changes between a layer and its parent come from ``btrfs send --no-data -p``:
the kernel compares the two snapshots' trees and streams only what differs,
without reading unchanged directories. The stream names candidate paths; each
is then classified exactly as the naive walk would, so both agree.
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
from layerfs.changes import Change, ChangeKind, _same_xattrs, _stat_differs, naive_changes
from layerfs.driver import Capabilities, Driver, Usage
from layerfs.errors import (
    DriverNotSupported,
    InUse,
    LayerfsError,
    NotFound,
    command_error,
    translate_errors,
)
from layerfs.fsinfo import backing_filesystem, layer_dir_usage
from layerfs.metastore import DriverState
from layerfs.mount import Mount, can_mount
from layerfs.options import DriverOptions
from layerfs.tar import export_changes

from .send import SendSummary, changed_paths, send_no_data


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
        self.use_send = self.options.get_bool("native_changes", True)
        if not self.use_send:
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
    @contextlib.contextmanager
    def _readonly_snapshot(self, layer_id: str) -> Iterator[Path]:
        """``btrfs send`` needs read-only subvolumes: a sealed layer already is; for a
        writable one take a throw-away read-only snapshot (O(1) on btrfs)."""
        path = self._path(layer_id)
        if btrfsutil.get_subvolume_read_only(path):
            yield path
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"send-{layer_id[:12]}-", dir=self.scratch))
        snap = tmp / "snap"
        btrfsutil.create_snapshot(path, snap, read_only=True)
        try:
            yield snap
        finally:
            btrfsutil.delete_subvolume(snap)  # root may delete a read-only snapshot
            tmp.rmdir()

    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        if parent is None or not self.use_send:
            return self.naive.changes(layer_id, parent)
        return self._send_changes(layer_id, parent)

    def _send_changes(self, layer_id: str, parent: str) -> list[Change]:
        with self._readonly_snapshot(parent) as psnap, self._readonly_snapshot(layer_id) as csnap:
            candidates = changed_paths(send_no_data(str(csnap), str(psnap)))
        return classify(self._path(parent), self._path(layer_id), candidates)

    def diff(self, layer_id: str, parent: str | None, out: IO[bytes]) -> int:
        if parent is None or not self.use_send:
            return self.naive.diff(layer_id, parent, out)
        return export_changes(self._path(layer_id), self._send_changes(layer_id, parent), out)

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


def entry_differs(lpath: str, upath: str, lo: os.stat_result, up: os.stat_result) -> bool:
    """The naive walk's per-entry rule (layerfs.changes), for one pair of paths."""
    return (_stat_differs(lo, up)
            or (stat.S_ISLNK(up.st_mode) and os.readlink(lpath) != os.readlink(upath))
            or not _same_xattrs(lpath, upath))


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _link_group(tree: Path, st: os.stat_result) -> set[str]:
    """All paths of a hardlinked inode inside a subvolume, by btrfs's inode→path lookup
    (an ioctl, no tree walk)."""
    proc = subprocess.run(["btrfs", "inspect-internal", "inode-resolve", str(st.st_ino),
                           str(tree)], capture_output=True, text=True)
    base = str(tree).rstrip("/")
    return {line[len(base):] for line in proc.stdout.splitlines() if line.startswith(base + "/")}


def classify(lower: Path, upper: Path, summary: SendSummary) -> list[Change]:
    """Turn the paths a send stream named into exactly the changes the naive walk reports.

    Each candidate is compared between the two trees with the naive walk's rules
    (:func:`entry_differs`); everything below a directory a rename or mkdir put in
    place is a candidate too, and new directories are listed whole, as the naive
    walk lists them.
    Hardlinked candidates pull in their link partners (found through the inode),
    so a changed link group is reported as the naive walk does.
    """
    lo_root, up_root = str(lower), str(upper)
    candidates = set(summary.paths)
    # A directory renamed into place (or re-created) may hold anything: every entry
    # below it, in either tree, becomes a candidate. Compared one by one (not by a
    # sub-walk) so that hardlink groups crossing the subtree's border are seen.
    for path in summary.subtrees:
        for root in (lo_root, up_root):
            if os.path.isdir(root + path) and not os.path.islink(root + path):
                for dirpath, dirs, files in os.walk(root + path):
                    rel = dirpath[len(root):]
                    candidates.update(f"{rel}/{name}" for name in (*dirs, *files))
    for path in list(candidates):
        for tree in (lower, upper):
            st = _lstat(str(tree) + path)
            if st is not None and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                candidates |= _link_group(tree, st)
    # Every ancestor of a candidate may have been created by this layer.
    for path in list(candidates):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            candidates.add("/" + "/".join(parts[:i]))
    result: dict[str, ChangeKind] = {}
    covered: list[str] = []  # subtrees already reported wholesale

    def under(path: str, roots: list[str]) -> bool:
        return any(path.startswith(r.rstrip("/") + "/") for r in roots)

    for path in sorted(candidates):
        if under(path, covered):
            continue
        lo, up = _lstat(lo_root + path), _lstat(up_root + path)
        if lo is None and up is None:
            continue  # a temporary name the stream used (o<ino>-<gen>-0)
        if up is None:
            result[path] = ChangeKind.DELETE
            covered.append(path)
            continue
        if lo is None or stat.S_IFMT(lo.st_mode) != stat.S_IFMT(up.st_mode):
            result[path] = ChangeKind.ADD if lo is None else ChangeKind.MODIFY
            if stat.S_ISDIR(up.st_mode):
                for change in naive_changes(None, Path(up_root + path)):
                    result[path + change.path] = ChangeKind.ADD
            if stat.S_ISDIR(up.st_mode) or (lo is not None and stat.S_ISDIR(lo.st_mode)):
                covered.append(path)
            continue
        linked = (lo.st_nlink > 1 or up.st_nlink > 1) and not stat.S_ISDIR(up.st_mode)
        if entry_differs(lo_root + path, up_root + path, lo, up) or (
                linked and _link_group(lower, lo) != _link_group(upper, up)):
            result[path] = ChangeKind.MODIFY
    return sorted(Change(p, k) for p, k in result.items())
