"""containerd on layerfs's devicemapper driver, inside the qemu guest (the host has no dm).

One boot (in the background) runs, for ``layerfs-devicemapper``: containerd's own
snapshotter testsuite through its proxy client (tests/engines/test_containerd_testsuite.py;
the Go program is built on the host first, the guest runs the cached binary),
and ``ctr image import`` / ``ctr run`` / ``ctr snapshots ls/info/usage/tree/diff``
against containerd's overlayfs (tests/engines/test_containerd.py). The mounts
containerd gets are the thin devices' filesystems, as data. Python runs ~20 times
slower in the guest: CI runs ``ctr image import`` and ``ctr run`` (~2 minutes with the
boot); ``LAYERFS_ENGINES_FULL=1`` runs everything (~15 minutes, passes).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.engines import gosuite

from .guest import check_passed, guest_marks, pytest_run

FULL = os.environ.get("LAYERFS_ENGINES_FULL") == "1"
GUEST_TESTS = [*(["tests/engines/test_containerd_testsuite.py"] if FULL else []),
               "tests/engines/test_containerd.py",
               "-k", "devicemapper" if FULL else "test_import_and_run and devicemapper",
               "-p", "pytest_timeout"]
MUST_RUN = ["test_import_and_run[devicemapper]",
            *(["test_containerd_snapshotter_testsuite[devicemapper]",
               "test_snapshots_agree_with_containerds_overlayfs[devicemapper]"] if FULL else [])]


def build_gosuite() -> None:
    reason = gosuite.missing()
    assert reason is None, reason
    gosuite.build()  # on the host: the guest only runs the cached binary


RUN = pytest_run("engines-devicemapper", GUEST_TESTS, timeout=1500 if FULL else 600,
                 env={"LAYERFS_ENGINES_FULL": "1"} if FULL else None,
                 before=build_gosuite if FULL else None)
pytestmark = guest_marks(RUN)


def test_containerd_on_devicemapper_in_the_guest(tmp_path: Path) -> None:
    check_passed(RUN.result(tmp_path), must_run=MUST_RUN)
