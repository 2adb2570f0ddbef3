"""Runs the devicemapper driver's tests inside the qemu guest, so CI really runs them.

One guest boot runs, in loopback mode, the whole conformance suite for
devicemapper (tests/conformance, ``-k devicemapper``: create, snapshots,
diff/apply round trips, the 128-layer chain, the diff/apply property test,
one answer: the same edits as on vfs give the same changes and diffs)
and tests/drivers/test_devicemapper.py (direct-lvm create/snapshot/remove/
destroy on the scratch disk, a full pool, min_free_space, status, crash
recovery, the generic crash suite, deferred removal, ``layerfs pool``) and
``layerfs system df|prune|reset`` (tests/cli/test_system.py). On
the host those skip (no device-mapper); here they must all run and pass,
with nothing skipped, within the guest timeout (BUDGET). The boot starts in the background
when the session starts (tests/vm/background.py).
vagrant/provision.sh --check (the Vagrant VM's prerequisites check) runs first.
"""

from __future__ import annotations

from pathlib import Path

from tests.support import qemu

from .background import GuestRun
from .guest import check_passed, guest_marks

GUEST_TESTS = ["tests/conformance", "tests/drivers/test_devicemapper.py",
               "tests/cli/test_system.py", "-k", "devicemapper"]
# Seconds for the whole guest run, boot included: 600 ran near its limit under load;
# `layerfs system df|prune|reset` on devicemapper added one test (a pool, two image loads,
# one `layerfs` start in the guest), hence 720 (now beside the host's tests, hence 900).
BUDGET = 900
MUST_RUN = [
    "test_deep_layer_read_128[devicemapper]",
    "test_diff_apply_reproduces_child[devicemapper]",
    "test_diff_apply_round_trip_with_sizes[devicemapper]",
    "test_same_edits_same_changes_on_every_driver[devicemapper]",
    "test_the_issue_scenario_gives_one_list[devicemapper]",
    "test_direct_lvm_create_snapshot_remove_destroy",
    "test_direct_lvm_refuses_a_device_with_a_filesystem_unless_forced",
    "test_a_full_pool_fails_writes_cleanly_and_recovers",
    "test_min_free_space_refuses_new_layers_with_a_clear_error",
    "test_a_crash_between_the_dm_message_and_the_store_write_is_recovered",
    "test_the_generic_crash_suite_on_devicemapper",
    "test_loopback_pool_layout_status_and_metadata",
    "test_cli_pool_create_and_destroy_loopback",
    "test_system_df_prune_reset_on_devicemapper",
]

# tests/conftest.py is needed (the conformance fixtures); plugin autoloading is
# not (hypothesis works without its plugin) and costs ~20 s of collection there.
# Passed tests' tmp dirs (sparse pool files in guest RAM) go as soon as they pass.
# The Vagrant VM's provisioning check runs first: the same prerequisites, one script.
RUN = GuestRun(
    "devicemapper",
    ["sh", "-c", 'sh vagrant/provision.sh --check && exec "$@"', "sh",
     str(qemu.REPO_ROOT / ".venv" / "bin" / "python"), "-m", "pytest", *GUEST_TESTS,
     "-p", "no:cacheprovider", "-o", "tmp_path_retention_policy=failed", "-q", "-rs",
     "--durations=15", f"--junitxml={qemu.GUEST_RESULTS}/junit.xml"],
    timeout=BUDGET - 60, disk_size="4G", env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
pytestmark = guest_marks(RUN)


def test_devicemapper_passes_in_the_guest_with_nothing_skipped(tmp_path: Path) -> None:
    result = RUN.result(tmp_path)
    assert "provision: devicemapper prerequisites present" in result.output, result.output
    check_passed(result, must_run=MUST_RUN)
