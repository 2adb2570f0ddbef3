"""The ``layerfs`` executable's entry point.

First the thin client (:mod:`layerfs.daemon.client`, standard library only):
when the root's daemon answers, the command runs there and we only relay
signals and return its status. Otherwise it runs here (:func:`run_here`), which
is also what the daemon's worker calls: one code path for both.

Container commands are latency-sensitive (``layerfs run --rm IMG true`` is
timed against runc), so they go straight to :mod:`layerfs.cli.run` without
importing rich and every other command group; everything else goes to
:mod:`layerfs.cli`. Both end in :func:`layerfs.cli.boundary.dispatch`, which
turns every failure into one line on stderr.

Ctrl-C or SIGTERM may come before a command even starts (the imports take a good
part of a second on a busy machine): the handlers are installed first, and an
interrupt during the imports is one word too, never a traceback of them.
"""

from __future__ import annotations

import sys

from .daemon.client import scan

_FAST = {"run", "exec"}


def version_line() -> str:
    from . import __version__

    return f"layerfs {__version__}"


def run_here(args: list[str]) -> int:
    """Run the command in this process: without a daemon, or in the daemon's worker."""
    if args == ["--version"]:
        # What the parser's --version action prints, without building the parser.
        sys.stdout.write(version_line() + "\n")
        return 0
    try:
        from .cli.boundary import install_signal_handlers

        install_signal_handlers()
        return _run(args)
    except KeyboardInterrupt:   # before the command ran: while importing or parsing
        sys.stderr.write("layerfs: error: interrupted\n")
        return 130
    except Exception:
        raise
    except BaseException as exc:   # SIGTERM or SIGHUP before the command ran
        boundary = sys.modules.get("layerfs.cli.boundary")
        if boundary is None or not isinstance(exc, boundary.Terminated):
            raise
        boundary.error_line(exc.word)
        return int(exc.exit_code)


def _run(args: list[str]) -> int:
    if scan(args)[1] in _FAST and not {"-h", "--help"} & set(args):
        from .cli.run import main as run_main

        return run_main(args)
    from .cli import main as cli_main

    return cli_main(args)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from .daemon.client import delegate

    try:
        status = delegate(args)
    except KeyboardInterrupt:   # before the daemon took the command: nothing ran
        sys.stderr.write("layerfs: error: interrupted\n")
        return 130
    return run_here(args) if status is None else status


if __name__ == "__main__":
    sys.exit(main())
