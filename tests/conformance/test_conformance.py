"""The shipped conformance suite (layerfs.testing.conformance) over every registered
driver, with this repository's fixtures (tests/conftest.py): btrfs roots on a loop-backed
btrfs pool, devicemapper on a small loopback pool (in the qemu guest), and skips that
LAYERFS_REQUIRE_DRIVERS turns into failures (tests/test_every_driver_runs.py)."""

from __future__ import annotations

from layerfs.testing.conformance import DriverTests
from layerfs.testing.conformance.properties import PropertyTests


class TestConformance(DriverTests):
    pass


class TestProperties(PropertyTests):
    pass
