"""FUSE union servers of mounts made through the daemon: adopted and reaped by it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.errors import DriverNotSupported
from layerfs.layers import LayerStore

from ..daemons import stop, wait_for_socket
from .conftest import wait_for, zombies_of


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])


def fuse_servers(target: Path) -> list[int]:
    """Pids of the union servers (`python -m layerfs_drivers.aufs.unionfs ... TARGET`)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"layerfs_drivers.aufs" in cmdline and str(target).encode() in cmdline:
            found.append(int(entry))
    return found


def test_union_servers_are_reaped_by_the_daemon(tmp_path: Path) -> None:
    root = tmp_path / "root"
    try:
        LayerStore.open(root, "aufs").close()
    except DriverNotSupported as e:
        pytest.skip(f"aufs: {e.reason}")
    env = dict(os.environ, LAYERFS_DAEMON="1")
    layerfs = [sys.executable, "-m", "layerfs", "--root", str(root)]
    daemon = subprocess.Popen([*layerfs, "daemon"], stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for_socket(root)
        base = subprocess.run([*layerfs, "layer", "create"], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()
        for _ in range(5):
            target = Path(subprocess.run([*layerfs, "layer", "mount", base], env=env,
                                         check=True, capture_output=True,
                                         text=True).stdout.strip())
            assert mountlib.is_mounted(target)
            servers = fuse_servers(target)
            # The helper that started the server has exited: the server is the daemon's.
            assert servers and all(ppid(p) == daemon.pid for p in servers), servers
            subprocess.run([*layerfs, "layer", "umount", base], env=env, check=True)
            wait_for(lambda s=servers: not any(Path(f"/proc/{p}").exists() for p in s),
                     what="the union server to exit and be reaped")
        assert zombies_of(daemon.pid) == []
        subprocess.run([*layerfs, "layer", "rm", base], env=env, check=True)
    finally:
        stop(daemon.pid)
        daemon.wait()
        with LayerStore.open(root, "aufs") as store:
            store.wipe()
