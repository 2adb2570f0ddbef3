"""Shared by the host-side tests that run a slice of the suite inside the qemu guest."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support import qemu

# Every host-side guest test: slow, never nested, and needs qemu (scripts/setup installs it).
GUEST_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LAYERFS_IN_GUEST") == "1",
                       reason="already inside the qemu guest: no nested guests"),
    pytest.mark.skipif(shutil.which(qemu.QEMU) is None,
                       reason=f"{qemu.QEMU} not installed (scripts/setup installs it)"),
]

F = TypeVar("F", bound=Callable[..., object])


def guest_test(test: F) -> F:
    """GUEST_MARKS on one test, for a module whose other tests run on the host."""
    for mark in GUEST_MARKS:
        test = mark(test)
    return test


def pytest_passes_in_guest(args: list[str], results_dir: Path, *, must_run: list[str],
                           timeout: int = 400, conftest: bool = True, disk_size: str = "0",
                           env: dict[str, str] | None = None) -> qemu.JunitSummary:
    """Boot once, run pytest ``args`` inside, and fail unless every selected test
    passed, none was skipped, and each name in ``must_run`` appears in the results."""
    extra = ["-p", "no:cacheprovider", "-v", "-rs"] + ([] if conftest else ["--noconftest"])
    result = qemu.pytest_in_guest([*args, *extra], timeout=timeout, disk_size=disk_size,
                                  results_dir=results_dir,
                                  env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **(env or {})})
    assert result.junit_xml, f"no junit.xml from the guest:\n{result.output}"
    summary = qemu.junit_summary(result.junit_xml)
    print(f"guest: {summary}; boot {result.boot_seconds:.1f} s, total {result.seconds:.1f} s")
    assert result.returncode == 0, f"guest pytest failed: {summary.failed}\n{result.output}"
    assert summary.failures == summary.errors == 0, summary.failed
    assert summary.skipped == 0, f"skipped in the guest: {summary.skipped_reasons}"
    for name in must_run:
        assert name in result.junit_xml, f"{name} did not run in the guest"
    return summary
