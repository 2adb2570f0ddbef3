"""Resource limits: memory (OOM reported as such), pids, CPU quota; cgroups removed on exit.

The dev VM is cgroup v1 hybrid: memory, cpu and pids are bound to v1, and the
cgroup2 hierarchy at /sys/fs/cgroup/unified has no controller to enable. So the
v2 code path runs here against that real cgroup2 hierarchy *without limits*
(create, join, namespace, removal), and the v2 limits run in the qemu guest
(``-m vm``, where ``LAYERFS_CGROUP2`` names a pure v2 mount).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.errors import LayerfsError
from layerfs.runtime import RuntimeConfig
from layerfs.runtime.cgroups import DEFAULT_ROOT, Cgroup, Limits, detect
from layerfs.runtime.security import CAP_MKNOD

from .conftest import Session
from .helpers import run, sh, start_logged, wait_for

UNIFIED = DEFAULT_ROOT / "unified"


def test_memory_limit_oom_kill_is_reported(rootfs: Path, state: Path,
                                           config: RuntimeConfig) -> None:
    # The shell doubles a string until the 32 MiB limit is hit.
    spec = sh(rootfs, "x=0123456789abcdef; while :; do x=$x$x; done", memory=32 << 20)
    t0 = time.monotonic()
    status, out = run(spec, state, config, timeout=30)
    assert (status.code, status.signal, status.oom_killed) == (137, 9, True), out
    assert time.monotonic() - t0 < 20


def test_memory_limit_allows_what_fits(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    spec = sh(rootfs, "head -c 8000000 /dev/zero > /dev/shm/blob; wc -c < /dev/shm/blob",
              memory=64 << 20)
    status, out = run(spec, state, config)
    assert (status.code, status.oom_killed) == (0, False), out
    assert out.strip() == "8000000"


def test_pids_limit_stops_forks(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    # PID 1 and the shell count too: with 10 allowed, the 9th background sleep cannot be
    # forked, and busybox sh gives up (exit 2) at the first failed fork.
    spec = sh(rootfs, "i=0; while [ $i -lt 30 ]; do sleep 5 & i=$((i+1)); echo $i; done",
              pids_limit=10)
    status, out = run(spec, state, config)
    assert status.code == 2, out
    assert "can't fork" in out
    assert [line for line in out.splitlines() if line.isdigit()][-1] == "8"


def test_cpu_quota_throttles(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    c, _ = start_logged(sh(rootfs, "while :; do :; done", cpus=0.1), state, config)
    try:
        if c.cgroup.version == 1:
            assert c.cgroup.read("cpu", "cpu.cfs_quota_us").strip() == "10000"
            assert c.cgroup.read("cpu", "cpu.cfs_period_us").strip() == "100000"
        else:
            assert c.cgroup.read("", "cpu.max").split() == ["10000", "100000"]
        wait_for(lambda: c.stats().get("nr_throttled", 0) > 2, what="CPU throttling")
    finally:
        c.kill(signal.SIGKILL)
        c.wait()


def test_cgroup_is_removed_on_exit_and_processes_are_in_it(rootfs: Path, state: Path,
                                                           config: RuntimeConfig) -> None:
    c, out = start_logged(sh(rootfs, "cat /proc/self/cgroup; sleep 0.5", memory=16 << 20,
                             pids_limit=50), state, config)
    paths = list(c.cgroup.paths.values())
    assert paths and all(p.is_dir() for p in paths)
    assert c.pid in c.cgroup.pids()
    status = c.wait()
    assert status.code == 0
    assert not any(p.exists() for p in paths)
    # The container sees its own cgroup as the root (cgroup namespace).
    for line in out.read_text().splitlines():
        assert line.endswith(":/"), line


def test_detect_matches_the_mounts() -> None:
    fstypes = {m.fstype for m in mountlib.mountinfo() if m.target.startswith("/sys/fs/cgroup")}
    mode = detect()
    if "cgroup" not in fstypes:
        assert mode == "v2"
    else:
        assert mode == ("hybrid" if (UNIFIED / "cgroup.controllers").exists() else "v1")


# --- v2 --------------------------------------------------------------------------------------------
@pytest.fixture
def unified(lfs: Session) -> Iterator[Path]:
    """The host's real cgroup2 hierarchy (hybrid hosts mount it at /sys/fs/cgroup/unified).

    Using the mount that exists, not a second ``mount -t cgroup2``: every cgroup2
    mount re-applies its options (nsdelegate, favordynmods, ...) to the one global
    v2 root, so a test mount with other options would change the host.
    """
    root = DEFAULT_ROOT if detect() == "v2" else UNIFIED
    if not (root / "cgroup.controllers").exists():
        pytest.fail("no cgroup2 hierarchy on this host")
    yield root
    parent = root / lfs.cgroup_parent
    if parent.exists():
        for child in parent.iterdir():  # only left by a failed test: its containers' cgroups
            if child.is_dir():
                Cgroup(2, {"unified": child}).kill_all()
                Cgroup(2, {"unified": child}).remove()
        parent.rmdir()


def test_v2_create_join_remove_without_limits(unified: Path, lfs: Session) -> None:
    name = os.urandom(8).hex()
    cg = Cgroup.create(name, Limits(), root=unified, parent=lfs.cgroup_parent)
    assert cg.version == 2 and cg.paths == {"unified": unified / lfs.cgroup_parent / name}
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    try:
        cg.add(pid)
        assert cg.pids() == [pid]
        with open(f"/proc/{pid}/cgroup") as f:
            assert f"0::/{lfs.cgroup_parent}/{name}\n" in f.read()
        assert cg.oom_kills() == 0 and not cg.oom_killed()
    finally:
        cg.kill_all()
        os.waitpid(pid, 0)
    cg.remove()
    assert not cg.exists()


def test_v2_limits_need_their_controllers(unified: Path, lfs: Session) -> None:
    available = (unified / "cgroup.controllers").read_text().split()
    name = os.urandom(8).hex()
    if "memory" in available:  # a pure v2 host (the guest): the limit is written
        cg = Cgroup.create(name, Limits(memory=64 << 20), root=unified, parent=lfs.cgroup_parent)
        assert cg.read("", "memory.max").strip() == str(64 << 20)
        cg.remove()
        return
    with pytest.raises(LayerfsError, match=r"memory.*not available"):
        Cgroup.create(name, Limits(memory=64 << 20), root=unified, parent=lfs.cgroup_parent)
    assert not (unified / lfs.cgroup_parent / name).exists()


def test_engine_on_v2_hierarchy(unified: Path, lfs: Session, rootfs: Path, state: Path) -> None:
    config = RuntimeConfig(cgroup_root=unified, cgroup_parent=lfs.cgroup_parent, network=lfs.net)
    c, out = start_logged(sh(rootfs, "cat /proc/self/cgroup; grep CapBnd /proc/self/status; "
                                     "sleep 0.5"), state, config)
    path = c.cgroup.paths["unified"]
    assert c.cgroup.version == 2 and path.is_dir() and c.pid in c.cgroup.pids()
    assert c.wait().code == 0
    assert not path.exists()
    lines = out.read_text().splitlines()
    assert "0::/" in lines
    # v2 has no device allow-list without eBPF, so CAP_MKNOD is not granted there.
    assert not int(lines[-1].split()[1], 16) & (1 << CAP_MKNOD)


V2_ROOT = os.environ.get("LAYERFS_CGROUP2")
needs_v2_controllers = pytest.mark.skipif(
    not V2_ROOT or "memory" not in Path(V2_ROOT, "cgroup.controllers").read_text().split(),
    reason="needs a cgroup v2 hierarchy with memory/cpu/pids (LAYERFS_CGROUP2, set in the qemu "
           "guest); on this host they are bound to v1")


@pytest.mark.vm
@needs_v2_controllers
def test_v2_limits_in_guest(lfs: Session, rootfs: Path, state: Path) -> None:
    # The generic tests above run on v2 too in the guest (its /sys/fs/cgroup is v2):
    # OOM kill, pids, CPU throttling, removal. This one checks the v2 files themselves.
    assert V2_ROOT is not None
    config = RuntimeConfig(cgroup_root=Path(V2_ROOT), cgroup_parent=lfs.cgroup_parent,
                           network=lfs.net)
    status, out = run(sh(rootfs, "x=0123456789abcdef; while :; do x=$x$x; done",
                         memory=32 << 20), state, config, timeout=120)
    assert (status.code, status.oom_killed) == (137, True), out
    c, _ = start_logged(sh(rootfs, "sleep 30", pids_limit=10, cpus=0.5, memory=64 << 20),
                        state, config)
    try:
        cg = c.cgroup
        assert cg.version == 2
        assert cg.read("", "memory.max").strip() == str(64 << 20)
        assert cg.read("", "memory.swap.max").strip() == "0"
        assert cg.read("", "cpu.max").split() == ["50000", "100000"]
        assert cg.read("", "pids.max").strip() == "10"
        enabled = (Path(V2_ROOT) / lfs.cgroup_parent / "cgroup.subtree_control").read_text()
        assert {"memory", "cpu", "pids"} <= set(enabled.split())
    finally:
        c.kill(signal.SIGKILL)
        c.wait()
    assert not cg.exists()
