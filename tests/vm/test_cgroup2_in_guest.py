"""The runner's cgroup v2 limits: this host binds memory/cpu/pids to v1, the qemu
guest mounts a pure v2 hierarchy (LAYERFS_CGROUP2). One boot, in the background."""

from __future__ import annotations

from pathlib import Path

from .guest import check_passed, guest_marks, pytest_run

RUN = pytest_run("cgroup2", ["tests/runtime/test_cgroups.py", "-k", "v2_limits_in_guest"])
pytestmark = guest_marks(RUN)


def test_cgroup_v2_limits_pass_in_the_guest(tmp_path: Path) -> None:
    check_passed(RUN.result(tmp_path), must_run=["test_v2_limits_in_guest"])
