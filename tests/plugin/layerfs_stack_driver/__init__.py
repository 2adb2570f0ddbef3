"""stack: a storage driver that lives outside layerfs, as a third party would write one.

Each layer is a directory of its own changes, and a mount stacks the chain with kernel
overlayfs (the parents as lower directories, the layer's own directory as the upper one).
It implements only the primitives; changes, diff and apply use the naive differ of
:class:`~layerfs.driver.Driver`. It registers through its own ``layerfs.drivers`` entry
point (``pyproject.toml`` next to this package) and passes the shipped conformance suite
(``tests/test_plugin_driver.py``).

On-disk layout under the driver home (``ROOT/stack``)::

    stack/
      <layer-id>/
        diff/        the layer's own files (overlay's upper directory)
        work/        overlay's work directory
        parent       the parent layer's id (absent for a base layer)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from layerfs.driver import Capabilities, Driver, Usage
from layerfs.errors import DriverNotSupported
from layerfs.fsinfo import layer_dir_usage
from layerfs.mount import Mount
from layerfs.options import DriverOptions
from layerfs.tar import WhiteoutFormat


class StackDriver(Driver):
    name = "stack"
    CAPABILITIES = Capabilities(whiteout_format=WhiteoutFormat.OVERLAY)

    @classmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        if "overlay" not in Path("/proc/filesystems").read_text():
            raise DriverNotSupported(cls.name, "the kernel has no overlayfs")

    def _dir(self, layer_id: str) -> Path:
        return self.home / layer_id

    def _chain(self, layer_id: str) -> list[Path]:
        """The diff directories of the layer and its ancestors, top first."""
        dirs = []
        current: str | None = layer_id
        while current is not None:
            dirs.append(self._dir(current) / "diff")
            parent = self._dir(current) / "parent"
            current = parent.read_text() if parent.exists() else None
        return dirs

    def create(self, layer_id: str, parent: str | None, *, readonly: bool,
               size: int | None = None) -> None:
        d = self._dir(layer_id)
        (d / "diff").mkdir(parents=True, mode=0o755)
        (d / "work").mkdir()
        if parent is not None:
            (d / "parent").write_text(parent)

    def remove(self, layer_id: str) -> None:
        shutil.rmtree(self._dir(layer_id), ignore_errors=True)

    def mounts(self, layer_id: str, *, readonly: bool = False) -> list[Mount]:
        top, *lowers = [str(p) for p in self._chain(layer_id)]
        if not lowers:
            return [Mount("bind", top, ("rbind", "ro" if readonly else "rw"))]
        if readonly:
            return [Mount("overlay", "overlay", (f"lowerdir={':'.join([top, *lowers])}",))]
        work = self._dir(layer_id) / "work"
        return [Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers)}", f"upperdir={top}",
                                             f"workdir={work}"))]

    def exists(self, layer_id: str) -> bool:
        return (self._dir(layer_id) / "diff").is_dir()

    def usage(self, layer_id: str) -> Usage:
        return layer_dir_usage(self._dir(layer_id) / "diff")
