"""Services the daemon hosts: long-running servers in supervised child processes.

A service is a callable ``serve(root: pathlib.Path, args: list[str]) -> int | None``
registered in the ``layerfs.daemon.services`` entry-point group (pyproject.toml),
started with ``layerfs daemon --root ROOT --service NAME[:ARG,ARG...]``. The daemon
forks it at start-up from the warm, still single-threaded supervisor (so it may
start threads: grpcio, an HTTP server), gives it ``PR_SET_PDEATHSIG=SIGTERM``,
restarts it with backoff when it fails, and sends SIGTERM (SIGKILL 10 s later)
when the daemon stops. Returning (or exiting with) 0 means "done: do not restart".
It opens its own store: SQLite connections never cross a fork.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import NotFound

ENTRY_POINT_GROUP = "layerfs.daemon.services"

ServeFunction = Callable[[Path, list[str]], object]


def registered() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load(name: str) -> ServeFunction:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            target: ServeFunction = ep.load()
            return target
    known = ", ".join(sorted(registered())) or "none"
    raise NotFound(f"no daemon service named {name!r} (registered: {known})")


def parse(spec: str) -> tuple[str, list[str]]:
    """``NAME`` or ``NAME:ARG,ARG`` (``--service``'s value) → (name, args)."""
    name, _, rest = spec.partition(":")
    return name, [a for a in rest.split(",") if a]
