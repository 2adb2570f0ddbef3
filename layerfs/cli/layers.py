"""``layerfs info|drivers|layer``: the storage root, its driver and its layers.

Thin, like every command group: parse, call :class:`~layerfs.layers.LayerStore`, render.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from .. import plugins
from ..errors import InvalidArgument, LayerfsError
from ..options import DriverOptions
from ..plugins import driver_info
from .common import SubParsers, emit_json, human_size, open_store
from .console import err, out

if TYPE_CHECKING:
    from ..layers import LayerStore

# --- info / drivers -----------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    root = Path(args.root)
    data: dict[str, Any] = {"root": str(root)}
    try:
        with open_store(args) as store:
            data["driver"] = store.driver.name
            data["status"] = store.status()
    except LayerfsError as e:
        data["driver"] = None
        data["error"] = str(e)
    opts = DriverOptions.parse(args.storage_opt or None)
    data["drivers"] = [{"name": p.name, "supported": p.supported, "reason": p.reason,
                        "priority": p.priority}
                       for p in plugins.probe_all(root, opts)]
    if args.json:
        emit_json(data)
        return 0
    out.print(f"[bold]Storage Driver:[/] {data['driver'] or '[red]none[/]'}")
    for key, value in data.get("status", {}).items():
        if key != "Storage Driver":
            out.print(f" {key}: {value}")
    if "error" in data:
        out.print(f" [red]{data['error']}[/]")
    table = Table(title="Registered drivers", show_lines=False)
    table.add_column("driver")
    table.add_column("supported")
    table.add_column("why not")
    for d in data["drivers"]:
        table.add_row(d["name"], "[green]yes[/]" if d["supported"] else "[red]no[/]",
                      d["reason"] or "")
    out.print(table)
    return 0


def cmd_drivers(args: argparse.Namespace) -> int:
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
    table = Table(title="layerfs storage drivers")
    for col in ("driver", "here", "native diff", "block CoW", "quotas", "max depth", "whiteouts"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "yes" if r["supported"] else f"no: {r['reason']}",
                      str(r.get("native_diff", "?")), str(r.get("block_level_cow", "?")),
                      str(r.get("quotas", "?")), str(r.get("max_depth") or "-"),
                      str(r.get("whiteouts", "?")))
    out.print(table)
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
        rec = store.create(args.parent, layer_id=args.id, readonly=args.readonly,
                           labels=_labels(args.label), size=args.size)
    print(rec.id)
    return 0


def cmd_layer_ls(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        layers = store.layers()
        mounted = {m.layer for m in store.store.list_mounts()}
        # A read-write layer's size changes as it is written: measured now, as the bytes
        # its diff carries (what `docker ps -s` shows), never stored.
        layers = [r if r.readonly else replace(r, size=_rw_size(store, r.id)) for r in layers]
    if args.json:
        emit_json([dict(r.as_dict(), mounted=r.id in mounted) for r in layers])
        return 0
    table = Table(title=f"layers ({len(layers)})")
    for col in ("id", "parent", "depth", "mode", "size", "mounted"):
        table.add_column(col)
    for r in layers:
        table.add_row(r.id[:12] if not args.no_trunc else r.id,
                      (r.parent or "")[:12] if not args.no_trunc else (r.parent or ""),
                      str(r.depth), "ro" if r.readonly else "rw", human_size(r.size),
                      "yes" if r.id in mounted else "")
    out.print(table)
    return 0


def _rw_size(store: LayerStore, layer_id: str) -> int | None:
    try:
        return store.diff_size(layer_id)
    except LayerfsError:
        return None


def cmd_layer_rm(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        for layer_id in args.ids:
            store.remove(layer_id)
            print(layer_id)
    return 0


def cmd_layer_mount(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        print(store.mount(args.id, args.target, readonly=args.readonly))
    return 0


def cmd_layer_umount(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        if args.all:
            for target in store.unmount_all():
                print(target)
            return 0
        if not args.id:
            raise InvalidArgument("give a layer id or --all")
        store.unmount(args.id, args.target, force=args.force)
    return 0


def cmd_layer_diff(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        if args.output and args.output != "-":
            with open(args.output, "wb") as f:
                size = store.diff(args.id, f)
            err.print(f"wrote {args.output}: layer size {human_size(size)}")
        else:
            if sys.stdout.isatty():
                raise InvalidArgument("refusing to write a tar to a terminal; use -o FILE or a pipe")
            store.diff(args.id, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    return 0


def cmd_layer_apply(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        if args.file == "-":
            rec = store.apply(sys.stdin.buffer, args.parent, layer_id=args.id,
                              labels=_labels(args.label))
        else:
            with open(args.file, "rb") as f:
                rec = store.apply(f, args.parent, layer_id=args.id, labels=_labels(args.label))
    print(rec.id)
    return 0


def cmd_layer_changes(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        changes = store.changes(args.id)
    if args.json:
        emit_json([{"path": c.path, "kind": c.kind.value} for c in changes])
        return 0
    colors = {"A": "green", "C": "yellow", "D": "red"}
    for c in changes:
        out.print(f"[{colors[c.kind.value]}]{c.kind.value}[/] {c.path}", highlight=False)
    return 0


def cmd_layer_inspect(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        rec = store.get(args.id)
        data = rec.as_dict()
        data["chain"] = store.chain(args.id)
        data["usage"] = store.usage(args.id).as_dict()
        data["driver_data"] = store.metadata(args.id)
        data["mounts"] = [m.target for m in store.store.list_mounts(args.id)]
    emit_json(data)
    return 0


# --- parser ----------------------------------------------------------------------------------------

def register(sub: SubParsers) -> None:
    p = sub.add_parser("info", help="the selected driver and why each other one is or isn't usable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("drivers", help="registered drivers and their capabilities")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_drivers)

    layer = sub.add_parser("layer", help="create, mount, diff and remove layers",
                           description="Layers are the building blocks: each is its parent plus "
                           "changes. Image layers are read-only; container layers read-write.")
    lsub = layer.add_subparsers(dest="layer_command", metavar="ACTION", required=True)
    p = lsub.add_parser("create", help="create an empty layer on a parent (read-write by default)")
    p.add_argument("--parent", help="parent layer id (none: an empty base layer)")
    p.add_argument("--id", help="layer id (default: 64 random hex characters)")
    p.add_argument("--readonly", action="store_true", help="an image layer instead of a "
                   "container layer")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--size", help="quota for the layer, e.g. 10G (drivers with quotas)")
    p.set_defaults(func=cmd_layer_create)
    p = lsub.add_parser("ls", help="list layers")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-trunc", action="store_true", help="show full ids")
    p.set_defaults(func=cmd_layer_ls)
    p = lsub.add_parser("rm", help="remove layers (refused while mounted or with children)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_layer_rm)
    p = lsub.add_parser("mount", help="mount a layer's merged view; prints the mount point")
    p.add_argument("id")
    p.add_argument("target", nargs="?", help="where (default ROOT/mnt/ID)")
    p.add_argument("--readonly", action="store_true")
    p.set_defaults(func=cmd_layer_mount)
    p = lsub.add_parser("umount", help="unmount a layer (or --all)")
    p.add_argument("id", nargs="?")
    p.add_argument("target", nargs="?")
    p.add_argument("--all", action="store_true", help="everything this root mounted")
    p.add_argument("--force", action="store_true", help="unmount even if others use it")
    p.set_defaults(func=cmd_layer_umount)
    p = lsub.add_parser("diff", help="write a layer's changes as an OCI layer tar")
    p.add_argument("id")
    p.add_argument("-o", "--output", help="file (default: stdout, if not a terminal)")
    p.set_defaults(func=cmd_layer_diff)
    p = lsub.add_parser("apply", help="a new read-only layer from an OCI layer tar "
                        "(gzip/zstd/plain)")
    p.add_argument("file", help="tar file, or - for stdin")
    p.add_argument("--parent")
    p.add_argument("--id")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_layer_apply)
    p = lsub.add_parser("changes", help="what a layer changed: A added, C changed, D deleted")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_layer_changes)
    p = lsub.add_parser("inspect", help="everything known about a layer, as JSON")
    p.add_argument("id")
    p.set_defaults(func=cmd_layer_inspect)
