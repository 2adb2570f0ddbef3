"""Every teaching lab in docs/labs/ runs here, as a student would run it.

One test per ``docs/labs/NN-*.md``: its ``sh lab`` blocks run in one shell
state, their output is checked against the ``text expect`` blocks, and the
``lab-cleanup`` blocks always run (see :mod:`tests.support.labs`). A lab whose
commands stop working, or whose output no longer shows what the text says it
shows, fails here with the block, its line in the Markdown and its output.

After each lab nothing may be left behind: no mount or loop device under the
lab's directory, no device-mapper device, network namespace, container veth,
container nft rule, cgroup or process. The runner removes what it finds (so one
broken lab cannot break the next) and the test fails.

The device-mapper lab (``runs-in: guest``) boots the qemu guest once for the
whole lab (~2 min under TCG), in the background from the session's start
(tests/vm/background.py); it is skipped only *inside* the guest, where no
nested guest can run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import labs
from tests.vm.background import GuestRun

LABS = labs.discover()
IN_GUEST = os.environ.get("LAYERFS_IN_GUEST") == "1"

# The curriculum of issue 10, in order: a missing or renamed lab is a failure.
CURRICULUM = ["copy-on-write", "aufs", "overlay", "devicemapper", "btrfs", "namespaces",
              "cgroups", "netfilter", "choosing-a-driver", "engines"]


def _guest_run(lab: labs.Lab) -> GuestRun:
    argv, timeout, disk = labs.guest_command(lab)
    return GuestRun(f"lab-{lab.path.stem}", argv, timeout=timeout, disk_size=disk,
                    env=labs.GUEST_ENV)


GUEST_RUNS: dict[Path, GuestRun] = {}


def _params() -> list[object]:
    out = []
    for path in LABS:
        lab = labs.parse_lab(path)
        # room for every block's own limit, plus the guest's boot and teardown
        budget = lab.budget + (240 if lab.in_guest else 60)
        marks = [pytest.mark.slow, pytest.mark.timeout(budget)]
        if lab.in_guest and not labs.host_can_run(lab):
            GUEST_RUNS[path] = _guest_run(lab)
            marks.append(pytest.mark.guest(GUEST_RUNS[path]))
        if lab.in_guest:
            marks.append(pytest.mark.skipif(IN_GUEST, reason="already inside the qemu guest: "
                                                             "no nested guests"))
        out.append(pytest.param(path, False, marks=marks, id=path.stem))
        if not lab.in_guest:
            # Again with `layerfs daemon` serving the lab's root, as a student may run it.
            out.append(pytest.param(path, True, marks=marks, id=f"{path.stem}-daemon"))
    return out


def test_the_curriculum_is_complete() -> None:
    names = [p.stem.split("-", 1)[1] for p in LABS]
    numbers = [p.stem.split("-", 1)[0] for p in LABS]
    assert names == CURRICULUM
    assert numbers == [f"{i:02d}" for i in range(1, len(CURRICULUM) + 1)]
    assert (labs.LABS_DIR / "README.md").exists(), "the instructor's guide is missing"


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_lab_structure(path: Path) -> None:
    """Readable on its own: goal, commands, expected output, questions, clean-up."""
    text = path.read_text()
    lab = labs.parse_lab(path)
    assert lab.title.startswith(f"Lab {int(path.stem[:2])}:"), lab.title
    for heading in ("**Goal.**", "**You need:**", "## Before you start", "## Questions",
                    "## Clean-up"):
        assert heading in text, f"{path.name}: no {heading}"
    runs = [b for b in lab.blocks if b.kind == labs.RUN]
    cleanups = [b for b in lab.blocks if b.always]
    assert runs, f"{path.name}: no `sh lab` block"
    assert cleanups and cleanups[-1] is lab.blocks[-1], \
        f"{path.name}: the last executable block must be a `sh lab-cleanup` block"
    assert sum(1 for b in runs if b.expect) >= len(runs) // 2, \
        f"{path.name}: most lab blocks should say what output to expect"
    assert "/var/lib/layerfs" not in "".join(b.code for b in lab.blocks), \
        f"{path.name}: labs keep everything under $LAB_DIR"


@pytest.mark.parametrize("path,daemon", _params())
def test_lab_runs(path: Path, daemon: bool, tmp_path: Path) -> None:
    if path in GUEST_RUNS:
        run = GUEST_RUNS[path]
        guest = run.result(tmp_path)
        assert run.results is not None
        result = labs.result_from_guest(labs.parse_lab(path), guest, run.results, guest.seconds)
    else:
        result = labs.run_lab(path, daemon=daemon)
    timings = ", ".join(f"{b.index}:{b.seconds:.1f}s" for b in result.blocks if b.status != "skipped")
    boot = f", guest boot {result.boot_seconds:.1f} s" if result.boot_seconds else ""
    print(f"{path.name}: {result.seconds:.1f} s on the {result.where}{boot}; blocks {timings}")
    assert result.ok, result.report()
    if daemon:
        assert result.daemon_commands, "no command of the lab went through the daemon"
