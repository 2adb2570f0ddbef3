"""overlay2's xfs project quotas need CONFIG_XFS_QUOTA, which this host's kernel
lacks and Debian's has: run that test inside the qemu guest (one boot)."""

from __future__ import annotations

from pathlib import Path

from .guest import GUEST_MARKS, pytest_passes_in_guest

pytestmark = GUEST_MARKS


def test_overlay2_xfs_quota_passes_in_the_guest(tmp_path: Path) -> None:
    pytest_passes_in_guest(["tests/drivers/test_overlay.py", "-k", "quota_on_xfs"], tmp_path,
                           conftest=False, timeout=300,
                           must_run=["test_quota_on_xfs_with_project_quotas"])
