"""The thin client: hand a ``layerfs`` command to the root's daemon, if one answers.

:func:`delegate` is the first thing ``layerfs`` does (``layerfs._entry``). When
``ROOT/daemon.sock`` answers, the command runs in a worker the daemon forks: it
gets this process's stdin, stdout and stderr (SCM_RIGHTS), its cwd, umask,
environment and argv, and runs the ordinary CLI in-process, exactly as this
process would have. Signals that reach us are relayed to the worker; we exit
with its status (or die of the same signal, as a cold process would have).
When no daemon answers, :func:`delegate` returns ``None`` and the command runs
here. ``LAYERFS_DAEMON=0`` never asks a daemon; ``LAYERFS_DAEMON=1`` requires one.

This module and :mod:`.wire` import only C modules of the standard library
(``_socket``, ``_signal``): a command sent to the daemon must not pay
for importing the CLI (tests/daemon/test_thin_client.py checks it with
``python -X importtime``).
"""

from __future__ import annotations

import os
import sys

from . import wire

TYPE_CHECKING = False   # typing costs ~15 ms to import; mypy reads this name as True
if TYPE_CHECKING:
    import signal as _signal
    import socket as _socket
else:
    import _signal
    import _socket

#: Signals relayed to the worker (what ``run`` forwards to a container, and SIGWINCH
#: for a terminal's size).
RELAYED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1,
           _signal.SIGUSR2, _signal.SIGWINCH)
#: A worker that died of one of these makes us die of it too (the caller sees the same
#: wait status as with a cold process); others (core dumps) become exit 128+N.
_REDELIVER = frozenset({_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGKILL,
                        _signal.SIGPIPE, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2,
                        _signal.SIGALRM})
#: Global options of ``layerfs`` that take a value (see layerfs.cli's parser).
_WITH_VALUE = ("--root", "--driver", "-s", "--storage-opt")
_FLAGS = ("-h", "--help", "--version")
DEFAULT_ROOT = "/var/lib/layerfs"


class DaemonError(Exception):
    """The daemon cannot be used (only raised, as one line, with LAYERFS_DAEMON=1)."""


def scan(argv: list[str]) -> tuple[str | None, str | None]:
    """(root, command) from the global options before the command, as argparse would
    read them; root None when they cannot be read for sure (then: run in-process)."""
    root = os.environ.get("LAYERFS_ROOT", DEFAULT_ROOT)
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _WITH_VALUE and arg.startswith("--") and eq:
            if name == "--root":
                root = value
            i += 1
        elif arg in _WITH_VALUE:
            if i + 1 >= len(argv):
                return None, None
            if arg == "--root":
                root = argv[i + 1]
            i += 2
        elif arg in _FLAGS or (arg.startswith("-s") and len(arg) > 2):   # or -sKEY=VALUE
            i += 1
        elif arg.startswith("-"):
            return None, None           # an abbreviation or a typo: argparse decides
        else:
            return root, arg
    return root, None


def delegate(argv: list[str]) -> int | None:
    """Run ``argv`` through the root's daemon: its exit status, or None to run it here."""
    mode = os.environ.get("LAYERFS_DAEMON", "")
    if mode == "0":
        return None
    try:
        root, command = scan(argv)
        if command == "daemon":
            return None
        if root is None:
            if mode == "1":
                raise DaemonError("LAYERFS_DAEMON=1, but the root cannot be told from these "
                                  "options before the command; spell out --root")
            return None
        conn = _connect(wire.socket_path(root), required=mode == "1")
        if conn is None:
            return None
        try:
            return _converse(conn, argv, required=mode == "1")
        finally:
            conn.close()
    except DaemonError as err:
        os.write(2, f"layerfs: error: {err}\n".encode(errors="surrogateescape"))
        return 1


def _connect(path: str, required: bool) -> _socket.socket | None:
    hint = "start one with `layerfs daemon --root ROOT`, or unset LAYERFS_DAEMON"
    try:
        os.stat(path)
    except FileNotFoundError:
        if required:
            raise DaemonError(f"no layerfs daemon at {path} ({hint})") from None
        return None
    except OSError:
        pass                      # let connect() say why
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    dir_fd = None
    try:
        address, dir_fd = wire.short_address(path)
        conn.connect(address)
    except OSError as err:
        conn.close()
        # Refused: a daemon that died left its socket; EACCES: not root (0600).
        if required:
            raise DaemonError(f"the layerfs daemon at {path} does not answer: "
                              f"{err.strerror} ({hint})") from None
        return None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return conn


def _request(argv: list[str]) -> tuple[bytes, list[int], list[int]]:
    """The request frame, the fds to pass, and those of them we opened (to close)."""
    items = [(b"version", wire.VERSION), (b"argv0", os.fsencode(sys.argv[0] or "layerfs"))]
    items += [(b"arg", os.fsencode(a)) for a in argv]
    items += [(b"env", k + b"=" + v) for k, v in os.environb.items()]
    mask = os.umask(0o022)
    os.umask(mask)
    items.append((b"umask", b"%o" % mask))
    # What this process ignores (`nohup`; SIGINT and SIGQUIT of a `cmd &` in a script)
    # the worker ignores too, as a process started here would: a relayed Ctrl-C then stops
    # a command only where a cold one would have stopped (`run` still forwards it).
    items += [(b"ignore", b"%d" % n) for n in RELAYED if _signal.getsignal(n) == _signal.SIG_IGN]
    fds, present = [], b""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.append(fd)
        present += b"%d" % fd
    items.append((b"fds", present))
    opened = []
    try:
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        cwd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)   # as if deleted
        items.append((b"cwd_gone", b"1"))
    fds.append(cwd)
    opened.append(cwd)
    return wire.encode(b"request", items), fds, opened


def _recv(conn: _socket.socket, frames: wire.Frames, queue: list[bytes]) -> wire.Message | None:
    while not queue:
        try:
            data = conn.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return None
        queue.extend(frames.feed(data))
    return wire.decode(queue.pop(0))


def _converse(conn: _socket.socket, argv: list[str], required: bool) -> int | None:
    frame, fds, opened = _request(argv)
    frames, queue = wire.Frames(), list[bytes]()
    try:
        # struct cmsghdr's payload: C ints (not `array`, which imports collections.abc)
        payload = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
        rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, payload)]
        sent = conn.sendmsg([frame], rights)
        if sent < len(frame):
            conn.sendall(frame[sent:])
    except OSError as err:
        # A daemon that refuses us says why before it closes: read that first.
        reply = _recv(conn, frames, queue)
        if reply is not None and reply[0] == b"error":
            raise DaemonError(wire.field(reply, b"message").decode(errors="replace")) from None
        if required:
            raise DaemonError(f"the layerfs daemon went away: {err.strerror}") from None
        return None
    finally:
        for fd in opened:
            os.close(fd)
    reply = _recv(conn, frames, queue)
    if reply is None:
        # It closed before taking the command (stopping, or killed): nothing ran.
        if required:
            raise DaemonError("the layerfs daemon closed the connection before running the "
                              "command")
        return None
    if reply[0] == b"error":
        raise DaemonError(wire.field(reply, b"message").decode(errors="replace"))
    if reply[0] != b"started":
        raise DaemonError(f"unexpected reply from the layerfs daemon: {reply[0]!r}")

    def relay(sig: int, _frame: object) -> None:
        try:
            conn.sendall(wire.encode(b"signal", [(b"number", b"%d" % sig)]))
        except OSError:
            pass   # the daemon is gone: _recv below says so

    previous = {number: _signal.signal(number, relay) for number in RELAYED}
    try:
        reply = _recv(conn, frames, queue)
    finally:
        for number, handler in previous.items():
            _signal.signal(number, handler)
    if reply is None or reply[0] != b"exit":
        raise DaemonError("the layerfs daemon stopped while running the command; what it "
                          "left half-done is recovered by the next command on this root")
    sig_text = wire.field(reply, b"signal", b"")
    if not sig_text:
        return int(wire.field(reply, b"status"))
    sig = int(sig_text)
    if sig in _REDELIVER:
        if sig != _signal.SIGKILL:
            _signal.signal(sig, _signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return 128 + sig
