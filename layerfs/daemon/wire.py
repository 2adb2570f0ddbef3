"""What the thin client and the daemon say to each other on ``ROOT/daemon.sock``.

Standard library only, and only its cheapest parts: the thin client imports this
module on every ``layerfs`` command, so it avoids :mod:`socket` and :mod:`json`
(``socket`` builds enum classes for every constant at import, ~10 ms; ``json``
imports ``re``). A message is a frame::

    length (4 bytes, big-endian) | kind NUL key=value NUL key=value ...

Keys may repeat (``arg=`` once per argument, in order). Values are bytes as the
kernel gives them (argv and the environment cannot hold NUL), so nothing is
re-encoded on the way. The conversation on one connection::

    client                                   daemon
    request  (+ SCM_RIGHTS: stdin, stdout,  ─▶
              stderr, cwd)
                                            ◀─ started          the command will run
    signal number=N  (any number of times) ─▶  relayed to the worker
                                            ◀─ exit status=N | exit signal=N
    or, before ``started``:                 ◀─ error message=TEXT    (refused, nothing ran)

``request`` carries ``version``, ``argv0``, ``arg`` (repeated), ``env`` (repeated
``NAME=value``), ``umask`` (octal) and ``fds``: which of stdin, stdout and stderr
follow (``012`` for all three; a closed one is left out), then always the cwd.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False   # typing costs ~15 ms to import; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Sequence

VERSION = b"1"
SOCKET_NAME = "daemon.sock"
LOCK_NAME = "daemon.lock"
#: A request holds the whole environment; anything bigger than this is refused.
MAX_FRAME = 4 << 20
#: stdin, stdout, stderr and the cwd.
MAX_FDS = 4
#: ``sockaddr_un.sun_path`` holds 108 bytes, NUL included.
_SUN_PATH_MAX = 107

Message = tuple[bytes, list[tuple[bytes, bytes]]]


def socket_path(root: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(root), SOCKET_NAME)


def encode(kind: bytes, items: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    body = b"\0".join([kind, *(k + b"=" + v for k, v in items)])
    return len(body).to_bytes(4, "big") + body


def decode(body: bytes) -> Message:
    kind, *items = body.split(b"\0")
    fields = []
    for item in items:
        key, sep, value = item.partition(b"=")
        if not sep:
            raise ValueError(f"malformed field {item[:40]!r}")
        fields.append((key, value))
    return kind, fields


def field(message: Message, key: bytes, default: bytes | None = None) -> bytes:
    for k, v in message[1]:
        if k == key:
            return v
    if default is None:
        raise ValueError(f"{message[0].decode(errors='replace')}: no {key.decode()}")
    return default


def fields(message: Message, key: bytes) -> list[bytes]:
    return [v for k, v in message[1] if k == key]


class Frames:
    """Splits a byte stream into message bodies (the daemon reads without blocking)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            size = int.from_bytes(self._buf[:4], "big")
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes (at most {MAX_FRAME})")
            if len(self._buf) < 4 + size:
                break
            out.append(bytes(self._buf[4:4 + size]))
            del self._buf[:4 + size]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def short_address(path: str) -> tuple[str, int | None]:
    """An address ``bind``/``connect`` accept for ``path``: itself, or, when it is longer
    than ``sun_path`` allows (deep test roots), ``/proc/self/fd/N/NAME`` through an
    ``O_PATH`` descriptor of its directory (returned, for the caller to close)."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path, None
    parent, name = os.path.split(path)
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{name}", fd
