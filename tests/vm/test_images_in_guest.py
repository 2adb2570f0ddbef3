"""Images on devicemapper: a docker-style image with deleted files and an opaque
directory, and an umoci layout with one whiteout per deleted file, load with the
deletions applied. devicemapper needs dm, so this runs in the qemu guest (one boot)."""

from __future__ import annotations

from pathlib import Path

from .guest import GUEST_MARKS, pytest_passes_in_guest

pytestmark = GUEST_MARKS

TESTS = ["tests/images/test_images.py::test_load_applies_deletions_on_every_driver",
         "tests/images/test_interop_umoci_skopeo.py::test_umoci_layout_loads_with_deletions"]


def test_image_loads_on_devicemapper_in_the_guest(tmp_path: Path) -> None:
    summary = pytest_passes_in_guest([*TESTS, "-k", "devicemapper"], tmp_path, timeout=500,
                                     must_run=["[devicemapper]", "[devicemapper-dir]",
                                               "[devicemapper-tar]"])
    assert summary.tests >= 3, summary
