"""Shared by the CLI tests that run containers: a cgroup parent of their own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ..host_resources import cgroup_dirs


@pytest.fixture
def cgroup_parent() -> Iterator[str]:
    """A cgroup parent (LAYERFS_CGROUP_PARENT) only this test uses, removed afterwards by
    name; empty by then if the test's containers are gone (else the rmdir fails the test)."""
    name = "lfscli" + os.urandom(3).hex()
    yield name
    for d in cgroup_dirs(name):
        if d.is_dir():
            d.rmdir()
