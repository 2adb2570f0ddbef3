"""Skips must never hide a driver in CI: the drivers listed in
LAYERFS_REQUIRE_DRIVERS (scripts/test sets it) must be supported here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs import plugins

from .conftest import ALL_DRIVERS, root_for

REQUIRED = [d for d in os.environ.get("LAYERFS_REQUIRE_DRIVERS", "").split(",") if d]


@pytest.mark.parametrize("name", REQUIRED or ["-"])
def test_required_driver_is_supported(name: str, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    if not REQUIRED:
        pytest.skip("LAYERFS_REQUIRE_DRIVERS is not set (scripts/test sets it)")
    assert name in ALL_DRIVERS, f"{name} is required but not registered"
    probe = plugins.probe(name, root_for(name, tmp_path, request))
    assert probe.supported, f"{name} must run on this machine, but: {probe.reason}"


def test_info_json_lists_every_driver(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(tmp_path / "r"),
                           "--driver", "vfs", "info", "--json"],
                          capture_output=True, text=True, check=True)
    data = json.loads(proc.stdout)
    assert data["driver"] == "vfs"
    listed = {d["name"]: d for d in data["drivers"]}
    assert set(listed) == set(ALL_DRIVERS)
    for d in listed.values():
        assert d["supported"] or d["reason"], f"{d['name']}: unsupported without a reason"
