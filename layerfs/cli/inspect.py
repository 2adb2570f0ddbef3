"""``layerfs explain``, ``image explore``, ``image diff``, ``union stats``: seeing inside.

Thin, like every command group: resolve what the user named (an image, a layer, a
container), ask :mod:`layerfs.inspect`, render. Output is plain lines (or ``--json``),
so it reads the same in a pipe as on a terminal; the explorer alone is a terminal UI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from ..errors import InvalidArgument, NotFound
from .common import command_parser, emit_json, human_size, open_store

TYPE_CHECKING = False       # typing and pathlib load when a command runs (--help is light)

if TYPE_CHECKING:
    from ..images import ImageStore
    from ..inspect.targets import Target


# --- opening what the user named ----------------------------------------------------------

@contextlib.contextmanager
def _images(args: argparse.Namespace) -> Iterator[ImageStore]:
    from ..images import ImageStore

    with open_store(args) as layers:
        yield ImageStore(layers, recover=False)


def _progress(args: argparse.Namespace) -> Callable[[int, int], None] | None:
    """A one-line "indexing layer N of M" on a terminal's stderr (never in a pipe)."""
    if getattr(args, "json", False) or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r\x1b[2Kindexed layer {done} of {total}" + end)
        sys.stderr.flush()

    return show


def _container(images: ImageStore, ref: str) -> Target:
    """A container's layer on its image. The runtime's own manager reads its table (without
    the crash recovery it runs for ``run``/``ps``: looking must not change anything)."""
    from ..inspect.targets import container_target
    from ..runtime.containers import ContainerManager

    with ContainerManager(images.layers.root, images.layers.driver.name, recover=False) as mgr:
        st = mgr.get(ref)
    return container_target(images, st.id, st.name or st.id[:12], st.image, st.layer)


def resolve_target(images: ImageStore, *, image: str | None = None, layer: str | None = None,
                   container: str | None = None) -> Target:
    from ..inspect.targets import image_target, layer_target

    given = [x for x in (image, layer, container) if x]
    if len(given) != 1:
        raise InvalidArgument("name one of --image IMAGE, --layer ID or --container NAME")
    if image:
        return image_target(images, image)
    if layer:
        return layer_target(images, layer)
    assert container
    return _container(images, container)


def resolve_any(images: ImageStore, text: str) -> Target:
    """``image:REF``, ``layer:ID``, ``container:NAME``, or a bare name tried as an image,
    then a container, then a layer."""
    kind, sep, rest = text.partition(":")
    if sep and kind in ("image", "layer", "container") and rest:
        return resolve_target(images, **{kind: rest})
    tried = []
    for kind in ("image", "container", "layer"):
        try:
            return resolve_target(images, **{kind: text})
        except NotFound as err:
            tried.append(str(err))
    raise NotFound(f"{text!r} is no image, container or layer here ({'; '.join(tried)})")


# --- explain ------------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    from ..inspect.explain import explain, human_lines
    from ..inspect.index import Indexer
    from ..inspect.targets import ensure_indexed

    with _images(args) as images:
        target = resolve_target(images, image=args.image, layer=args.layer,
                                container=args.container)
        indexer = Indexer(images.layers, images)
        # The first look at an image indexes its layers (shown on a terminal); explain
        # itself then reads only the entries of the paths it is asked about.
        ensure_indexed(indexer, target, _progress(args))
        results = [explain(images.layers, indexer, target, p) for p in args.paths]
    if args.json:
        emit_json([r.as_dict() for r in results] if len(results) > 1 else results[0].as_dict())
    else:
        for r in results:
            print("\n".join(human_lines(r, human_size)))
    return 0 if all(r.exists for r in results) else 1


# --- union stats --------------------------------------------------------------------------

_COUNTER_GROUPS = (
    ("lookups", ("lookups", "lookups_negative", "lookup_name_stats", "lookup_whiteout_probes",
                 "lookup_opaque_probes")),
    ("copy-up", ("copy_ups", "copy_up_bytes", "dir_copy_ups")),
    ("whiteouts", ("whiteouts_created", "whiteouts_removed")),
    ("other", ()),
)


def cmd_union_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    with _images(args) as images:
        layers = images.layers
        target = _union_mount(images, args.target)
        counters = layers.driver.counters(Path(target), reset=args.reset)
        if counters is None:
            raise InvalidArgument(f"{layers.driver.name} keeps no union counters: they are "
                                  f"the aufs driver's FUSE union's (use aufs with mode=fuse)")
    if args.json:
        emit_json({"mount": target, "counters": counters, "reset": args.reset})
        return 0
    from rich.table import Table

    from .console import out

    print(f"union counters of {target}" + (" (now reset to zero)" if args.reset else ""))
    table = Table()
    table.add_column("group")
    table.add_column("counter")
    table.add_column("value", justify="right")
    shown: set[str] = set()
    for group, keys in _COUNTER_GROUPS:
        rest = keys or tuple(sorted(k for k in counters if k not in shown))
        for key in rest:
            if key in counters:
                value = counters[key]
                table.add_row(group, key, human_size(value) if key.endswith("_bytes")
                              else str(value))
                shown.add(key)
                group = ""
    out.print(table)
    return 0


def _union_mount(images: ImageStore, text: str) -> str:
    """The mount point ``text`` names: a mount of this root, or a container's rootfs."""
    layers = images.layers
    mounts = layers.store.list_mounts()
    if os.path.isdir(text):
        real = os.path.realpath(text)
        for m in mounts:
            if os.path.realpath(m.target) == real:
                return m.target
        raise NotFound(f"{text} is not a mount of this root ({layers.root}); see "
                       f"`layerfs layer ls` for mounted layers")
    target = _container(images, text)
    top = target.layers[-1].layer_id
    for m in mounts:
        if m.layer == top:
            return m.target
    raise InvalidArgument(f"container {text} is not running: its union is not mounted")


# --- image diff ----------------------------------------------------------------------------

def cmd_image_diff(args: argparse.Namespace) -> int:
    from ..inspect.diff import diff_stacks
    from ..inspect.index import Indexer
    from ..inspect.targets import load_stack

    with _images(args) as images:
        a = resolve_any(images, args.a)
        b = resolve_any(images, args.b)
        indexer = Indexer(images.layers, images)
        progress = _progress(args)
        result = diff_stacks(a, load_stack(indexer, a, progress=progress),
                             b, load_stack(indexer, b, progress=progress))
    if args.json:
        emit_json(result.as_dict())
        return 0
    print("\n".join(result.human_lines(human_size, limit=None if args.all else 200)))
    return 0


# --- image explore -------------------------------------------------------------------------

def cmd_image_explore(args: argparse.Namespace) -> int:
    from ..inspect import explore
    from ..inspect.index import Indexer
    from ..inspect.targets import image_target, load_stack

    interactive = not (args.json or args.ci)
    if interactive and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InvalidArgument("image explore is a terminal UI and this is not a terminal; "
                              "use --json for the analysis, or --ci to check it against "
                              "rules")
    with _images(args) as images:
        target = image_target(images, args.image)
        stack = load_stack(Indexer(images.layers, images), target,
                           progress=_progress(args))
    analysis = explore.Analysis.of(target, stack)
    report = None
    if args.ci:
        report = explore.evaluate(analysis.efficiency, lowest_efficiency=args.lowest_efficiency,
                                  highest_wasted_bytes=args.highest_wasted_bytes,
                                  highest_user_wasted_percent=args.highest_user_wasted_percent)
    if args.json:
        data = analysis.as_dict()
        if report is not None:
            data["ci"] = report.as_dict()
        emit_json(data)
    elif report is not None:
        print("\n".join(explore.summary_lines(analysis, human_size)
                        + explore.report_lines(report)))
    else:
        from ..inspect.tui import ExploreApp

        ExploreApp(analysis, human_size).run()
    return 1 if report is not None and not report.passed else 0


# --- parser -------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command_parser(
        sub, "explain", "where a path comes from, what it hides and what finding it costs",
        "Explain PATH in an image, a layer (with its parents) or a container: the layer that "
        "serves it (and the command that made that layer), the lower copies it hides "
        "(replaced, whited out, under an opaque directory) and the bytes they waste; on "
        "overlay2 whether it is metacopy, redirected or copied up; on aufs the branch probes "
        "a lookup costs; on btrfs and devicemapper the bytes it shares with other layers. "
        "Exit status 1 if a path does not exist.",
        "  layerfs explain --image app /usr/lib/libssl.so.3\n"
        "  layerfs explain --container web /etc/nginx/nginx.conf --json\n"
        "  layerfs explain --layer 3f2a9c1b0d4e /a/b/c/d/e\n")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--image", metavar="IMAGE", help="look in this image (a name or id)")
    p.add_argument("--layer", metavar="ID", help="look in this layer and its parents")
    p.add_argument("--container", metavar="NAME", help="look in this container's layer "
                   "and its image")
    p.add_argument("--json", action="store_true", help="everything as JSON (a list for "
                   "several paths)")
    p.set_defaults(func=cmd_explain)

    union = command_parser(sub, "union", "the aufs union's counters",
                           "Commands for the aufs driver's FUSE union filesystem.",
                           "  layerfs union stats web\n"
                           "  layerfs union stats --reset web\n")
    usub = union.add_subparsers(dest="union_command", metavar="ACTION", required=True)
    p = command_parser(
        usub, "stats", "the union's lookup, whiteout-probe and copy-up counters",
        "Counters of a mounted aufs union (FUSE mode): lookups and the branch probes they "
        "made (name stats, whiteout probes, opaque probes), copy-ups and their bytes, "
        "whiteouts made. MOUNT is a mount point of this root; CONTAINER a running "
        "container. --reset sets them to zero after reading.",
        "  layerfs union stats /var/lib/layerfs/mnt/3f2a9c1b0d4e\n"
        "  layerfs union stats web --json\n"
        "  layerfs union stats --reset web\n")
    p.add_argument("target", metavar="MOUNT|CONTAINER")
    p.add_argument("--reset", action="store_true", help="zero the counters after reading")
    p.add_argument("--json", action="store_true", help="the counters as JSON")
    p.set_defaults(func=cmd_union_stats)


def register_image(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``image explore`` and ``image diff``, in the ``image`` group."""
    from ..inspect import rules as explore  # the defaults alone: --help loads no index

    p = command_parser(
        isub, "explore", "browse an image's layers and files; wasted space, efficiency",
        "A terminal UI in the manner of dive: the layers with the command that made each "
        "and its size; the file tree as of the selected layer with what it added, changed "
        "and deleted (or, aggregated, every layer up to it); the space wasted by files "
        "later layers overwrite or delete; dive's efficiency score. Press ? for the keys. "
        "Without a terminal use --json, or --ci to fail (exit status 1) when a rule does, "
        "as dive's CI mode does.",
        "  layerfs image explore lab/app\n"
        "  layerfs image explore lab/app --json | jq .efficiency\n"
        "  layerfs image explore lab/app --ci --highest-wasted-bytes 10M\n")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="the analysis as JSON, no UI")
    p.add_argument("--ci", action="store_true", help="check the rules below, no UI; exit "
                   "status 1 if one fails")
    p.add_argument("--lowest-efficiency", default=explore.DEFAULT_LOWEST_EFFICIENCY,
                   metavar="RATIO", help="fail below this efficiency (default %(default)s; "
                   "'disabled' to skip)")
    p.add_argument("--highest-wasted-bytes", default=explore.DEFAULT_HIGHEST_WASTED_BYTES,
                   metavar="SIZE", help="fail above this many wasted bytes, e.g. 20M "
                   "(default %(default)s)")
    p.add_argument("--highest-user-wasted-percent",
                   default=explore.DEFAULT_HIGHEST_USER_WASTED_PERCENT, metavar="RATIO",
                   help="fail if wasted bytes exceed this ratio of the bytes added above the "
                   "base layer (default %(default)s)")
    p.set_defaults(func=cmd_image_explore)

    p = command_parser(
        isub, "diff", "files added, changed and deleted between two images",
        "Compare two images, layers or containers (A, then B): files added, changed and "
        "deleted from A to B with their sizes, and the layers both share (same chain id: "
        "stored once). A and B are image names or ids, or layer:ID, container:NAME.",
        "  layerfs image diff busybox lab/app\n"
        "  layerfs image diff container:web lab/web --json\n"
        "  layerfs image diff layer:3f2a9c1b0d4e layer:9b1d5e0a7c3f\n")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", help="the changes and shared layers as "
                   "JSON")
    p.add_argument("--all", action="store_true", help="list every change (default: 200)")
    p.set_defaults(func=cmd_image_diff)


__all__ = ["register", "register_image", "resolve_any", "resolve_target"]
