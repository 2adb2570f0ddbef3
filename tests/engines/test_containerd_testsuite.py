"""containerd's own snapshotter conformance suite, run against layerfs on every native driver.

containerd ships the suite its snapshotters must pass (``snapshots/testsuite``:
21 scenarios, from the basic prepare/commit/view cycle to a 128-layer mount,
labels, filters and removal rules). :mod:`tests.engines.gosuite` builds a small
Go program, offline from Debian's packages, that runs it through containerd's
proxy client (``snapshots/proxy``) -- the code containerd itself uses for a
proxy snapshotter -- against a layerfs server on a fresh root per scenario.

The suite skips ``Rename`` itself ("still fails on some kernels with
overlay"); everything else must pass. devicemapper runs it in the qemu guest
(tests/vm/test_engines_in_guest.py).

On aufs every snapshot mount is a FUSE union: the servers fork from one warm fork
server shared by the scenarios' servers (tests/engines/suite_helper.py), as in the
daemon, so the whole suite takes seconds, not the minutes of a cold interpreter per
mount.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from . import gosuite
from .conftest import ALL, driver_supported, engine_root

SKIPPED_BY_THE_SUITE = {"Rename"}
SCENARIOS = ["Basic", "StatActive", "StatComitted", "TransitivityTest", "PreareViewFailingtest",
             "Update", "Remove", "Walk", "LayerFileupdate", "RemoveDirectoryInLowerLayer",
             "Chown", "DirectoryPermissionOnCommit", "RemoveIntermediateSnapshot",
             "DeletedFilesInChildSnapshot", "MoveFileFromLowerLayer", "ViewReadonly",
             "StatInWalk", "CloseTwice", "RootPermission", "128LayersMount"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def suite_binary() -> Path:
    reason = gosuite.missing()
    if reason:
        pytest.skip(reason)
    return gosuite.build()


@pytest.mark.parametrize("driver", ALL)
def test_containerd_snapshotter_testsuite(driver: str, suite_binary: Path, tmp_path: Path,
                                          request: pytest.FixtureRequest) -> None:
    # The suite makes one root per scenario below ``base`` (on btrfs for btrfs).
    base = engine_root(driver, tmp_path, request)
    reason = driver_supported(driver, base)
    if reason is not None:
        pytest.skip(f"{driver} not supported here: {reason}")
    with tempfile.TemporaryDirectory(prefix="lfs-suite-", dir="/tmp") as sockdir:
        result = gosuite.run(suite_binary, driver, tmpdir=base, sockdir=Path(sockdir))
    tail = "\n".join(result.output.splitlines()[-80:])
    assert result.returncode == 0 and not result.failed, \
        f"containerd testsuite on layerfs-{driver}: failed {result.failed}\n{tail}"
    assert set(result.skipped) <= SKIPPED_BY_THE_SUITE, result.skipped
    assert sorted(result.passed) == sorted(SCENARIOS), result.passed
    print(f"layerfs-{driver}: {len(result.passed)} passed, skipped by the suite: "
          f"{result.skipped}")
