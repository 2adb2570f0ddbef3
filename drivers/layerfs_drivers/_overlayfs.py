"""What the overlay and overlay2 drivers share: host checks and feature probes.

Kept separate from both drivers so neither imports the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from pathlib import Path

from layerfs import mount as mountlib
from layerfs.errors import DriverNotSupported, LayerfsError
from layerfs.fsinfo import backing_filesystem

# Options a user may turn on; each maps to overlayfs mount options. Turning
# one on is probed on this root first, so a kernel without it gives a clear
# DriverNotSupported rather than a mount failure on first use.
FEATURE_OPTIONS = {
    "metacopy": ("metacopy=on",),
    "redirect_dir": ("redirect_dir=on",),
    "index": ("index=on",),
    "volatile": ("volatile",),
    "userxattr": ("userxattr",),
}
# When a feature is off we say so explicitly, so a kernel built with
# CONFIG_OVERLAY_FS_REDIRECT_DIR/METACOPY=y cannot switch it on behind our back
# (that would make the upper dir stop being a plain diff).
FEATURE_OFF = {
    "metacopy": ("metacopy=off",),
    "redirect_dir": ("redirect_dir=off",),
    "index": ("index=off",),
}

_DT_REG = 8


def overlay_in_kernel() -> bool:
    with open("/proc/filesystems", encoding="ascii") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())


def supports_d_type(directory: Path) -> bool:
    """Whether readdir on ``directory``'s filesystem fills d_type (overlay needs it).

    Python's scandir hides DT_UNKNOWN behind a stat, so read a raw dirent.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    probe = Path(tempfile.mkdtemp(prefix="dtype-", dir=directory))
    try:
        (probe / "f").write_bytes(b"")
        handle = libc.opendir(os.fsencode(probe))
        if not handle:
            return False
        try:
            while True:
                ent = libc.readdir(handle)
                if not ent:
                    return False
                # struct dirent: ino(8) off(8) reclen(2) type(1) name[]
                name = ctypes.string_at(ent + 19)
                if name == b"f":
                    return ctypes.c_ubyte.from_address(ent + 18).value == _DT_REG
        finally:
            libc.closedir(handle)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def check_host(driver: str, home: Path) -> None:
    """Raise DriverNotSupported unless kernel overlay can be used with ``home`` as upper."""
    if not overlay_in_kernel():
        raise DriverNotSupported(driver, "the kernel has no overlay filesystem "
                                         "(/proc/filesystems; try `modprobe overlay`)")
    probe_base = home if home.exists() else home.parent
    while not probe_base.exists():
        probe_base = probe_base.parent
    fs = backing_filesystem(probe_base)
    if fs in ("overlayfs", "zfs", "fakeowner"):
        raise DriverNotSupported(driver, f"backing filesystem {fs} cannot hold overlay upper dirs")
    if not supports_d_type(probe_base):
        raise DriverNotSupported(driver, f"backing filesystem of {probe_base} lacks d_type "
                                         "support (xfs needs ftype=1)")
    if os.geteuid() != 0:
        raise DriverNotSupported(driver, "mounting overlay needs root (or a user namespace "
                                         "with userxattr; try mount_program=fuse-overlayfs)")


def probe_features(scratch: Path) -> dict[str, bool]:
    """Try one small overlay mount per optional feature; True where the kernel accepts it."""
    result: dict[str, bool] = {}
    for feature, opts in FEATURE_OPTIONS.items():
        base = Path(tempfile.mkdtemp(prefix="probe-", dir=scratch))
        try:
            for sub in ("lower", "upper", "work", "merged"):
                (base / sub).mkdir()
            options = (f"lowerdir={base / 'lower'}", f"upperdir={base / 'upper'}",
                       f"workdir={base / 'work'}", *opts)
            try:
                mountlib.mount(mountlib.Mount("overlay", "overlay", options), base / "merged")
            except LayerfsError:
                result[feature] = False
            else:
                result[feature] = True
                mountlib.unmount(base / "merged")
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(base)
    return result
