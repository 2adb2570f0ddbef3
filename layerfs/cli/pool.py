"""``layerfs pool``: make and remove the storage some drivers need."""

from __future__ import annotations

import argparse

from ..errors import InvalidArgument
from .common import SubParsers, command_parser


def cmd_pool_create(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import pool
    from ..units import parse_size

    if args.kind == "btrfs":
        if not args.image or not args.mount:
            raise InvalidArgument("btrfs pools need --image FILE and --mount DIR")
        p = pool.create_btrfs(Path(args.image), Path(args.mount), size=parse_size(args.size))
        print(f"btrfs pool: {p.image} on {p.device}, mounted at {p.mountpoint}")
        print(f"use it:  layerfs --root {p.mountpoint}/layerfs --driver btrfs info")
        return 0
    from layerfs_drivers.devicemapper import cli as dmcli  # optional, driver-owned

    return dmcli.pool_create(args)


def cmd_pool_destroy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import pool

    if args.kind == "btrfs":
        p = pool.destroy_btrfs(Path(args.target), remove_image=not args.keep_image)
        print(f"unmounted {p.mountpoint}, detached {p.device}"
              + ("" if args.keep_image else f", removed {p.image}"))
        return 0
    from layerfs_drivers.devicemapper import cli as dmcli

    return dmcli.pool_destroy(args)


def register(sub: SubParsers) -> None:
    p = command_parser(sub, "pool", "create or destroy backing storage (btrfs, devicemapper)",
                       "Some drivers need a filesystem or device of their own: btrfs needs the "
                       "root on btrfs, devicemapper a thin pool.",
                       "  layerfs pool create btrfs --size 4G --image /var/tmp/btrfs.img "
                       "--mount /mnt/lfs-btrfs\n"
                       "  layerfs --root /mnt/lfs-btrfs/layerfs --driver btrfs info\n"
                       "  layerfs pool destroy btrfs /mnt/lfs-btrfs\n")
    psub = p.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    c = command_parser(psub, "create", "make a pool",
                       "btrfs: a sparse image file formatted as btrfs, attached to a loop "
                       "device and mounted at --mount. devicemapper: a thin pool for the root "
                       "(--mode loopback|direct-lvm).",
                       "  layerfs pool create btrfs --size 4G --image /var/tmp/btrfs.img "
                       "--mount /mnt/lfs-btrfs\n"
                       "  layerfs --root /var/lib/layerfs-dm pool create devicemapper "
                       "--size 20G\n"
                       "  layerfs --root /var/lib/layerfs-dm pool create devicemapper "
                       "--mode direct-lvm --device /dev/vdb\n")
    c.add_argument("kind", choices=["btrfs", "devicemapper"], help="what kind of pool")
    c.add_argument("--size", default="4G", help="image size (default %(default)s)")
    c.add_argument("--image", help="btrfs: image file to create")
    c.add_argument("--mount", help="btrfs: where to mount it")
    c.add_argument("--mode", choices=["loopback", "direct-lvm"], default="loopback",
                   help="devicemapper pool mode")
    c.add_argument("--device", help="devicemapper direct-lvm: the block device to use")
    c.add_argument("--name", help="devicemapper: pool name")
    c.add_argument("--force", action="store_true", help="use a device that has a filesystem")
    c.set_defaults(func=cmd_pool_create)
    d = command_parser(psub, "destroy", "unmount/remove a pool and detach its devices",
                       "btrfs: unmount the pool, detach its loop device and delete the image "
                       "file. devicemapper: remove the root's layers, then its thin pool and "
                       "what it is made of (loop files, or the LV, VG and PV label).",
                       "  layerfs pool destroy btrfs /mnt/lfs-btrfs\n"
                       "  layerfs pool destroy devicemapper /var/lib/layerfs-dm\n")
    d.add_argument("kind", choices=["btrfs", "devicemapper"], help="what kind of pool")
    d.add_argument("target", help="btrfs: the mount point; devicemapper: the pool name or root")
    d.add_argument("--keep-image", action="store_true", help="btrfs: keep the image file")
    d.set_defaults(func=cmd_pool_destroy)
