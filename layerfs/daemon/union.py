"""FUSE union mounts through the daemon (issue 17, part 3): the aufs driver's fork server.

pyfuse3-style servers serve one filesystem per process, and a cold one costs an
interpreter start and its imports on every aufs mount. The daemon of an aufs root
asks the driver for its fork server (``make_fuse_forker()``: a warm interpreter with
the union filesystem imported, which forks one server per mount and reaps them) and
installs it with ``layerfs.mount.set_fuse_forker``. Every worker is a fork of the
supervisor and inherits it, so the worker's aufs mounts fork from the warm process;
workers mount concurrently, which is why the forker must say ``fork_safe = True``.
The fork server is the supervisor's child: reaped there, restarted if it dies.

Without a daemon, or for a driver without a fork server, mounts run the helper
command as before.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import LayerfsError

log = logging.getLogger("layerfs.daemon")

#: The driver whose mounts the fork server serves.
DRIVER = "aufs"


def wanted(root: Path) -> bool:
    """Whether ``root`` is an aufs root (the only driver with FUSE helper mounts)."""
    from .. import plugins

    try:
        return plugins.prior_driver(root) == DRIVER
    except LayerfsError:
        return False


def start_fork_server() -> int | None:
    """Install the aufs driver's fork server for this process and its future forks;
    returns its pid, or None when there is none to install (no aufs driver, no fork
    server in it, or one that forks of this process cannot share)."""
    from .. import mount as mountlib
    from .. import plugins

    try:
        # Not in the Driver contract: a capability of the aufs driver's FUSE mode.
        make = getattr(plugins.load(DRIVER), "make_fuse_forker", None)
    except LayerfsError:
        make = None
    if make is None:
        return None
    forker = make()
    if not getattr(forker, "fork_safe", False):
        log.info("union mounts: the fork server cannot be shared by workers; mounts run "
                 "the helper")
        forker.close()
        return None
    mountlib.set_fuse_forker(forker)
    pid: int = forker.pid
    log.info("union mounts: fork server started (pid %d)", pid)
    return pid


def forget_fork_server() -> None:
    """Mounts run the helper again (the fork server has exited)."""
    from .. import mount as mountlib

    mountlib.set_fuse_forker(None)
