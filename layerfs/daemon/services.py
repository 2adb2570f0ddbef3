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

import importlib
import shlex
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import InvalidArgument, NotFound

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
