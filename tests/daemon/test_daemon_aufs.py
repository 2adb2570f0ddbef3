"""aufs mounts through the daemon: their FUSE servers fork from its fork server, and
nothing it starts is ever left a zombie (this VM's PID 1 does not reap)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.errors import DriverNotSupported
from layerfs.layers import LayerStore

from .conftest import Daemon, Env, Root, daemon_starter, wait_for, zombies_of


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])


def fuse_servers() -> set[int]:
    """Pids of the processes that hold /dev/fuse open (every FUSE server of the host)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse":
                    found.add(int(entry))
                    break
        except OSError:
            continue
    return found


def fork_server_of(daemon: Daemon) -> int:
    """The pid of the daemon's fork server, from its log (the socket answers before the
    daemon is done starting: clients wait in the backlog)."""
    pattern = re.compile(r"fork server started \(pid (\d+)\)")
    wait_for(lambda: "serving" in daemon.text(), what="the daemon to start")
    found = pattern.findall(daemon.text())
    assert found, daemon.text()
    return int(found[-1])


@pytest.fixture
def aufs_root(denv: Env, tmp_path: Path) -> Iterator[tuple[Root, str]]:
    """An aufs root with one layer (wiped after)."""
    path = tmp_path / "aufs-root"
    try:
        with LayerStore.open(path, "aufs") as store:
            layer = store.create().id
    except DriverNotSupported as e:
        pytest.skip(f"aufs: {e.reason}")
    yield Root(path, denv), layer
    with LayerStore.open(path) as store:
        store.wipe()


@pytest.fixture
def start_aufs_daemon(aufs_root: tuple[Root, str], tmp_path: Path
                      ) -> Iterator[Callable[..., Daemon]]:
    yield from daemon_starter(aufs_root[0].path, tmp_path)


def test_aufs_mounts_fork_from_the_daemons_fork_server(
        aufs_root: tuple[Root, str], start_aufs_daemon: Callable[..., Daemon]) -> None:
    root, layer = aufs_root
    daemon = start_aufs_daemon()
    forker = fork_server_of(daemon)
    assert ppid(forker) == daemon.pid            # the daemon's child, reaped by it
    for _ in range(5):
        before = fuse_servers()
        target = Path(root.layerfs("layer", "mount", layer).stdout.strip())
        assert mountlib.is_mounted(target)
        (target / "f").write_text("x")
        # Other processes of the host may be starting FUSE servers too: ours are in the
        # daemon's tree. Forked by the fork server; the cold helper's server would be the
        # daemon's child, re-parented to it (the subreaper) once the helper exited.
        new = {p for p in fuse_servers() - before if ppid(p) in (forker, daemon.pid)}
        assert new and all(ppid(p) == forker for p in new), (new, forker)
        root.layerfs("layer", "umount", layer)
        wait_for(lambda n=new: not any(Path(f"/proc/{p}").exists() for p in n),
                 what="the union server to exit and be reaped")
    assert zombies_of(daemon.pid) == [] and zombies_of(forker) == []
    assert daemon.stop() == 0


@pytest.mark.slow
def test_no_zombie_after_1000_aufs_mount_cycles(tmp_path: Path,
                                                start_aufs_daemon: Callable[..., Daemon]
                                                ) -> None:
    """1,000 mounts and unmounts in a child of the daemon (a service: forked from it like
    a worker, with the fork server it installed), without 2,000 client start-ups."""
    done = tmp_path / "done"
    daemon = start_aufs_daemon(extra=[
        "--service", f"tests.daemon.sample_service:mount_cycles 1000 {done}"])
    forker = fork_server_of(daemon)
    wait_for(done.exists, timeout=900, what="1,000 mount cycles")
    wait_for(lambda: zombies_of(forker) == [] and zombies_of(daemon.pid) == [],
             what=f"no zombie: {zombies_of(forker)} {zombies_of(daemon.pid)}")
    # The supervisor logs the service's exit once it has reaped it, after "done".
    wait_for(lambda: "service tests.daemon.sample_service:mount_cycles: exit 0" in daemon.text(),
             what="the service's exit in the log")
    assert daemon.stop() == 0
