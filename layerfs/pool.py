"""Backing storage for drivers that need their own filesystem or device.

``layerfs pool create btrfs --size 4G --image FILE --mount DIR`` makes a
loop-backed btrfs filesystem, for labs, tests and machines whose root is not
on btrfs; ``layerfs pool destroy DIR`` unmounts it and detaches its loop
device — found by exact name from the mount, and checked against the image
file, never by pattern. (The device-mapper thin pool is managed by that
driver's own pool module.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import mount as mountlib
from .errors import DriverNotSupported, InUse, InvalidArgument, LayerfsError, NotFound, command_error


@dataclass(frozen=True)
class LoopPool:
    """A filesystem image attached to a loop device and mounted."""

    image: Path
    device: str
    mountpoint: Path
    fstype: str


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as err:
        raise command_error(err) from err
    except FileNotFoundError as err:
        raise DriverNotSupported(argv[0], f"{argv[0]} is not installed") from err


def loop_backing_file(device: str) -> str | None:
    data = json.loads(_run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE",
                            device]) or "{}")
    for dev in data.get("loopdevices", []):
        if dev["name"] == device:
            return str(dev.get("back-file") or "").removesuffix(" (deleted)") or None
    return None


def create_btrfs(image: Path, mountpoint: Path, *, size: int) -> LoopPool:
    """Make a sparse image, mkfs.btrfs it, attach a loop device and mount it."""
    if shutil.which("mkfs.btrfs") is None:
        raise DriverNotSupported("btrfs", "mkfs.btrfs not found (apt-get install btrfs-progs)")
    if size < 256 << 20:
        raise InvalidArgument("a btrfs pool needs at least 256M")
    image = image.absolute()
    mountpoint = mountpoint.absolute()
    if image.exists():
        raise InvalidArgument(f"{image} exists; pick another --image or destroy the old pool")
    if mountlib.is_mounted(mountpoint):
        raise InvalidArgument(f"{mountpoint} is already a mount point")
    image.parent.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    device = None
    try:
        _run(["mkfs.btrfs", "-q", "-f", str(image)])
        device = _run(["losetup", "--find", "--show", str(image)]).strip()
        mountlib.mount(mountlib.Mount("btrfs", device, ("user_subvol_rm_allowed",)), mountpoint)
    except BaseException:
        if device:
            subprocess.run(["losetup", "-d", device], capture_output=True)
        image.unlink(missing_ok=True)
        raise
    return LoopPool(image, device, mountpoint, "btrfs")


def find_pool(mountpoint: Path) -> LoopPool:
    target = os.path.realpath(mountpoint)
    for info in mountlib.mountinfo():
        if info.target == target and info.source.startswith("/dev/loop"):
            back = loop_backing_file(info.source)
            if back is None:
                raise NotFound(f"{info.source} at {target} has no backing file")
            return LoopPool(Path(back), info.source, Path(target), info.fstype)
    raise NotFound(f"no loop-backed pool is mounted at {target}")


def _refuse_if_served(mountpoint: Path) -> None:
    """A layerfs daemon serving a root on the pool keeps it busy (its socket and lock live
    in the root): say which one, instead of a bare EBUSY."""
    from .daemon.server import serving_daemon

    for lock in (*mountpoint.glob("daemon.lock"), *mountpoint.glob("*/daemon.lock"),
                 *mountpoint.glob("*/*/daemon.lock")):
        pid = serving_daemon(lock.parent)
        if pid is not None:
            raise InUse(f"{mountpoint} is busy: the layerfs daemon (pid {pid}) serving "
                        f"{lock.parent} keeps it open; stop the daemon first")


def destroy_btrfs(mountpoint: Path, *, remove_image: bool = True) -> LoopPool:
    """Unmount the pool, detach exactly its loop device, and delete the image."""
    pool = find_pool(mountpoint)
    leftovers = [m.target for m in mountlib.mounts_under(pool.mountpoint)
                 if m.target != str(pool.mountpoint)]
    for target in leftovers:
        mountlib.unmount(target, lazy=True)
    try:
        mountlib.unmount(pool.mountpoint)
    except LayerfsError:
        _refuse_if_served(pool.mountpoint)
        raise
    # Detach only if this device still backs our image (it could have been reused).
    if loop_backing_file(pool.device) == str(pool.image):
        _run(["losetup", "-d", pool.device])
    if remove_image:
        pool.image.unlink(missing_ok=True)
    return pool
