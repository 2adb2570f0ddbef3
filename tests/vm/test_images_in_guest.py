"""Images on devicemapper: a docker-style image with deleted files and an opaque
directory, and an umoci layout with one whiteout per deleted file, load with the
deletions applied. devicemapper needs dm, so this runs in the qemu guest (one boot)."""

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

TESTS = ["tests/images/test_images.py::test_load_applies_deletions_on_every_driver",
         "tests/images/test_interop_umoci_skopeo.py::test_umoci_layout_loads_with_deletions"]


def test_image_loads_on_devicemapper_in_the_guest(tmp_path: Path) -> None:
    result = qemu.pytest_in_guest(
        [*TESTS, "-k", "devicemapper", "-p", "no:cacheprovider", "-v", "-rs"],
        timeout=500, disk_size="0", results_dir=tmp_path,
        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.junit_xml, f"no junit.xml from the guest:\n{result.output}"
    summary = qemu.junit_summary(result.junit_xml)
    print(f"guest: {summary}; boot {result.boot_seconds:.1f} s, total {result.seconds:.1f} s")
    assert result.returncode == 0, f"guest pytest failed: {summary.failed}\n{result.output}"
    assert summary.skipped == 0 and summary.failures == summary.errors == 0, summary
    assert summary.tests >= 2, summary
