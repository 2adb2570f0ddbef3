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

from layerfs import mount as mountlib
from layerfs import registry
from layerfs.layers import LayerStore
from layerfs.testing.engines import EngineServer
from layerfs.testing.images import sample_image

NATIVE = ["overlay2", "btrfs", "vfs", "aufs"]


def driver_supported(driver: str, root: Path | None = None) -> str | None:
    """Why ``driver`` cannot run on ``root`` (the test then skips with it), or None."""
    probe = registry.probe(driver, root or Path(tempfile.gettempdir()))
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


@contextlib.contextmanager
def engine_servers(drivers: list[str], base: Path, sockets: Path,
                   request: pytest.FixtureRequest, *, snapshotter: bool = True,
                   docker_tag: str | None = None) -> Iterator[dict[str, EngineServer]]:
    """One started layerfs server per driver the host supports; stopped and wiped after."""
    servers: dict[str, EngineServer] = {}
    try:
        for driver in drivers:
            root = engine_root(driver, base, request)
            if driver_supported(driver, root) is not None:
                shutil.rmtree(root)
                continue
            server = EngineServer(
                root, driver, log_path=base / f"engines-{driver}.log",
                snapshotter_socket=sockets / f"{driver}.sock" if snapshotter else None,
                docker_plugin=f"layerfs-{driver}-{docker_tag}" if docker_tag else None)
            servers[driver] = server.start()
        yield servers
    finally:
        leaks = {}
        for driver, server in servers.items():
            server.stop()
            leaked = wipe_root(server.root, driver)
            if leaked:
                leaks[driver] = leaked
        assert not leaks, f"mounts left under the engine roots: {leaks}"


def need(servers: dict[str, EngineServer], driver: str) -> EngineServer:
    if driver not in servers:
        pytest.skip(f"{driver} not supported here: {driver_supported(driver)}")  # btrfs: the pool

    return servers[driver]
