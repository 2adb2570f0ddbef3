"""Runs tests/drivers/test_dm_plumbing.py inside the qemu guest, so CI really runs it.

On the host those tests skip (no device-mapper); here they must all run and
pass, with nothing skipped. One guest boot; about a minute under TCG.
"""

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

DM_TESTS = "tests/drivers/test_dm_plumbing.py"
MUST_RUN = ["test_loopback_pool_lifecycle", "test_pool_full_fails_cleanly_and_still_destroys",
            "test_direct_lvm_refuses_a_used_device_unless_forced",
            "test_direct_lvm_pool_lifecycle"]


def test_dm_plumbing_passes_in_the_guest_with_nothing_skipped(tmp_path: Path) -> None:
    # Python in the guest is ~10x slower. These tests need no shared fixture and
    # no plugin, so skip tests/conftest.py (session-wide driver probing) and
    # plugin autoloading (hypothesis, benchmark...: ~20 s of collection there).
    result = qemu.pytest_in_guest(
        [DM_TESTS, "--noconftest", "-p", "no:cacheprovider", "-v", "-rs"],
        timeout=600, disk_size="4G", results_dir=tmp_path,
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.junit_xml, f"no junit.xml from the guest:\n{result.output}"
    summary = qemu.junit_summary(result.junit_xml)
    print(f"guest: {summary}; boot {result.boot_seconds:.1f} s, total {result.seconds:.1f} s")
    assert result.returncode == 0, f"guest pytest failed: {summary.failed}\n{result.output}"
    assert summary.failures == summary.errors == 0, summary.failed
    assert summary.skipped == 0, f"skipped in the guest: {summary.skipped_reasons}"
    for name in MUST_RUN:
        assert name in result.junit_xml, f"{name} did not run in the guest"
