"""Host resources the runner tests take by exact name: a free subnet, a free port, and
an rmdir for cgroups that the kernel still counts as busy for a moment."""

from __future__ import annotations

import errno
import os
import random
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_subnet() -> str:
    """A 10.x.y.0/24 no route on this host uses (random: parallel sessions differ)."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True, check=True).stdout
    for _ in range(100):
        subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        if f"{subnet}." not in routes:
            return f"{subnet}.0/24"
    raise RuntimeError("no free 10.x.y.0/24 subnet")


def free_port() -> int:
    """A TCP port free on every address (published ports bind 0.0.0.0)."""
    for _ in range(100):
        port = random.randint(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def rmdir_retry(path: Path) -> None:
    """rmdir a cgroup: EBUSY for a moment after its last process exited."""
    for _ in range(200):
        try:
            path.rmdir()
            return
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise
            time.sleep(0.01)
    path.rmdir()


def cgroup_dirs(parent: str) -> list[Path]:
    """Where the runner makes the cgroups of containers under ``parent`` (v2 or v1)."""
    from layerfs.runtime.cgroups import DEFAULT_ROOT, detect

    if detect(DEFAULT_ROOT) == "v2":
        return [DEFAULT_ROOT / parent]
    return [DEFAULT_ROOT / c / parent for c in ("memory", "cpu", "pids", "devices")]


def pids_whose_argv(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Pids of the processes whose command line (``/proc/PID/cmdline`` split on NUL)
    ``match`` accepts: for finding our own helpers by an exact path they were given."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if match(argv):
            pids.append(int(entry))
    return pids


def wait_gone(pid: int, timeout: float = 60) -> None:
    """Until process ``pid`` (not necessarily our child) has terminated."""
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise TimeoutError(f"process {pid} still running after {timeout} s")
    finally:
        os.close(pidfd)


def sweep_dead_sessions(scratch: Path) -> None:
    """Remove ``scratch/<pid>`` and ``scratch/docker-<pid>`` of test sessions that died
    without their teardown (killed): unmount what their dockerd left there (it bind-mounts
    its data root), then delete. Only folders of processes that no longer exist, by name."""
    import shutil

    from layerfs import mount as mountlib

    if not scratch.is_dir():
        return
    for entry in scratch.iterdir():
        pid = entry.name.removeprefix("docker-")
        if not pid.isdigit() or int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        mountlib.unmount_all_under(entry)
        shutil.rmtree(entry, ignore_errors=True)
