"""What every command group shares: the global options, subcommand parsers, opening the
root, JSON and size rendering.

No rich here (:mod:`.console` has the consoles): ``layerfs run`` and ``exec`` import this
module on their fast path, and a container start is timed against runc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

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


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
             error: Callable[[str], None], interrupted: Callable[[], None] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; every failure a user can cause is one
    line through ``error`` and an exit code, never a traceback."""
    from ..errors import LayerfsError

    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LayerfsError as e:
        error(str(e))
        return 1
    except KeyboardInterrupt:
        if interrupted is not None:
            interrupted()
        return 130
    except BrokenPipeError:
        return 141
    except PermissionError as e:
        error(f"{e} (most commands need root)")
        return 1


def command_parser(sub: SubParsers, name: str, help: str, description: str, examples: str,
                   **kw: Any) -> argparse.ArgumentParser:
    """A subcommand whose --help teaches: a wrapped description, then examples."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=textwrap.fill(description, 88),
        epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw)
    return parser


def open_store(args: argparse.Namespace) -> LayerStore:
    """The root the global options name."""
    from ..layers import LayerStore

    return LayerStore.open(args.root, args.driver, args.storage_opt or None)


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
