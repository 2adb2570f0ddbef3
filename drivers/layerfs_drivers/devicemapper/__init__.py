"""devicemapper: every layer is a thin snapshot of its parent in a dm thin pool.

Docker's devicemapper driver is the model (moby ``daemon/graphdriver/devmapper``),
split into modules instead of one 2,800-line file:

==============  ===========================================================
module          what
==============  ===========================================================
``__init__``    this driver class: the Driver contract on top of a DeviceSet
``config``      options, defaults, which ones are fixed when the pool is made
``deviceset``   the pool of a root, the base device, one device per layer,
                transactions, activation, locking, status
``metadata``    the driver's records in the layer store (DriverState)
``pool``        thin pools: loopback files, direct-lvm (PV/VG/LV), dm messages
``dmsetup``     the ``dmsetup`` command and parsers of what it prints; udev
``cli``         ``layerfs pool create|destroy devicemapper``
==============  ===========================================================

Layout::

    ROOT/
      layerfs.db                  the layer store; the driver's records are its
                                  driver_state rows (see metadata.py): the pool,
                                  the base device, device:<layer> = {dev_id,
                                  name, size, origin}, the open transaction
      devicemapper/               the driver home
        devices.lock, users.lock  flock files (see deviceset.py)
        loopback/                 loopback mode only:
          data                    sparse, loopdatasize   -> /dev/loopN
          metadata                sparse, loopmetadatasize -> /dev/loopM
          pool.json               what reattaching needs
      tmp/                        scratch mounts (naive diff views, fs grow)

    device-mapper (names by exact match, never by pattern):
      <pool>                      thin-pool target: loopback
                                  ``layerfs-<maj>:<min>-<ino>-pool``, direct-lvm
                                  ``<vg>-thinpool`` (VG default ``layerfs``), or
                                  the thinpooldev given
      layerfs-<maj>:<min>-<ino>-base      the base device: basesize, formatted
                                          once (fs), never mounted as a layer
      layerfs-<maj>:<min>-<ino>-<layer>   a layer: ``create_snap`` of its parent's
                                          device (of the base for a layer
                                          without parent); <maj>:<min>-<ino> is
                                          the driver home's device and inode

A layer's tree is its device's filesystem root (ext4's lost+found is removed
when the base is formatted; Docker used a ``rootfs/`` subdirectory, which
needs a second, private mount per layer that the store's single unmount would
leak). :meth:`mounts` returns one ``Mount(fs, /dev/mapper/<name>)`` and, to
make that mountable, activates the device (a dm table load, not a mount);
the device stays mapped while the root is open and is unmapped by
``remove`` or by the last user's ``cleanup``. Diffs are the naive walk
(``Driver.diff``): both trees are mounted read-only and compared; a snapshot
keeps every inode's metadata, so only what changed differs.

Per-layer ``size``: a thin device larger than its parent's, whose
filesystem is grown (resize2fs/xfs_growfs) -- the layer can hold no more.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from layerfs.driver import Capabilities, Driver, Usage
from layerfs.errors import DriverNotSupported, ExternalCommandFailed, InvalidArgument, LayerfsError
from layerfs.fsinfo import layer_dir_usage
from layerfs.metastore import DriverState
from layerfs.mount import Mount
from layerfs.options import DriverOptions

from . import config as dmconfig
from . import dmsetup
from .deviceset import DeviceSet, PoolSpaceLow
from .metadata import Metadata

__all__ = ["DevicemapperDriver", "PoolSpaceLow"]

GUEST_HINT = ("the devicemapper driver and its tests run in the qemu guest: "
              "python -m tests.support.qemu pytest -- tests/drivers/test_devicemapper.py "
              "(see docs/vm.md)")


def dm_missing() -> str | None:
    """Why this kernel cannot run the driver, or None."""
    try:
        proc_devices = Path("/proc/devices").read_text()
    except OSError:
        proc_devices = ""
    if (not re.search(r"^\s*\d+\s+device-mapper\s*$", proc_devices, re.MULTILINE)
            or not Path("/dev/mapper/control").exists()):
        return ("device-mapper is not in this kernel (no 'device-mapper' in /proc/devices, or "
                f"no /dev/mapper/control); {GUEST_HINT}")
    return None


class DevicemapperDriver(Driver):
    name = "devicemapper"
    CAPABILITIES = Capabilities(block_level_cow=True, quotas=True)
    known_options = dmconfig.KNOWN_OPTIONS

    def __init__(self, home: Path, options: DriverOptions | None = None,
                 state: DriverState | None = None) -> None:
        super().__init__(home, options, state)
        if state is None:
            raise InvalidArgument("devicemapper keeps its device table in the layer store: "
                                  "open it through LayerStore / layerfs.open_root")
        self.config = dmconfig.parse(self.options)
        self.devices = DeviceSet(self.home, self.config, Metadata(state), self.scratch)
        self.recovered = self.devices.open()

    @classmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        if os.geteuid() != 0:
            raise DriverNotSupported(cls.name, "needs root (device-mapper, loop devices, mount)")
        reason = dm_missing()
        if reason:
            raise DriverNotSupported(cls.name, reason)
        if shutil.which(dmsetup.DMSETUP) is None:
            raise DriverNotSupported(cls.name, "dmsetup is not installed (apt-get install dmsetup)")
        try:
            targets = dmsetup.targets()
            if "thin-pool" not in targets:
                subprocess.run(["modprobe", "dm_thin_pool"], capture_output=True)
                targets = dmsetup.targets()
        except (ExternalCommandFailed, OSError) as err:
            raise DriverNotSupported(cls.name, f"dmsetup targets failed: {err}") from err
        if "thin-pool" not in targets:
            raise DriverNotSupported(cls.name, "the kernel has no thin-pool target (dm_thin_pool)")
        try:
            setup = dmconfig.parse(options).setup
        except LayerfsError:
            setup = dmconfig.Setup(mode="loopback")  # bad options are reported by open
        tools = {"loopback": ["losetup"], "direct-lvm": ["pvcreate", "vgcreate", "lvcreate",
                                                         "lvconvert", "wipefs"],
                 "existing": []}[setup.mode]
        tools += ["mkfs.ext4", "debugfs", "resize2fs"] if setup.fs == "ext4" else [
            "mkfs.xfs", "xfs_growfs"]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise DriverNotSupported(cls.name, f"missing tools: {', '.join(missing)} "
                                               "(run scripts/setup)")

    # --- lifecycle ----------------------------------------------------------------------------
    def create(self, layer_id: str, parent: str | None, *, readonly: bool,
               size: int | None = None) -> None:
        self.devices.create(layer_id, parent, size)

    def remove(self, layer_id: str) -> None:
        self.devices.remove(layer_id)

    def exists(self, layer_id: str) -> bool:
        return self.devices.meta.device(layer_id) is not None

    def mounts(self, layer_id: str, *, readonly: bool = False) -> list[Mount]:
        """One mount of the layer's thin device. Activates the device if needed."""
        return self.devices.mounts(layer_id, readonly)

    def cleanup(self) -> None:
        self.devices.close()

    # --- reporting ----------------------------------------------------------------------------
    def usage(self, layer_id: str) -> Usage:
        """The tree's bytes and inodes (a device holds its whole tree), and from
        ``thin_ls`` the bytes only this device maps vs those it shares."""
        rec = self.devices.record_of(layer_id)
        with self.view(layer_id) as path:
            assert path is not None
            tree = layer_dir_usage(path)
        thin = self.devices.thin_usage(rec)
        return Usage(tree.bytes, tree.inodes,
                     exclusive_bytes=thin.exclusive if thin else None,
                     shared_bytes=thin.shared if thin else None)

    def path_facts(self, layer_id: str, path: str) -> dict[str, Any]:
        """The layer's thin device: bytes it maps alone and bytes it shares with other
        devices (its origin snapshots and their children), from ``thin_ls``; and the
        same split for the file's own blocks (:meth:`DeviceSet.file_sharing`)."""
        rec = self.devices.record_of(layer_id)
        facts: dict[str, Any] = {}
        thin = self.devices.thin_usage(rec)
        if thin is not None:
            facts.update(device_exclusive_bytes=thin.exclusive,
                         device_shared_bytes=thin.shared, device_mapped_bytes=thin.mapped)
        with self.view(layer_id) as root:
            assert root is not None
            shared = self.devices.file_sharing(rec, root / path)
        if shared is not None:
            facts.update(shared.as_dict())
        return facts

    def metadata(self, layer_id: str) -> dict[str, str]:
        rec = self.devices.record_of(layer_id)
        data = {"DeviceId": str(rec.dev_id), "DeviceName": rec.name,
                "DeviceSize": str(rec.size), "Device": f"/dev/mapper/{rec.name}",
                "Pool": str(self.devices.record.get("name", "")),
                "Filesystem": self.devices.setup.fs}
        if rec.origin is not None:
            data["Origin"] = str(rec.origin)
        with contextlib.suppress(LayerfsError):
            info = dmsetup.info(rec.name)
            data["Active"] = str(info is not None).lower()
        return data

    def status(self) -> dict[str, str]:
        return self.devices.status()

    def destroy(self) -> list[str]:
        """The pool and its devices (loop files, or the LV, VG and PV label of direct-lvm;
        an existing pool only loses this root's thin devices), then the home."""
        return self.destroy_pool() + super().destroy()

    def destroy_pool(self) -> list[str]:
        """Tear down this root's pool (see DeviceSet.destroy); layers must be gone first."""
        return self.devices.destroy()
