"""What every command group shares: the global options, subcommand parsers, opening the
root, JSON and size rendering.

No rich here (:mod:`.console` has the consoles): ``layerfs run`` and ``exec`` import this
module on their fast path, and a container start is timed against runc.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..errors import LayerfsError

TYPE_CHECKING = False       # typing costs ms at import; mypy reads TYPE_CHECKING as True

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any

    from ..layers import LayerStore

DEFAULT_ROOT = "/var/lib/layerfs"

#: argparse's type for ``parser.add_subparsers()`` (generic only to the type checker).
if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    SubParsers = argparse._SubParsersAction


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


class _Unbuilt:
    """Stands in for the parser of a subcommand this invocation does not run, and for
    its groups and nested subcommands: every call is accepted and ignored."""

    _actions: tuple[argparse.Action, ...] = ()   # no options, no subcommands to visit

    def __getattr__(self, name: str) -> Any:
        return self._ignore

    def _ignore(self, *args: object, **kwargs: object) -> _Unbuilt:
        return self


_UNBUILT: Any = _Unbuilt()


def wanted_command(argv: Sequence[str] | None) -> str | None:
    """The subcommand ``argv`` runs (``""``: none, as for ``--help``); None when the
    options before it cannot be read for sure, so that every parser gets built."""
    if argv is None:
        return None
    from ..daemon.client import scan  # the one reader of the global options

    root, command = scan(list(argv))
    return None if root is None else command or ""


def subcommands(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                **kw: Any) -> SubParsers:
    """``parser.add_subparsers(**kw)`` that builds only the subcommand ``argv`` runs.

    The others are still registered with their name and one-line help (so ``--help``
    and "invalid choice" read the same), but their parser is a stand-in that ignores
    what their ``register`` adds: building all fifty parsers, argparse calling
    gettext for each and their help texts wrapped, costs more than the rest of a short
    command's start. Without ``argv`` (or when the options before the command cannot
    be read for sure) every parser is built.
    """
    wanted = wanted_command(argv)

    def make(**parser_kw: Any) -> Any:
        name = str(parser_kw.get("prog", "")).rpartition(" ")[2]
        return argparse.ArgumentParser(**parser_kw) if wanted in (None, name) else _UNBUILT

    factory: Any = make            # argparse calls parser_class(**kwargs); any callable does
    sub: SubParsers = parser.add_subparsers(parser_class=factory, **kw)
    sub.layerfs_wanted = wanted  # type: ignore[attr-defined]  # for command_parser
    return sub


def command_parser(sub: SubParsers, name: str, help: str, description: str, examples: str,
                   **kw: Any) -> argparse.ArgumentParser:
    """A subcommand whose --help teaches: a wrapped description, then examples."""
    if getattr(sub, "layerfs_wanted", None) not in (None, name):
        return sub.add_parser(name, help=help, **kw)      # not run: no text to wrap
    import textwrap

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
    import json

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
