"""Issue 17, part 3: union mounts forked from a warm process (the fork server).

A :class:`ForkServer` starts one single-threaded interpreter with the union
filesystem imported; each mount forks a server from it, and it reaps them. The
mount module uses it once a long-lived process installs it
(``mount.set_fuse_forker``), and runs the helper command otherwise.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from layerfs_drivers.aufs.forkserver import MODULE, ForkServer

from layerfs import mount as mountlib
from layerfs.testing.conformance import close_and_check

from ..conftest import open_store_or_skip
from .unionfs_fixtures import Union, is_mounted, server_pids, subreaper, wait_gone

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts FUSE filesystems: run as root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]


def children_of(pid: int) -> dict[int, str]:
    """{child pid: state letter} of the processes whose parent is ``pid``."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out[int(entry)] = fields[0]
    return out


def servers_of(pid: int) -> dict[int, str]:
    """The children of fork server ``pid`` that serve a mount (hold /dev/fuse open); the
    fork server also keeps one idle child forked ahead of the next request."""
    out = {}
    for child, state in children_of(pid).items():
        try:
            fds = os.listdir(f"/proc/{child}/fd")
            if any(os.readlink(f"/proc/{child}/fd/{fd}") == "/dev/fuse" for fd in fds):
                out[child] = state
        except OSError:
            continue
    return out


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def helper_of(u: Union, *options: str) -> tuple[str, ...]:
    return (sys.executable, "-m", MODULE, *options, f"{u.top}:rw",
            *[f"{b}:ro" for b in u.lowers])


@pytest.fixture
def forker() -> Iterator[ForkServer]:
    fs = ForkServer()
    try:
        yield fs
    finally:
        fs.close(wait=10)
    assert fs._proc.returncode == 0  # exited by itself, reaped by us


def test_mount_is_live_when_mount_returns_and_the_server_is_reaped(
        forker: ForkServer, tmp_path: Path) -> None:
    u = Union(tmp_path, lowers=1)
    u.put(u.lowers[0], "f", b"lower")
    try:
        assert forker.mount(helper_of(u), str(u.mnt)) is True
        assert is_mounted(u.mnt)
        assert (u.mnt / "f").read_bytes() == b"lower"
        servers = servers_of(forker.pid)
        assert len(servers) == 1 and "Z" not in servers.values()
        mountlib.unmount(u.mnt)
        assert wait_for(lambda: servers_of(forker.pid) == {}), servers_of(forker.pid)
        assert wait_for(lambda: "Z" not in children_of(forker.pid).values())
    finally:
        u.force_cleanup()


def test_errors_come_back_and_the_fork_server_goes_on(forker: ForkServer,
                                                      tmp_path: Path) -> None:
    u = Union(tmp_path, lowers=1)
    with pytest.raises(OSError, match="branch is not a directory"):
        forker.mount((*helper_of(u)[:3], f"{tmp_path}/missing:rw"), str(u.mnt))
    (u.top / "sub").mkdir()
    with pytest.raises(OSError, match="inside branch"):
        forker.mount(helper_of(u), str(u.top / "sub"))
    with pytest.raises(OSError, match=r"unrecognized arguments|invalid"):
        forker.mount((*helper_of(u), "--no-such-option"), str(u.mnt))
    rotop = tmp_path / "rotop"
    rotop.mkdir()
    subprocess.run(["mount", "--bind", str(rotop), str(rotop)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(rotop)], check=True)
        with pytest.raises(OSError, match="Read-only file system"):
            forker.mount((*helper_of(u)[:3], f"{rotop}:rw", f"{u.lowers[0]}:ro"), str(u.mnt))
    finally:
        subprocess.run(["umount", str(rotop)], check=True)
    assert not is_mounted(u.mnt)
    # Not the union's helper: the caller must run it itself.
    assert forker.mount(("fuse-overlayfs", "-o", "x"), str(u.mnt)) is False
    assert wait_for(lambda: servers_of(forker.pid) == {})
    try:
        assert forker.mount(helper_of(u), str(u.mnt))
        assert os.listdir(u.mnt) == ["sub"]
    finally:
        mountlib.unmount(u.mnt)
        u.force_cleanup()


def test_processes_forked_from_the_owner_mount_concurrently(forker: ForkServer,
                                                            tmp_path: Path) -> None:
    """The daemon's workers are forks of the process that made the fork server, and mount
    at the same time: each must get its own answer (its mount live, or its own error)."""
    unions = [Union(tmp_path / f"u{i}", lowers=1) for i in range(6)]
    for i, u in enumerate(unions):
        u.put(u.lowers[0], f"f{i}", str(i).encode())
    inside = unions[-1].top / "inside"  # the last one's mount point is inside a branch
    inside.mkdir()
    owner = Union(tmp_path / "owner", lowers=1)
    assert forker.fork_safe
    pids = []
    try:
        for i, u in enumerate(unions):
            pid = os.fork()
            if pid == 0:  # a worker: exit 0 only if its own request came back
                code = 1
                try:
                    if u is unions[-1]:
                        try:
                            forker.mount(helper_of(u), str(inside))
                        except OSError as err:
                            code = 0 if "inside branch" in str(err) else 3
                    elif forker.mount(helper_of(u), str(u.mnt)):
                        code = 0 if os.listdir(u.mnt) == [f"f{i}"] else 2
                finally:
                    os._exit(code)
            pids.append(pid)
        # The owner mounts meanwhile, too.
        assert forker.mount(helper_of(owner), str(owner.mnt))
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        pids = []
        assert codes == [0] * len(unions)
        assert all(is_mounted(u.mnt) for u in unions[:-1]) and is_mounted(owner.mnt)
        assert not is_mounted(inside)
        assert len(servers_of(forker.pid)) == len(unions)
    finally:
        for pid in pids:
            os.waitpid(pid, 0)
        for u in [*unions, owner]:
            if is_mounted(u.mnt):
                mountlib.unmount(u.mnt)
            u.force_cleanup()
    assert wait_for(lambda: servers_of(forker.pid) == {}), servers_of(forker.pid)


def test_malformed_requests_leave_the_fork_server_serving(forker: ForkServer,
                                                          tmp_path: Path) -> None:
    def send(data: bytes, fd: int | None) -> None:
        fds = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [fd]))]
        forker._sock.sendmsg([data], fds)

    send(b'{"argv": []}', None)  # no reply channel: dropped
    r, w = os.pipe()
    try:
        send(b'{"argv": []}', r)  # a reply channel that is no socket: dropped
    finally:
        os.close(r)
        os.close(w)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with mine, theirs:
        send(b"not json", theirs.fileno())
        mine.settimeout(30)
        assert "bad request" in json.loads(mine.recv(4096))["error"]
    u = Union(tmp_path, lowers=1)
    try:
        assert forker.mount(helper_of(u), str(u.mnt)) is True
        mountlib.unmount(u.mnt)
    finally:
        u.force_cleanup()


def test_a_killed_fork_server_falls_back_to_the_helper(tmp_path: Path) -> None:
    fs = ForkServer()
    u = Union(tmp_path, lowers=1)
    m = mountlib.Mount("fuse.layerfs-union", "layerfs-union", (), helper=helper_of(u))
    previous = mountlib.set_fuse_forker(fs)
    try:
        fs._proc.kill()
        fs._proc.wait()
        pid = os.fork()
        if pid == 0:  # a worker: it cannot wait for the zygote, it finds its socket shut
            code = 1
            try:
                code = 0 if fs.mount(helper_of(u), str(u.mnt)) is False else 2
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert fs.mount(helper_of(u), str(u.mnt)) is False
        with subreaper():  # the cold helper's server becomes our child, to be reaped
            mountlib.mount(m, u.mnt)  # the helper command, as without a forker
            assert os.listdir(u.mnt) == []
            (server,) = server_pids(u.mnt)
            mountlib.unmount(u.mnt)
            assert wait_gone(server) == 0
    finally:
        mountlib.set_fuse_forker(previous)
        fs.close()
        u.force_cleanup()


def test_mount_module_forks_from_the_installed_forker(forker: ForkServer,
                                                      tmp_path: Path) -> None:
    store = open_store_or_skip("aufs", tmp_path / "root", ["mode=fuse"])
    previous = mountlib.set_fuse_forker(forker)
    try:
        base = store.create().id
        with store.mounted(base) as path:
            (path / "f").write_bytes(b"x")
            assert len(servers_of(forker.pid)) == 1  # the server is the fork server's child
        mountlib.set_fuse_forker(None)  # without it: the cold helper command, as before
        with store.mounted(base) as path:
            assert (path / "f").read_bytes() == b"x"
            assert wait_for(lambda: servers_of(forker.pid) == {})
    finally:
        mountlib.set_fuse_forker(previous)
        close_and_check(store)


@pytest.mark.slow
def test_no_zombie_after_1000_mount_cycles(forker: ForkServer, tmp_path: Path) -> None:
    u = Union(tmp_path, lowers=2)
    u.put(u.lowers[1], "d/f", b"f")
    m = mountlib.Mount("fuse.layerfs-union", "layerfs-union", (), helper=helper_of(u))
    previous = mountlib.set_fuse_forker(forker)
    try:
        for i in range(1000):
            mountlib.mount(m, u.mnt)
            if i % 100 == 0:
                assert (u.mnt / "d/f").read_bytes() == b"f"
            mountlib.unmount(u.mnt)
    finally:
        mountlib.set_fuse_forker(previous)
        u.force_cleanup()
    # Every server exits once unmounted and is reaped (the fork server ignores SIGCHLD, so
    # the kernel reaps them; no zombie at all); what stays is the idle server forked ahead.
    assert wait_for(lambda: servers_of(forker.pid) == {}), servers_of(forker.pid)
    assert wait_for(lambda: len(children_of(forker.pid)) <= 1
                    and "Z" not in children_of(forker.pid).values()), children_of(forker.pid)
    assert "Z" not in children_of(os.getpid()).values(), children_of(os.getpid())


def test_fork_server_outlives_its_owner_until_its_servers_exit(tmp_path: Path) -> None:
    u = Union(tmp_path, lowers=1)
    fs = ForkServer()
    try:
        assert fs.mount(helper_of(u), str(u.mnt))
        fs.close(wait=0.5)  # the owner lets go while a mount is still served
        assert fs._proc.poll() is None and is_mounted(u.mnt)
        assert os.listdir(u.mnt) == []
        mountlib.unmount(u.mnt)
        assert fs._proc.wait(10) == 0  # then it exits by itself
    finally:
        u.force_cleanup()
        if fs._proc.poll() is None:
            fs._proc.kill()
            fs._proc.wait()
