"""What the daemon imports before it serves, so that every worker it forks finds it done.

A worker is a fork of the supervisor: the modules imported here, the drivers loaded,
the regular expressions argparse compiled, are the worker's without a cost of its
own (docs/daemon.md, "what a worker adopts"). Nothing here may create a thread, open
a database or capture the environment or the terminal: workers adopt their client's.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Sequence

from ..errors import LayerfsError

log = logging.getLogger("layerfs.daemon")

#: The modules a worker should find already imported: the CLI and what its commands
#: use. Never modules that capture the process's environment or terminal at import
#: (the bench harness reads LAYERFS_BENCH_SCRATCH): a worker imports those itself.
#: The rich consoles are made on first use, in the worker (layerfs.cli.console).
WARM_MODULES = (
    "layerfs._entry", "layerfs.cli", "layerfs.cli.run", "layerfs.cli.common",
    "layerfs.cli.layers", "layerfs.cli.images", "layerfs.cli.distribution", "layerfs.cli.pool",
    "layerfs.cli.bench", "layerfs.cli.console", "layerfs.daemon.command",
    "layerfs.runtime.containers", "layerfs.images", "layerfs.layers", "layerfs.metastore",
    "layerfs.mount", "layerfs.tar", "layerfs.naivediff", "layerfs.oci", "layerfs.reference",
    "layerfs.digests", "layerfs.changes", "layerfs.plugins",
    "layerfs.runtime.engine", "layerfs.runtime.network", "layerfs.runtime.state",
    "layerfs.pool", "layerfs.distribution", "layerfs.daemon.worker", "rich.console",
    "rich.table", "rich.progress", "sqlite3", "argparse", "tarfile", "gzip", "zstandard", "json",
    "shlex", "tempfile", "uuid",
)


def warm_up(modules: Sequence[str] = WARM_MODULES) -> list[str]:
    """Import what workers will need, and load every driver; returns what failed to import
    (a partial install still serves the commands it can)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            failed.append(f"{name}: {err}")
    from .. import plugins

    for name in plugins.registered():
        try:
            plugins.load(name)
        except LayerfsError as err:
            failed.append(f"driver {name}: {err}")
    _warm_parsers()
    for line in failed:
        log.debug("warm-up: %s", line)
    return failed


#: Command lines the warm-up parses (and throws away): argparse compiles a regular
#: expression per argument layout it meets, once per process; parsed here, they are in
#: ``re``'s cache of every worker.
WARM_ARGV = (["run", "--rm", "-i", "--network", "none", "--name", "x", "-e", "A=1", "img", "true"],
             ["exec", "-i", "x", "sh"], ["ps", "-a"], ["images", "-q"], ["layer", "ls"],
             ["layer", "create", "--parent", "p"], ["layer", "mount", "x"], ["rm", "-f", "x"])


def _warm_parsers() -> None:
    from ..cli import build_parser

    for argv in WARM_ARGV:
        with contextlib.suppress(Exception, SystemExit):
            build_parser(argv).parse_args(argv)
