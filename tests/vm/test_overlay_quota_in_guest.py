"""overlay2's xfs project quotas need CONFIG_XFS_QUOTA, which this host's kernel
lacks and Debian's has: run that test inside the qemu guest (one boot)."""

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


def test_overlay2_xfs_quota_passes_in_the_guest(tmp_path: Path) -> None:
    result = qemu.pytest_in_guest(
        ["tests/drivers/test_overlay.py", "-k", "quota_on_xfs", "--noconftest",
         "-p", "no:cacheprovider", "-v", "-rs"],
        timeout=300, disk_size="0", results_dir=tmp_path,
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.junit_xml, f"no junit.xml from the guest:\n{result.output}"
    summary = qemu.junit_summary(result.junit_xml)
    print(f"guest: {summary}; boot {result.boot_seconds:.1f} s, total {result.seconds:.1f} s")
    assert result.returncode == 0, f"guest pytest failed: {summary.failed}\n{result.output}"
    assert summary.skipped == 0 and summary.failures == summary.errors == 0, summary
    assert "test_quota_on_xfs_with_project_quotas" in result.junit_xml
