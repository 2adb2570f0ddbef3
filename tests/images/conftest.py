"""Fixtures for the image tests: image stores on every native driver, sample archives,
one dockerd per session, and a stand-in for the container runner.

Archives are built once per session from busybox-static (nothing is downloaded).
Scratch outside pytest's tmp_path lives under /tmp/lfs-images/<pid> and is
removed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from layerfs_bench.peers import DockerDaemon

from layerfs.errors import DriverNotSupported, LayerfsError
from layerfs.images import Image, ImageStore
from layerfs.layers import LayerStore
from layerfs.testing import images as timg
from layerfs.testing.conformance import close_and_check

from ..conftest import NATIVE_DRIVERS, root_for
from ..dm_fixtures import options_for
from ..host_resources import sweep_dead_sessions
from ..support import timeouts

SCRATCH = Path("/tmp/lfs-images")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A hung mount helper or daemon must not eat the CI budget: bound every image test."""
    timeouts.bound(config, items, Path(__file__).parent, 300)


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    sweep_dead_sessions(SCRATCH)
    path = SCRATCH / str(os.getpid())
    path.mkdir(parents=True, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def open_images_or_skip(driver: str, root: Path) -> ImageStore:
    """An ImageStore on a fresh root; skips (with the reason) where the driver can't run."""
    try:
        layers = LayerStore.open(root, driver, options_for(driver, None))
    except DriverNotSupported as e:
        pytest.skip(f"{driver} not supported here: {e.reason}")
    except ImportError as e:  # a driver whose dependencies are not installed yet
        pytest.skip(f"{driver} cannot be loaded: {e}")
    return ImageStore(layers)


def close_images(images: ImageStore) -> None:
    close_and_check(images.layers)


@contextlib.contextmanager
def image_store(driver: str, root: Path) -> Iterator[ImageStore]:
    """Open (or skip with the reason), then close and check nothing leaked. A btrfs
    root is a folder in the session's shared pool, so it is removed too."""
    store = open_images_or_skip(driver, root)
    try:
        yield store
    finally:
        close_images(store)
        if driver == "btrfs":
            shutil.rmtree(root, ignore_errors=True)


# devicemapper needs a kernel with dm: it joins the list inside the qemu guest
# (test_interop_docker.py::test_images_interop_on_devicemapper_in_the_guest runs
# the deletion and Docker-output tests there).
IMAGE_DRIVERS = NATIVE_DRIVERS + (["devicemapper"] if os.environ.get("LAYERFS_IN_GUEST") == "1"
                                  else [])


@pytest.fixture(params=IMAGE_DRIVERS)
def image_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def images_on(image_driver: str, tmp_path: Path,
              request: pytest.FixtureRequest) -> Iterator[ImageStore]:
    """An ImageStore on a fresh root, for every native driver."""
    with image_store(image_driver, root_for(image_driver, tmp_path, request)) as store:
        yield store


@pytest.fixture
def images(tmp_path: Path) -> Iterator[ImageStore]:
    """An ImageStore on overlay2 (the default driver) for tests that are not about drivers."""
    with image_store("overlay2", tmp_path / "root") as store:
        yield store


# --- archives, built once ----------------------------------------------------------------------

@dataclass(frozen=True)
class Archives:
    dir: Path
    busybox_layer: Path          # the busybox rootfs as a layer tar
    busybox: timg.BuiltImage     # docker-archive, one layer
    sample: timg.BuiltImage      # docker-archive, three layers with deletions
    layers: tuple[bytes, ...]    # the sample's layer tars


@pytest.fixture(scope="session")
def archives(scratch: Path) -> Archives:
    d = scratch / "archives"
    d.mkdir(exist_ok=True)
    layer = timg.busybox_rootfs_tar(d / "busybox-rootfs.tar", d)
    busybox = timg.build_image(d / "busybox.tar", [layer.read_bytes()], name="busybox:latest",
                               cmd=["sh"], history=["busybox-static rootfs"])
    layers = timg.sample_layers(d)
    sample = timg.sample_image(d / "sample.tar", d)
    return Archives(d, layer, busybox, sample, tuple(layers))


# --- what is left after a failed load ------------------------------------------------------

def snapshot(images: ImageStore) -> dict[str, object]:
    """Everything a load may add: image rows, names, chain layers, leases, layers, mounts."""
    db = images.store.db
    return {
        "images": sorted(r[0] for r in db.execute("SELECT id FROM images")),
        "names": sorted(r[0] for r in db.execute("SELECT name FROM image_names")),
        "chains": sorted(r[0] for r in db.execute("SELECT chain_id FROM image_layers")),
        "leases": db.execute("SELECT COUNT(*) FROM image_leases").fetchone()[0],
        "layers": sorted(r.id for r in images.layers.store.list_layers(state=None)),
        "mounts": len(images.store.list_mounts()),
        "scratch": sorted(p.name for p in images.scratch.iterdir()),
    }


# --- running an image without the runner -----------------------------------------------------

def run_image(images: ImageStore, ref: str, argv: list[str] | None = None) -> str:
    """Run an image's Entrypoint+Cmd (or ``argv``) chrooted into its top layer; stdout.

    Not ``layerfs run``: these tests are about what the image holds, and a chroot
    works everywhere they run, the qemu guest included (no bridge, no cgroup setup).
    Env (with Docker's default PATH), WorkingDir and the command come from the config.
    """
    image: Image = images.get(ref)
    rc = image.run_config
    command = argv or rc.argv
    assert command, f"{ref} has no Cmd/Entrypoint"
    assert image.top_layer is not None
    workdir = rc.working_dir or "/"
    with images.layers.mounted(image.top_layer, readonly=True) as root:
        def enter() -> None:
            os.chroot(root)
            os.chdir(workdir)

        proc = subprocess.run(command, env=rc.environment(), preexec_fn=enter,
                              capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise LayerfsError(f"{ref}: {command} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


# --- one dockerd per session -------------------------------------------------------------------

@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DockerDaemon]:
    reason = DockerDaemon.unavailable()
    if reason:
        pytest.skip(f"docker interop: {reason}")
    sweep_dead_sessions(SCRATCH)
    # Short path: containerd's socket lives under the exec root (sun_path is 108 bytes).
    daemon = DockerDaemon(SCRATCH / f"docker-{os.getpid()}")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        daemon.remove_data()
