"""Unix sockets for the engine servers: root only, and never two servers on one path."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from layerfs.errors import AlreadyExists, InvalidArgument


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free for a new listening socket.

    A socket file nobody listens on (left by a killed server) is removed; a
    live one, or anything that is not a socket, is refused: the path belongs
    to someone else.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"{path} exists and is not a socket; choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        path.unlink(missing_ok=True)  # stale: its server is gone
        return
    finally:
        probe.close()
    raise AlreadyExists(f"another server is listening on {path}")


@contextlib.contextmanager
def root_only_socket(path: Path) -> Iterator[None]:
    """Around the bind of a listening socket at ``path``: claim the path, create the
    socket with mode 0600 (no window in which others could connect), check it after."""
    claim_socket_path(path)
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)
    if path.exists():
        os.chmod(path, 0o600)


def listen_unix(path: Path, backlog: int = 64) -> socket.socket:
    """A listening unix stream socket at ``path``, mode 0600."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with root_only_socket(path):
            sock.bind(os.fspath(path))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
