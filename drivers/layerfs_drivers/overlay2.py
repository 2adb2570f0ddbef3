"""overlay2: kernel overlayfs with many lower layers, Docker's default driver.

On-disk layout under the driver home (``ROOT/overlay2``)::

    overlay2/
      l/
        <SHORT> -> ../<id>/diff   one short symlink per layer (26 characters), so a
                                  128-layer lowerdir list fits in one page
      <id>/
        diff/                     the layer's own files: for an image layer what its
                                  tar added; for a container layer the overlay upper
                                  dir. Deletions are char devices 0/0 (whiteouts) and
                                  opaque dirs carry trusted.overlay.opaque=y
                                  (user.overlay.opaque with userxattr)
        link                      <SHORT>, this layer's name in l/
        lower                     "l/<SHORT>:l/<SHORT>:..." parents, nearest first
                                  (absent for a layer without parent)
        work/                     overlay's workdir (same filesystem as diff/)

Mounting a layer with parents is one overlay mount: ``lowerdir`` = the parents'
l/ links, ``upperdir`` = diff/, ``workdir`` = work/. A read-only view drops the
upper: ``lowerdir`` = own diff/ + parents. A layer without parent is a bind
mount of its diff/. The mount point is chosen by the store (``ROOT/mnt/<id>``),
so there is no ``merged/`` here.

Because diff/ *is* the layer's change set, diff/apply/changes read and write it
directly, converting whiteouts at the edge. That stops being true with
``redirect_dir`` (a renamed dir points at its lower origin) or ``metacopy``
(an upper file may hold only metadata): with either on, the driver falls back
to the naive tree walk — the ``Native Overlay Diff`` line of ``layerfs info``.

Quotas: the ``size`` option (per layer, or driver-wide) works where the home is
on xfs mounted with ``prjquota``: each layer's diff/ gets its own project id and
a hard block limit (``xfs_quota``), as Docker's overlay2 does. Elsewhere it is a
clear DriverNotSupported.

Layers: the kernel stacks at most 500 lowers (Docker stops at 128). Above one
page of options the shared mount module switches to the new mount API
(``lowerdir+``), or to paths relative to this home from a chdir'd child.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from layerfs.changes import Change, WhiteoutFormat, changes_from_diff_dir
from layerfs.driver import Capabilities, Driver, Usage
from layerfs.errors import DriverNotSupported, InvalidArgument, NotFound, translate_errors
from layerfs.fsinfo import backing_filesystem, layer_dir_usage
from layerfs.metastore import DriverState
from layerfs.mount import Mount, MountInfo, mountinfo
from layerfs.options import DriverOptions

from ._overlayfs import FEATURE_OFF, FEATURE_OPTIONS, check_host, probe_features

if TYPE_CHECKING:
    from layerfs.tar import Readable  # the tar codec loads when a layer is applied

MAX_LOWERS = 500  # OVL_MAX_STACK in fs/overlayfs


def mount_of(path: Path) -> MountInfo:
    """The mount holding ``path`` (the longest mount point above it; the last one mounted
    there if several are stacked)."""
    real = os.path.realpath(path)
    best: MountInfo | None = None
    for info in mountinfo():
        if (real == info.target or real.startswith(info.target.rstrip("/") + "/")) and \
                (best is None or len(info.target) >= len(best.target)):
            best = info
    assert best is not None  # "/" is always mounted
    return best


def xfs_project_quotas(path: Path) -> bool:
    """Whether the xfs filesystem holding ``path`` enforces project quotas."""
    return bool({"prjquota", "pquota"} & mount_of(path).super_option_set)


def _short_id() -> str:
    # 26 base32 characters, as Docker's overlay2 uses: short but collision-safe.
    return base64.b32encode(secrets.token_bytes(16)).decode()[:26]


class Overlay2Driver(Driver):
    name = "overlay2"
    CAPABILITIES = Capabilities(native_diff=True, native_changes=True, quotas=True,
                                max_depth=MAX_LOWERS, whiteout_format=WhiteoutFormat.OVERLAY)
    known_options = {"metacopy", "redirect_dir", "index", "volatile", "userxattr",
                     "mount_program", "size"}

    def __init__(self, home: Path, options: DriverOptions | None = None,
                 state: DriverState | None = None) -> None:
        super().__init__(home, options, state)
        (self.home / "l").mkdir(exist_ok=True)
        opts = self.options
        self.enabled = {f: opts.get_bool(f, False) for f in FEATURE_OPTIONS}
        if self.enabled["metacopy"] and "redirect_dir" not in opts.values:
            # The kernel refuses metacopy=on with redirect_dir=off ("conflicting
            # options"): a metacopy upper file must be able to point at its lower.
            self.enabled["redirect_dir"] = True
        if os.geteuid() != 0 and "userxattr" not in opts.values:
            self.enabled["userxattr"] = True
        self.mount_program = opts.get_str("mount_program")
        if self.mount_program and shutil.which(self.mount_program) is None:
            raise InvalidArgument(f"overlay2: mount_program {self.mount_program!r} not found")
        self.default_size = opts.get_size("size", None)
        self.features = self._features()
        missing = [f for f, on in self.enabled.items() if on and not self.features.get(f)]
        if missing and not self.mount_program:
            raise DriverNotSupported(self.name, f"this kernel's overlay rejects "
                                                f"{', '.join(missing)}")
        # With redirect_dir or metacopy an upper directory is no longer a plain diff
        # (a renamed dir points at its lower origin, a metacopy file has no data): the
        # diff family falls back to the naive differ, and the capabilities say so.
        self.capabilities = replace(self.CAPABILITIES, native_diff=self.native_diff_ok,
                                    native_changes=self.native_diff_ok,
                                    whiteout_format=self.whiteouts)

    @classmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        if options.get_str("mount_program"):
            if shutil.which(options.values["mount_program"]) is None:
                raise DriverNotSupported(cls.name, f"{options.values['mount_program']} not found")
            return
        check_host(cls.name, home)

    def _features(self) -> dict[str, bool]:
        """Kernel overlay features, probed once per root and kept in the store."""
        cached = self.state.get("features") if self.state else None
        if cached is not None:
            return dict(cached)
        if self.mount_program:
            return {}
        features = probe_features(self.scratch)
        if self.state:
            self.state.set("features", features)
        return features

    @property
    def whiteouts(self) -> WhiteoutFormat:
        return WhiteoutFormat.OVERLAY_USER if self.enabled["userxattr"] else WhiteoutFormat.OVERLAY

    @property
    def native_diff_ok(self) -> bool:
        return not (self.enabled["redirect_dir"] or self.enabled["metacopy"])

    # --- paths ----------------------------------------------------------------------------
    def _dir(self, layer_id: str) -> Path:
        return self.home / layer_id

    def _diff(self, layer_id: str) -> Path:
        return self._dir(layer_id) / "diff"

    def _lowers(self, layer_id: str) -> list[str]:
        """Parents' l/ links, nearest first, as paths relative to home."""
        lower = self._dir(layer_id) / "lower"
        if not lower.exists():
            return []
        text = lower.read_text().strip()
        return text.split(":") if text else []

    def _lower_diff_dirs(self, layer_id: str) -> list[Path]:
        return [self.home / link for link in self._lowers(layer_id)]

    # --- lifecycle -------------------------------------------------------------------------
    @translate_errors("overlay2 create")
    def create(self, layer_id: str, parent: str | None, *, readonly: bool,
               size: int | None = None) -> None:
        size = size if size is not None else self.default_size
        if size is not None:
            self._check_quota_support()
        d = self._dir(layer_id)
        d.mkdir(mode=0o700)
        (d / "diff").mkdir(mode=0o755)
        short = _short_id()
        (self.home / "l" / short).symlink_to(f"../{layer_id}/diff")
        (d / "link").write_text(short)
        if size is not None:
            self._set_quota(layer_id, size)
        if parent is not None:
            pdir = self._dir(parent)
            if not (pdir / "link").exists():
                raise NotFound(f"overlay2: parent layer {parent} has no {pdir / 'link'}")
            chain = [f"l/{(pdir / 'link').read_text().strip()}", *self._lowers(parent)]
            if len(chain) > MAX_LOWERS - 1 and not readonly:
                raise InvalidArgument(f"overlay2: {len(chain)} lower layers exceed the "
                                      f"kernel's {MAX_LOWERS}")
            (d / "lower").write_text(":".join(chain))
            (d / "work").mkdir(mode=0o700)
            # Parent diff dir's mode/owner are what the root of the merged view shows
            # from a lower layer; copy them so an empty upper doesn't change them.
            pst = os.stat(self._diff(parent))
            os.chmod(d / "diff", stat.S_IMODE(pst.st_mode))
            os.chown(d / "diff", pst.st_uid, pst.st_gid)

    def _check_quota_support(self) -> None:
        fs = backing_filesystem(self.home)
        if fs != "xfs" or not xfs_project_quotas(self.home):
            raise DriverNotSupported(
                self.name, f"per-layer size needs xfs mounted with project quotas (prjquota); "
                           f"{self.home} is on {fs}" + ("" if fs != "xfs" else " without prjquota"))

    def _set_quota(self, layer_id: str, size: int) -> None:
        """Give the layer's diff/ its own xfs project and a hard block limit on it,
        as Docker's overlay2 did (the project id is inherited by everything below)."""
        assert self.state is not None
        with self.state.transaction():
            projid = int(self.state.get("next_projid", 100_000))
            self.state.set("next_projid", projid + 1)
            self.state.set(f"projid:{layer_id}", projid)
        mnt = mount_of(self.home).target
        diff = self._diff(layer_id)
        for command in (f"project -s -p {diff} {projid}", f"limit -p bhard={size} {projid}"):
            subprocess.run(["xfs_quota", "-x", "-c", command, mnt], check=True,
                           capture_output=True)

    def _clear_quota(self, layer_id: str) -> None:
        state = self.state
        projid = state.get(f"projid:{layer_id}") if state else None
        if state is None or projid is None:
            return
        subprocess.run(["xfs_quota", "-x", "-c", f"limit -p bhard=0 {projid}",
                        mount_of(self.home).target], capture_output=True)
        state.delete(f"projid:{layer_id}")

    @translate_errors("overlay2 remove")
    def remove(self, layer_id: str) -> None:
        self._clear_quota(layer_id)
        d = self._dir(layer_id)
        link = d / "link"
        if link.exists():
            short = link.read_text().strip()
            if short:
                (self.home / "l" / short).unlink(missing_ok=True)
        if d.exists():
            shutil.rmtree(d)

    def exists(self, layer_id: str) -> bool:
        return self._diff(layer_id).is_dir()

    # --- mounts ------------------------------------------------------------------------------
    def _feature_options(self) -> list[str]:
        opts: list[str] = []
        for feature, on in self.enabled.items():
            if on:
                opts.extend(FEATURE_OPTIONS[feature])
            elif feature in FEATURE_OFF and self.features.get(feature, False):
                if feature == "redirect_dir" and self.enabled["userxattr"]:
                    # "off" means "follow" when the overlay module's
                    # redirect_always_follow is set, and userxattr refuses to follow.
                    opts.append("redirect_dir=nofollow")
                else:
                    opts.extend(FEATURE_OFF[feature])
        return opts

    def mounts(self, layer_id: str, *, readonly: bool = False) -> list[Mount]:
        lowers = [str(p) for p in self._lower_diff_dirs(layer_id)]
        diff = str(self._diff(layer_id))
        if not lowers:
            return [Mount("bind", diff, ("rbind", "ro" if readonly else "rw"))]
        if readonly:
            # No upper: overlay is read-only by construction; index/volatile need an upper.
            # metacopy stays: a container layer's metacopy files, now a lower layer, are
            # only followed to their data with metacopy=on (without it, EPERM on read).
            extra = [o for o in self._feature_options()
                     if not o.startswith(("index", "volatile"))]
            options = (f"lowerdir={':'.join([diff, *lowers])}", *extra)
        else:
            options = (f"lowerdir={':'.join(lowers)}", f"upperdir={diff}",
                       f"workdir={self._dir(layer_id) / 'work'}", *self._feature_options())
        if self.mount_program:
            data = ",".join(o for o in options if o not in ("ro",))
            return [Mount(f"fuse.{os.path.basename(self.mount_program)}", "overlay", options,
                          helper=(self.mount_program, "-o", data))]
        return [Mount("overlay", "overlay", options)]

    # --- native diffs --------------------------------------------------------------------------
    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        if not self.native_diff_ok:
            return self.naive.changes(layer_id, parent)
        return changes_from_diff_dir(self._diff(layer_id), self.whiteouts,
                                     self._lower_diff_dirs(layer_id))

    @translate_errors("overlay2 diff")
    def diff(self, layer_id: str, parent: str | None, out: IO[bytes]) -> int:
        if not self.native_diff_ok:
            return self.naive.diff(layer_id, parent, out)
        from layerfs.tar import export_native  # the tar codec loads when used

        return export_native(self._diff(layer_id), self.whiteouts, out)

    @translate_errors("overlay2 apply")
    def apply_diff(self, layer_id: str, parent: str | None, stream: Readable) -> int:
        # A fresh layer's diff/ is empty: the tar's entries, with whiteouts in overlay
        # form, are exactly what its upper dir must hold.
        from layerfs.tar import apply_layer

        return apply_layer(self._diff(layer_id), stream, self.whiteouts)

    def diff_size(self, layer_id: str, parent: str | None) -> int:
        if not self.native_diff_ok:
            return self.naive.diff_size(layer_id, parent)
        seen: set[int] = set()
        total = 0
        for dirpath, _dirs, files in os.walk(self._diff(layer_id)):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_size
        return total

    # --- reporting -----------------------------------------------------------------------------
    def path_facts(self, layer_id: str, path: str) -> dict[str, Any]:
        """How the layer's diff/ holds ``path``: overlayfs's own xattrs on it say whether an
        upper copy is metadata only (``metacopy``: the data is still read from a lower
        layer), points elsewhere (``redirect``: renamed, or a metacopy file's data path)
        or was copied up from a lower file (``origin``)."""
        target = self._diff(layer_id) / path
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            return {"in_diff": False}
        prefix = "user.overlay." if self.enabled["userxattr"] else "trusted.overlay."
        try:
            names = set(os.listxattr(target, follow_symlinks=False))
        except OSError:
            names = set()

        def value(name: str) -> bytes | None:
            if prefix + name not in names:
                return None
            try:
                return os.getxattr(target, prefix + name, follow_symlinks=False)
            except OSError:
                return None

        redirect = value("redirect")
        return {"in_diff": True,
                "whiteout": stat.S_ISCHR(st.st_mode) and st.st_rdev == 0,
                "metacopy": prefix + "metacopy" in names,
                "redirect": os.fsdecode(redirect) if redirect else None,
                "copied_up": prefix + "origin" in names,
                "opaque": value("opaque") == b"y",
                "allocated_bytes": st.st_blocks * 512}

    def usage(self, layer_id: str) -> Usage:
        return layer_dir_usage(self._dir(layer_id))

    def metadata(self, layer_id: str) -> dict[str, str]:
        lowers = [str(p.resolve()) for p in self._lower_diff_dirs(layer_id)]
        return {"UpperDir": str(self._diff(layer_id)), "WorkDir": str(self._dir(layer_id) / "work"),
                "LowerDir": ":".join(lowers), "Depth": str(len(lowers) + 1)}

    def status(self) -> dict[str, str]:
        info = super().status()
        info["Supports d_type"] = "true"
        info["Native Overlay Diff"] = str(self.native_diff_ok).lower()
        info["Features (kernel)"] = ", ".join(f"{k}={'yes' if v else 'no'}"
                                               for k, v in sorted(self.features.items()))
        info["Enabled"] = ", ".join(k for k, v in self.enabled.items() if v) or "none"
        if self.mount_program:
            info["Mount Program"] = self.mount_program
        return info
