"""Shared fixtures: a fresh layerfs root per test, for every registered driver.

A driver the host can't run is skipped with its reason printed (``-rs``), but
CI sets ``LAYERFS_REQUIRE_DRIVERS`` to the drivers that must run, so a skip can
never hide a broken driver there (see tests/test_every_driver_runs.py).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs import plugins
from layerfs.errors import DriverNotSupported
from layerfs.layers import LayerStore
from layerfs.testing.conformance.fixtures import DriverFactory, open_or_skip

from .daemons import cli_mode, daemons  # noqa: F401  (fixtures: the CLI suites' two modes)
from .vm.background import (
    background_guests,  # noqa: F401  (autouse session fixture)
    run_guest_tests_last,
)

# The suite's fixtures (store, capabilities, ...); driver_name, layer_root and
# driver_factory are overridden below.
pytest_plugins = ["layerfs.testing.conformance.fixtures"]

ALL_DRIVERS = sorted(plugins.registered())
# Device-mapper needs a kernel with dm: it runs inside the qemu guest.
NATIVE_DRIVERS = [d for d in ALL_DRIVERS if d != "devicemapper"]


def pytest_configure(config: pytest.Config) -> None:
    # A test run started in the background of a script (`./scripts/test &`) or under nohup
    # inherits SIGINT ignored, and so would every `layerfs` the tests start: the Ctrl-C
    # tests would then see a command that (rightly) ignores Ctrl-C. Their children get
    # the default disposition back (a handler, unlike SIG_IGN, is reset by exec).
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The qemu guest runs start in the background with the session; their tests wait
    # for them, so they go last (tests/vm/background.py).
    run_guest_tests_last(items)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for probe in plugins.probe_all(Path("/tmp")):
        state = "supported" if probe.supported else f"NOT supported: {probe.reason}"
        lines.append(f"layerfs driver {probe.name}: {state}")
    return lines


@pytest.fixture(scope="session")
def btrfs_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A loop-backed btrfs filesystem for the whole session (made like `layerfs pool create`)."""
    from layerfs import pool

    base = tmp_path_factory.mktemp("btrfs-pool")
    try:
        handle = pool.create_btrfs(base / "pool.img", base / "mnt", size=4 << 30)
    except DriverNotSupported as e:
        pytest.skip(f"btrfs: {e.reason}")
    try:
        yield handle.mountpoint
    finally:
        pool.destroy_btrfs(handle.mountpoint)


@pytest.fixture(scope="session")
def debian_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A minimal Debian made by debootstrap (the host's suite, from the Debian mirror), once
    per session: tests read it, or copy it before they change anything. A mirror that
    cannot be reached fails with debootstrap's last lines, not a skip."""
    import shutil

    from layerfs.testing import images as timg

    if shutil.which("debootstrap") is None:
        pytest.fail("debootstrap is not installed (scripts/setup installs it)")
    tree = tmp_path_factory.mktemp("debian") / "rootfs"
    try:
        yield timg.debian_rootfs(tree)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def root_for(driver: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    if driver == "btrfs":
        pool_mnt: Path = request.getfixturevalue("btrfs_pool")
        root = pool_mnt / tmp_path.name
        root.mkdir()
        return root
    return tmp_path / "root"


@pytest.fixture(params=ALL_DRIVERS)
def driver_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def open_store_or_skip(driver: str, root: Path, options: list[str] | None = None) -> LayerStore:
    from .dm_fixtures import options_for  # devicemapper: a small loopback pool

    return open_or_skip(driver, root, options_for(driver, options))


@pytest.fixture
def layer_root(driver_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    root = root_for(driver_name, tmp_path, request)
    yield root
    if driver_name == "btrfs":
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def driver_factory(driver_name: str) -> DriverFactory:
    """The shipped suite's ``store`` (layerfs.testing.conformance.fixtures) opens roots
    through this: devicemapper gets the small loopback pool of tests/dm_fixtures.py."""
    return lambda root: open_store_or_skip(driver_name, root)


def in_guest() -> bool:
    return os.environ.get("LAYERFS_IN_GUEST") == "1"
