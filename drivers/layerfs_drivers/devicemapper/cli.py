"""``layerfs pool create|destroy devicemapper``: set up and tear down a root's thin pool.

``create`` opens the root with the devicemapper driver and the pool options
(``--mode``, ``--device``, ``--name``, ``--force``, ``--size`` = loopdatasize,
plus any ``-s KEY=VALUE``), which is exactly what the driver does on the first
open of a root; the pool is recorded in the root, so later commands need only
``--root ROOT``. ``destroy`` removes every layer of the root and then the pool:
thin devices, pool device, loop devices and files (loopback), or the LV, the
VG, the PV label and the lvm profile (direct-lvm) -- each by the exact name
recorded at set-up. The target is the root, or the pool's name (the
loopback pool's dm name or the direct-lvm VG) together with ``--root``.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from layerfs.errors import AlreadyExists, InvalidArgument, LayerfsError, NotFound
from layerfs.layers import LayerStore
from layerfs.metastore import DriverState, MetaStore
from layerfs.options import DriverOptions

from . import DevicemapperDriver
from .config import LOOPBACK_WARNING

DRIVER = "devicemapper"


def _options(args: argparse.Namespace) -> dict[str, str]:
    opts = dict(DriverOptions.parse(getattr(args, "storage_opt", None) or None).values)
    want = {"mode": args.mode}
    if args.mode == "direct-lvm":
        if not args.device:
            raise InvalidArgument("devicemapper direct-lvm needs --device /dev/DEV (it is wiped)")
        want["directlvm_device"] = args.device
        if args.force:
            want["directlvm_device_force"] = "true"
    elif args.device:
        raise InvalidArgument("--device is for --mode direct-lvm")
    elif getattr(args, "size", None) and "loopdatasize" not in opts:
        want["loopdatasize"] = args.size
    if args.name:
        want["pool_name"] = args.name
    for key, value in want.items():
        if key in opts and opts[key] != value:
            raise InvalidArgument(f"-s {key}={opts[key]} contradicts the command line ({value})")
        opts[key] = value
    return opts


def _recorded_pool(root: Path) -> dict[str, Any] | None:
    db = root / "layerfs.db"
    if not db.exists():
        return None
    store = MetaStore(db)
    try:
        pool: dict[str, Any] | None = DriverState(store, DRIVER).get("pool")
        return pool
    finally:
        store.close()


def pool_create(args: argparse.Namespace) -> int:
    root = Path(args.root).absolute()
    if _recorded_pool(root) is not None:
        raise AlreadyExists(f"{root} already has a devicemapper pool; use it, or "
                            f"`layerfs --root {root} pool destroy devicemapper {root}` first")
    with LayerStore.open(root, DRIVER, _options(args)) as store:
        info = store.status()
    print(f"devicemapper pool {info['Pool Name']} ({info['Mode']}) for {root}")
    for key in ("Data loop file", "Metadata loop file", "Volume Group", "Physical Volume",
                "Data Space Total", "Metadata Space Total", "Pool Blocksize", "Base Device Size",
                "Backing Filesystem"):
        if key in info:
            print(f"  {key}: {info[key]}")
    if info["Mode"] == "loopback":
        print(f"WARNING: {LOOPBACK_WARNING}")
    print(f"use it:   layerfs --root {root} info")
    print(f"destroy:  layerfs --root {root} pool destroy devicemapper {root}")
    return 0


def _resolve_root(args: argparse.Namespace) -> Path:
    """The root named by the target: a root directory, or a pool name checked against --root."""
    target = Path(args.target)
    if target.is_dir():
        return target.absolute()
    root = Path(args.root).absolute()
    record = _recorded_pool(root)
    if record is None:
        raise NotFound(f"{args.target} is not a directory, and {root} (--root) has no "
                       f"devicemapper pool: give the root, or the pool name with --root")
    names = {str(n) for n in (record.get("name"), record.get("vg")) if n}
    if args.target not in names:
        raise InvalidArgument(f"the pool of {root} is {' / '.join(sorted(names))}, not "
                              f"{args.target}; refusing to guess")
    return root


def destroy_root_pool(root: Path) -> list[str]:
    """Remove every layer of ``root`` and then its pool; what was done, line by line."""
    if _recorded_pool(root) is None:
        raise NotFound(f"{root} has no devicemapper pool")
    store = LayerStore.open(root, DRIVER)
    try:
        layers = len(store.store.list_layers(state=None))
        store.wipe()  # unmounts what the root mounted, removes every layer's device
        driver = store.driver
        assert isinstance(driver, DevicemapperDriver)
        done = driver.destroy_pool()
    except BaseException:
        with contextlib.suppress(LayerfsError):
            store.close()
        raise
    store.close()
    return [f"removed {layers} layer(s) of {root}", *done]


def pool_destroy(args: argparse.Namespace) -> int:
    for line in destroy_root_pool(_resolve_root(args)):
        print(line)
    return 0
