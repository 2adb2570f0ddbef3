"""Runs the inspect commands' devicemapper tests inside the qemu guest (one boot, in the
background).

explain (the story of every path of the sample image), explore, diff and union stats
through the library on a thin-pool root, and explain's shared vs exclusive bytes of a
file whose container appended to it (FIEMAP extents mapped to pool blocks with
thin_dump). No CLI processes: Python start-up costs seconds in the guest.
"""

from __future__ import annotations

from pathlib import Path

from .guest import check_passed, guest_marks, pytest_run

MUST_RUN = ["test_explain_tells_the_story_of_each_path[devicemapper]",
            "test_every_inspect_command_on_the_driver[devicemapper]",
            "test_block_level_drivers_tell_shared_from_exclusive_bytes[devicemapper]"]
RUN = pytest_run("inspect-devicemapper", [
    f"tests/inspect/test_explain.py::{MUST_RUN[0]}",
    f"tests/inspect/test_commands.py::{MUST_RUN[1]}",
    f"tests/inspect/test_drivers.py::{MUST_RUN[2]}",
], timeout=420)
pytestmark = guest_marks(RUN)


def test_inspect_on_devicemapper_in_the_guest(tmp_path: Path) -> None:
    summary = check_passed(RUN.result(tmp_path), must_run=MUST_RUN)
    assert summary.tests == 3, summary
