"""The fixtures the conformance suite runs on (a pytest plugin module).

The tests take ``store``: a :class:`~layerfs.layers.LayerStore` on a fresh root, opened
with the driver under test, wiped and checked for leftover mounts afterwards. It is
built from three fixtures you can override in your own ``conftest.py``:

``driver_name``
    the driver under test, parametrized over ``LAYERFS_CONFORMANCE_DRIVERS`` (comma
    separated) or, without it, over every registered driver;
``layer_root``
    a fresh, empty directory for the root (under ``LAYERFS_CONFORMANCE_ROOT`` if set,
    e.g. a btrfs mount, else pytest's ``tmp_path``);
``driver_factory``
    ``root -> LayerStore``, like containerd's ``SnapshotterSuite`` factory; the default
    opens the root with ``driver_name`` and the options in
    ``LAYERFS_CONFORMANCE_OPTIONS`` (``KEY=VALUE,...``), and skips the test with the
    driver's reason when it raises :class:`~layerfs.errors.DriverNotSupported`.

Capability fixtures say what the driver under test does, as computed by the driver
instance after probing the host: ``capabilities`` (a
:class:`~layerfs.driver.Capabilities`); tests that need a capability skip without it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs import plugins
from layerfs.driver import Capabilities
from layerfs.errors import DriverNotSupported
from layerfs.layers import LayerStore

DriverFactory = Callable[[Path], LayerStore]

DRIVERS_ENV = "LAYERFS_CONFORMANCE_DRIVERS"
OPTIONS_ENV = "LAYERFS_CONFORMANCE_OPTIONS"
ROOT_ENV = "LAYERFS_CONFORMANCE_ROOT"


def selected_drivers() -> list[str]:
    """The drivers to test: ``$LAYERFS_CONFORMANCE_DRIVERS``, else every registered one."""
    names = [n.strip() for n in os.environ.get(DRIVERS_ENV, "").split(",") if n.strip()]
    return names or sorted(plugins.registered())


def open_or_skip(driver: str, root: Path, options: list[str] | None = None) -> LayerStore:
    """The root opened with ``driver``; the test skips (with the reason) if the host
    cannot run it."""
    try:
        return LayerStore.open(root, driver, options)
    except DriverNotSupported as e:
        pytest.skip(f"{driver} not supported here: {e.reason}")


def close_and_check(store: LayerStore) -> None:
    """Wipe and close a store; fail if anything is still mounted under its root."""
    root = store.root
    store.wipe()
    store.close()
    leftovers = mountlib.mounts_under(root)
    for m in leftovers:
        mountlib.unmount(m.target, lazy=True)
    assert not leftovers, f"mounts left under {root}: {[m.target for m in leftovers]}"


@pytest.fixture(params=selected_drivers())
def driver_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def layer_root(tmp_path: Path) -> Iterator[Path]:
    base = os.environ.get(ROOT_ENV)
    if not base:
        yield tmp_path / "root"
        return
    root = Path(base) / f"{os.getpid()}-{tmp_path.name}"
    root.mkdir(parents=True)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def driver_factory(driver_name: str) -> DriverFactory:
    options = [o for o in os.environ.get(OPTIONS_ENV, "").split(",") if o] or None
    return lambda root: open_or_skip(driver_name, root, options)


@pytest.fixture
def store(driver_factory: DriverFactory, layer_root: Path) -> Iterator[LayerStore]:
    """A fresh LayerStore on its own root; wiped and checked for leaked mounts afterwards."""
    s = driver_factory(layer_root)
    try:
        yield s
    finally:
        close_and_check(s)


@pytest.fixture
def capabilities(store: LayerStore) -> Capabilities:
    """What the driver under test does natively, after probing this host."""
    return store.driver.capabilities
