"""Runs the inspect commands' devicemapper tests inside the qemu guest (one boot).

explain (the story of every path of the sample image), explore, diff and union stats
through the library on a thin-pool root, and explain's shared vs exclusive bytes of a
file whose container appended to it (FIEMAP extents mapped to pool blocks with
thin_dump). No CLI processes: Python start-up costs seconds in the guest.
"""

from __future__ import annotations

from pathlib import Path

from .guest import GUEST_MARKS, pytest_passes_in_guest

pytestmark = GUEST_MARKS

GUEST_TESTS = [
    "tests/inspect/test_explain.py::test_explain_tells_the_story_of_each_path[devicemapper]",
    "tests/inspect/test_commands.py::test_every_inspect_command_on_the_driver[devicemapper]",
    "tests/inspect/test_drivers.py::"
    "test_block_level_drivers_tell_shared_from_exclusive_bytes[devicemapper]",
]


def test_inspect_on_devicemapper_in_the_guest(tmp_path: Path) -> None:
    summary = pytest_passes_in_guest(
        GUEST_TESTS, tmp_path, timeout=420,
        must_run=["test_explain_tells_the_story_of_each_path[devicemapper]",
                  "test_every_inspect_command_on_the_driver[devicemapper]",
                  "test_block_level_drivers_tell_shared_from_exclusive_bytes[devicemapper]"])
    assert summary.tests == 3, summary
