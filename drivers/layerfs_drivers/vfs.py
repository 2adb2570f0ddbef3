"""vfs: every layer is a complete copy of its parent. No copy-on-write at all.

It is the baseline the other drivers are measured against, and it runs on any
filesystem. Where the filesystem can share extents (btrfs, xfs with reflink)
``cp --reflink=auto`` makes the copy cheap; elsewhere every layer costs the
full size of the image below it.

On-disk layout under the driver home (``ROOT/vfs``)::

    vfs/
      dir/
        <layer-id>/        the layer's full contents: parent's files + its own changes
      staging/
        <pid>_<start>_<layer-id>/   a copy in progress, renamed into dir/ when complete

A layer appears in ``dir/`` only once its copy is whole (a rename). The copy runs
in a ``cp`` that dies with the process that started it (``PR_SET_PDEATHSIG``): a
``kill -9`` of ``layer create`` on a big parent used to leave ``cp`` copying for
minutes, and every command failed on the half-written tree meanwhile. Staging
directories of dead owners are removed by whoever comes next, best effort (a
tree still being written by a stray copy is left for a later pass, never an error).

A layer's mount is a bind mount of its directory (read-only for image layers).
Diffs use the shared naive walk, reading the directories directly (no mount).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from layerfs.driver import Capabilities, Driver, Usage
from layerfs.errors import DriverNotSupported, NotFound, translate_errors
from layerfs.fsinfo import layer_dir_usage
from layerfs.metastore import process_alive, process_token
from layerfs.mount import Mount, can_mount
from layerfs.options import DriverOptions


def _dying_with_us(argv: list[str]) -> list[str]:
    """``argv`` run so that it dies (SIGKILL) when the thread that starts it exits, even by
    ``kill -9``, and exits at once if its parent is already gone by then.

    util-linux's ``setpriv`` sets ``PR_SET_PDEATHSIG`` and a shell checks the parent
    before it execs ``argv``. Not a ``preexec_fn``: Python code between fork and exec is
    unsafe in a process with threads, and in a gRPC server (layerfs.engines) the fork
    handlers grpcio registers make that child crash before it execs."""
    check = 'test "$PPID" = "$1" || exit 1; shift; exec "$@"'
    return ["setpriv", "--pdeathsig", "KILL", "--", "sh", "-c", check, "sh",
            str(os.getpid()), *argv]


class VfsDriver(Driver):
    name = "vfs"
    CAPABILITIES = Capabilities()

    @classmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        if not can_mount():
            raise DriverNotSupported(cls.name, "mounting a layer (a bind mount) needs root")
        for tool in ("cp", "setpriv"):
            if shutil.which(tool) is None:
                raise DriverNotSupported(cls.name, f"{tool} (coreutils, util-linux) is "
                                         "required to copy layers")

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
        self._sweep_staging()
        staging = self.home / "staging"
        staging.mkdir(exist_ok=True)
        partial = staging / f"{process_token().replace(':', '_')}_{layer_id}"
        try:
            # cp -a keeps owners, modes, times, xattrs, hardlinks and special files;
            # --reflink=auto shares extents where the filesystem can.
            subprocess.run(_dying_with_us(["cp", "-a", "--reflink=auto", "--", str(source),
                                           str(partial)]),
                           check=True, capture_output=True, close_fds=True)
            os.rename(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    @translate_errors("vfs remove")
    def remove(self, layer_id: str) -> None:
        path = self._dir(layer_id)
        if path.exists():
            shutil.rmtree(path)
        self._sweep_staging()

    def _sweep_staging(self) -> None:
        """Remove the staging copies of processes that died (best effort: a copy still
        running there, which PR_SET_PDEATHSIG makes unlikely, is retried next time)."""
        staging = self.home / "staging"
        try:
            entries = list(staging.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            pid, _, rest = entry.name.partition("_")
            start = rest.partition("_")[0]
            if not process_alive(f"{pid}:{start}"):
                shutil.rmtree(entry, ignore_errors=True)

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
