"""Namespaces, mounts, PID 1 behaviour, users and capabilities, exec, detached mode."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from layerfs.errors import AlreadyExists, InvalidArgument, NotFound
from layerfs.runtime import (
    ContainerSpec,
    RuntimeConfig,
    Volume,
    exec_in,
    inspect,
    kill,
    list_containers,
    remove,
    run_detached,
    start,
)
from layerfs.runtime.cgroups import detect
from layerfs.runtime.security import CAP_MKNOD, DEFAULT_CAPS, cap_mask

from .helpers import run, sh, start_logged, wait_for

DOCKER_DEFAULT_CAPS = 0xA80425FB  # what `docker run` shows as CapBnd/CapEff


def status_field(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in {text!r}")


def test_pid1_is_the_init_and_host_pid_differs(rootfs: Path, state: Path,
                                               config: RuntimeConfig) -> None:
    spec = sh(rootfs, "echo main=$$; cat /proc/1/comm; cat /proc/1/cmdline; echo; "
                      "ls /proc | grep -c '^[0-9]'; sleep 0.3")
    c, out = start_logged(spec, state, config)
    # The host sees PID 1 of the container under another pid, in a nested pid ns.
    with open(f"/proc/{c.pid}/status") as f:
        nspid = status_field(f.read(), "NSpid").split()
    assert c.pid != 1 and nspid == [str(c.pid), "1"]
    assert os.readlink(f"/proc/{c.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    status = c.wait()
    text = out.read_text()
    assert status.code == 0, text
    lines = text.splitlines()
    assert lines[0] == "main=2"
    assert lines[1] == "layerfs-init"          # not the runner's python command line
    assert lines[2].rstrip("\0") == "layerfs-init"
    assert int(lines[3]) <= 4                  # init, sh, ls, grep: nothing of the host


def test_the_program_never_sees_pid1_before_it_is_the_init(rootfs: Path, state: Path,
                                                           config: RuntimeConfig) -> None:
    """The main process's first read of /proc/1/cmdline already names the init: PID 1
    execs the helper before the program runs (never the runner's python command line,
    never the empty one of an exec in progress)."""
    for i in range(20):
        c, out = start_logged(sh(rootfs, "cat /proc/1/cmdline"), state, config)
        assert c.wait().code == 0
        assert out.read_bytes() == b"layerfs-init\0", (i, out.read_bytes())


def test_hostname_and_every_namespace_is_new(rootfs: Path, state: Path,
                                             config: RuntimeConfig) -> None:
    kinds = ["ipc", "mnt", "net", "pid", "uts", "cgroup", "user"]
    script = "hostname; cat /etc/hostname; " + "; ".join(
        f"readlink /proc/self/ns/{k}" for k in kinds)
    status, out = run(sh(rootfs, script, hostname="box-1.test"), state, config)
    assert status.code == 0, out
    lines = out.splitlines()
    assert lines[:2] == ["box-1.test", "box-1.test"]
    assert socket.gethostname() != "box-1.test"
    inside = dict(zip(kinds, lines[2:], strict=True))
    for kind in kinds[:-1]:
        assert inside[kind] != os.readlink(f"/proc/self/ns/{kind}"), kind
    assert inside["user"] == os.readlink("/proc/self/ns/user")  # no userns unless asked


def test_network_none_sees_only_lo(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    status, out = run(sh(rootfs, "ls /sys/class/net; cat /sys/class/net/lo/operstate"),
                      state, config)
    assert status.code == 0, out
    assert out.split() == ["lo", "unknown"]  # lo is up (its operstate is always "unknown")


def test_network_host_sees_host_interfaces(rootfs: Path, state: Path,
                                           config: RuntimeConfig) -> None:
    status, out = run(sh(rootfs, "ls /sys/class/net", network="host"), state, config)
    assert status.code == 0, out
    assert sorted(out.split()) == sorted(os.listdir("/sys/class/net"))


def test_mounts_dev_proc_sys(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    script = ("ls /dev | tr '\\n' ' '; echo; "
              "stat -c '%t:%T' /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty; "
              "grep -E ' /(proc|sys|dev|dev/pts|dev/shm|dev/mqueue) ' /proc/mounts | "
              "awk '{print $2, $3, $4}'; "
              "head -c 4 /dev/zero | wc -c; echo x > /dev/null && echo null-ok; "
              "touch /sys/x 2>&1; echo > /proc/sys/kernel/hostname 2>&1; "
              "cat /proc/keys | wc -c; cat /proc/timer_list | wc -c; ls /sys/firmware | wc -l")
    status, out = run(sh(rootfs, script), state, config)
    lines = out.splitlines()
    assert set(lines[0].split()) == {"fd", "full", "mqueue", "null", "ptmx", "pts", "random",
                                     "shm", "stderr", "stdin", "stdout", "tty", "urandom",
                                     "zero"}
    assert lines[1:7] == ["1:3", "1:5", "1:7", "1:8", "1:9", "5:0"]
    mounts = {m.split()[0]: m.split() for m in lines[7:13]}
    assert mounts["/proc"][1] == "proc"
    assert mounts["/sys"][1] == "sysfs" and mounts["/sys"][2].startswith("ro,")
    assert mounts["/dev"][1] == "tmpfs" and mounts["/dev/pts"][1] == "devpts"
    assert mounts["/dev/shm"][1] == "tmpfs" and mounts["/dev/mqueue"][1] == "mqueue"
    assert lines[13:15] == ["4", "null-ok"]
    assert "Read-only file system" in lines[15]            # /sys is read-only
    assert "Read-only file system" in lines[16]            # /proc/sys is read-only
    assert lines[17:20] == ["0", "0", "0"]                 # keys, timer_list, firmware masked
    assert status.code == 0, out


def test_init_reaps_orphans_and_forwards_signals(rootfs: Path, state: Path,
                                                 config: RuntimeConfig) -> None:
    # Orphans get reparented to PID 1, which must reap them (no Z left); SIGTERM sent
    # to the container reaches the main process through PID 1.
    script = ('trap "echo got-term; ps -o stat,comm | grep -c ^Z; exit 3" TERM; '
              "for i in 1 2 3; do sh -c 'sleep 0.05 & exit 0'; done; "
              "echo ready; while :; do sleep 0.05; done")
    c, out = start_logged(sh(rootfs, script), state, config)
    wait_for(lambda: "ready" in out.read_text(), what="container ready")
    time.sleep(0.3)  # the orphaned sleeps exit and must be reaped by PID 1
    c.kill(signal.SIGTERM)
    status = c.wait(timeout=10)
    text = out.read_text()
    assert status.code == 3 and status.signal is None, text
    assert text.splitlines()[-2:] == ["got-term", "0"], text


def test_exit_codes_and_signals(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    status, _ = run(sh(rootfs, "exit 7"), state, config)
    assert (status.code, status.signal, status.oom_killed) == (7, None, False)
    status, _ = run(sh(rootfs, "kill -9 $$"), state, config)
    assert (status.code, status.signal) == (137, 9)
    c, _ = start_logged(sh(rootfs, "sleep 30"), state, config)
    c.kill(signal.SIGKILL)  # kills PID 1, and with it the whole pid namespace
    status = c.wait(timeout=5)
    assert (status.code, status.signal) == (137, 9)


def test_root_gets_docker_default_caps_and_no_new_privs(rootfs: Path, state: Path,
                                                        config: RuntimeConfig) -> None:
    status, out = run(sh(rootfs, "cat /proc/self/status"), state, config)
    assert status.code == 0
    assert cap_mask(DEFAULT_CAPS) == DOCKER_DEFAULT_CAPS
    # CAP_MKNOD needs the v1 devices allow-list; on v2 (no eBPF filter yet) it is withheld.
    expected = DOCKER_DEFAULT_CAPS
    if detect() == "v2":
        expected &= ~(1 << CAP_MKNOD)
    for field in ("CapBnd", "CapEff", "CapPrm"):
        assert int(status_field(out, field), 16) == expected, field
    assert int(status_field(out, "CapInh"), 16) == 0
    assert int(status_field(out, "CapAmb"), 16) == 0
    assert status_field(out, "NoNewPrivs") == "1"


def test_user_cwd_env(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    spec = sh(rootfs, "id -u; id -g; id -G; pwd; echo $GREETING $PATH $HOME; "
                      "grep CapEff /proc/self/status", user=(1000, 1001), groups=(20, 30),
              cwd="/tmp/work/dir", env={"GREETING": "hi"})
    status, out = run(spec, state, config)
    assert status.code == 0, out
    lines = out.splitlines()
    assert lines[:4] == ["1000", "1001", "1001 20 30", "/tmp/work/dir"]  # cwd created if missing
    assert lines[4].split() == ["hi", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                      "/sbin:/bin", "/"]
    assert int(lines[5].split()[1], 16) == 0  # a non-root user has no capabilities


def test_missing_executable_or_rootfs_fails_start_and_leaves_nothing(
        rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    for argv0 in ("/no/such/binary", "no-such-command"):  # a path, and a $PATH search
        spec = ContainerSpec(rootfs=rootfs, argv=[argv0], network="none")
        with pytest.raises(NotFound, match=argv0):
            start(spec, state, config)
        assert not (state / "containers" / spec.id).exists()
    with pytest.raises(NotFound, match="rootfs"):
        start(ContainerSpec(rootfs=state / "nope", argv=["true"], network="none"), state, config)
    with pytest.raises(NotFound, match="volume source"):
        start(sh(rootfs, "true", volumes=[(state / "missing", "/data")]), state, config)


def test_same_id_twice_is_refused(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    spec = sh(rootfs, "sleep 5")
    c, _ = start_logged(spec, state, config)
    try:
        with pytest.raises(AlreadyExists):
            start(spec, state, config)
    finally:
        c.kill(9)
        c.wait()


def test_volumes_rw_and_ro(rootfs: Path, state: Path, config: RuntimeConfig,
                           tmp_path: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "given").write_text("from host\n")
    (tmp_path / "single").write_text("one file\n")
    spec = sh(rootfs, "echo written > /data/out; cat /data/out; cat /cfg/given; "
                      "cat /etc/single.conf; echo nope > /cfg/new; echo rc=$?",
              volumes=[Volume(rw, "/data"), Volume(ro, "/cfg", readonly=True),
                       Volume(tmp_path / "single", "/etc/single.conf", readonly=True)])
    status, out = run(spec, state, config)
    assert status.code == 0, out
    assert (rw / "out").read_text() == "written\n"
    lines = out.splitlines()
    assert lines[:3] == ["written", "from host", "one file"]
    assert "Read-only file system" in lines[3] and lines[4] == "rc=1"
    assert not (ro / "new").exists()


def test_read_only_rootfs(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    spec = sh(rootfs, "touch /rofile 2>&1; echo x > /dev/shm/ok && echo shm-ok", read_only=True)
    _status, out = run(spec, state, config)
    assert "Read-only file system" in out and "shm-ok" in out, out
    assert not (rootfs / "rofile").exists()


def test_user_namespace_maps_ids(rootfs: Path, state: Path, config: RuntimeConfig,
                                 tmp_path: Path) -> None:
    owned = tmp_path / "hostroot"
    owned.mkdir(mode=0o755)  # owned by the host's root: not the container's root
    spec = sh(rootfs, "id -u; cat /proc/self/uid_map /proc/self/gid_map; echo $$; "
                      "stat -c %u /bin/busybox; touch /mnt/x 2>&1; cat /proc/1/comm; "
                      "ls /sys/class/net | tr '\\n' ' '; sleep 0.5",
              userns=True, network="bridge", uid_map=[(0, 200000, 65536)], gid_map=[(0, 200000, 65536)],
              volumes=[Volume(owned, "/mnt")])
    c, out = start_logged(spec, state, config)
    with open(f"/proc/{c.pid}/status") as f:
        host_view = f.read()
    status = c.wait()
    text = out.read_text()
    assert status.code == 0, text
    lines = text.splitlines()
    assert lines[0] == "0"
    assert lines[1].split() == ["0", "200000", "65536"]
    assert lines[2].split() == ["0", "200000", "65536"]
    assert lines[3] == "2"
    assert lines[4] == "65534"               # host root's files are nobody's in here
    assert "Permission denied" in lines[5]   # and the container's root cannot write them
    assert lines[6] == "layerfs-init"
    assert lines[7].split() == ["eth0", "lo"]  # the netns belongs to the user namespace
    assert status_field(host_view, "Uid").split()[0] == "200000"
    assert not (owned / "x").exists()


def test_exec_joins_namespaces_and_cgroup(rootfs: Path, state: Path,
                                          config: RuntimeConfig) -> None:
    spec = sh(rootfs, "echo main > /tmp/marker-$$; sleep 30", hostname="exec-box",
              network="bridge", memory=64 << 20)
    c, _ = start_logged(spec, state, config)
    try:
        out_path = state / "exec.out"
        with open(out_path, "wb") as out:
            p = c.exec(["sh", "-c", "hostname; echo $$; ls /sys/class/net | tr '\\n' ' '; "
                                    "echo; cat /tmp/marker-2; grep NoNewPrivs /proc/self/status; "
                                    "ls /proc/self/fd | tr '\\n' ' '; echo; sleep 0.5"],
                       stdout=out, stderr=out)
            pids = [int(x) for x in c.cgroup.read("memory", "cgroup.procs").split()]
            assert p.pid in pids  # in the container's cgroup while it runs
            status = p.wait(timeout=10)
        lines = out_path.read_text().splitlines()
        assert status.code == 0, lines
        assert lines[0] == "exec-box"
        assert int(lines[1]) > 2                 # a pid of the container's namespace
        assert lines[2].split() == ["eth0", "lo"]
        assert lines[3] == "main"                # same mount namespace and root
        assert lines[4].split()[1] == "1"
        assert lines[5].split() == ["0", "1", "2", "3"]  # no fd of the runner (3: ls's own)
        for argv0 in ("/not/here", "not-here"):
            with pytest.raises(NotFound):
                c.exec([argv0]).wait()
    finally:
        c.kill(9)
        c.wait()
    with pytest.raises(NotFound, match="not running"):
        c.exec(["true"])


def test_detached_run_logs_ps_kill_remove(rootfs: Path, state: Path,
                                          config: RuntimeConfig) -> None:
    spec = sh(rootfs, "echo hello-log; echo err-line >&2; exec sleep 30", name="detached-1",
              env={"GREETING": "hi"}, cwd="/tmp")
    info = run_detached(spec, state, config)
    assert info.status == "running" and info.pid
    assert [i.id for i in list_containers(state)] == [spec.id]
    assert inspect(state, "detached-1").id == spec.id
    assert inspect(state, spec.id[:8]).id == spec.id
    log = state / "containers" / spec.id / "container.log"
    wait_for(lambda: "err-line" in log.read_text(), what="log lines")
    assert log.read_text().split() == ["hello-log", "err-line"]
    # exec from a process that did not start it: found by name, same env and cwd
    exec_out = state / "exec.out"
    with open(exec_out, "wb") as out:
        p = exec_in(inspect(state, "detached-1"), ["sh", "-c", "echo $GREETING $(pwd)"],
                    stdout=out, stderr=out)
        assert p.wait(timeout=10).code == 0
    assert exec_out.read_text().split() == ["hi", "/tmp"]
    kill(state, "detached-1", signal.SIGTERM)
    # The monitor process reaps it and releases everything.
    wait_for(lambda: inspect(state, spec.id).status == "exited", what="monitor cleanup")
    info = inspect(state, spec.id)
    assert info.exit == {"code": 143, "signal": 15, "oom_killed": False}
    with pytest.raises(NotFound):
        kill(state, spec.id)
    remove(state, spec.id)
    assert list_containers(state) == []
    with pytest.raises(InvalidArgument):
        start(sh(rootfs, "true", ports=[(8080, 80)], network="host"), state, config)


def test_user_namespace_exec_and_kill(rootfs: Path, state: Path, config: RuntimeConfig) -> None:
    c, _ = start_logged(sh(rootfs, "sleep 30", userns=True), state, config)
    try:
        out_path = state / "exec.out"
        with open(out_path, "wb") as out:
            p = c.exec(["sh", "-c", "id -u; cat /proc/self/uid_map; echo $$"], stdout=out,
                       stderr=out)
            assert p.wait(timeout=10).code == 0
        lines = out_path.read_text().splitlines()
        assert lines[0] == "0"
        assert lines[1].split() == ["0", "100000", "65536"]
        assert int(lines[2]) > 2
    finally:
        c.kill(signal.SIGKILL)
        status = c.wait(timeout=10)
    # The relay outside the user namespace dies the way PID 1 died.
    assert (status.code, status.signal) == (137, 9)
