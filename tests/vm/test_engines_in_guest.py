"""containerd on layerfs's devicemapper driver, inside the qemu guest (the host has no dm).

One boot (in the background, tests/vm/background.py) runs, for ``layerfs-devicemapper``:
containerd's own snapshotter testsuite in full through its proxy client
(tests/engines/test_containerd_testsuite.py; the Go program is built on the host first,
the guest runs the cached binary), ``ctr image import`` / ``ctr run``, and ``ctr snapshots
ls/info/usage/tree/diff`` against containerd's overlayfs (tests/engines/test_containerd.py).
The mounts containerd gets are the thin devices' filesystems, as data. About six minutes
under TCG, five of them the testsuite (21 fresh thin pools, the 128-layer chain).
"""

from __future__ import annotations

from pathlib import Path

from tests.engines import gosuite

from .guest import check_passed, guest_marks, pytest_run

GUEST_TESTS = ["tests/engines/test_containerd_testsuite.py", "tests/engines/test_containerd.py",
               "-k", "devicemapper", "-p", "pytest_timeout"]
MUST_RUN = ["test_import_and_run[devicemapper]",
            "test_containerd_snapshotter_testsuite[devicemapper]",
            "test_snapshots_agree_with_containerds_overlayfs[devicemapper]"]


def build_gosuite() -> None:
    reason = gosuite.missing()
    assert reason is None, reason
    gosuite.build()  # on the host: the guest only runs the cached binary


RUN = pytest_run("engines-devicemapper", GUEST_TESTS, timeout=1200, before=build_gosuite)
pytestmark = guest_marks(RUN)


def test_containerd_on_devicemapper_in_the_guest(tmp_path: Path) -> None:
    check_passed(RUN.result(tmp_path), must_run=MUST_RUN)
