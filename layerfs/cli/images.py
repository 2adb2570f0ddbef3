"""``layerfs import|load|save|images|rmi|tag|history|image``: images on top of the layers.

Thin, like the rest of the CLI: parse, call :class:`~layerfs.images.ImageStore`,
render. Long loads and saves draw rich progress bars on a terminal (stderr),
never in pipes.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from ..errors import InvalidArgument, LayerfsError
from .common import SubParsers, command_parser, emit_json, human_size, open_store, with_source

TYPE_CHECKING = False       # typing, rich and the library load when a command runs
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from rich.progress import (
        Progress,
        TaskID,
    )

    from ..images import ImageStore


@contextmanager
def image_store(args: argparse.Namespace) -> Iterator[ImageStore]:
    from ..images import ImageStore

    with open_store(args) as layers:
        yield ImageStore(layers)


class RichProgress:
    """The library's progress protocol drawn with rich bars (one per layer)."""

    def __init__(self, progress: Progress) -> None:
        self._p = progress
        self._tasks: dict[str, TaskID] = {}

    def begin(self, key: str, description: str, total: int | None) -> None:
        if key not in self._tasks:
            self._tasks[key] = self._p.add_task(description, total=total)

    def advance(self, key: str, amount: int) -> None:
        task = self._tasks.get(key)
        if task is not None and amount:
            self._p.advance(task, amount)

    def end(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            self._p.remove_task(task)


@contextmanager
def progress_for(args: argparse.Namespace) -> Iterator[RichProgress | None]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from .console import err

    if getattr(args, "quiet", False) or not err.is_terminal:
        yield None
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)
    with bars:
        yield RichProgress(bars)


def _age(created: Any) -> str:
    """``3 days ago`` for an RFC 3339 time or a Unix timestamp."""
    import datetime

    if created is None:
        return "-"
    try:
        if isinstance(created, int | float):
            when = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
        else:
            text = str(created).replace("Z", "+00:00")
            if "." in text:  # Python parses at most 6 fractional digits
                head, _, tail = text.partition(".")
                digits = "".join(c for c in tail if c.isdigit())
                text = f"{head}.{digits[:6]}{tail[len(digits):]}"
            when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return str(created)
    if when.tzinfo is None:  # a config without a zone: RFC 3339 says UTC is meant
        when = when.replace(tzinfo=datetime.UTC)
    seconds = (datetime.datetime.now(tz=datetime.UTC) - when).total_seconds()
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                       ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "seconds ago"


# --- commands ---------------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace) -> int:
    with image_store(args) as images, progress_for(args) as progress:
        try:
            if args.source == "-":
                image = images.import_rootfs(None, args.name, stream=sys.stdin.buffer,
                                             changes=args.change or (), message=args.message,
                                             progress=progress)
            else:
                image = images.import_rootfs(args.source, args.name, changes=args.change or (),
                                             message=args.message, progress=progress)
        except InvalidArgument as e:
            raise with_source(e, "stdin" if args.source == "-" else args.source) from e
    print(image.id)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    with image_store(args) as images, progress_for(args) as progress:
        if args.input in (None, "-"):
            if sys.stdin.isatty():
                raise InvalidArgument("give an archive with -i FILE, or pipe one into stdin")
            loaded = images.load(stream=sys.stdin.buffer, repo=args.name, progress=progress)
        else:
            loaded = images.load(args.input, repo=args.name, progress=progress)
    for image in loaded:   # the names in the archive, not every name the image has here
        if image.loaded_as:
            for name in image.loaded_as:
                print(f"Loaded image: {name}")
        else:
            print(f"Loaded image ID: {image.id}")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    with image_store(args) as images, progress_for(args) as progress:
        if args.output in (None, "-"):
            if args.format == "oci-dir":
                raise InvalidArgument("--format oci-dir writes a directory: give -o DIR")
            if sys.stdout.isatty():
                raise InvalidArgument("refusing to write an archive to a terminal; use -o FILE "
                                      "or a pipe")
            images.save(args.images, stream=sys.stdout.buffer, format=args.format,
                        compression=args.compression, progress=progress)
            sys.stdout.buffer.flush()
        else:
            images.save(args.images, args.output, format=args.format,
                        compression=args.compression, progress=progress)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from .console import print_table

    with image_store(args) as images:
        listed = images.images()
    if args.filter:
        repo = args.filter.split(":", 1)[0]
        tagged = ":" in args.filter.rsplit("/", 1)[-1]
        listed = [i for i in listed if any(
            n == args.filter if tagged else n.rsplit(":", 1)[0] == repo for n in i.names)]
    if args.json:
        emit_json([dict(i.as_dict(), config=i.config) for i in listed])
        return 0
    if args.quiet:
        for image in listed:
            print(image.id if args.no_trunc else image.short_id)
        return 0
    rows = []
    for image in listed:
        ident = image.id if args.no_trunc else image.short_id
        created = _age(image.config.get("created"))
        for name in image.names or ["<none>:<none>"]:
            repo, _, tag = name.rpartition(":")
            rows.append([repo, tag, ident, created, human_size(image.size)])
    count = f"{len(listed)} image{'s' if len(listed) != 1 else ''}"
    if len(rows) != len(listed):
        count += f", {len(rows)} names"
    print_table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], rows,
                title=f"images ({count})", no_trunc=args.no_trunc)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from .boundary import error_line

    failures = 0
    with image_store(args) as images:
        for ref in args.images:
            try:
                for what, ident in images.remove(ref, force=args.force):
                    print(f"{what}: {ident}")
            except LayerfsError as e:
                if len(args.images) == 1:
                    raise
                error_line(str(e))
                failures += 1
    return 1 if failures else 0


def cmd_tag(args: argparse.Namespace) -> int:
    with image_store(args) as images:
        images.tag(args.source, args.target)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from .console import print_table

    with image_store(args) as images:
        image = images.get(args.image)
        entries = images.history(args.image)
    if args.json:
        emit_json([e.__dict__ for e in entries])
        return 0
    columns = ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]
    rows = []
    for i, e in enumerate(entries):
        ident = (image.id if args.no_trunc else image.short_id) if i == 0 else "<missing>"
        created_by = e.created_by if args.no_trunc or len(e.created_by) <= 45 else \
            e.created_by[:44] + "…"
        rows.append([ident, _age(e.created), created_by,
                     "0 B" if e.empty_layer else human_size(e.size), e.comment])
    if not any(row[-1] for row in rows):   # no comment anywhere: no empty last column
        columns.pop()
        rows = [row[:-1] for row in rows]
    print_table(columns, rows, no_trunc=args.no_trunc,
                title=f"history of {image.names[0] if image.names else image.short_id}")
    return 0


def cmd_image_inspect(args: argparse.Namespace) -> int:
    with image_store(args) as images:
        emit_json([images.inspect(ref) for ref in args.images])
    return 0


def cmd_image_prune(args: argparse.Namespace) -> int:
    with image_store(args) as images:
        for what, ident in images.prune():
            print(f"{what}: {ident}")
    return 0


# --- parser -------------------------------------------------------------------------------------

def _add_import(sub: SubParsers) -> None:
    p = command_parser(sub, "import", "a one-layer image from a root filesystem tar or directory",
                       "Create an image whose only layer is ROOTFS (like `docker import`): a tar "
                       "(plain, gzip or zstd), a directory, or - for stdin. Prints the image id.",
                       "  layerfs import rootfs.tar busybox:1.36\n"
                       "  layerfs import ./rootfs lab/box -c 'CMD [\"/bin/sh\"]' -c 'ENV LANG=C'\n"
                       "  zstd -dc rootfs.tar.zst | layerfs import - scratch:base\n")
    p.add_argument("source", metavar="ROOTFS.tar|DIR|-")
    p.add_argument("name", nargs="?", metavar="NAME[:TAG]", help="name for the image "
                   "(default tag: latest); none: untagged")
    p.add_argument("-c", "--change", action="append", metavar="INSTRUCTION",
                   help="Dockerfile instruction for the config: CMD, ENTRYPOINT, ENV, WORKDIR, "
                   "USER, EXPOSE, LABEL, STOPSIGNAL, VOLUME (repeatable)")
    p.add_argument("-m", "--message", help="comment for the history entry")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import)


def _add_load(sub: SubParsers, name: str = "load") -> None:
    p = command_parser(sub, name, "load images from a docker save archive or an OCI layout",
                       "Load every image of a `docker save` archive or an OCI image layout "
                       "(directory or tar; layers plain, gzip or zstd; the archive itself may be "
                       "gzip/zstd-compressed). Every digest is verified; on any error nothing is "
                       "left behind. Layers already stored (same chain id) are not unpacked again.",
                       "  layerfs load -i busybox.tar\n"
                       "  docker save busybox | layerfs load\n"
                       "  layerfs load -i ./oci-layout --name lab/app   # ref.name 'v1' -> lab/app:v1\n")
    p.add_argument("-i", "--input", metavar="FILE|DIR", help="archive or layout (default: stdin)")
    p.add_argument("--name", metavar="REPO", help="repository for OCI images whose ref.name is "
                   "a bare tag (umoci, skopeo); without it they load untagged")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_load)


def _add_save(sub: SubParsers, name: str = "save") -> None:
    p = command_parser(sub, name, "write images to a docker save archive or an OCI layout",
                       "Write images with their layers, byte for byte as loaded, so digests and "
                       "image ids are kept. Formats: docker (what `docker load` reads), oci (an OCI "
                       "layout in a tar), oci-dir (an OCI layout directory). The output appears "
                       "complete or not at all.",
                       "  layerfs save -o busybox.tar busybox\n"
                       "  layerfs save --format oci --compression zstd -o app.oci.tar lab/app:v1\n"
                       "  layerfs save busybox | docker load\n")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", metavar="FILE|DIR", help="default: stdout (not a terminal)")
    p.add_argument("--format", choices=["docker", "oci", "oci-dir"], default="docker",
                   help="docker (`docker load` reads it), oci (an OCI layout in a tar) or "
                   "oci-dir (an OCI layout directory); default: %(default)s")
    p.add_argument("--compression", choices=["none", "gzip", "zstd"], default="none",
                   help="layer blobs in oci formats (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_save)


def _add_images(sub: SubParsers, name: str = "images") -> None:
    p = command_parser(sub, name, "list images",
                       "List images: one row per name; untagged images show as <none>.",
                       "  layerfs images\n  layerfs images busybox\n  layerfs images --json\n")
    p.add_argument("filter", nargs="?", metavar="REPOSITORY[:TAG]")
    p.add_argument("--json", action="store_true", help="every field and the config, as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="only image ids")
    p.add_argument("--no-trunc", action="store_true", help="full image ids")
    p.set_defaults(func=cmd_images)


def _add_rmi(sub: SubParsers, name: str = "rmi") -> None:
    p = command_parser(sub, name, "remove images (refused while a container uses them)",
                       "Remove a name; the image goes with its last name, and its layers with the "
                       "last image using them. Refused while a container uses the image, or its "
                       "top layer is mounted.",
                       "  layerfs rmi busybox:1.36\n  layerfs rmi -f 3f2a9c1b0d4e\n")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true",
                   help="remove an image given by id even if it has several names")
    p.set_defaults(func=cmd_rmi)


def _add_history(sub: SubParsers, name: str = "history") -> None:
    p = command_parser(sub, name, "how an image was built, layer by layer",
                       "The image config's history, newest first, with the size of each layer.",
                       "  layerfs history busybox\n  layerfs history --no-trunc --json lab/app\n")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="the history entries, as JSON")
    p.add_argument("--no-trunc", action="store_true", help="full ids and commands")
    p.set_defaults(func=cmd_history)


def register(sub: SubParsers) -> None:
    _add_import(sub)
    _add_load(sub)
    _add_save(sub)
    _add_images(sub)
    _add_rmi(sub)
    p = command_parser(sub, "tag", "give an image another name",
                       "Point TARGET at the image SOURCE names (a name or an id).",
                       "  layerfs tag busybox lab/busybox:stable\n")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET[:TAG]")
    p.set_defaults(func=cmd_tag)
    _add_history(sub)

    image = command_parser(sub, "image", "image commands: inspect, ls, rm, prune, ...",
                           "Images are named stacks of read-only layers plus a config "
                           "(command, environment, ...). See also the top-level import, load, "
                           "save, images, rmi, tag and history.",
                           "  layerfs image ls\n  layerfs image inspect busybox\n"
                           "  layerfs image prune\n")
    isub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    p = command_parser(isub, "inspect", "everything about images, as JSON",
                       "Like `docker image inspect`, plus where layerfs keeps the layers.",
                       "  layerfs image inspect busybox\n"
                       "  layerfs image inspect busybox | jq '.[0].Config.Cmd'\n")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_image_inspect)
    _add_images(isub, "ls")
    _add_rmi(isub, "rm")
    _add_load(isub, "load")
    _add_save(isub, "save")
    _add_history(isub, "history")
    from .inspect import register_image

    register_image(isub)
    p = command_parser(isub, "prune", "remove untagged images and layers no image uses",
                       "Untagged images no container uses are removed, then every image layer "
                       "nothing holds.", "  layerfs image prune\n")
    p.set_defaults(func=cmd_image_prune)


__all__ = ["register"]
