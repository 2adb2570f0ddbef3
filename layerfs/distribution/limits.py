"""Bounds on what a registry can make the client spend: bytes per answer, time per
request, and the slowest rate a blob download or upload accepts (:class:`SpeedLimit`).

httpx's timeouts are per read, so a server that sends one byte every 20 s never trips
them, and ``Response.content`` reads a body whole before anyone can look at its size.
So every registry connection goes through :class:`DeadlineBackend`, httpcore's public
network-backend interface with each connect, read and write clamped to the deadline of
the request the calling thread is serving (:func:`deadline`): status line, headers,
body and TLS handshake are all bounded, on new and on pooled connections alike. Bodies
are read as a stream and stop at a cap (:func:`read_body`).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from ..errors import InvalidArgument

#: Most bytes kept of an error body: enough for the registry's JSON error list.
ERROR_BODY_MAX = 64 << 10
#: Answers that carry no document (``/v2/``, HEAD, upload steps).
SMALL_BODY_MAX = 64 << 10
#: A token service's answer (a JWT and a few fields).
TOKEN_BODY_MAX = 1 << 20


@dataclass
class Deadline:
    """When the request being served must be over (``time.monotonic()``); ``at`` may be
    moved on by whoever watches the transfer (the blob rate check does)."""

    at: float
    reason: str

    def passed(self) -> bool:
        return time.monotonic() >= self.at


_CURRENT: ContextVar[Deadline | None] = ContextVar("layerfs_registry_deadline", default=None)


@contextlib.contextmanager
def deadline(seconds: float | None, reason: str) -> Iterator[Deadline | None]:
    """Bound every network wait of this thread for ``seconds`` (None: no bound of its
    own). An enclosing deadline that ends sooner stays in force."""
    outer = _CURRENT.get()
    if seconds is None or (outer is not None and outer.at <= time.monotonic() + seconds):
        yield outer
        return
    mine = Deadline(time.monotonic() + seconds, reason)
    token = _CURRENT.set(mine)
    try:
        yield mine
    finally:
        _CURRENT.reset(token)


class SpeedLimit:
    """curl's ``--speed-limit``/``--speed-time`` on one transfer: at least ``limit``
    bytes/s over every ``seconds`` window. It keeps moving the transfer's
    :class:`Deadline` to the end of the current window, so a stall or a drip fails at
    that window's end (with the deadline's reason), not at the next byte."""

    def __init__(self, current: Deadline, limit: int, seconds: float) -> None:
        self.current = current
        self.seconds = seconds
        self.reason = current.reason
        self.window = max(1, int(limit * seconds))
        self.moved = 0

    def restart(self) -> None:
        """A new window from now (a transfer starts or starts again)."""
        self.moved, self.current.at = 0, time.monotonic() + self.seconds
        self.current.reason = self.reason

    def count(self, n: int) -> None:
        """``n`` more bytes went through: enough of them open the next window."""
        self.moved += n
        if self.moved >= self.window:
            self.restart()


class PacedBody:
    """A streamed request body (re-iterable, as httpx may send it again) whose sending is
    held to a :class:`SpeedLimit`. httpx writes each chunk before it asks for the next,
    so a chunk is counted when the next one is asked for. Once the body is all sent the
    answer gets ``answer_within`` seconds, with ``answer_reason``."""

    def __init__(self, body: Iterable[bytes], speed: SpeedLimit, answer_within: float,
                 answer_reason: str) -> None:
        self.body = body
        self.speed = speed
        self.answer_within = answer_within
        self.answer_reason = answer_reason

    def __iter__(self) -> Iterator[bytes]:
        speed = self.speed
        speed.restart()
        for chunk in self.body:
            yield chunk
            speed.count(len(chunk))
        speed.current.at = time.monotonic() + self.answer_within
        speed.current.reason = self.answer_reason


def _clamp(timeout: float | None) -> float | None:
    current = _CURRENT.get()
    if current is None:
        return timeout
    left = current.at - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout(current.reason)
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own socket backend, with every wait clamped to the thread's deadline."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_tcp(host, port, _clamp(timeout), local_address,
                                               socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None
                            ) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(path, _clamp(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def transport(verify: ssl.SSLContext | bool, limits: httpx.Limits) -> httpx.HTTPTransport:
    """An httpx transport whose connections honour :func:`deadline`."""
    t = httpx.HTTPTransport(verify=verify, limits=limits)
    # httpx does not let a caller choose the network backend of the httpcore pool it
    # builds; the pool takes one and only reads it when it opens a connection.
    pool = t._pool
    assert isinstance(pool, httpcore.ConnectionPool)
    pool._network_backend = DeadlineBackend()
    return t


def read_body(r: httpx.Response, cap: int, what: str, *, truncate: bool = False) -> bytes:
    """The body of a streamed response, read until ``cap`` bytes at most: more is an
    error naming ``what`` (or, with ``truncate``, cut off: for error bodies)."""
    if r.is_stream_consumed:
        return r.content[:cap] if truncate else _fits(r.content, cap, what)
    parts: list[bytes] = []
    got = 0
    for chunk in r.iter_bytes():
        parts.append(chunk)
        got += len(chunk)
        if got > cap:
            if truncate:
                break
            raise InvalidArgument(f"{what}: the answer is longer than the {cap}-byte limit")
    return b"".join(parts)[:cap] if truncate else b"".join(parts)


def _fits(data: bytes, cap: int, what: str) -> bytes:
    if len(data) > cap:
        raise InvalidArgument(f"{what}: the answer is longer than the {cap}-byte limit")
    return data


def whole(r: httpx.Response, cap: int, what: str) -> httpx.Response:
    """A copy of a streamed response with its body read (at most ``cap`` bytes)."""
    data = read_body(r, cap, what)
    headers = [(k, v) for k, v in r.headers.multi_items()
               if k.lower() not in ("content-encoding", "transfer-encoding")]
    return httpx.Response(r.status_code, headers=headers, content=data, request=r.request,
                          extensions={k: v for k, v in r.extensions.items()
                                      if k != "network_stream"})


__all__ = ["ERROR_BODY_MAX", "SMALL_BODY_MAX", "TOKEN_BODY_MAX", "Deadline",
           "DeadlineBackend", "PacedBody", "SpeedLimit", "deadline", "read_body", "transport", "whole"]
