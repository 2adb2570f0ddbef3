"""Services the daemon hosts: long-running servers in supervised child processes.

A service is a callable ``serve(root: pathlib.Path, args: list[str]) -> int | None``,
named either by its entry point in the ``layerfs.daemon.services`` group
(pyproject.toml) or as ``module:function``, and started with
``layerfs daemon --root ROOT --service 'NAME ARG ARG ...'`` (the value is split
like a shell command line). The daemon forks it at start-up from the warm, still
single-threaded supervisor, so it may start threads (grpcio, an HTTP server);
it gets ``PR_SET_PDEATHSIG=SIGTERM``, Python's default signal handlers, is
restarted with backoff when it fails, and gets SIGTERM (SIGKILL 10 s later)
when the daemon stops. Returning (or exiting with) 0 means "done: do not
restart". It opens its own store: SQLite connections never cross a fork.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import signal
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import InvalidArgument, NotFound

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .server import Supervisor

#: Seconds a service gets between SIGTERM and SIGKILL when the daemon stops.
SERVICE_STOP_GRACE = 10.0

ENTRY_POINT_GROUP = "layerfs.daemon.services"

ServeFunction = Callable[[Path, list[str]], object]


def registered() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load(name: str) -> ServeFunction:
    """The service ``name``: an entry point's name, or ``module:function``."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            target: ServeFunction = ep.load()
            return target
    module, sep, attr = name.partition(":")
    if sep:
        try:
            found: ServeFunction = getattr(importlib.import_module(module), attr)
            return found
        except (ImportError, AttributeError) as err:
            raise NotFound(f"daemon service {name!r}: {err}") from err
    known = ", ".join(sorted(registered())) or "none"
    raise NotFound(f"no daemon service named {name!r} (registered: {known}; or give "
                   f"module:function)")


def parse(spec: str) -> tuple[str, list[str]]:
    """``--service``'s value, ``'NAME ARG ...'``, → (name, args)."""
    try:
        words = shlex.split(spec)
    except ValueError as err:
        raise InvalidArgument(f"--service {spec!r}: {err}") from None
    if not words:
        raise InvalidArgument("--service needs a name")
    return words[0], words[1:]


class Service:
    """A long-running server the daemon forks at start-up and keeps running (issue 18's
    containerd snapshotter and Docker graphdriver endpoints).

    ``target(root, args)`` runs in a child forked from the warm supervisor before any
    thread exists; it may start threads (grpcio) and serves until SIGTERM. It is
    restarted with backoff if it fails; exit status 0 means "done, do not restart".
    """

    def __init__(self, name: str, target: Callable[[Path, list[str]], object],
                 args: list[str]) -> None:
        self.name = name
        self.target = target
        self.args = args
        self.pid: int | None = None
        self.started = 0.0
        self.backoff = 0.0

    @classmethod
    def load(cls, name: str, args: list[str]) -> Service:
        return cls(name, load(name), args)

    def run(self, root: Path) -> None:
        result = self.target(root, self.args)
        raise SystemExit(result if isinstance(result, int) else 0)

    def terminate(self, sup: Supervisor) -> None:
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

        def kill() -> None:
            if self.pid == pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        sup.after(SERVICE_STOP_GRACE, kill)
