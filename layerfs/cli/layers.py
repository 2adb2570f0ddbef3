"""``layerfs info|drivers|layer``: the storage root, its driver and its layers.

Thin, like every command group: parse, call :class:`~layerfs.layers.LayerStore`, render.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..errors import InvalidArgument, LayerfsError
from .common import SubParsers, command_parser, emit_json, human_size, open_store, with_source

TYPE_CHECKING = False       # typing, rich and the library load when a command runs
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from typing import IO, Any

    from ..layers import LayerStore


# --- info / drivers -----------------------------------------------------------------------------

def _root_info(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """What ``info`` says about the root, without creating, pinning or switching anything."""
    from .. import plugins
    from ..fsinfo import backing_filesystem
    from ..layers import LayerStore
    from ..options import DriverOptions

    if not (root / "layerfs.db").is_file():
        LayerStore.check_new_root(root)
        opts = DriverOptions.parse(args.storage_opt or None)
        name, _ = plugins.select(root, args.driver, opts)
        existing = next(p for p in (root, *root.parents) if p.exists())
        return {"driver": name, "created": False,
                "status": {"Root": f"{root} (not made yet: the first command that stores "
                                   f"something makes it, for driver {name})",
                           "Backing Filesystem": backing_filesystem(existing)}}
    # The root's own driver: opening with --driver could switch an empty root.
    with LayerStore.open(root, None, args.storage_opt or None) as store:
        data: dict[str, Any] = {"driver": store.driver.name, "created": True,
                                "status": store.status()}
        if args.driver and args.driver != store.driver.name:
            if store.layers():
                raise InvalidArgument(f"root {root} holds layers of driver "
                                      f"{store.driver.name!r}, not {args.driver!r}")
            data["note"] = (f"the root has no layers: a command with --driver {args.driver} "
                            f"switches it from {store.driver.name} to {args.driver}")
    return data


def cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.text import Text

    from .. import plugins
    from ..options import DriverOptions
    from .console import out, print_table

    root = Path(args.root).absolute()
    if args.driver:
        plugins.load(args.driver)   # no driver of that name: the error, exit 1
    data: dict[str, Any] = {"root": str(root)}
    code = 0
    try:
        data.update(_root_info(args, root))
    except LayerfsError as e:
        data["driver"] = None
        data["error"] = str(e)
        code = 1
    opts = DriverOptions.parse(args.storage_opt or None)
    data["drivers"] = [{"name": p.name, "supported": p.supported, "reason": p.reason,
                        "priority": p.priority}
                       for p in plugins.probe_all(root, opts)]
    if args.json:
        emit_json(data)
        return code
    out.print(f"[bold]Storage Driver:[/] {data['driver'] or '[red]none[/]'}", soft_wrap=True)
    for key, value in data.get("status", {}).items():
        if key != "Storage Driver":
            out.print(f" {key}: {value}", soft_wrap=True, markup=False, highlight=False)
    if "note" in data:
        out.print(f" Note: {data['note']}", soft_wrap=True, markup=False, highlight=False)
    if "error" in data:
        out.print(Text(f" {data['error']}", style="red"), soft_wrap=True)
    print_table(["DRIVER", "SUPPORTED", "WHY NOT"],
                [[d["name"], Text("yes", style="green") if d["supported"]
                  else Text("no", style="red"), d["reason"] or ""] for d in data["drivers"]],
                title="Registered drivers")
    return code


def cmd_drivers(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import plugins
    from ..plugins import driver_info
    from .console import print_table

    rows = []
    for name in sorted(plugins.registered()):
        probe = plugins.probe(name, Path(args.root))
        row: dict[str, Any] = {"name": name, "supported": probe.supported, "reason": probe.reason}
        try:
            row.update(driver_info(plugins.load(name)))
        except LayerfsError as e:
            row["load_error"] = str(e)
        rows.append(row)
    if args.json:
        emit_json(rows)
        return 0
    print_table(["DRIVER", "NATIVE DIFF", "BLOCK COW", "QUOTAS", "MAX DEPTH", "WHITEOUTS",
                 "HERE"],
                [[r["name"], str(r.get("native_diff", "?")), str(r.get("block_level_cow", "?")),
                  str(r.get("quotas", "?")), str(r.get("max_depth") or "-"),
                  str(r.get("whiteouts", "?")),
                  "yes" if r["supported"] else f"no: {r['reason']}"] for r in rows],
                title="layerfs storage drivers")
    return 0


# --- layer ---------------------------------------------------------------------------------------

def _labels(items: Sequence[str] | None) -> dict[str, str]:
    labels = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"label {item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def cmd_layer_create(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        parent = store.resolve(args.parent) if args.parent else None
        rec = store.create(parent, layer_id=args.id, readonly=args.readonly,
                           labels=_labels(args.label), size=args.size)
    print(rec.id)
    return 0


def cmd_layer_ls(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .console import print_table

    with open_store(args) as store:
        layers = store.layers()
        mounted = {m.layer for m in store.store.list_mounts()}
        # A read-write layer's size changes as it is written: measured now, as the bytes
        # its diff carries (what `docker ps -s` shows), never stored.
        if not args.quiet:
            layers = [r if r.readonly else replace(r, size=_rw_size(store, r.id))
                      for r in layers]
    if args.quiet:
        sys.stdout.write("".join(f"{r.id if args.no_trunc else r.id[:12]}\n" for r in layers))
        return 0
    if args.json:
        emit_json([dict(r.as_dict(), mounted=r.id in mounted) for r in layers])
        return 0

    def short(layer_id: str | None) -> str:
        return (layer_id or "") if args.no_trunc else (layer_id or "")[:12]

    print_table(["LAYER ID", "PARENT", "DEPTH", "MODE", "SIZE", "MOUNTED"],
                [[short(r.id), short(r.parent), str(r.depth), "ro" if r.readonly else "rw",
                  human_size(r.size), "yes" if r.id in mounted else ""] for r in layers],
                title=f"layers ({len(layers)})", no_trunc=args.no_trunc)
    return 0


def _rw_size(store: LayerStore, layer_id: str) -> int | None:
    try:
        return store.diff_size(layer_id)
    except LayerfsError:
        return None


def cmd_layer_rm(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        for ref in args.ids:
            layer_id = store.resolve(ref)
            store.remove(layer_id)
            print(ref)
    return 0


def cmd_layer_mount(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        print(store.mount(store.resolve(args.id), args.target, readonly=args.readonly))
    return 0


def cmd_layer_umount(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        if args.all:
            for target in store.unmount_all():
                print(target)
            return 0
        if not args.id:
            raise InvalidArgument("give a layer id or --all")
        store.unmount(store.resolve(args.id), args.target, force=args.force)
    return 0


def cmd_layer_diff(args: argparse.Namespace) -> int:
    from .console import err

    to_file = bool(args.output) and args.output != "-"
    if not to_file and sys.stdout.isatty():
        raise InvalidArgument("refusing to write a tar to a terminal; use -o FILE or a pipe")
    with open_store(args) as store:
        layer_id = store.resolve(args.id)
        if not to_file:
            store.diff(layer_id, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return 0
        existed = os.path.lexists(args.output)
        try:
            with open(args.output, "wb") as f:
                size = store.diff(layer_id, f)
        except BaseException:
            if not existed:   # no half-written tar left behind
                with contextlib.suppress(OSError):
                    os.unlink(args.output)
            raise
    err.print(f"wrote {args.output}: {human_size(size)} of file data", soft_wrap=True,
              markup=False, highlight=False)
    return 0


def cmd_layer_apply(args: argparse.Namespace) -> int:
    # The input first: a tar that cannot be read must not make a root on the way.
    with contextlib.ExitStack() as stack:
        if args.file == "-":
            source: IO[bytes] = sys.stdin.buffer
        else:
            if os.path.isdir(args.file):
                raise InvalidArgument(f"{args.file}: is a directory, not a layer tar "
                                      f"(`layerfs import {args.file}` makes an image from a "
                                      "directory)")
            source = stack.enter_context(open(args.file, "rb"))
        store = stack.enter_context(open_store(args))
        parent = store.resolve(args.parent) if args.parent else None
        try:
            rec = store.apply(source, parent, layer_id=args.id, labels=_labels(args.label))
        except InvalidArgument as e:
            raise with_source(e, "stdin" if args.file == "-" else args.file) from e
    print(rec.id)
    return 0


def cmd_layer_changes(args: argparse.Namespace) -> int:
    from rich.text import Text

    from .console import out

    with open_store(args) as store:
        changes = store.changes(store.resolve(args.id))
    if args.json:
        emit_json([{"path": c.path, "kind": c.kind.value} for c in changes])
        return 0
    colors = {"A": "green", "C": "yellow", "D": "red"}
    for c in changes:
        out.print(Text(c.kind.value, style=colors[c.kind.value]) + Text(f" {c.path}"),
                  soft_wrap=True)
    return 0


def cmd_layer_inspect(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        layer_id = store.resolve(args.id)
        rec = store.get(layer_id)
        data = rec.as_dict()
        data["chain"] = store.chain(layer_id)
        data["usage"] = store.usage(layer_id).as_dict()
        data["driver_data"] = store.metadata(layer_id)
        data["mounts"] = [m.target for m in store.store.list_mounts(layer_id)]
    emit_json(data)
    return 0


# --- parser ----------------------------------------------------------------------------------------

INFO_EXAMPLES = """\
  layerfs info                          the driver of /var/lib/layerfs (or the one a new
                                        root would get), and why each other one is not usable
  layerfs --root /var/tmp/lab info      another root: nothing is made until it stores something
  layerfs --driver btrfs info           can btrfs work here? exits 1 with the reason if not
  layerfs info --json | jq .drivers
"""

LAYER_DESCRIPTION = (
    "Layers are the building blocks: each is its parent plus changes. Image layers are "
    "read-only (`apply`, `create --readonly`); container layers read-write (`create`). A "
    "layer is named by its id or any unique prefix of it (the 12 characters `layer ls` "
    "prints).")

LAYER_EXAMPLES = """\
  base=$(layerfs layer apply rootfs.tar)            an image layer from a tar
  box=$(layerfs layer create --parent "$base")      a container layer on it
  mnt=$(layerfs layer mount "$box")                 write files under $mnt, then
  layerfs layer changes "$box"                      what changed: A added, C changed, D deleted
  layerfs layer diff "$box" -o changes.tar          the changes as an OCI layer tar
  layerfs layer umount "$box"; layerfs layer rm "$box" "$base"
"""


def register(sub: SubParsers) -> None:
    p = command_parser(sub, "info", "the selected driver and why each other one is or isn't "
                       "usable",
                       "The root's driver and its status (backing filesystem, features, pool "
                       "usage), then every registered driver: usable here or not, and why. On a "
                       "root that does not exist yet, the driver it would get; nothing is made "
                       "or pinned. Exits 1 when no driver can be used (or the --driver given "
                       "cannot).", INFO_EXAMPLES)
    p.add_argument("--json", action="store_true", help="everything as one JSON document")
    p.set_defaults(func=cmd_info)
    p = command_parser(sub, "drivers", "registered drivers and their capabilities",
                       "What each registered driver does natively (diffs without a tree walk, "
                       "block-level copy-on-write, quotas, how deep a chain it can mount, how "
                       "it stores deletions) and whether it works on this host.",
                       "  layerfs drivers\n  layerfs drivers --json | jq '.[].name'\n")
    p.add_argument("--json", action="store_true", help="one JSON object per driver")
    p.set_defaults(func=cmd_drivers, without_root=True)

    layer = command_parser(sub, "layer", "create, mount, diff and remove layers",
                           LAYER_DESCRIPTION, LAYER_EXAMPLES)
    lsub = layer.add_subparsers(dest="layer_command", metavar="ACTION", required=True)
    p = command_parser(lsub, "create", "create an empty layer on a parent (read-write by "
                       "default)",
                       "A new layer whose contents start as its parent's (empty without a "
                       "parent): a container layer, or an image layer with --readonly. Prints "
                       "its id.",
                       "  layerfs layer create                          an empty base layer\n"
                       "  layerfs layer create --parent 3f2a9c1b0d4e    a container layer\n"
                       "  layerfs layer create --parent ID --label purpose=lab --size 1G\n")
    p.add_argument("--parent", metavar="ID", help="parent layer id or unique prefix (none: an "
                   "empty base layer)")
    p.add_argument("--id", help="the new layer's id (default: 64 random hex characters)")
    p.add_argument("--readonly", action="store_true", help="an image layer instead of a "
                   "container layer")
    p.add_argument("--label", action="append", metavar="KEY=VALUE",
                   help="a label kept with the layer (repeatable; `layer inspect` shows them)")
    p.add_argument("--size", help="quota for the layer, e.g. 10G (drivers with quotas: btrfs, "
                   "devicemapper)")
    p.set_defaults(func=cmd_layer_create)
    p = command_parser(lsub, "ls", "list layers",
                       "Every layer: id, parent, depth in its chain, read-only (image) or "
                       "read-write (container), size of its changes, and whether it is mounted.",
                       "  layerfs layer ls\n  layerfs layer ls -q | xargs layerfs layer rm\n"
                       "  layerfs layer ls --json | jq '.[] | select(.readonly)'\n")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids, one per line")
    p.add_argument("--json", action="store_true", help="every field, as JSON")
    p.add_argument("--no-trunc", action="store_true", help="show full ids")
    p.set_defaults(func=cmd_layer_ls)
    p = command_parser(lsub, "rm", "remove layers (refused while mounted or with children)",
                       "Remove layers, children before parents. A layer that is mounted or has "
                       "child layers is refused.",
                       "  layerfs layer rm 3f2a9c1b0d4e\n  layerfs layer rm \"$box\" \"$base\"\n")
    p.add_argument("ids", nargs="+", metavar="ID", help="layer id or unique prefix")
    p.set_defaults(func=cmd_layer_rm)
    p = command_parser(lsub, "mount", "mount a layer's merged view; prints the mount point",
                       "Mount the layer with everything below it, through the driver "
                       "(overlay, bind, a thin device, the FUSE union, ...). Mounting a mounted "
                       "layer again counts one more user; `layer umount` drops one.",
                       "  mnt=$(layerfs layer mount \"$box\"); ls \"$mnt\"\n"
                       "  layerfs layer mount --readonly \"$base\" /mnt/look\n")
    p.add_argument("id", metavar="ID", help="layer id or unique prefix")
    p.add_argument("target", nargs="?", help="where (default ROOT/mnt/ID)")
    p.add_argument("--readonly", action="store_true", help="mount read-only (image layers "
                   "always are)")
    p.set_defaults(func=cmd_layer_mount)
    p = command_parser(lsub, "umount", "unmount a layer (or --all)",
                       "Drop one user of the layer's mount; the last one unmounts.",
                       "  layerfs layer umount \"$box\"\n  layerfs layer umount --all\n")
    p.add_argument("id", nargs="?", metavar="ID", help="layer id or unique prefix")
    p.add_argument("target", nargs="?", help="which mount of the layer (default: its first)")
    p.add_argument("--all", action="store_true", help="everything this root mounted")
    p.add_argument("--force", action="store_true", help="unmount even if others use it")
    p.set_defaults(func=cmd_layer_umount)
    p = command_parser(lsub, "diff", "write a layer's changes as an OCI layer tar",
                       "The layer's changes against its parent as an uncompressed OCI layer tar "
                       "(deletions as .wh. whiteouts): what `layer apply` and `docker load` "
                       "take. Reports the bytes of file data it holds.",
                       "  layerfs layer diff \"$box\" -o changes.tar\n"
                       "  layerfs layer diff \"$box\" | tar -t\n")
    p.add_argument("id", metavar="ID", help="layer id or unique prefix")
    p.add_argument("-o", "--output", help="file (default: stdout, if not a terminal)")
    p.set_defaults(func=cmd_layer_diff)
    p = command_parser(lsub, "apply", "a new read-only layer from an OCI layer tar "
                       "(gzip/zstd/plain)",
                       "Apply an OCI layer tar (plain, gzip or zstd; whiteouts of either "
                       "style) on a parent as a new read-only layer. Hostile entries (paths "
                       "out of the layer, device files, ...) are refused; the layer appears "
                       "only once the whole tar applied. Prints its id.",
                       "  base=$(layerfs layer apply rootfs.tar)\n"
                       "  layerfs layer apply --parent \"$base\" changes.tar\n"
                       "  zstd -dc layer.tar.zst | layerfs layer apply --id mylayer -\n")
    p.add_argument("file", help="tar file, or - for stdin")
    p.add_argument("--parent", metavar="ID", help="parent layer id or unique prefix (none: a "
                   "base layer)")
    p.add_argument("--id", help="the new layer's id (default: 64 random hex characters)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE",
                   help="a label kept with the layer (repeatable)")
    p.set_defaults(func=cmd_layer_apply)
    p = command_parser(lsub, "changes", "what a layer changed: A added, C changed, D deleted",
                       "Files and directories the layer added, changed or deleted compared "
                       "with its parent (`docker diff`).",
                       "  layerfs layer changes \"$box\"\n"
                       "  layerfs layer changes --json \"$box\" | jq length\n")
    p.add_argument("id", metavar="ID", help="layer id or unique prefix")
    p.add_argument("--json", action="store_true", help="a list of {path, kind}")
    p.set_defaults(func=cmd_layer_changes)
    p = command_parser(lsub, "inspect", "everything known about a layer, as JSON",
                       "The layer's record, its chain, its disk usage, the driver's data "
                       "(paths, devices) and where it is mounted.",
                       "  layerfs layer inspect \"$box\"\n"
                       "  layerfs layer inspect \"$box\" | jq .driver_data\n")
    p.add_argument("id", metavar="ID", help="layer id or unique prefix")
    p.set_defaults(func=cmd_layer_inspect)
