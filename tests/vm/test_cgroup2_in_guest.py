"""The runner's cgroup v2 limits: this host binds memory/cpu/pids to v1, the qemu
guest mounts a pure v2 hierarchy (LAYERFS_CGROUP2). One boot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from layerfs.testing import qemu

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LAYERFS_IN_GUEST") == "1",
                       reason="already inside the qemu guest: no nested guests"),
    pytest.mark.skipif(shutil.which(qemu.QEMU) is None,
                       reason=f"{qemu.QEMU} not installed (scripts/setup installs it)"),
]


def test_cgroup_v2_limits_pass_in_the_guest(tmp_path: Path) -> None:
    result = qemu.pytest_in_guest(
        ["tests/runtime/test_cgroups.py", "-k", "v2_limits_in_guest", "-p", "no:cacheprovider",
         "-v", "-rs"],
        timeout=400, disk_size="0", results_dir=tmp_path,
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.junit_xml, f"no junit.xml from the guest:\n{result.output}"
    summary = qemu.junit_summary(result.junit_xml)
    print(f"guest: {summary}; boot {result.boot_seconds:.1f} s, total {result.seconds:.1f} s")
    assert result.returncode == 0, f"guest pytest failed: {summary.failed}\n{result.output}"
    assert summary.skipped == 0 and summary.failures == summary.errors == 0, summary
    assert "test_v2_limits_in_guest" in result.junit_xml
