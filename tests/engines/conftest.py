"""Fixtures for the engine tests: layerfs servers for every native driver, images to feed them.

Engines are slow to start, so a test module shares one containerd (or dockerd)
and one layerfs server per driver (module-scoped fixtures). Every root lives
under the test's scratch folder, btrfs's on the session's loop-backed btrfs;
sockets live under a short folder in /tmp (a unix socket path is at most 107
bytes).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from layerfs_bench.engine_peers import EngineServer

from layerfs import mount as mountlib
from layerfs import plugins
from layerfs.layers import LayerStore
from layerfs.testing.images import sample_image

from ..dm_fixtures import options_for

NATIVE = ["overlay2", "btrfs", "vfs", "aufs"]
#: devicemapper needs a kernel with device-mapper: it runs in the qemu guest.
ALL = [*NATIVE, "devicemapper"]


def driver_supported(driver: str, root: Path | None = None) -> str | None:
    """Why ``driver`` cannot run on ``root`` (the test then skips with it), or None."""
    probe = plugins.probe(driver, root or Path(tempfile.gettempdir()))
    return None if probe.supported else probe.reason


def engine_root(driver: str, base: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh, empty root for ``driver`` (on btrfs for btrfs)."""
    if driver == "btrfs":
        pool: Path = request.getfixturevalue("btrfs_pool")
        root = pool / f"engines-{secrets.token_hex(4)}"
    else:
        root = base / f"root-{driver}"
    root.mkdir(parents=True)
    return root


def wipe_root(root: Path, driver: str) -> list[str]:
    """Remove every layer of ``root`` and check nothing stays mounted; returns leaks."""
    store = LayerStore.open(root, driver)
    store.wipe()
    store.close()
    leaked = [m.target for m in mountlib.mounts_under(root)]
    for target in leaked:
        mountlib.unmount(target, lazy=True)
    shutil.rmtree(root, ignore_errors=True)
    return leaked


@pytest.fixture(scope="module")
def sockets() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lfs-eng-", dir="/tmp") as path:
        yield Path(path)


@pytest.fixture(scope="module")
def module_scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def sample_tar(module_scratch: Path) -> Path:
    """The three-layer sample image (deletions, opaque dirs) as a docker-archive."""
    path = module_scratch / "sample.tar"
    sample_image(path, module_scratch, name="docker.io/library/sample:latest")
    return path


class EngineFleet:
    """layerfs servers, one per driver, started on first use; stopped and wiped at close.

    Socket paths are known before any server starts, so an engine can be configured
    with all of them up front (containerd dials its proxy plugins lazily).
    """

    def __init__(self, base: Path, sockets: Path, request: pytest.FixtureRequest, *,
                 snapshotter: bool = True, docker_tag: str | None = None) -> None:
        self.base = base
        self.sockets = sockets
        self.request = request
        self.snapshotter = snapshotter
        self.docker_tag = docker_tag
        self.servers: dict[str, EngineServer] = {}
        self.unsupported: dict[str, str] = {}

    def snapshotter_socket(self, driver: str) -> Path:
        return self.sockets / f"{driver}.sock"

    def server(self, driver: str) -> EngineServer:
        """The started server for ``driver``; skips the test if the host cannot run it."""
        if driver in self.unsupported:
            pytest.skip(f"{driver} not supported here: {self.unsupported[driver]}")
        if driver not in self.servers:
            root = engine_root(driver, self.base, self.request)
            reason = driver_supported(driver, root)
            if reason is not None:
                shutil.rmtree(root)
                self.unsupported[driver] = reason
                pytest.skip(f"{driver} not supported here: {reason}")
            server = EngineServer(
                root, driver, log_path=self.base / f"engines-{driver}.log",
                options=options_for(driver, None),
                snapshotter_socket=self.snapshotter_socket(driver) if self.snapshotter else None,
                docker_plugin=f"layerfs-{driver}-{self.docker_tag}" if self.docker_tag else None)
            self.servers[driver] = server.start()
        return self.servers[driver]

    def close(self) -> None:
        leaks = {}
        for driver, server in self.servers.items():
            server.stop()
            leaked = wipe_root(server.root, driver)
            if leaked:
                leaks[driver] = leaked
        self.servers.clear()
        assert not leaks, f"mounts left under the engine roots: {leaks}"


@contextlib.contextmanager
def engine_fleet(base: Path, sockets: Path, request: pytest.FixtureRequest, *,
                 snapshotter: bool = True, docker_tag: str | None = None
                 ) -> Iterator[EngineFleet]:
    fleet = EngineFleet(base, sockets, request, snapshotter=snapshotter, docker_tag=docker_tag)
    try:
        yield fleet
    finally:
        fleet.close()
