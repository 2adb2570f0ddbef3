"""``layerfs`` command line: parses, calls the library, renders with rich.

One module per command group, each with a ``register(subparsers)``:

====================  =========================================================
:mod:`.layers`        ``info``, ``drivers``, ``layer ...``: the storage root
:mod:`.pool`          ``pool create|destroy``: btrfs and device-mapper storage
:mod:`.images`        ``import``, ``load``, ``save``, ``images``, ``rmi``, ...
:mod:`.run`           ``run``, ``ps``, ``stop``, ``exec``, ...: containers
:mod:`.system`        ``system df|prune|reset``: the root as a whole
:mod:`.bench`         ``bench``: the benchmark scenarios
:mod:`.distribution`  ``pull``, ``push``, ``login``, ``logout``: OCI registries
:mod:`.inspect`       ``explain``, ``image explore|diff``, ``union stats``: seeing inside
:mod:`.boundary`      where every failure becomes one line on stderr
====================  =========================================================

:mod:`.common` holds what they share; :mod:`.console` the rich consoles. This package
imports neither rich nor any group until :func:`main` builds the parser, because
``layerfs run`` and ``exec`` go straight to :func:`.run.main` (see ``layerfs._entry``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._entry import version_line
from .common import DEFAULT_ROOT, add_global_options, subcommands

EPILOG = f"""\
examples:
  layerfs info                          which driver this root uses, and why not the others
  layerfs --driver overlay2 layer apply rootfs.tar       an image layer from a tar
  layerfs layer create --parent ID      a container layer on top of it
  layerfs layer mount ID                mount it (prints the path), write files, then
  layerfs layer changes ID              see what changed (A added, C changed, D deleted)
  layerfs layer diff ID -o changes.tar  the changes as an OCI layer tar

environment: LAYERFS_ROOT (default {DEFAULT_ROOT}), LAYERFS_DRIVER, LAYERFS_STORAGE_OPTS
(comma-separated KEY=VALUE)."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``layerfs`` parser; given the ``argv`` it will parse, it builds the parser of that
    subcommand only (the others are listed, not built: see :func:`.common.subcommands`)."""
    from ..daemon import command as daemon
    from . import bench, distribution, images, inspect, layers, pool, run, system

    parser = argparse.ArgumentParser(
        prog="layerfs", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Container storage drivers you can mount, measure and learn from.",
        epilog=EPILOG)
    add_global_options(parser)
    parser.add_argument("--version", action="version", version=version_line())
    sub = subcommands(parser, argv, dest="command", metavar="COMMAND")
    for group in (layers, pool, images, inspect, run, system, bench, distribution, daemon):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .boundary import dispatch

    argv = sys.argv[1:] if argv is None else argv
    return dispatch(build_parser(argv), argv)


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
