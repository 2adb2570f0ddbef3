"""Shared by the host-side tests that run a slice of the suite inside the qemu guest.

Each module declares its guest boot as a :class:`~tests.vm.background.GuestRun`
(:func:`pytest_run` for a pytest slice) and marks its test with :func:`guest_marks`:
the run starts in the background when the session starts, and the test checks its
result (:func:`check_passed`) at the end of the session.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support import qemu

from .background import GuestRun

F = TypeVar("F", bound=Callable[..., object])

# Every host-side guest test: slow, never nested, and needs qemu (scripts/setup installs it).
GUEST_MARKS = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LAYERFS_IN_GUEST") == "1",
                       reason="already inside the qemu guest: no nested guests"),
    pytest.mark.skipif(shutil.which(qemu.QEMU) is None,
                       reason=f"{qemu.QEMU} not installed (scripts/setup installs it)"),
]


def guest_marks(run: GuestRun) -> list[pytest.MarkDecorator]:
    """The marks of a test that checks ``run``: GUEST_MARKS and the run itself."""
    return [*GUEST_MARKS, pytest.mark.guest(run)]


def pytest_run(name: str, args: Sequence[str], *, timeout: int = 400, conftest: bool = True,
               disk_size: str = "0", env: Mapping[str, str] | None = None,
               before: Callable[[], None] | None = None) -> GuestRun:
    """A guest run of ``python -m pytest ARGS`` from the repo's venv, with junit XML."""
    extra = ["-p", "no:cacheprovider", "-v", "-rs"] + ([] if conftest else ["--noconftest"])
    python = qemu.REPO_ROOT / ".venv" / "bin" / "python"
    argv = [str(python), "-m", "pytest", *args, *extra,
            f"--junitxml={qemu.GUEST_RESULTS}/junit.xml"]
    return GuestRun(name, argv, timeout=timeout, disk_size=disk_size,
                    env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **(env or {})}, before=before)


def check_passed(result: qemu.GuestResult, *, must_run: Sequence[str]) -> qemu.JunitSummary:
    """Fail unless every selected test passed, none was skipped, and each name in
    ``must_run`` appears in the results."""
    assert result.junit_xml, f"no junit.xml from the guest:\n{result.output}"
    summary = qemu.junit_summary(result.junit_xml)
    print(f"guest: {summary}; boot {result.boot_seconds or 0:.1f} s, "
          f"total {result.seconds:.1f} s")
    assert result.returncode == 0, f"guest pytest failed: {summary.failed}\n{result.output}"
    assert summary.failures == summary.errors == 0, summary.failed
    assert summary.skipped == 0, f"skipped in the guest: {summary.skipped_reasons}"
    for name in must_run:
        assert name in result.junit_xml, f"{name} did not run in the guest\n{result.output}"
    return summary


def guest_test(test: F) -> F:
    """GUEST_MARKS on one test, for a module whose other tests run on the host."""
    for mark in GUEST_MARKS:
        test = mark(test)
    return test


def pytest_passes_in_guest(args: list[str], results_dir: Path, *, must_run: list[str],
                           timeout: int = 400, conftest: bool = True, disk_size: str = "0",
                           env: dict[str, str] | None = None) -> qemu.JunitSummary:
    """Boot now (in the foreground: for a run that needs what the test made first, in
    ``results_dir``), run pytest ``args`` inside, and :func:`check_passed`."""
    run = pytest_run("foreground", args, timeout=timeout, conftest=conftest,
                     disk_size=disk_size, env=env)
    return check_passed(run.execute(results_dir), must_run=must_run)
