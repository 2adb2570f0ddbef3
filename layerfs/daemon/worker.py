"""A worker: one client's command, run by the ordinary CLI in a fork of the daemon.

The worker turns itself into the process the client would have been: the
client's stdin, stdout and stderr on fds 0-2, its cwd, umask, environment and
argv, a session of its own (no controlling terminal: the client's terminal
stays the client's), Python's default signal dispositions but for those the client
ignores (which stay ignored, as ``nohup`` and ``cmd &`` want), and ``sys.stdin``,
``sys.stdout``, ``sys.stderr`` made afresh for those fds. Then it calls the
same entry point a cold ``layerfs`` calls (:func:`layerfs._entry.run_here`),
and ends the way the interpreter would: non-daemon threads joined, ``atexit``
handlers run, stdio flushed (exit 120 if stdout cannot be), an uncaught
``KeyboardInterrupt`` re-raised as SIGINT.

Module-level state that depends on the environment or the terminal (rich
consoles, ``os.environ`` read at import) must not be created in the supervisor:
those modules stay out of :data:`layerfs.daemon.warm.WARM_MODULES`, so the
worker imports them itself, after adopting the client's environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from .server import Request

log = logging.getLogger("layerfs.daemon")


def run(request: Request) -> NoReturn:
    code = 1
    try:
        _adopt(request)
        code = _main([os.fsdecode(a) for a in request.args])
    finally:
        os._exit(_finish(code))


def _adopt(request: Request) -> None:
    # The daemon's log handlers write to the daemon's stderr; from here on fd 2 is the
    # client's, and nothing of the daemon's should appear there.
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.disabled = True
    os.setsid()
    # Received descriptors first go above 2 (one may be 0-2 if the daemon was started
    # with those closed), then onto 0-2; a stream the client had closed is closed here.
    high = {n: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for n, fd in request.stdio.items()}
    cwd = fcntl.fcntl(request.cwd, fcntl.F_DUPFD_CLOEXEC, 10)
    for fd in request.fds():
        os.close(fd)
    for n in (0, 1, 2):
        if n in high:
            os.dup2(high[n], n)          # inheritable, as in any process
            os.close(high[n])
        else:
            with contextlib.suppress(OSError):
                os.close(n)
    os.fchdir(cwd)
    os.close(cwd)
    os.umask(request.umask)
    for sig in request.ignored:
        with contextlib.suppress(OSError, ValueError):   # SIGKILL/SIGSTOP cannot be ignored
            signal.signal(sig, signal.SIG_IGN)
    os.environ.clear()
    for entry in request.env:
        key, _, value = entry.partition(b"=")
        with contextlib.suppress(ValueError):
            os.environb[key] = value
    time.tzset()
    sys.argv = [os.fsdecode(request.argv0), *(os.fsdecode(a) for a in request.args)]
    _new_stdio(set(high))


def _new_stdio(present: set[int]) -> None:
    """sys.stdin/stdout/stderr for fds 0-2, made as interpreter start-up makes them."""
    encoding = os.environ.get("PYTHONIOENCODING", "").partition(":")[0] or \
        (sys.__stdout__.encoding if sys.__stdout__ else "utf-8")
    errors = os.environ.get("PYTHONIOENCODING", "").partition(":")[2] or \
        (sys.__stdout__.errors if sys.__stdout__ else "strict")
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    streams: list[io.TextIOWrapper | None] = []
    for fd in (0, 1, 2):
        if fd not in present:
            streams.append(None)
            continue
        mode = "r" if fd == 0 else "w"
        tty = os.isatty(fd)
        buffering = 0 if unbuffered and fd else -1
        raw = open(fd, mode + "b", buffering=buffering, closefd=False)
        streams.append(io.TextIOWrapper(
            raw, encoding=encoding, errors="backslashreplace" if fd == 2 else errors,
            line_buffering=fd == 2 or (tty and fd == 1), write_through=unbuffered and fd != 0))
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams  # type: ignore[misc]


def _main(args: list[str]) -> int:
    from .._entry import run_here

    try:
        return _exit_code(run_here(args))
    except SystemExit as e:
        return _exit_code(e.code)
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        _flush()
        # CPython ends an uncaught KeyboardInterrupt by dying of SIGINT (bpo-1054041).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def _finish(code: int) -> int:
    """What the interpreter does on the way out, minus tearing down the interpreter."""
    import threading

    with contextlib.suppress(BaseException):
        for t in threading.enumerate():
            if t is not threading.current_thread() and not t.daemon:
                t.join()
    import atexit

    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    if not _flush() and code == 0:
        code = 120
    return code


def _flush() -> bool:
    ok = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except Exception:
            if stream is sys.stdout:
                ok = False
    return ok


def recover(root: Path) -> None:
    """Finish or roll back what dead processes left on ``root`` (start-up, and after a
    worker died of a signal): half-made layers and mounts, containers whose runner died."""
    from ..layers import LayerStore
    from ..metastore import MetaStore
    from ..runtime.containers import ContainerManager

    with contextlib.closing(MetaStore(root / "layerfs.db")) as store:
        if store.get_setting("driver") is None:
            return                   # nothing made here yet
    with LayerStore.open(root, recover=False) as layers:
        for action in layers.recover():
            log.info("recovery: %s", action)
    with ContainerManager(root, recover=False) as mgr:
        for cid in mgr.cleanup_stale(raise_errors=False):
            log.info("recovery: finished container %s (its runner had died)", cid[:12])
        for error in mgr.cleanup_errors:
            log.warning("recovery: %s", error)


def keep_store_open(root: Path) -> None:
    """Hold a connection to ``root``'s database until SIGTERM (see
    ``Supervisor._start_keeper``); then close it, which checkpoints the WAL."""
    import sqlite3

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    db = sqlite3.connect(root / "layerfs.db", timeout=60)
    try:
        db.execute("SELECT 1 FROM settings LIMIT 1").fetchall()   # opens the WAL index
        signal.sigwait({signal.SIGTERM})
    finally:
        db.close()
