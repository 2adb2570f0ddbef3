"""The CLI boundary: where every command's failure becomes one line on stderr and an exit code.

Commands raise; nothing below the CLI prints errors. :func:`dispatch` parses the
command line, checks what every command needs (a root path, root privileges), runs
the command, and turns what it raises into ``layerfs: error: ...`` by *type*:

==========================================  ============================================  ====
raised                                      says                                          exit
==========================================  ============================================  ====
:class:`~layerfs.errors.LayerfsError`       its message (they name ids and paths)         1
``FileNotFoundError`` & other ``OSError``   ``PATH: <cause>`` (read-only, full, ...)      1
``sqlite3.OperationalError``                the root's database and the cause             1
``subprocess.CalledProcessError``           the command, its exit code, its last line     1
``KeyboardInterrupt`` (Ctrl-C)              ``interrupted``                               130
SIGTERM / SIGHUP                            ``terminated`` / ``hangup``                   143/129
``BrokenPipeError`` (``| head``)            nothing                                       141
==========================================  ============================================  ====

Anything else is a bug in layerfs and keeps its traceback. ``LAYERFS_DEBUG=1`` shows
the traceback of the handled ones too.

SIGTERM and SIGHUP raise :class:`Terminated` in the main thread, the way SIGINT
raises ``KeyboardInterrupt``, so the ``finally`` blocks and ``except BaseException``
roll-backs of the library run (a half-applied layer is removed before the exit).

The daemon's workers call the same code (``layerfs._entry.run_here``), so they
report errors exactly like a command run in the terminal. This module imports only
the standard library: ``layerfs run`` passes through it on its fast path.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

TYPE_CHECKING = False       # typing costs ms at import (docs/architecture.md, "Import time")
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

NEEDS_ROOT = ("layerfs needs root: it mounts filesystems, and creates loop devices, "
              "namespaces and cgroups (run it with sudo, or as root)")


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM or SIGHUP, so that clean-up code runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def word(self) -> str:
        return "hangup" if self.signum == signal.SIGHUP else "terminated"


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP raise :class:`Terminated` (unless ignored, as under nohup)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise_terminated)


def error_line(message: str) -> None:
    """``layerfs: error: MESSAGE`` on stderr, one line whatever the terminal's width."""
    text = " ".join(message.split("\n"))
    try:
        sys.stderr.write(f"layerfs: error: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):   # stderr closed: the exit code still says it
        pass


# --- exceptions -> one line ------------------------------------------------------------------

_OS_CAUSES = {
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory, not a file",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "directory not empty",
    errno.EBUSY: "busy (mounted, or in use)",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
}


def _os_error(err: OSError, root: str | None) -> str:
    cause = _OS_CAUSES.get(err.errno or 0) or err.strerror or str(err)
    path = err.filename
    if path is None:
        where = f"{root}: " if root and err.errno in (errno.ENOSPC, errno.EROFS,
                                                      errno.EDQUOT) else ""
    else:
        where = f"{os.fsdecode(path)}: "
        if err.filename2 is not None:
            where = f"{os.fsdecode(path)} -> {os.fsdecode(err.filename2)}: "
    if err.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
        cause += " (layerfs needs root)"
    return f"{where}{cause}"


def _read_only(path: str | None) -> bool:
    try:
        return bool(path) and bool(os.statvfs(path).f_flag & os.ST_RDONLY)  # type: ignore[arg-type]
    except OSError:
        return False


def _nearly_full(root: str | None) -> bool:
    # sqlite reports a write that found no space as "disk I/O error" when it was the
    # WAL index that could not grow: look at the file system instead of the message,
    # with the store's own test (the sqlite error means the store is loaded).
    from pathlib import Path

    from ..metastore import disk_full

    return root is not None and disk_full(Path(root))


def _sqlite_error(err: Exception, root: str | None) -> str:
    text = str(err)
    where = f"the metadata database in {root}" if root else "the metadata database"
    if _read_only(root):
        return f"{where} cannot be written: {text} ({root} is on a read-only file system)"
    if "readonly database" in text:
        hint = ("layerfs needs root" if os.geteuid() != 0 else
                "is the database file read-only?")
        return f"{where} cannot be written: {text} ({hint})"
    if "disk is full" in text or _nearly_full(root):
        return f"{where}: {text} (no space left on the file system of {root})"
    if "unable to open database file" in text:
        return f"{where} cannot be opened: {text} (can its directory be written?)"
    return f"{where}: {text}"


def describe(exc: BaseException, root: str | None = None) -> str | None:
    """The one line that reports ``exc``, or None when it is not a failure we expected
    (a bug: keep the traceback). ``root`` is the layerfs root the command worked on."""
    from ..errors import LayerfsError

    if isinstance(exc, LayerfsError):
        return str(exc)
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        return _sqlite_error(exc, root)
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None and isinstance(exc, subprocess.CalledProcessError):
        from ..errors import command_error
        return str(command_error(exc))
    if isinstance(exc, OSError):
        return _os_error(exc, root)
    return None


# --- running one command ---------------------------------------------------------------------

def _debug() -> bool:
    return os.environ.get("LAYERFS_DEBUG", "") not in ("", "0")


def _quiet_stdout() -> None:
    # After EPIPE, the interpreter's final flush of stdout would fail again and print
    # "Exception ignored ... BrokenPipeError": point fd 1 at /dev/null instead.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def call(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run one parsed command; every failure ends as one line and an exit code."""
    root = getattr(args, "root", None)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except Terminated as t:
        error_line(t.word)
        return t.exit_code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        message = describe(exc, root)
        if message is None:
            raise
        if _debug():
            import traceback

            traceback.print_exc()
        error_line(message)
        return EXIT_ERROR


def _tag_command_parsers(parser: argparse.ArgumentParser) -> None:
    """Every subcommand's parser records itself in the namespace, so that an unknown
    option is reported with *that* command's usage (``layerfs run --nosuch``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_command_parser=sub)
                _tag_command_parsers(sub)


def check_root_option(args: argparse.Namespace) -> str | None:
    """Why the global ``--root`` cannot be used, or None."""
    root = getattr(args, "root", None)
    if root is not None and not str(root).strip():
        return ("--root is empty (is LAYERFS_ROOT set to ''?): give a directory, e.g. "
                "--root /var/lib/layerfs")
    return None


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` with ``parser`` and run the command it names (the ``func`` default)."""
    _tag_command_parsers(parser)
    args, extra = parser.parse_known_args(argv)
    if extra:
        command_parser: argparse.ArgumentParser = getattr(args, "_command_parser", parser)
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func = getattr(args, "func", None)
    if func is None:
        command_parser = getattr(args, "_command_parser", parser)
        command_parser.print_help(sys.stderr)
        return EXIT_USAGE
    problem = check_root_option(args)
    if problem:
        error_line(problem)
        return EXIT_USAGE
    if os.geteuid() != 0 and not getattr(args, "without_root", False):
        error_line(NEEDS_ROOT)
        return EXIT_ERROR
    install_signal_handlers()
    return call(func, args)


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "NEEDS_ROOT", "Terminated", "call",
           "describe", "dispatch", "error_line", "install_signal_handlers"]
