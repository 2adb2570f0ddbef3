"""The runner's cgroup v2 limits: this host binds memory/cpu/pids to v1, the qemu
guest mounts a pure v2 hierarchy (LAYERFS_CGROUP2). One boot."""

from __future__ import annotations

from pathlib import Path

from .guest import GUEST_MARKS, pytest_passes_in_guest

pytestmark = GUEST_MARKS


def test_cgroup_v2_limits_pass_in_the_guest(tmp_path: Path) -> None:
    pytest_passes_in_guest(["tests/runtime/test_cgroups.py", "-k", "v2_limits_in_guest"],
                           tmp_path, must_run=["test_v2_limits_in_guest"])
