"""The ``layerfs`` executable's entry point.

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

_FAST = {"run", "exec"}
_GLOBAL_WITH_VALUE = {"--root", "--driver", "-s", "--storage-opt"}


def _command(argv: list[str]) -> str | None:
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL_WITH_VALUE:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return arg
    return None


def run_here(args: list[str]) -> int:
    """Run the command in this process."""
    if _command(args) in _FAST and not {"-h", "--help"} & set(args):
        from .cli.run import main as run_main

        return run_main(args)
    from .cli import main as cli_main

    return cli_main(args)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        from .cli.boundary import install_signal_handlers

        install_signal_handlers()
        return run_here(args)
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


if __name__ == "__main__":
    sys.exit(main())
