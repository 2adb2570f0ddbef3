"""``layerfs system df|prune|reset``: a root as a whole (:mod:`layerfs.system`).

Thin, like every command group: parse, call the library, render. ``prune`` and
``reset`` remove data: without ``-f`` they ask on a terminal, and refuse (with the
hint to add ``-f``) when there is no terminal to ask on.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import InvalidArgument
from .common import SubParsers, command_parser, emit_json, human_size

TYPE_CHECKING = False       # typing and the library load when a command runs
if TYPE_CHECKING:
    from ..runtime.containers import ContainerManager


def _manager(args: argparse.Namespace) -> ContainerManager:
    from ..runtime.containers import ContainerManager

    return ContainerManager(args.root, args.driver, args.storage_opt or None)


def confirm(what: str, args: argparse.Namespace) -> bool:
    """True to go on: ``-f``, or a yes typed on the terminal. No terminal, no ``-f``: refuse."""
    if args.force:
        return True
    if not sys.stdin.isatty():
        raise InvalidArgument(f"`layerfs {args.command} {args.system_command}` removes {what}; "
                              "add -f to go ahead (stdin is not a terminal to ask on)")
    sys.stderr.write(f"WARNING! This will remove {what}.\n"
                     "Are you sure you want to continue? [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def cmd_df(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import system
    from .console import out, print_table

    if not (Path(args.root) / "layerfs.db").is_file():
        raise InvalidArgument(f"{Path(args.root).absolute()} is not a layerfs root yet: "
                              "nothing to count")
    with _manager(args) as mgr:
        usage = system.disk_usage(mgr)
    if args.json:
        emit_json(usage.as_dict())
        return 0
    out.print(f"Storage driver {usage.driver} on {usage.backing_filesystem}, root {usage.root}: "
              f"{human_size(usage.driver_bytes)} on disk under {usage.root}/{usage.driver}",
              soft_wrap=True, markup=False, highlight=False)

    def share(part: int, whole: int) -> str:
        return f"{human_size(part)} ({100 * part // whole if whole else 0}%)"

    print_table(["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"],
                [[r.kind, str(r.total), str(r.active), human_size(r.size),
                  share(r.reclaimable, r.size)] for r in usage.rows])
    return 0


PRUNE_WHAT = ("all stopped containers, {images}, all layers nothing uses (no image, "
              "container, mount or child layer), and the downloads no pull is using (also "
              "those a stopped `pull --resume` kept to continue from)")


def cmd_prune(args: argparse.Namespace) -> int:
    from .. import system

    images = ("all images without a container" if args.all else "all dangling images "
              "(untagged, without a container)")
    if not confirm(PRUNE_WHAT.format(images=images), args):
        sys.stderr.write("layerfs: nothing removed\n")
        return 1
    with _manager(args) as mgr:
        done = system.prune(mgr, all_images=args.all)
    for title, ids in (("Deleted Containers:", done.containers),
                       ("Deleted Images:", done.images), ("Deleted Layers:", done.layers),
                       ("Deleted Downloads:", done.downloads)):
        if ids:
            print(title)
            print("".join(f"{i}\n" for i in ids))
    print(f"Total reclaimed space: {human_size(done.reclaimed)}")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import system

    root = Path(args.root).absolute()
    if not (root / "layerfs.db").is_file():
        raise InvalidArgument(f"{root} is not a layerfs root (no layerfs.db): nothing to reset")
    if not confirm(f"everything in {root}: every container (running ones are killed), "
                   "image and layer, the driver's state, and the directory itself", args):
        sys.stderr.write("layerfs: nothing removed\n")
        return 1
    for line in system.reset(root):
        print(line)
    return 0


def register(sub: SubParsers) -> None:
    group = command_parser(
        sub, "system", "the root as a whole: disk usage, prune, reset",
        "What a root takes on disk (df), removing what nothing uses (prune), and giving the "
        "root back entirely (reset), like `docker system`. prune and reset ask first on a "
        "terminal; elsewhere they need -f.",
        "  layerfs system df\n  layerfs system prune -f\n"
        "  layerfs --root /var/tmp/tour system reset -f\n")
    gsub = group.add_subparsers(dest="system_command", metavar="ACTION", required=True)
    p = command_parser(gsub, "df", "space used by images, containers and layers",
                       "The driver and what it holds on disk, then images, containers, the "
                       "other layers (made by `layer create|apply`) and the downloads of pulls "
                       "(partial blobs under ROOT/tmp): how many, how many in use, their size, "
                       "and how much `system prune` would give back (`-a`: more).",
                       "  layerfs system df\n  layerfs system df --json | jq .rows\n")
    p.add_argument("--json", action="store_true", help="everything as one JSON document")
    p.set_defaults(func=cmd_df)
    p = command_parser(gsub, "prune", "remove stopped containers, dangling images, unused layers",
                       "Remove every stopped container, every dangling image (untagged, no "
                       "container) with the layers only it had, and every layer nothing uses "
                       "(no image, container, mount or child layer; `layer create|apply` "
                       "made those), and every download no running pull is using (a pull "
                       "killed with -9 leaves its partial blob; a stopped `pull --resume` "
                       "keeps its own to continue from). With -a, every image without a "
                       "container too. Asks first unless -f.",
                       "  layerfs system prune\n  layerfs system prune -af\n")
    p.add_argument("-a", "--all", action="store_true", help="also images that have a name, "
                   "when no container uses them")
    p.add_argument("-f", "--force", action="store_true", help="do not ask")
    p.set_defaults(func=cmd_prune)
    p = command_parser(gsub, "reset", "remove everything: containers, images, layers, the root",
                       "Stop and remove every container, remove every image and layer, tear down "
                       "the driver's state (btrfs subvolumes, read-only ones included; "
                       "device-mapper thin devices and the pool), unmount whatever is still "
                       "mounted under the root, and delete the root. Only a directory with a "
                       "layerfs.db is touched. Asks first unless -f.",
                       "  layerfs --root /var/tmp/tour system reset\n"
                       "  layerfs --root /mnt/lfs-btrfs/layerfs system reset -f\n")
    p.add_argument("-f", "--force", action="store_true", help="do not ask")
    p.set_defaults(func=cmd_reset)


__all__ = ["register"]
