"""``layerfs daemon``: the socket, the modes, what a worker adopts, signals, hang-ups."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from layerfs.daemon import wire

from .conftest import Daemon, Root, wait_for, zombies_of


def layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    return buf.getvalue()


def one_line_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: error: "), text
    assert "Traceback" not in text
    return lines[0]


def test_socket_is_root_only_and_one_daemon_per_root(root: Root, daemon: Daemon,
                                                     start_daemon: Callable[..., Daemon]) -> None:
    st = os.stat(wire.socket_path(root.path))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    second = subprocess.run([sys.executable, "-m", "layerfs", "daemon", "--root",
                             str(root.path)], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"another layerfs daemon (pid {daemon.pid}) serves {root.path}" in \
        one_line_error(second.stderr)
    assert root.layerfs("images", "-q").stdout.strip()      # the first still serves


def _as_nobody(fn: Callable[[], int]) -> tuple[int, str]:
    """Run ``fn`` in a child with effective uid 65534; its return value and stderr."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.dup2(w, 2)
            sys.stderr = open(2, "w", closefd=False)  # not pytest's capture
            os.setegid(65534)
            os.seteuid(65534)
            code = fn()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_non_root_is_refused(root: Root, daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    import rich.console  # noqa: F401  (the error message is printed with it)

    from layerfs._entry import main
    from layerfs.cli import build_parser
    from layerfs.daemon import command, server  # noqa: F401  (nobody cannot import them)
    from layerfs.daemon.client import delegate

    build_parser()                                # imports every command module
    # pytest's folders are root-only: nobody reaches the root through a descriptor.
    dir_fd = os.open(root.path, os.O_PATH | os.O_DIRECTORY)
    argv = ["--root", f"/proc/self/fd/{dir_fd}", "images", "-q"]
    monkeypatch.setenv("LAYERFS_DAEMON", "1")
    # The socket is 0600: a non-root client cannot even connect.
    code, err = _as_nobody(lambda: delegate(argv) or 0)
    assert code == 1 and "does not answer: Permission denied" in one_line_error(err)
    # With the mode loosened, the daemon checks the peer's credentials itself.
    os.chmod(wire.socket_path(root.path), 0o666)
    code, err = _as_nobody(lambda: delegate(argv) or 0)
    assert code == 1 and "serves root only" in one_line_error(err)
    assert "refused uid 65534" in daemon.text()
    # And a non-root `layerfs daemon` does not start.
    code, err = _as_nobody(lambda: main(["daemon", "--root", str(root.path / "other")]))
    # (the CLI's boundary refuses every command that needs root before it runs)
    assert code == 1 and "needs root" in err and "Traceback" not in err
    os.close(dir_fd)


def test_modes(root: Root, tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    # LAYERFS_DAEMON=1 without a daemon: one clear line, nothing runs.
    proc = root.layerfs("images", "-q", mode="daemon", check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"no layerfs daemon at {root.path}/daemon.sock" in one_line_error(proc.stderr)
    daemon = start_daemon()
    served = daemon.text().count("(images): exit 0")
    root.layerfs("images", "-q", mode="daemon")
    wait_for(lambda: daemon.text().count("(images): exit 0") == served + 1, what="the log")
    root.layerfs("images", "-q", mode="in-process")                         # LAYERFS_DAEMON=0
    root.layerfs("images", "-q", mode="daemon", env={"LAYERFS_DAEMON": ""})   # unset: the daemon
    wait_for(lambda: daemon.text().count("(images): exit 0") == served + 2, what="the log")
    time.sleep(0.2)
    assert daemon.text().count("(images): exit 0") == served + 2
    # A daemon that stopped leaves no socket; a killed one leaves a dead socket: both
    # mean in-process without LAYERFS_DAEMON, and a clear error with =1.
    daemon.kill9()
    assert os.path.exists(wire.socket_path(root.path))
    assert root.layerfs("images", "-q", mode="daemon", env={"LAYERFS_DAEMON": ""}).stdout
    proc = root.layerfs("images", "-q", mode="daemon", check=False)
    assert proc.returncode == 1 and "does not answer: Connection refused" in \
        one_line_error(proc.stderr)


def test_the_worker_is_the_client(root: Root, daemon: Daemon, tmp_path: Path) -> None:
    """cwd, umask, environment, stdin/stdout/stderr, argv and exit status are the client's."""
    work = tmp_path / "work"
    work.mkdir()
    base = root.layerfs("layer", "apply", "-", input=layer_tar(), cwd=work).stdout.strip()
    # A relative output path lands in the client's cwd, with the client's umask.
    proc = subprocess.run(["sh", "-c", f"umask 027; exec {' '.join(root.argv())} layer diff "
                           f"{base} -o out.tar"], cwd=work, env=root.environ("daemon", None),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(work / "out.tar").st_mode) == 0o640
    assert (work / "out.tar").read_bytes().count(b"hi\n") == 1
    # stdout and stderr stay apart; -e NAME copies NAME from the client's environment;
    # the exit status is the container's.
    proc = root.layerfs("run", "--rm", "--network", "none", "-e", "GREETING", "busybox", "sh",
                        "-c", 'echo "$GREETING"; echo oops >&2; exit 7', check=False,
                        env={"GREETING": "hello from the client"})
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "hello from the client\n",
                                                            "oops\n")
    # An error is one line on the client's stderr, exit 1.
    proc = root.layerfs("layer", "rm", "nosuchlayer", check=False)
    assert proc.returncode == 1 and "nosuchlayer" in one_line_error(proc.stderr)
    # argparse's own errors and --help come out as they would in-process.
    for args in (["layer", "frobnicate"], ["--help"], ["run", "--help"]):
        here = root.layerfs(*args, mode="in-process", check=False)
        there = root.layerfs(*args, check=False)
        assert (there.returncode, there.stdout, there.stderr) == \
            (here.returncode, here.stdout, here.stderr)
    # stdin is the client's: -i passes it to the container.
    proc = root.layerfs("run", "--rm", "-i", "--network", "none", "busybox", "wc", "-c",
                        input=b"12345")
    assert proc.stdout.strip() == "5"


def test_signals_reach_the_container(root: Root, daemon: Daemon) -> None:
    for sig, code in ((signal.SIGINT, 42), (signal.SIGTERM, 43)):
        proc = root.popen("run", "--rm", "--network", "none", "busybox", "sh", "-c",
                          f'trap "exit {code}" {sig.name[3:]}; echo ready; '
                          "while :; do sleep 0.05; done", stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        proc.send_signal(sig)
        assert proc.wait(30) == code
    assert root.leftovers() == []


@pytest.mark.parametrize("mode", ["in-process", "daemon"])
def test_a_signal_the_client_ignores_does_not_stop_its_command(root: Root, daemon: Daemon,
                                                                mode: str) -> None:
    """`nohup`, or `cmd &` in a script, starts a process with SIGINT ignored: a Ctrl-C then
    does not stop `layerfs`, through the daemon as in-process (the worker ignores what its
    client ignores)."""
    data = layer_tar()
    proc = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh",
                             *root.argv("layer", "apply", "-")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=root.environ(mode, None))
    assert proc.stdin is not None
    try:
        proc.stdin.write(data[:512])     # the command is reading its layer from stdin
        proc.stdin.flush()
        if mode == "daemon":
            wait_for(lambda: len(daemon.workers()) == 1, what="the worker")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        stdout, stderr = proc.communicate(data[512:], timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert len(stdout.split()) == 1            # the new layer's id


def test_a_worker_killed_by_a_signal_kills_its_client_the_same_way(root: Root,
                                                                   daemon: Daemon) -> None:
    proc = root.popen("run", "--rm", "--network", "none", "busybox", "sleep", "60",
                      stdout=subprocess.PIPE)
    wait_for(lambda: len(daemon.workers()) == 1, what="the worker")
    os.kill(daemon.workers()[0], signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL          # as if `layerfs` itself was killed
    # The container died with its runner; the daemon's recovery cleans up after it.
    wait_for(lambda: root.leftovers() == [], what="recovery after the worker died")


def test_client_death_hangs_up_the_command(root: Root, daemon: Daemon) -> None:
    proc = root.popen("run", "--rm", "--network", "none", "busybox", "sh", "-c",
                      'trap "exit 5" HUP; echo ready; while :; do sleep 0.05; done',
                      stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: "(run): exit 5" in daemon.text(), what="the worker's exit")
    assert "client went away, hanging up" in daemon.text()
    assert root.leftovers() == []


def test_hang_up_escalates_to_sigkill(root: Root, start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(extra=["--hangup-grace", "0.5"])
    proc = root.popen("run", "--rm", "--network", "none", "busybox", "sh", "-c",
                      'trap "" HUP TERM; echo ready; while :; do sleep 0.05; done',
                      stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: "(run): killed by SIGKILL" in daemon.text(), what="SIGKILL")
    wait_for(lambda: root.leftovers() == [], what="recovery after the hang-up")


def test_stopping_lets_running_commands_finish(root: Root, daemon: Daemon) -> None:
    proc = root.popen("run", "--rm", "--network", "none", "busybox", "sh", "-c",
                      "echo ready; sleep 1; echo done", stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    os.kill(daemon.pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(wire.socket_path(root.path)), what="the socket to go")
    # New commands now run in-process (and fail with LAYERFS_DAEMON=1).
    assert root.layerfs("images", "-q", mode="in-process").stdout
    assert proc.stdout.read() == b"done\n" and proc.wait(30) == 0
    assert daemon.proc is not None and daemon.proc.wait(30) == 0
    assert "stopped" in daemon.text()


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])


def test_orphans_are_reaped(root: Root, daemon: Daemon) -> None:
    """A detached container's monitor outlives the worker that started it: it is
    re-parented to the daemon (a subreaper, not this VM's PID 1, which never reaps)
    and reaped when it finishes."""
    monitors = []
    for i in range(3):
        root.layerfs("run", "-d", "--rm", "--name", f"bg{i}", "--network", "none", "busybox",
                     "sleep", "1")
        with root.manager() as mgr:
            init = mgr.get(f"bg{i}").pid
        assert init is not None
        monitors.append(ppid(init))
    assert [ppid(m) for m in monitors] == [daemon.pid] * 3
    wait_for(lambda: root.leftovers() == [], what="the detached containers to finish")
    wait_for(lambda: not any(os.path.exists(f"/proc/{m}") for m in monitors),
             what="the monitors to be reaped")
    assert zombies_of(daemon.pid) == []


def test_services_are_supervised(root: Root, tmp_path: Path,
                                 start_daemon: Callable[..., Daemon]) -> None:
    """A service (issue 18's engine endpoints use this) runs in its own child of the
    daemon, is restarted when it dies, and is stopped with the daemon, or by its death."""
    record = tmp_path / "service.log"

    def lines() -> list[list[str]]:
        return [line.split() for line in record.read_text().splitlines()] \
            if record.exists() else []

    daemon = start_daemon(extra=["--service", f"tests.daemon.sample_service:serve {record} a b"])
    wait_for(lambda: len(lines()) == 1, what="the service")
    started, pid, parent, where, *args = lines()[0]
    assert (started, int(parent), where, args) == ("started", daemon.pid, str(root.path),
                                                   ["a", "b"])
    os.kill(int(pid), signal.SIGKILL)                      # it fails: it comes back
    wait_for(lambda: len(lines()) == 2, what="the restart")
    assert "restarting in 1 s" in daemon.text()
    again = int(lines()[1][1])
    assert root.layerfs("images", "-q").stdout             # commands are served meanwhile
    daemon.stop()
    assert lines()[2] == ["stopped", str(again)]
    # Killed with the daemon: SIGTERM through PR_SET_PDEATHSIG, a clean stop.
    daemon = start_daemon(extra=["--service", f"tests.daemon.sample_service:serve {record}"])
    wait_for(lambda: len(lines()) == 4, what="the service")
    daemon.kill9()
    wait_for(lambda: len(lines()) == 5, what="the service to stop")
    assert lines()[4] == ["stopped", lines()[3][1]]
    proc = root.layerfs("daemon", "--service", "nosuch", mode="in-process", check=False)
    assert proc.returncode == 1 and "no daemon service named 'nosuch'" in \
        one_line_error(proc.stderr)


def test_socket_activation(root: Root, tmp_path: Path) -> None:
    """systemd-socket-activate stands in for systemd: it binds ROOT/daemon.sock and starts
    the daemon on the first connection with the socket as fd 3 (LISTEN_FDS)."""
    activate = subprocess.run(["which", "systemd-socket-activate"], capture_output=True,
                              text=True).stdout.strip()
    if not activate:
        pytest.skip("systemd-socket-activate is not installed")
    log = open(tmp_path / "activated.log", "wb")
    proc = subprocess.Popen([activate, "-l", wire.socket_path(root.path), sys.executable, "-m",
                             "layerfs", "daemon", "--root", str(root.path)], stdout=log,
                            stderr=log, env=root.environ("in-process", None))
    try:
        wait_for(lambda: os.path.exists(wire.socket_path(root.path)), what="the socket")
        assert root.layerfs("images", "-q").stdout.strip()
        assert "using the listening socket from systemd" in \
            (tmp_path / "activated.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
        with open(tmp_path / "activated.log") as f:
            text = f.read()
        # systemd-socket-activate execs the daemon in its own process: it got SIGTERM.
        assert "stopped" in text, text


def test_units_are_valid(tmp_path: Path) -> None:
    """systemd itself checks the units (``systemd-analyze verify``), for an instance."""
    units = Path(__file__).parents[2] / "contrib" / "systemd"
    assert sorted(f.name for f in units.iterdir()) == ["layerfs@.service", "layerfs@.socket"]
    socket_unit = (units / "layerfs@.socket").read_text()
    assert "ListenStream=%f/daemon.sock" in socket_unit and "SocketMode=0600" in socket_unit
    service = (units / "layerfs@.service").read_text()
    assert "ExecStart=/usr/local/bin/layerfs daemon --root %f" in service
    assert "Type=notify" in service and "KillMode=process" in service
    for unit in units.iterdir():
        # Here layerfs is the checkout's virtualenv, not /usr/local/bin.
        (tmp_path / unit.name).write_text(unit.read_text().replace(
            "/usr/local/bin/layerfs", str(Path(sys.executable).with_name("layerfs"))))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           "layerfs@var-lib-layerfs.service", "layerfs@var-lib-layerfs.socket"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_a_pool_a_daemon_serves_is_not_destroyed_under_it(denv: object, tmp_path: Path) -> None:
    """The daemon keeps its root's filesystem busy (socket and lock live in the root):
    `pool destroy` says which daemon to stop, and works once it is stopped."""
    from ..daemons import stop, wait_for_socket

    image, mnt = tmp_path / "pool.img", tmp_path / "mnt"
    layerfs = [sys.executable, "-m", "layerfs"]
    env = dict(os.environ, LAYERFS_DAEMON="0")
    subprocess.run([*layerfs, "pool", "create", "btrfs", "--size", "300M", "--image", str(image),
                    "--mount", str(mnt)], check=True, capture_output=True, env=env)
    daemon = None
    try:
        daemon = subprocess.Popen([*layerfs, "daemon", "--root", str(mnt / "layerfs")],
                                  stderr=subprocess.DEVNULL, env=env)
        wait_for_socket(mnt / "layerfs")
        proc = subprocess.run([*layerfs, "pool", "destroy", "btrfs", str(mnt)],
                              capture_output=True, text=True, env=env)
        assert proc.returncode == 1
        assert f"the layerfs daemon (pid {daemon.pid}) serving {mnt}/layerfs keeps it open; " \
               f"stop the daemon first" in one_line_error(proc.stderr)
        stop(daemon.pid)
        daemon.wait()
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        subprocess.run([*layerfs, "pool", "destroy", "btrfs", str(mnt)], check=True,
                       capture_output=True, env=env)
    assert not image.exists()
