"""Mount the FUSE union filesystem for a test, the way the mount module does.

:class:`Union` lays out a top branch and N lower ones under a directory,
runs ``python -m layerfs_drivers.aufs.unionfs`` as a mount helper (it returns
once the mount is live) and, on exit, unmounts and waits for the server to
exit by itself. The server is a daemon: it outlives the helper that started
it, so the test process makes itself a child subreaper while mounting and
the server becomes its child, to be reaped (and its exit status checked)
after unmount. PID 1 on these machines does not reap orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from layerfs import mount as mountlib

from ..host_resources import pids_whose_argv

MODULE = "layerfs_drivers.aufs.unionfs"
PR_SET_CHILD_SUBREAPER = 36
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _subreaper(on: bool) -> None:
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Orphans of this process (a helper's daemonized server) become its children."""
    _subreaper(True)
    try:
        yield
    finally:
        _subreaper(False)


def helper_argv(branches: list[str], *options: str) -> list[str]:
    return [sys.executable, "-m", MODULE, *options, *branches]


def is_mounted(target: Path) -> bool:
    return mountlib.is_mounted(target)


def server_pids(target: Path) -> list[int]:
    """Processes whose command line names ``target`` and the module (our servers)."""
    want = os.fsencode(os.path.realpath(target))
    return pids_whose_argv(lambda argv: MODULE.encode() in argv and want in argv)


def wait_gone(pid: int, timeout: float = 10.0) -> int | None:
    """Reap ``pid`` (our child after subreaping); its exit code, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not ours: poll until it is gone
            if not os.path.exists(f"/proc/{pid}"):
                return 0
        else:
            if done:
                return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    return None


class Union:
    """A top branch over ``lowers`` lower ones, mounted at ``mnt`` while in ``with``.

    The branches live under ``branch_base`` (default ``base``), the mount point is
    ``base/mnt``.
    """

    def __init__(self, base: Path, lowers: int = 2, options: tuple[str, ...] = (),
                 top_mode: str = "rw", branch_base: Path | None = None) -> None:
        self.base = base
        bb = branch_base or base
        self.top = bb / "top"
        self.lowers = [bb / f"l{i + 1}" for i in range(lowers)]
        self.mnt = base / "mnt"
        self.options = options
        self.top_mode = top_mode
        self.pid: int | None = None
        for d in (self.top, *self.lowers, self.mnt):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def branches(self) -> list[Path]:
        return [self.top, *self.lowers]

    def rotate(self) -> None:
        """Unmounted: the top branch becomes the uppermost lower one under a new, empty top
        (a committed container layer stacked under the next container's)."""
        assert not is_mounted(self.mnt)
        old = self.top
        self.top = old.with_name(f"{old.name}.{len(self.lowers)}")
        self.top.mkdir()
        self.lowers = [old, *self.lowers]

    def argv(self) -> list[str]:
        specs = [f"{self.top}:{self.top_mode}"] + [f"{b}:ro" for b in self.lowers]
        return [*helper_argv(specs, *self.options), str(self.mnt)]

    def mount(self) -> None:
        _subreaper(True)
        try:
            proc = subprocess.run(self.argv(), capture_output=True, text=True, timeout=30,
                                  stdin=subprocess.DEVNULL)
        finally:
            _subreaper(False)
        assert proc.returncode == 0, proc.stderr
        assert is_mounted(self.mnt), "helper returned before the mount was live"
        pids = server_pids(self.mnt)
        assert len(pids) == 1, pids
        self.pid = pids[0]

    def unmount(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=True, capture_output=True)
        if self.pid is not None:
            code = wait_gone(self.pid)
            pid, self.pid = self.pid, None
            assert code == 0, f"server {pid} exit status {code}"

    def force_cleanup(self) -> None:
        """Last resort after a failed test: detach the mount, kill the server."""
        if is_mounted(self.mnt):
            _libc.umount2(os.fsencode(str(self.mnt)), MNT_DETACH)
        for pid in server_pids(self.mnt) + ([self.pid] if self.pid else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            wait_gone(pid, 5)
        self.pid = None

    def __enter__(self) -> Union:
        self.mount()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.unmount()
        finally:
            self.force_cleanup()

    # --- counters -----------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = json.loads(os.getxattr(self.mnt, "user.layerfs.stats"))
        return stats

    def reset_stats(self) -> None:
        os.setxattr(self.mnt, "user.layerfs.stats.reset", b"1")

    # --- building branches ----------------------------------------------------------------------
    def put(self, branch: Path, rel: str, data: bytes = b"", mode: int | None = None) -> Path:
        path = branch / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mode is not None:
            os.chmod(path, mode)
        return path
