"""Run the engine servers of one layerfs root until told to stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from layerfs import mount as mountlib
from layerfs.errors import InvalidArgument, LayerfsError
from layerfs.layers import LayerStore

log = logging.getLogger("layerfs.engines")

#: Where dockerd looks for plugin sockets (``NAME.sock``); fixed in Docker 20.10.
DOCKER_PLUGIN_DIR = Path("/run/docker/plugins")


def docker_plugin_socket(name: str) -> Path:
    """The socket dockerd connects to for ``--storage-driver NAME``."""
    if not name or "/" in name or name.startswith("."):
        raise InvalidArgument(f"bad Docker plugin name {name!r}: use e.g. layerfs-overlay2")
    return DOCKER_PLUGIN_DIR / f"{name}.sock"


def setter_for_signals(event: threading.Event) -> Callable[[int, object], None]:
    """A signal handler that sets ``event``, safe while the main thread waits on it.

    Not ``event.set()`` in the handler itself: the handler runs in the main thread,
    between two bytecodes of whatever it was doing, which may be ``event.wait()``
    holding the event's (non-reentrant) lock; ``set()`` would then wait for that lock
    forever. A containerd testsuite scenario's server hung so on SIGTERM. A thread sets
    the event, taking the lock once the main thread has let go of it."""
    def handler(_signum: int, _frame: object) -> None:
        threading.Thread(target=event.set, name="layerfs-stop", daemon=True).start()
    return handler


def serve(root: str | os.PathLike[str], driver: str | None = None,
          options: dict[str, str] | list[str] | None = None, *,
          snapshotter_socket: str | os.PathLike[str] | None = None,
          graphdriver_socket: str | os.PathLike[str] | None = None,
          stop: threading.Event | None = None,
          on_ready: Callable[[], None] | None = None) -> None:
    """Serve containerd's snapshots API and/or Docker's graphdriver protocol for ``root``.

    Opens its own :class:`LayerStore` (recovering what a killed server left),
    listens on the sockets given (each created mode 0600), calls ``on_ready``,
    and blocks until ``stop`` is set — or, when called from the main thread
    without ``stop``, until SIGTERM or SIGINT. Then it stops listening, removes
    its sockets and closes the store. Mounts made for running containers stay.
    """
    if snapshotter_socket is None and graphdriver_socket is None:
        raise InvalidArgument("nothing to serve: give a containerd snapshotter socket, "
                              "a Docker plugin socket, or both")
    if stop is None:
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, setter_for_signals(stop))
    layers = LayerStore.open(root, driver, options)
    stoppers: list[Callable[[], None]] = []
    try:
        _warm_fuse_mounts(layers, stoppers)
        if snapshotter_socket is not None:
            from .containerd import start_server
            from .snapshots import Snapshots

            snapshots = Snapshots(layers)
            for action in snapshots.recover():
                log.warning("recovered: %s", action)
            path = Path(snapshotter_socket)
            grpc_server = start_server(snapshots, path)
            stoppers.append(lambda: _stop_grpc(grpc_server, path))
            log.info("containerd snapshotter (%s) on %s", layers.driver.name, path)
        if graphdriver_socket is not None:
            from .docker import start_plugin

            plugin = start_plugin(layers, Path(graphdriver_socket))
            stoppers.append(plugin.stop)
            log.info("Docker graphdriver plugin (%s) on %s", layers.driver.name,
                     graphdriver_socket)
        if on_ready is not None:
            on_ready()
        stop.wait()
    finally:
        for stopper in reversed(stoppers):
            with contextlib.suppress(Exception):
                stopper()
        layers.close()


def _warm_fuse_mounts(layers: LayerStore, stoppers: list[Callable[[], None]]) -> None:
    """An engine mounts a snapshot per container and per build step: on the FUSE union
    each would start an interpreter for its server. Unless this process already mounts
    through a fork server (the daemon's services inherit the daemon's), start one, as
    the daemon does, for as long as we serve."""
    make = getattr(layers.driver, "make_fuse_forker", None)
    if make is None or mountlib.fuse_forker() is not None:
        return
    forker = make()
    mountlib.set_fuse_forker(forker)

    def stop() -> None:
        mountlib.set_fuse_forker(None)
        forker.close()
    stoppers.append(stop)
    log.info("union mounts: fork server started (pid %d)", forker.pid)


# --- as services of `layerfs daemon` (entry point group layerfs.daemon.services) -------------

def _service_args(args: list[str], what: str) -> tuple[str, str | None]:
    """``TARGET [driver=NAME]``: the words after the service's name in ``--service``."""
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(named) - {"driver"})
    if len(positional) != 1 or unknown:
        raise InvalidArgument(f"--service '{what} {' '.join(args)}': expected "
                              f"'{what} TARGET [driver=NAME]'")
    return positional[0], named.get("driver")


def containerd_snapshotter_service(root: Path, args: list[str]) -> int:
    """``layerfs daemon --service 'containerd-snapshotter SOCKET [driver=NAME]'``."""
    def run() -> None:
        socket, driver = _service_args(args, "containerd-snapshotter")
        serve(root, driver, snapshotter_socket=socket)
    return _as_service("containerd-snapshotter", run)


def docker_plugin_service(root: Path, args: list[str]) -> int:
    """``layerfs daemon --service 'docker-plugin NAME [driver=NAME]'``: plugin NAME
    (``/run/docker/plugins/NAME.sock``), or an absolute socket path."""
    def run() -> None:
        target, driver = _service_args(args, "docker-plugin")
        socket = Path(target) if target.startswith("/") else docker_plugin_socket(target)
        serve(root, driver, graphdriver_socket=socket)
    return _as_service("docker-plugin", run)


def _as_service(name: str, run: Callable[[], None]) -> int:
    """0 once stopped (SIGTERM: the daemon does not restart it); a refused start (bad
    arguments, a root of another driver, a live socket) is one line in the daemon's log
    and status 2, which the daemon answers by restarting it with backoff."""
    try:
        run()
    except LayerfsError as err:
        print(f"layerfs daemon: service {name}: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


def _stop_grpc(server: object, path: Path) -> None:
    import grpc

    assert isinstance(server, grpc.Server)
    server.stop(grace=5).wait()
    path.unlink(missing_ok=True)
