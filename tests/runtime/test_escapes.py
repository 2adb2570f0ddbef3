"""Escape attempts from inside a container: each must fail, and the host must be untouched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.errors import LayerfsError
from layerfs.runtime import RuntimeConfig, Volume, start

from .conftest import Session
from .helpers import run, sh


def test_writes_through_proc_pid_root_stay_inside(rootfs: Path, state: Path, lfs: Session,
                                                   config: RuntimeConfig) -> None:
    name = f"escape-{os.urandom(4).hex()}"
    host_target = Path("/tmp") / name
    script = (f"echo pwned > /proc/1/root/tmp/{name} 2>&1; echo rc1=$?; "
              f"echo pwned > /proc/$$/root/../../../tmp/{name} 2>&1; echo rc2=$?; "
              "ls /proc/1/root/ 2>&1; ls /proc/1/cwd/ 2>&1")
    _status, out = run(sh(rootfs, script), state, config)
    assert not host_target.exists()
    lines = out.splitlines()
    # PID 1 is not inspectable at all; our own root is the container's root.
    assert "Permission denied" in lines[0] and lines[1] == "rc1=1", out
    assert lines[2] == "rc2=0" and (rootfs / "tmp" / name).read_text() == "pwned\n"
    assert "Permission denied" in out.splitlines()[3]
    (rootfs / "tmp" / name).unlink()


def test_init_cannot_be_inspected_or_overwritten(rootfs: Path, state: Path,
                                                 config: RuntimeConfig) -> None:
    # PID 1 is a fork of the runner: its memory, environment, fds and executable (the
    # host's python) must be out of reach (CVE-2019-5736 overwrote runc through /proc/PID/exe).
    script = ("for f in exe mem environ fd/0 maps; do cat /proc/1/$f > /dev/null 2>&1 "
              "&& echo open-$f; done; echo x >> /proc/1/exe 2>&1 || echo exe-write-refused; "
              "kill -9 1; echo still-alive")
    status, out = run(sh(rootfs, script), state, config)
    assert status.code == 0, out
    assert "open-" not in out, out
    assert "exe-write-refused" in out and "still-alive" in out


def test_mount_sys_sysrq_and_proc_sys_are_refused(rootfs: Path, state: Path,
                                                  config: RuntimeConfig) -> None:
    script = ("mount -t tmpfs none /mnt 2>&1; echo m1=$?; "
              "mount --bind /bin /mnt 2>&1; echo m2=$?; "
              "umount /proc/kcore 2>&1; echo m3=$?; "
              "echo 1 > /sys/kernel/profiling 2>&1; echo s1=$?; "
              "echo h > /proc/sysrq-trigger 2>&1; echo s2=$?; "
              "echo 1 > /proc/sys/vm/drop_caches 2>&1; echo s3=$?; "
              "echo layerfs-pwned > /proc/sys/kernel/hostname 2>&1; echo s4=$?; "
              "ls /sys/fs/cgroup | wc -l")
    hostname_before = Path("/proc/sys/kernel/hostname").read_text()
    _status, out = run(sh(rootfs, script), state, config)
    for key in ("m1", "m2", "m3", "s1", "s2", "s3", "s4"):
        assert f"{key}=0" not in out, out
    assert out.splitlines()[-1] == "0"                      # no cgroupfs inside
    assert Path("/proc/sys/kernel/hostname").read_text() == hostname_before


def test_leaked_host_fds_are_closed(rootfs: Path, state: Path, lfs: Session,
                                    config: RuntimeConfig) -> None:
    # The runc CVE-2024-21626 class: a host directory fd inherited by the container
    # process gives a way out through /proc/self/fd/N (also as the working directory).
    host_dir = lfs.base / f"leak-{os.urandom(3).hex()}"
    host_dir.mkdir()
    fds = [os.open(host_dir, os.O_RDONLY | os.O_DIRECTORY),
           os.open(host_dir, os.O_PATH),
           os.open("/", os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        probes = "; ".join(f"ls /proc/self/fd/{fd}/ >/dev/null 2>&1 && echo open-{fd}; "
                           f"touch /proc/self/fd/{fd}/pwned 2>/dev/null && echo wrote-{fd}"
                           for fd in fds)
        status, out = run(sh(rootfs, f"ls /proc/self/fd | tr '\\n' ' '; echo; {probes}; true"),
                          state, config)
        assert status.code == 0, out
        assert out.splitlines()[0].split() == ["0", "1", "2", "3"]  # 3: ls's own dir fd
        assert "open-" not in out and "wrote-" not in out, out
        for fd in fds:
            with pytest.raises(LayerfsError, match=r"working directory|workdir"):
                start(sh(rootfs, "touch pwned", cwd=f"/proc/self/fd/{fd}"), state, config)
        assert list(host_dir.iterdir()) == []
        assert not Path("/pwned").exists()
    finally:
        for fd in fds:
            os.close(fd)


def test_device_nodes_of_the_host_cannot_be_used(rootfs: Path, state: Path,
                                                 config: RuntimeConfig) -> None:
    st = os.stat("/")
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    script = (f"mknod /dev/hostdisk b {major} {minor} 2>&1; echo mk=$?; "
              "head -c 512 /dev/hostdisk 2>&1 | wc -c; "
              f"mknod /tmp/hostdisk b {major} {minor} 2>&1; "
              "head -c 512 /tmp/hostdisk 2>&1 | wc -c; "
              "mknod /dev/kmsg2 c 1 11 2>&1; echo hi > /dev/kmsg2 2>&1; echo kmsg=$?")
    _status, out = run(sh(rootfs, script), state, config)
    lines = out.splitlines()
    # mknod itself is allowed (Docker's default), opening the node is not.
    assert "Operation not permitted" in out
    assert "512" not in lines, out
    assert lines[-1] == "kmsg=1", out
    (rootfs / "tmp" / "hostdisk").unlink(missing_ok=True)


def test_symlinks_in_the_image_cannot_redirect_mounts_to_the_host(
        state: Path, lfs: Session, config: RuntimeConfig) -> None:
    # A hostile image: its /proc, /etc/hosts and a volume's parent are absolute symlinks
    # to host paths. After pivot_root they resolve inside the container.
    evil = lfs.base / f"evil-{os.urandom(3).hex()}"
    shutil.copytree(lfs.rootfs, evil / "rootfs", symlinks=True)
    host_side = lfs.base / f"hostside-{os.urandom(3).hex()}"
    host_side.mkdir()
    root = evil / "rootfs"
    (root / "proc").rmdir()
    os.symlink(str(host_side / "proc"), root / "proc")
    (root / "etc" / "hosts").unlink(missing_ok=True)  # a mount point left by other tests
    os.symlink(str(host_side / "hosts"), root / "etc" / "hosts")
    os.symlink(str(host_side), root / "data")
    src = lfs.base / f"volsrc-{os.urandom(3).hex()}"
    src.mkdir()
    (src / "file").write_text("volume\n")
    spec = sh(root, "cat /data/vol/file; ls /proc/self/ >/dev/null && echo proc-ok",
              volumes=[Volume(src, "/data/vol")])
    status, out = run(spec, state, config)
    assert status.code == 0, out
    assert out.split() == ["volume", "proc-ok"]
    assert list(host_side.iterdir()) == []          # nothing created or mounted on the host
    assert not any(str(host_side) in f"{m.root} {m.target} {m.source}" for m in mountlib.mountinfo())
    # ... it all landed inside the container's own tree instead.
    assert (root / host_side.relative_to("/") / "vol").is_dir()
    shutil.rmtree(evil)
