"""The ``layerfs`` executable's entry point.

First the thin client (:mod:`layerfs.daemon.client`, standard library only):
when the root's daemon answers, the command runs there and we only relay
signals and return its status. Otherwise it runs here (:func:`run_here`), which
is also what the daemon's worker calls: one code path for both.

Container commands are latency-sensitive (``layerfs run --rm IMG true`` is
timed against runc), so they go straight to :mod:`layerfs.cli.run` without
importing rich and every other command group; everything else goes to
:mod:`layerfs.cli`.
"""

from __future__ import annotations

import sys

from .daemon.client import scan

_FAST = {"run", "exec"}


def version_line() -> str:
    from . import __version__

    return f"layerfs {__version__}"


def run_here(args: list[str]) -> int:
    """Run the command in this process (no daemon)."""
    if args == ["--version"]:
        # What the parser's --version action prints, without building the parser.
        sys.stdout.write(version_line() + "\n")
        return 0
    if scan(args)[1] in _FAST and not {"-h", "--help"} & set(args):
        from .cli.run import main as run_main

        return run_main(args)
    from .cli import main as cli_main

    return cli_main(args)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from .daemon.client import delegate

    status = delegate(args)
    return run_here(args) if status is None else status


if __name__ == "__main__":
    sys.exit(main())
