"""The process side of the FUSE union: the mount helper behind
``python -m layerfs_drivers.aufs.unionfs`` (usage in :mod:`.unionfs`).

Arguments and their checks, the daemon child that mounts, reports "live" (or
the error) to the waiting parent over a pipe and serves until unmounted,
signals (stop, write the counters), and the entry for a server forked by
:mod:`.forkserver` (:func:`warm_up`, :func:`serve_forked`). The filesystem
itself is :class:`~.union_ops.UnionFS`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from . import fuseproto as fp
from .union_ops import UnionFS
from .union_state import DEFAULT_TIMEOUT, FSTYPE, log


def parse_branches(specs: list[str]) -> tuple[list[str], bool]:
    """``DIR:rw DIR:ro ...`` -> (dirs top-down, top writable)."""
    dirs: list[str] = []
    writable = True
    for i, spec in enumerate(specs):
        path, sep, mode = spec.rpartition(":")
        if not sep or mode not in ("rw", "ro"):
            path, mode = spec, ("rw" if i == 0 else "ro")
        if mode == "rw" and i > 0:
            raise ValueError(f"{spec}: only the first (top) branch can be rw")
        if i == 0:
            writable = mode == "rw"
        if not os.path.isdir(path):
            raise ValueError(f"{path}: branch is not a directory")
        dirs.append(path)
    if not dirs:
        raise ValueError("no branches given")
    return dirs, writable


class _ArgumentParser(argparse.ArgumentParser):
    """Raises ValueError instead of exiting when ``raise_errors`` (a forked server reports
    its errors to whoever asked for the mount)."""

    raise_errors = False

    def error(self, message: str) -> NoReturn:
        if self.raise_errors:
            raise ValueError(message)
        super().error(message)


def _parser() -> _ArgumentParser:
    p = _ArgumentParser(
        prog="python -m layerfs_drivers.aufs.unionfs",
        description="Mount a union of branches with AUFS semantics (FUSE).")
    p.add_argument("--foreground", action="store_true", help="serve in this process")
    p.add_argument("--entry-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="kernel cache time for names, found or not (default %(default)s)")
    p.add_argument("--attr-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="kernel cache time for attributes (default %(default)s)")
    p.add_argument("--keep-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep file pages cached across opens (default on)")
    p.add_argument("--passthrough", action=argparse.BooleanOptionalAction, default=True,
                   help="let the kernel read and write backing files directly where it can "
                        "(FUSE passthrough, Linux >= 6.9; default on)")
    p.add_argument("--dirren", action="store_true",
                   help="rename directories that exist in lower branches (AUFS's dirren) "
                        "instead of failing with EXDEV")
    p.add_argument("--copyup-fsync", action="store_true",
                   help="fsync each copied-up file before it replaces the lower one")
    p.add_argument("--readahead-kb", type=int, default=1024, metavar="KB",
                   help="readahead of the mount (default %(default)s; 0 keeps the kernel's)")
    p.add_argument("--stats-file", metavar="PATH",
                   help="write the counters as JSON here on exit and on SIGUSR1")
    p.add_argument("--log", metavar="PATH", help="log errors here (default: discarded)")
    p.add_argument("branches", nargs="+", metavar="BRANCH:rw|ro")
    p.add_argument("mountpoint")
    return p


def _write_stats(fs: UnionFS, path: str | None) -> None:
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(fs.stats_json() + "\n")
    os.replace(tmp, path)


def _set_readahead(mountpoint: str, kb: int) -> None:
    """Raise the readahead of this mount's bdi (the kernel's default is 128 KiB).

    Reads served here are answered one request at a time, so a sequential
    reader is bound by round trips: 1 MiB of readahead keeps requests queued
    (bench/layerfs_bench/aufs_fuse.py seq_read). Files in passthrough use their backing
    filesystem's readahead instead. Needs root; without it the default stays.
    """
    dev = fp.device_of_mount(mountpoint)
    if dev is None:
        return
    try:
        with open(f"/sys/class/bdi/{dev[0]}:{dev[1]}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(kb))
    except OSError as err:
        log.info("cannot set the readahead of %s: %s", mountpoint, err)


class _Server:
    """Signals around :meth:`fuseproto.Session.serve`: SIGTERM, SIGINT and SIGHUP stop it
    between requests (a request in progress is finished first); SIGUSR1 writes the stats."""

    def __init__(self, fs: UnionFS, session: fp.Session, stats_file: str | None) -> None:
        self.fs = fs
        self.session = session
        self.stats_file = stats_file
        self.stopping = False

    def _signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGUSR1:
            _write_stats(self.fs, self.stats_file)
            return
        self.stopping = True
        if not self.session.busy:
            raise fp.Stop()

    def run(self) -> bool:
        """Serve until unmounted (False) or stopped by a signal (True)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._signal)
        self.session.stop_check = lambda: self.stopping
        try:
            self.session.serve()
        except fp.Stop:
            return True
        return self.stopping


def _run(args: argparse.Namespace, dirs: list[str], writable: bool,
         ready: Callable[[], None]) -> int:
    if args.log:  # here: the daemon has closed every fd it inherited
        logging.basicConfig(filename=args.log, level=logging.INFO,
                            format="%(asctime)s %(process)d %(levelname)s %(message)s")
    fs = UnionFS(dirs, writable=writable, entry_timeout=args.entry_timeout,
                 attr_timeout=args.attr_timeout, keep_cache=args.keep_cache,
                 copyup_fsync=args.copyup_fsync, dirren=args.dirren,
                 passthrough=args.passthrough)
    os.umask(0)  # modes come from the kernel with the caller's umask applied
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))  # redirect chains
    # One backing fd per open file in the union, and cached directory fds.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mountpoint = _real_dir(args.mountpoint)
    try:
        fd = fp.mount(mountpoint, FSTYPE, FSTYPE, readonly=not writable)
    except BaseException:
        fs.close()
        raise
    stopped = True
    try:
        session = fp.Session(fd, fs, want_passthrough=args.passthrough)
        fs.session = session
        session.between = fs.between_requests
        session.init()
        if args.readahead_kb > 0:
            # Only reads served here use it: set it when the first such file opens,
            # not on the way to reporting the mount live.
            kb = args.readahead_kb
            fs.on_first_cached_open = lambda: _set_readahead(mountpoint, kb)
        ready()
        stopped = _Server(fs, session, args.stats_file).run()
    finally:
        if stopped:
            with contextlib.suppress(OSError):
                fp.unmount(mountpoint)
        os.close(fd)
        _write_stats(fs, args.stats_file)
        fs.close()
    return 0


def _close_inherited(keep: int) -> None:
    max_fd = os.sysconf("SC_OPEN_MAX")
    os.closerange(3, keep)
    os.closerange(keep + 1, max_fd)


def _real_dir(path: str) -> str:
    """The canonical path of a directory, resolved by the kernel in one open (a realpath()
    in Python costs an lstat per component)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise ValueError(f"{path}: not a directory ({err.strerror})") from None
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _validate(args: argparse.Namespace) -> tuple[list[str], bool]:
    dirs, writable = parse_branches(args.branches)
    dirs = [os.path.abspath(d) for d in dirs]
    args.mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(args.mountpoint):
        raise ValueError(f"{args.mountpoint}: mount point is not a directory")
    real_mnt = _real_dir(args.mountpoint)
    for d in dirs:
        real = _real_dir(d)
        if real_mnt == real or real_mnt.startswith(real.rstrip("/") + "/"):
            # Serving a lookup would then wait for this very server.
            raise ValueError(f"{args.mountpoint}: mount point is inside branch {d}")
    return dirs, writable


def _serve_detached(args: argparse.Namespace, dirs: list[str], writable: bool,
                    notify_fd: int) -> NoReturn:
    """In a forked child: become a daemon, mount, report "R" (or "E" + the error) on
    ``notify_fd``, serve until unmounted, exit."""
    code = 1
    try:
        os.setsid()
        os.chdir("/")
        _close_inherited(notify_fd)
        null = os.open(os.devnull, os.O_RDWR)
        # stderr stays the caller's until the mount is live; then nothing of the caller's
        # stays open (it may be waiting for EOF on its pipes).
        os.dup2(null, 0)
        os.dup2(null, 1)

        def ready() -> None:
            os.dup2(null, 2)
            os.write(notify_fd, b"R")
            os.close(notify_fd)

        code = _run(args, dirs, writable, ready)
    except BaseException as err:  # report to whoever waits, never return to its caller
        if args.log:
            log.exception("unionfs server failed")
        # Nothing of the branches may stay open once the waiter hears of the failure
        # (it may unmount them at once: EBUSY), so close every fd before reporting.
        _close_inherited(notify_fd)
        with contextlib.suppress(OSError):
            os.write(notify_fd, b"E" + str(err).encode(errors="replace"))
    finally:
        os._exit(code)


_forked_parser: _ArgumentParser | None = None


def warm_up(*, touch: bool = False) -> None:
    """Do once, in a fork server, the work every forked server would repeat: building
    the argument parser costs ~5 ms the first time in a process (gettext lookups).
    ``touch``: in a server forked ahead of its request, run a parse now, so the memory
    pages it writes are copied from the fork server before the request, not during it."""
    global _forked_parser
    if _forked_parser is None:
        _forked_parser = _parser()
        _forked_parser.raise_errors = True
    if touch:
        _forked_parser.parse_args(["--readahead-kb", "1", "/:rw", "/:ro", "/"])


def serve_forked(argv: list[str], notify_fd: int) -> NoReturn:
    """The server side of a fork server: ``argv`` as for the helper (options, branches,
    mount point); reports on ``notify_fd`` like the helper's daemon child, then serves."""
    warm_up()
    parser = _forked_parser
    assert parser is not None
    try:
        args = parser.parse_args(argv)
        dirs, writable = _validate(args)
    except ValueError as err:
        with contextlib.suppress(OSError):
            os.write(notify_fd, b"E" + str(err).encode(errors="replace"))
        os._exit(2)
    _serve_detached(args, dirs, writable, notify_fd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        dirs, writable = _validate(args)
    except ValueError as err:
        print(f"unionfs: {err}", file=sys.stderr)
        return 2
    if args.foreground:
        try:
            return _run(args, dirs, writable, lambda: None)
        except (OSError, RuntimeError) as err:
            print(f"unionfs: mount {args.mountpoint}: {err}", file=sys.stderr)
            return 1

    # Daemon: the child mounts and serves; the parent waits until the mount is
    # live (or failed) so it behaves like a mount.fuse helper.
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _serve_detached(args, dirs, writable, wfd)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 4096):
        chunks.append(chunk)
    os.close(rfd)
    msg = b"".join(chunks)
    if msg[:1] == b"R":
        return 0
    text = msg[1:].decode(errors="replace") or "the server exited before mounting"
    print(f"unionfs: mount {args.mountpoint}: {text}", file=sys.stderr)
    return 1
