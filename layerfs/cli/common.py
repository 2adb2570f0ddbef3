"""What every command group shares: the global options, subcommand parsers, opening the
root, JSON and size rendering.

No rich here (:mod:`.console` has the consoles): ``layerfs run`` and ``exec`` import this
module on their fast path, and a container start is timed against runc.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

from ..errors import LayerfsError

if TYPE_CHECKING:
    from ..layers import LayerStore

DEFAULT_ROOT = "/var/lib/layerfs"

#: What ``parser.add_subparsers()`` returns (argparse names the class privately).
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """``--root``, ``--driver`` and ``-s``, defaulting to the ``LAYERFS_*`` variables."""
    parser.add_argument("--root", default=os.environ.get("LAYERFS_ROOT", DEFAULT_ROOT),
                        help="layerfs root directory (default: %(default)s)")
    parser.add_argument("--driver", default=os.environ.get("LAYERFS_DRIVER") or None,
                        help="storage driver; default: the root's driver, else auto-select")
    env_opts = [o for o in os.environ.get("LAYERFS_STORAGE_OPTS", "").split(",") if o]
    parser.add_argument("-s", "--storage-opt", action="append", default=env_opts,
                        metavar="KEY=VALUE", help="driver option (repeatable), e.g. "
                        "metacopy=true for overlay2")


def command_parser(sub: SubParsers, name: str, help: str, description: str, examples: str,
                   **kw: Any) -> argparse.ArgumentParser:
    """A subcommand whose --help teaches: a wrapped description, then examples."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=textwrap.fill(description, 88),
        epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw)
    return parser


@contextlib.contextmanager
def open_store(args: argparse.Namespace) -> Iterator[LayerStore]:
    """``with open_store(args) as store:`` the root the global options name. A command
    that made the root and then failed before storing anything removes it again:
    ``layerfs --root NEW layer apply bad.tar`` leaves no NEW behind."""
    from ..layers import LayerStore

    store = LayerStore.open(args.root, args.driver, args.storage_opt or None)
    try:
        yield store
    except BaseException:
        store.discard()
        raise
    store.close()


def with_source(err: LayerfsError, source: str) -> LayerfsError:
    """``err`` with the file (or stream) it is about named first, as one more error of
    its type (the library sees a stream; the command knows the path)."""
    message = str(err)
    if message.startswith(f"{source}:"):
        return err
    try:
        return type(err)(f"{source}: {message}")
    except TypeError:   # an error type with other constructor arguments
        return LayerfsError(f"{source}: {message}")


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)
