"""overlay (legacy): Docker's first overlayfs driver, two layers per mount.

Kernel overlayfs had a single lowerdir until Linux 4.0, so this driver could
only stack one read-only tree under one writable one. Every *image* layer is
therefore a complete tree — the parent's files hardlinked, with the layer's
changes applied on top (a changed file replaces its link with a new file) —
and every *container* layer is an overlay of exactly one such tree.

On-disk layout under the driver home (``ROOT/overlay``)::

    overlay/
      <image-layer-id>/
        root/          full tree: hardlinks to the parent's root/ files, new
                       directories (a hardlink can't share a directory), and
                       the files this layer added or changed
      <container-layer-id>/
        lower-id       id of the image layer below
        upper/         overlay upperdir: this layer's changes (whiteouts are
                       char devices 0/0, opaque dirs trusted.overlay.opaque=y)
        work/          overlay workdir

The cost the bench makes visible: hardlinks don't need new inodes, but every
directory of every image layer does, so an image of N layers over a base with
D directories uses about N×D inodes where overlay2 uses D plus the changes.
:meth:`usage` counts the inodes each layer adds beyond its parent.

A layer created on a *container* layer (``commit`` without applying a tar)
copies the parent's upper dir and shares its lower-id, as Docker did. Diffs
always use the naive walk; applying a tar builds the hardlinked tree.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from layerfs.changes import WhiteoutFormat
from layerfs.driver import Capabilities, Driver, Usage
from layerfs.errors import NotFound, translate_errors
from layerfs.fsinfo import layer_dir_usage
from layerfs.metastore import DriverState
from layerfs.mount import Mount
from layerfs.options import DriverOptions

from ._overlayfs import FEATURE_OFF, check_host, probe_features

if TYPE_CHECKING:
    from layerfs.tar import Readable  # the tar codec loads when a layer is applied


class OverlayDriver(Driver):
    name = "overlay"
    CAPABILITIES = Capabilities(max_depth=None, whiteout_format=WhiteoutFormat.IN_PLACE)

    def __init__(self, home: Path, options: DriverOptions | None = None,
                 state: DriverState | None = None) -> None:
        super().__init__(home, options, state)
        cached = self.state.get("features") if self.state else None
        if cached is None:
            cached = probe_features(self.scratch)
            if self.state:
                self.state.set("features", cached)
        self.features: dict[str, bool] = dict(cached)

    @classmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        check_host(cls.name, home)

    def _dir(self, layer_id: str) -> Path:
        return self.home / layer_id

    def _root(self, layer_id: str) -> Path:
        return self._dir(layer_id) / "root"

    def _is_image(self, layer_id: str) -> bool:
        return self._root(layer_id).is_dir()

    @translate_errors("overlay create")
    def create(self, layer_id: str, parent: str | None, *, readonly: bool,
               size: int | None = None) -> None:
        d = self._dir(layer_id)
        d.mkdir(mode=0o700)
        if parent is None:
            self._root(layer_id).mkdir(mode=0o755)
            return
        pdir = self._dir(parent)
        if not pdir.is_dir():
            raise NotFound(f"overlay: parent layer {parent} has no directory {pdir}")
        # Remembered only so usage() can tell this layer's inodes from its parent's.
        (d / "parent-id").write_text(parent)
        (d / "upper").mkdir(mode=0o755)
        (d / "work").mkdir(mode=0o700)
        if self._is_image(parent):
            (d / "lower-id").write_text(parent)
            pst = os.stat(self._root(parent))
        else:
            # Parent is itself a container layer: share its lower, copy its changes.
            (d / "lower-id").write_text((pdir / "lower-id").read_text())
            shutil.rmtree(d / "upper")
            subprocess.run(["cp", "-a", "--", str(pdir / "upper"), str(d / "upper")],
                           check=True, capture_output=True)
            pst = os.stat(pdir / "upper")
        os.chmod(d / "upper", stat.S_IMODE(pst.st_mode))
        os.chown(d / "upper", pst.st_uid, pst.st_gid)

    @translate_errors("overlay remove")
    def remove(self, layer_id: str) -> None:
        d = self._dir(layer_id)
        if d.exists():
            shutil.rmtree(d)

    def exists(self, layer_id: str) -> bool:
        return self._dir(layer_id).is_dir()

    def _off_options(self) -> list[str]:
        return [o for f, opts in FEATURE_OFF.items() if self.features.get(f) for o in opts]

    def mounts(self, layer_id: str, *, readonly: bool = False) -> list[Mount]:
        if self._is_image(layer_id):
            return [Mount("bind", str(self._root(layer_id)), ("rbind", "ro" if readonly else "rw"))]
        d = self._dir(layer_id)
        lower = self._root((d / "lower-id").read_text().strip())
        if readonly:
            return [Mount("overlay", "overlay",
                          (f"lowerdir={d / 'upper'}:{lower}", *self._off_options()))]
        return [Mount("overlay", "overlay", (f"lowerdir={lower}", f"upperdir={d / 'upper'}",
                                             f"workdir={d / 'work'}", *self._off_options()))]

    @translate_errors("overlay apply")
    def apply_diff(self, layer_id: str, parent: str | None, stream: Readable) -> int:
        d = self._dir(layer_id)
        if parent is None or self._is_image(layer_id):
            from layerfs.tar import apply_layer  # the tar codec loads when used

            return apply_layer(self._root(layer_id), stream, WhiteoutFormat.IN_PLACE)
        if not self._is_image(parent):
            return self.naive.apply_diff(layer_id, parent, stream)
        # Docker's way: hardlink the parent's whole tree, then apply the layer in
        # place. The applier replaces files (unlink + create), so a changed file
        # gets a new inode and the parent's copy is never written through a link.
        staging = d / "root.staging"
        subprocess.run(["cp", "-al", "--", str(self._root(parent)), str(staging)],
                       check=True, capture_output=True)
        from layerfs.tar import apply_layer

        size = apply_layer(staging, stream, WhiteoutFormat.IN_PLACE)
        staging.rename(self._root(layer_id))
        for leftover in ("upper", "work"):
            shutil.rmtree(d / leftover, ignore_errors=True)
        (d / "lower-id").unlink(missing_ok=True)  # it is an image layer now
        return size

    def usage(self, layer_id: str) -> Usage:
        """Inodes and bytes this layer adds: entries whose inode its parent doesn't have."""
        d = self._dir(layer_id)
        if not self._is_image(layer_id):
            return layer_dir_usage(d)
        parent_inodes: set[int] = set()
        parent_file = d / "parent-id"
        parent = parent_file.read_text().strip() if parent_file.exists() else None
        if parent and self._is_image(parent):
            for dirpath, dirs, files in os.walk(self._root(parent)):
                for name in dirs + files:
                    parent_inodes.add(os.lstat(os.path.join(dirpath, name)).st_ino)
        inodes = 1
        nbytes = os.lstat(d).st_blocks * 512
        seen: set[int] = set()
        for dirpath, dirs, files in os.walk(self._root(layer_id)):
            for name in (*dirs, *files):
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_ino in parent_inodes or st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                inodes += 1
                nbytes += st.st_blocks * 512
        root_st = os.lstat(self._root(layer_id))
        return Usage(nbytes + root_st.st_blocks * 512, inodes + 1)

    def metadata(self, layer_id: str) -> dict[str, str]:
        d = self._dir(layer_id)
        if self._is_image(layer_id):
            return {"RootDir": str(self._root(layer_id))}
        lower = (d / "lower-id").read_text().strip()
        return {"LowerDir": str(self._root(lower)), "UpperDir": str(d / "upper"),
                "WorkDir": str(d / "work")}
