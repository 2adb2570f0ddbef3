"""aufs: a union of branches, one per layer, with AUFS's own whiteout files.

AUFS was Docker's first storage driver. No Debian kernel ships it any more, so
where ``/proc/filesystems`` has no ``aufs`` this driver mounts our own FUSE
union filesystem (:mod:`layerfs_drivers.aufs.unionfs`) that implements the
same semantics: top-down branch lookup, ``.wh.`` whiteouts, opaque dirs,
file-level copy-up — and counts every backing lookup it makes.

On-disk layout under the driver home (``ROOT/aufs``), as Docker's driver::

    aufs/
      diff/
        <id>/          the layer's branch: its own files; a deleted lower entry
                       NAME is the empty file .wh.NAME, an opaque directory holds
                       .wh..wh..opq (AUFS internals .wh..wh.plnk etc. are hidden)
      layers/
        <id>           the parent chain, nearest parent first, one id per line

A mount stacks ``diff/<id>`` (read-write for a container layer) over the
parents' branches (read-only). Mount points come from the store
(``ROOT/mnt/<id>``), where Docker used ``aufs/mnt/<id>``. Because a branch *is*
the layer's change set, diff, apply and changes read and write it directly —
except in a branch where a directory of a lower layer was renamed in place
(the ``dirren`` option; the FUSE filesystem then leaves ``.wh..wh.dirren`` at
the branch root): its redirect points into the layers below, so such a layer is
diffed by walking the mounted trees, as overlay2 does with ``redirect_dir``.
A renamed directory then comes out as OCI changes: a whiteout of the old path
and the whole tree under the new one.

Options: ``mode`` (auto, kernel, fuse), ``dirren`` (rename lower directories
in place instead of EXDEV; default off, as AUFS), and for the FUSE filesystem
``entry_timeout``, ``attr_timeout``, ``keep_cache`` and ``passthrough`` (let the
kernel read and write backing files directly, Linux >= 6.9; default on).

Kernel aufs: ``br:`` branches (top ``rw``, the rest ``ro+wh``) with ``xino``
and ``dirperm1``; a chain longer than one page of options is mounted with the
first branches and extended by ``remount,append:`` — returned as several
:class:`Mount` values for the shared mount module.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

from layerfs.changes import Change, changes_from_diff_dir
from layerfs.driver import Capabilities, Driver, Usage
from layerfs.errors import DriverNotSupported, InvalidArgument, NotFound, translate_errors
from layerfs.fsinfo import layer_dir_usage
from layerfs.mount import PAGE_SIZE, FuseForker, Mount, can_mount
from layerfs.options import DriverOptions
from layerfs.tar import Readable, WhiteoutFormat, apply_layer, export_native

if TYPE_CHECKING:
    from layerfs.metastore import DriverState

WH_PREFIX = ".wh."
DIRREN_FLAG = ".wh..wh.dirren"  # unionfs.DIRREN_FLAG (not imported: keeps the driver light)


def kernel_has_aufs() -> bool:
    with open("/proc/filesystems", encoding="ascii") as f:
        return any(line.split()[-1] == "aufs" for line in f if line.strip())


class AufsDriver(Driver):
    name = "aufs"
    CAPABILITIES = Capabilities(native_diff=True, native_changes=True,
                                whiteout_format=WhiteoutFormat.AUFS)
    known_options = {"mode", "entry_timeout", "attr_timeout", "keep_cache", "dirren",
                     "passthrough"}

    def __init__(self, home: Path, options: DriverOptions | None = None,
                 state: DriverState | None = None) -> None:
        super().__init__(home, options, state)
        for sub in ("diff", "layers"):
            (self.home / sub).mkdir(exist_ok=True)
        mode = self.options.get_str("mode", "auto")
        if mode not in ("auto", "kernel", "fuse"):
            raise InvalidArgument(f"aufs: mode={mode!r}: use auto, kernel or fuse")
        if mode == "auto":
            mode = "kernel" if kernel_has_aufs() else "fuse"
        if mode == "kernel" and not kernel_has_aufs():
            raise DriverNotSupported(self.name, "mode=kernel but this kernel has no aufs")
        self.mode = mode
        self.dirren = self.options.get_bool("dirren", False)

    @classmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        if not can_mount():
            raise DriverNotSupported(cls.name, "mounting a layer (kernel aufs, or the FUSE union "
                                               "with allow_other) needs root")
        if kernel_has_aufs() and options.get_str("mode", "auto") != "fuse":
            return
        if not os.path.exists("/dev/fuse"):
            raise DriverNotSupported(cls.name, "no kernel aufs and no /dev/fuse for the FUSE "
                                               "union filesystem")

    @staticmethod
    def make_fuse_forker() -> FuseForker:
        """A fork server for the FUSE union's mounts, for :func:`layerfs.mount.set_fuse_forker`
        (see :mod:`layerfs_drivers.aufs.forkserver`). Call it early in a long-lived process."""
        from .forkserver import ForkServer

        return ForkServer()

    # --- paths -----------------------------------------------------------------------------
    def _diff(self, layer_id: str) -> Path:
        return self.home / "diff" / layer_id

    def _parents(self, layer_id: str) -> list[str]:
        path = self.home / "layers" / layer_id
        if not path.exists():
            return []
        return [line for line in path.read_text().splitlines() if line]

    def _branches(self, layer_id: str) -> list[Path]:
        return [self._diff(layer_id)] + [self._diff(p) for p in self._parents(layer_id)]

    # --- lifecycle -------------------------------------------------------------------------
    @translate_errors("aufs create")
    def create(self, layer_id: str, parent: str | None, *, readonly: bool,
               size: int | None = None) -> None:
        chain: list[str] = []
        if parent is not None:
            if not self._diff(parent).is_dir():
                raise NotFound(f"aufs: parent layer {parent} has no branch")
            chain = [parent, *self._parents(parent)]
        self._diff(layer_id).mkdir(mode=0o755)
        if parent is not None:
            pst = os.stat(self._diff(parent))
            os.chmod(self._diff(layer_id), pst.st_mode & 0o7777)
            os.chown(self._diff(layer_id), pst.st_uid, pst.st_gid)
        (self.home / "layers" / layer_id).write_text("".join(f"{p}\n" for p in chain))

    @translate_errors("aufs remove")
    def remove(self, layer_id: str) -> None:
        if self._diff(layer_id).exists():
            shutil.rmtree(self._diff(layer_id))
        (self.home / "layers" / layer_id).unlink(missing_ok=True)

    def exists(self, layer_id: str) -> bool:
        return self._diff(layer_id).is_dir()

    # --- mounts ------------------------------------------------------------------------------
    def mounts(self, layer_id: str, *, readonly: bool = False) -> list[Mount]:
        branches = self._branches(layer_id)
        if self.mode == "kernel":
            return self._kernel_mounts(branches, readonly)
        argv = [sys.executable, "-m", "layerfs_drivers.aufs.unionfs"]
        for key, flag in (("entry_timeout", "--entry-timeout"),
                          ("attr_timeout", "--attr-timeout")):
            value = self.options.get_str(key)
            if value is not None:
                argv += [flag, value]
        keep = self.options.get_str("keep_cache")
        if keep is not None:
            argv.append("--keep-cache" if self.options.get_bool("keep_cache", True)
                        else "--no-keep-cache")
        if not self.options.get_bool("passthrough", True):
            argv.append("--no-passthrough")
        if self.dirren:
            argv.append("--dirren")
        top_mode = "ro" if readonly else "rw"
        argv.append(f"{branches[0]}:{top_mode}")
        argv += [f"{b}:ro" for b in branches[1:]]
        opts = ("ro",) if readonly else ()
        return [Mount("fuse.layerfs-union", "layerfs-union", opts, helper=tuple(argv))]

    def _kernel_mounts(self, branches: list[Path], readonly: bool) -> list[Mount]:
        top = f"{branches[0]}={'ro+wh' if readonly else 'rw'}"
        rest = [f"{b}=ro+wh" for b in branches[1:]]
        common: tuple[str, ...] = ("dirperm1", f"xino=/dev/shm/aufs.xino.{branches[0].name[:12]}")
        if self.dirren:
            common += ("dirren",)
        first: list[str] = [top]
        budget = PAGE_SIZE - 512  # leave room for the other options
        while rest and len(":".join([*first, rest[0]])) < budget:
            first.append(rest.pop(0))
        mounts = [Mount("aufs", "none", (f"br:{':'.join(first)}", *common))]
        # The rest goes in one remount,append per branch, bottom-most last.
        position = len(first)
        for branch in rest:
            mounts.append(Mount("aufs", "none", ("remount", f"append:{branch}")))
            position += 1
        return mounts

    # --- native diffs -------------------------------------------------------------------------
    def _has_redirects(self, branches: list[Path]) -> bool:
        """Whether a dirren rename left redirects in any of ``branches``."""
        return any(os.path.lexists(b / DIRREN_FLAG) for b in branches)

    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        if self._has_redirects(self._branches(layer_id)):
            return self.naive.changes(layer_id, parent)
        return changes_from_diff_dir(self._diff(layer_id), WhiteoutFormat.AUFS,
                                     self._branches(layer_id)[1:])

    @translate_errors("aufs diff")
    def diff(self, layer_id: str, parent: str | None, out: IO[bytes]) -> int:
        if self._has_redirects([self._diff(layer_id)]):
            return self.naive.diff(layer_id, parent, out)
        return export_native(self._diff(layer_id), WhiteoutFormat.AUFS, out)

    @translate_errors("aufs apply")
    def apply_diff(self, layer_id: str, parent: str | None, stream: Readable) -> int:
        return apply_layer(self._diff(layer_id), stream, WhiteoutFormat.AUFS)

    def diff_size(self, layer_id: str, parent: str | None) -> int:
        if self._has_redirects([self._diff(layer_id)]):
            return self.naive.diff_size(layer_id, parent)
        seen: set[int] = set()
        total = 0
        for dirpath, _dirs, files in os.walk(self._diff(layer_id)):
            for name in files:
                if name.startswith(WH_PREFIX):
                    continue
                st = os.lstat(os.path.join(dirpath, name))
                if st.st_ino not in seen and (st.st_mode & 0o170000) == 0o100000:
                    seen.add(st.st_ino)
                    total += st.st_size
        return total

    # --- reporting ------------------------------------------------------------------------------
    def usage(self, layer_id: str) -> Usage:
        return layer_dir_usage(self._diff(layer_id))

    def counters(self, target: Path, *, reset: bool = False) -> dict[str, int] | None:
        """The FUSE union's counters: a JSON object in the virtual xattr of its mount root
        (see :mod:`layerfs_drivers.aufs.unionfs`); kernel aufs counts nothing."""
        if self.mode != "fuse":
            return None
        import json

        from .unionfs import RESET_XATTR, STATS_XATTR

        try:
            raw = os.getxattr(target, STATS_XATTR, follow_symlinks=False)
        except OSError as err:
            raise InvalidArgument(f"aufs: {target} does not answer the union's counters "
                                  f"({err.strerror}): is it a layerfs-union mount?") from err
        if reset:
            try:
                os.setxattr(target, RESET_XATTR, b"1", follow_symlinks=False)
            except OSError as err:
                if err.errno == errno.EROFS:
                    raise InvalidArgument(
                        f"aufs: cannot reset the counters of {target}: it is mounted "
                        f"read-only and the kernel refuses to set the reset attribute "
                        f"there (compare two readings instead)") from err
                raise
        data = json.loads(raw)
        return {k: int(v) for k, v in data.items() if isinstance(v, int)}

    def metadata(self, layer_id: str) -> dict[str, str]:
        return {"Branch": str(self._diff(layer_id)),
                "Branches": ":".join(str(b) for b in self._branches(layer_id)),
                "Mode": self.mode}

    def status(self) -> dict[str, str]:
        info = super().status()
        info["Mode"] = ("kernel aufs" if self.mode == "kernel"
                        else "FUSE union filesystem (layerfs_drivers.aufs.unionfs)")
        info["Dirs"] = str(len(list((self.home / "diff").iterdir())))
        return info
