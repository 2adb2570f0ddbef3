"""Runs tests/drivers/test_dm_plumbing.py inside the qemu guest, so CI really runs it.

On the host those tests skip (no device-mapper); here they must all run and
pass, with nothing skipped. One guest boot, in the background; about a minute under TCG.
"""

from __future__ import annotations

from pathlib import Path

from .guest import check_passed, guest_marks, pytest_run

# Python in the guest is ~10x slower. These tests need no shared fixture, so skip
# tests/conftest.py (session-wide driver probing); plugin autoloading is off too
# (hypothesis, benchmark...: ~20 s of collection there).
RUN = pytest_run("dm-plumbing", ["tests/drivers/test_dm_plumbing.py"], timeout=600,
                 conftest=False, disk_size="4G")
pytestmark = guest_marks(RUN)

MUST_RUN = ["test_loopback_pool_lifecycle", "test_pool_full_fails_cleanly_and_still_destroys",
            "test_direct_lvm_refuses_a_used_device_unless_forced",
            "test_direct_lvm_pool_lifecycle"]


def test_dm_plumbing_passes_in_the_guest_with_nothing_skipped(tmp_path: Path) -> None:
    check_passed(RUN.result(tmp_path), must_run=MUST_RUN)
