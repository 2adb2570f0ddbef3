"""The README's tour, run verbatim: from making its tars to its cleanup.

A new user copies that block into a shell; if it breaks, the first hour is over. The
block is taken from README.md as it is, and run with ``bash -euo pipefail`` (any
failing command fails the test), with the checkout's venv first on PATH (as after
``source .venv/bin/activate``). Only the cgroup parent is this test's own, so that
the runner's cgroups can be removed by name afterwards. Then nothing may be left:
no scratch folder, no mount, no loop device, no cgroup.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from layerfs import mount as mountlib

from ..host_resources import cgroup_dirs

REPO_ROOT = Path(__file__).resolve().parents[2]
TOUR_GLOB = "layerfs-tour.*"
TOUR_PARENT = Path("/var/tmp")


def tour_block() -> str:
    """The first ``sh`` block under the README's "A short tour" heading."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## A short tour"):]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README.md: no sh block in the tour"
    return match.group(1)


def _clean_up_after_failure(tour: Path) -> None:
    layerfs = [sys.executable, "-m", "layerfs"]
    if (tour / "root" / "layerfs.db").exists():
        subprocess.run([*layerfs, "--root", str(tour / "root"), "system", "reset", "-f"],
                       capture_output=True)
    if mountlib.is_mounted(tour / "btrfs"):
        subprocess.run([*layerfs, "pool", "destroy", "btrfs", str(tour / "btrfs")],
                       capture_output=True)
    for info in mountlib.mounts_under(tour):
        mountlib.unmount(info.target, lazy=True)
    shutil.rmtree(tour, ignore_errors=True)


def test_the_readme_tour_runs_verbatim_and_leaves_nothing(cgroup_parent: str) -> None:
    script = tour_block()
    before = set(TOUR_PARENT.glob(TOUR_GLOB))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LAYERFS_") and k != "VIRTUAL_ENV"}
    env.update(PATH=f"{REPO_ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
               LAYERFS_CGROUP_PARENT=cgroup_parent)
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd="/",
                              capture_output=True, text=True, env=env, timeout=600,
                              stdin=subprocess.DEVNULL)
        made = set(TOUR_PARENT.glob(TOUR_GLOB)) - before
        assert proc.returncode == 0, (f"the tour failed ({proc.returncode}):\n"
                                      f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        out = proc.stdout
        for expected in ("C /etc", "A /etc/motd", "D /etc/group",   # layer changes
                         "Loaded image: busybox:latest",
                         "box",                                     # the container's hostname
                         "changed",                                 # from the committed image
                         "Storage Driver: btrfs",                   # on the pool
                         "removed container"):                      # system reset
            assert expected in out, f"{expected!r} missing from the tour's output:\n{out}"
        assert "layerfs-init" in out   # ps inside: PID 1 is layerfs's init
        assert not proc.stderr.count("Traceback"), proc.stderr
        assert not made, f"the tour left {sorted(made)}"
        tour_path = re.search(r"/var/tmp/layerfs-tour\.\w+", out)
        assert tour_path, out
        loops = subprocess.run(["losetup", "--list", "--noheadings", "--output",
                                "NAME,BACK-FILE"], capture_output=True, text=True).stdout
        assert tour_path.group(0) not in loops, f"loop devices left: {loops}"
    finally:
        for tour in set(TOUR_PARENT.glob(TOUR_GLOB)) - before:
            _clean_up_after_failure(tour)
    leftover_cgroups = [str(c) for d in cgroup_dirs(cgroup_parent) if d.is_dir()
                        for c in d.iterdir() if c.is_dir()]
    assert not leftover_cgroups, leftover_cgroups
