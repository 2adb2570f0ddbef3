"""A small threaded HTTP/1.1 server on a unix socket, for Docker's plugin protocol.

Docker talks to plugins with JSON over HTTP/1.1 on a unix socket, streams
layer tars both ways (``ApplyDiff`` sends one as a chunked request body,
``Diff`` receives one) and keeps connections alive. ``http.server`` does not
decode chunked bodies; :mod:`h11` (already installed with httpx) is a
well-kept, sans-I/O HTTP/1.1 state machine that does, so this module only
moves bytes between it and the socket: one thread per connection, bodies
streamed both ways in bounded pieces.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast
from urllib.parse import parse_qs, urlsplit

import h11

from .sockets import listen_unix

log = logging.getLogger("layerfs.engines.http")

READ_SIZE = 256 * 1024


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: BinaryIO


@dataclass
class Response:
    """``body`` is bytes, or a function that writes the body to a stream (sent chunked)."""

    status: int = 200
    body: bytes | Callable[[io.RawIOBase], object] = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Response]


class _Connection:
    """One client connection: requests in, responses out, until either side closes."""

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        self.sock = sock
        self.handler = handler
        self.h11 = h11.Connection(h11.SERVER)

    def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(self.sock.recv(READ_SIZE))
                continue
            return cast("h11.Event | type[h11.PAUSED]", event)

    def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.sock.sendall(data)

    def serve(self) -> None:
        try:
            while True:
                event = self.next_event()
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if not isinstance(event, h11.Request):
                    return
                self.one_request(event)
                if self.h11.our_state is h11.MUST_CLOSE:
                    return
                self.h11.start_next_cycle()
        except (OSError, h11.ProtocolError) as err:
            log.debug("connection ended: %s", err)
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()

    def one_request(self, event: h11.Request) -> None:
        target = urlsplit(event.target.decode("latin-1"))
        query = {k: v[-1] for k, v in parse_qs(target.query, keep_blank_values=True).items()}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
        body = io.BufferedReader(_Body(self), READ_SIZE)
        request = Request(event.method.decode("ascii"), target.path, query, headers, body)
        response = self.handler(request)
        # What the handler did not read must still be consumed before the next request.
        while body.read(READ_SIZE):
            pass
        out_headers = [(k.encode(), v.encode()) for k, v in response.headers]
        if isinstance(response.body, bytes):
            out_headers.append((b"Content-Length", str(len(response.body)).encode()))
            self.send(h11.Response(status_code=response.status, headers=out_headers))
            self.send(h11.Data(data=response.body))
            self.send(h11.EndOfMessage())
            return
        # Streamed: no length known, so h11 sends it chunked. A failure half-way can
        # no longer change the status: the connection is cut instead, and the client
        # sees a truncated body, never a "complete" one.
        self.send(h11.Response(status_code=response.status, headers=out_headers))
        response.body(_ChunkWriter(self))
        self.send(h11.EndOfMessage())


class _Body(io.RawIOBase):
    """The request body, read from h11's Data events as the handler asks for it."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.pending = b""
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self.pending and not self.done:
            event = self.conn.next_event()
            if isinstance(event, h11.Data):
                self.pending = bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.done = True
            else:
                raise OSError(f"unexpected {type(event).__name__} in a request body")
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


class _ChunkWriter(io.RawIOBase):
    """A writable stream whose writes go out as HTTP chunks."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if data:
            self.conn.send(h11.Data(data=bytes(data)))
        return len(data)


class UnixHTTPServer:
    """Serve ``handler`` on a unix socket (mode 0600) from background threads."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.sock = listen_unix(path)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"http:{path.name}",
                                         daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            threading.Thread(target=_Connection(client, self.handler).serve, daemon=True,
                             name="http-conn").start()

    def stop(self) -> None:
        """Stop accepting and remove the socket; requests in flight finish on their own."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


def json_response(payload: object, status: int = 200,
                  content_type: str = "application/json") -> Response:
    import json

    return Response(status, json.dumps(payload).encode(), [("Content-Type", content_type)])
