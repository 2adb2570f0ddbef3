"""containerd on layerfs's devicemapper driver, inside the qemu guest (the host has no dm).

One boot runs, for ``layerfs-devicemapper``: containerd's own snapshotter
testsuite through its proxy client (tests/engines/test_containerd_testsuite.py;
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

from .guest import GUEST_MARKS, pytest_passes_in_guest

pytestmark = GUEST_MARKS

FULL = os.environ.get("LAYERFS_ENGINES_FULL") == "1"
GUEST_TESTS = [*(["tests/engines/test_containerd_testsuite.py"] if FULL else []),
               "tests/engines/test_containerd.py",
               "-k", "devicemapper" if FULL else "test_import_and_run and devicemapper",
               "-p", "pytest_timeout"]
MUST_RUN = ["test_import_and_run[devicemapper]",
            *(["test_containerd_snapshotter_testsuite[devicemapper]",
               "test_snapshots_agree_with_containerds_overlayfs[devicemapper]"] if FULL else [])]


def test_containerd_on_devicemapper_in_the_guest(tmp_path: Path) -> None:
    if FULL:
        reason = gosuite.missing()
        assert reason is None, reason
        gosuite.build()  # on the host: the guest only runs the cached binary
    pytest_passes_in_guest(GUEST_TESTS, tmp_path, must_run=MUST_RUN, timeout=1500 if FULL else 600,
                           disk_size="0", env={"LAYERFS_ENGINES_FULL": "1"} if FULL else None)
