"""overlay2's xfs project quotas need CONFIG_XFS_QUOTA, which this host's kernel
lacks and Debian's has: run that test inside the qemu guest (one boot, in the background)."""

from __future__ import annotations

from pathlib import Path

from .guest import check_passed, guest_marks, pytest_run

RUN = pytest_run("overlay-quota", ["tests/drivers/test_overlay.py", "-k", "quota_on_xfs"],
                 conftest=False, timeout=300)
pytestmark = guest_marks(RUN)


def test_overlay2_xfs_quota_passes_in_the_guest(tmp_path: Path) -> None:
    check_passed(RUN.result(tmp_path), must_run=["test_quota_on_xfs_with_project_quotas"])
