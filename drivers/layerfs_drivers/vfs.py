"""vfs: every layer is a complete copy of its parent. No copy-on-write at all.

It is the baseline the other drivers are measured against, and it runs on any
filesystem. Where the filesystem can share extents (btrfs, xfs with reflink)
``cp --reflink=auto`` makes the copy cheap; elsewhere every layer costs the
full size of the image below it.

On-disk layout under the driver home (``ROOT/vfs``)::

    vfs/
      dir/
        <layer-id>/        the layer's full contents: parent's files + its own changes

A layer's mount is a bind mount of its directory (read-only for image layers).
Diffs use the shared naive walk, reading the directories directly (no mount).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from layerfs.driver import Capabilities, Driver, Usage
from layerfs.errors import DriverNotSupported, NotFound, translate_errors
from layerfs.fsinfo import layer_dir_usage
from layerfs.mount import Mount
from layerfs.options import DriverOptions


class VfsDriver(Driver):
    name = "vfs"
    CAPABILITIES = Capabilities()

    @classmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        if shutil.which("cp") is None:
            raise DriverNotSupported(cls.name, "GNU cp is required to copy layers")

    def _dir(self, layer_id: str) -> Path:
        return self.home / "dir" / layer_id

    @translate_errors("vfs create")
    def create(self, layer_id: str, parent: str | None, *, readonly: bool,
               size: int | None = None) -> None:
        target = self._dir(layer_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        if parent is None:
            target.mkdir(mode=0o755)
            return
        source = self._dir(parent)
        if not source.is_dir():
            raise NotFound(f"vfs: parent layer {parent} has no directory {source}")
        # cp -a keeps owners, modes, times, xattrs, hardlinks and special files;
        # --reflink=auto shares extents where the filesystem can.
        subprocess.run(["cp", "-a", "--reflink=auto", "--", str(source), str(target)],
                       check=True, capture_output=True)

    @translate_errors("vfs remove")
    def remove(self, layer_id: str) -> None:
        path = self._dir(layer_id)
        if path.exists():
            shutil.rmtree(path)

    def mounts(self, layer_id: str, *, readonly: bool = False) -> list[Mount]:
        opts = ("rbind", "ro") if readonly else ("rbind", "rw")
        return [Mount("bind", str(self._dir(layer_id)), opts)]

    def exists(self, layer_id: str) -> bool:
        return self._dir(layer_id).is_dir()

    def usage(self, layer_id: str) -> Usage:
        return layer_dir_usage(self._dir(layer_id))

    def metadata(self, layer_id: str) -> dict[str, str]:
        return {"Dir": str(self._dir(layer_id))}

    @contextlib.contextmanager
    def view(self, layer_id: str | None) -> Iterator[Path | None]:
        yield None if layer_id is None else self._dir(layer_id)

    @contextlib.contextmanager
    def writable_view(self, layer_id: str) -> Iterator[Path]:
        yield self._dir(layer_id)
