"""The naive differ: the diff family for any driver, by walking trees.

It mounts (or opens) a layer and its parent through the driver's views and compares the
two trees file by file (:func:`~layerfs.changes.naive_changes`): what changed, the OCI
tar of it, and applying such a tar through a writable view. Every driver holds one
(``driver.naive``) and uses it for what it cannot do natively, the way moby's drivers
wrap themselves in ``NaiveDiffDriver``; overlay2 falls back to it when its upper
directories are not plain diffs (``redirect_dir``, ``metacopy``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .changes import Change, naive_changes

if TYPE_CHECKING:
    from .driver import Driver
    from .tar import Readable


class NaiveDiffer:
    """``changes``, ``diff``, ``apply_diff`` and ``diff_size`` of ``driver``'s layers,
    computed from its :meth:`~layerfs.driver.Driver.view` and
    :meth:`~layerfs.driver.Driver.writable_view`."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        with self.driver.view(parent) as lower, self.driver.view(layer_id) as upper:
            assert upper is not None
            return naive_changes(lower, upper)

    def diff(self, layer_id: str, parent: str | None, out: IO[bytes]) -> int:
        with self.driver.view(parent) as lower, self.driver.view(layer_id) as upper:
            assert upper is not None
            from .tar import export_changes  # the tar codec loads when used

            return export_changes(upper, naive_changes(lower, upper), out)

    def apply_diff(self, layer_id: str, parent: str | None, stream: Readable) -> int:
        with self.driver.writable_view(layer_id) as target:
            from .tar import WhiteoutFormat, apply_layer

            return apply_layer(target, stream, WhiteoutFormat.IN_PLACE)

    def diff_size(self, layer_id: str, parent: str | None) -> int:
        with self.driver.view(parent) as lower, self.driver.view(layer_id) as upper:
            assert upper is not None
            return changes_size(upper, naive_changes(lower, upper))


def changes_size(tree: Path, changes: list[Change]) -> int:
    """Sum of regular-file sizes that a diff of ``changes`` would carry (hardlinks once).

    A directory added as a whole is listed with all its children by the change
    model, so only the listed paths are counted.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for change in changes:
        if change.kind.value == "D":
            continue
        try:
            st = os.lstat(tree / change.path.lstrip("/"))
        except FileNotFoundError:
            continue
        if (st.st_mode & 0o170000) == 0o100000 and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total
