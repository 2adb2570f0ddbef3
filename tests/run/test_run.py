"""``layerfs run`` and friends, end to end through the command line.

Storage-relevant tests (run, commit, volumes) run on every native driver; the
isolation, limit and network tests run on overlay2 (the engine's own suite,
tests/runtime, covers them in depth).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from layerfs.runtime.containers import LABEL_CONTAINER
from layerfs.testing import images as timg

from ..conftest import NATIVE_DRIVERS
from ..host_resources import free_port
from .conftest import Cli, busybox_layer, wait_for

RUN = ("run", "--rm", "--network", "none")


def inspect(cli: Cli, ref: str) -> Any:
    data = json.loads(cli("inspect", "--type", "container", ref).stdout)
    assert len(data) == 1
    return data[0]


# --- storage: every native driver ------------------------------------------------------------------

@pytest.mark.parametrize("driver", NATIVE_DRIVERS)
def test_run_echo_then_everything_is_removed(driver: str, make_cli: Callable[[str], Cli]) -> None:
    cli = make_cli(driver)
    proc = cli(*RUN, "busybox", "echo", "hello", "from", driver)
    assert proc.stdout == f"hello from {driver}\n" and proc.returncode == 0
    # Without --rm the container stays (exited), its output in the log, until rm.
    proc = cli("run", "--network", "none", "--name", "kept", "busybox", "sh", "-c",
               "echo out; echo err >&2; exit 3", check=False)
    assert proc.returncode == 3 and proc.stdout == "out\n" and proc.stderr == "err\n"
    ps = json.loads(cli("ps", "-a", "--json").stdout)
    assert [(c["name"], c["status"], c["exit_code"]) for c in ps] == [("kept", "exited", 3)]
    assert sorted(cli("logs", "kept").stdout.splitlines()) == ["err", "out"]
    with cli.manager() as mgr:
        assert [r.id for r in mgr.layers.layers() if LABEL_CONTAINER in r.labels] == \
            [ps[0]["layer"]]
        assert not mgr.store.list_mounts(), "an exited container's layer stays unmounted"
    assert cli("rm", "kept").stdout == "kept\n"
    assert json.loads(cli("ps", "-a", "--json").stdout) == []


@pytest.mark.parametrize("driver", NATIVE_DRIVERS)
def test_commit_captures_a_change(driver: str, make_cli: Callable[[str], Cli]) -> None:
    cli = make_cli(driver)
    cli("run", "--network", "none", "--name", "box", "-e", "STAGE=one", "busybox", "sh", "-c",
        "echo committed > /greeting && mkdir -p /srv/app && echo x > /srv/app/f "
        "&& rm /etc/group")
    image_id = cli("commit", "-m", "add greeting", "-c", "CMD [\"cat\", \"/greeting\"]", "box",
                   "lab/greeting:v1").stdout.strip()
    assert image_id.startswith("sha256:")
    cli("rm", "box")
    # The image's Cmd (from -c) prints the file; the deletion is carried too.
    assert cli(*RUN, "lab/greeting:v1").stdout == "committed\n"
    out = cli(*RUN, "lab/greeting:v1", "sh", "-c",
              "cat /srv/app/f; test -e /etc/group || echo no-group; echo $STAGE").stdout
    assert out == "x\nno-group\none\n"
    with cli.manager() as mgr:
        image = mgr.images.get("lab/greeting:v1")
        assert len(image.layers) == 2 and image.config["config"]["Cmd"] == ["cat", "/greeting"]
        assert image.config["history"][-1]["comment"] == "add greeting"
        # Mount points layerfs created for the engine (/etc/hosts, ...) are not in the layer.
        assert image.top_layer is not None
        changes = {c.path.lstrip("/") for c in mgr.layers.changes(image.top_layer)}
        assert "greeting" in changes and "srv/app/f" in changes
        assert not changes & {"etc/hosts", "etc/hostname", "etc/resolv.conf"}, changes


@pytest.mark.parametrize("driver", NATIVE_DRIVERS)
def test_volumes_read_write_and_read_only(driver: str, make_cli: Callable[[str], Cli],
                                          tmp_path: Path) -> None:
    cli = make_cli(driver)
    host = tmp_path / "vol"
    host.mkdir()
    (host / "in.txt").write_text("from host\n")
    out = cli(*RUN, "-v", f"{host}:/data", "-v", f"{host}:/ro:ro", "busybox", "sh", "-c",
              "cat /data/in.txt; echo from container > /data/out.txt; "
              "echo no > /ro/x 2>&1 || echo ro-refused; rm /ro/in.txt 2>/dev/null || "
              "echo rm-refused").stdout
    assert out == "from host\nro-refused\nrm-refused\n", out
    assert (host / "out.txt").read_text() == "from container\n"
    assert sorted(p.name for p in host.iterdir()) == ["in.txt", "out.txt"]


# --- isolation: overlay2 ---------------------------------------------------------------------------

def test_pid1_is_layerfs_init_and_the_host_pid_differs(cli: Cli) -> None:
    # The seed's demo: inside, `ps -ef` sees only the container's processes.
    out = cli(*RUN, "busybox", "ps", "-ef").stdout.splitlines()
    assert out[1].split()[:3] == ["1", "root", "layerfs-init"], out
    assert out[2].split()[:3] == ["2", "root", "ps"] and len(out) == 3, out
    cid = cli("run", "-d", "--network", "none", "--name", "sleeper", "busybox",
              "sleep", "60").stdout.strip()
    state = inspect(cli, "sleeper")["State"]
    host_pid = state["Pid"]
    assert state["Running"] and host_pid > 1
    # The kernel's view: pid <host_pid> outside is pid 1 inside.
    nspid = next(ln for ln in Path(f"/proc/{host_pid}/status").read_text().splitlines()
                 if ln.startswith("NSpid:")).split()[1:]
    assert nspid == [str(host_pid), "1"]
    assert cli("exec", "sleeper", "cat", "/proc/1/comm").stdout == "layerfs-init\n"
    assert cli("stop", "-t", "5", cid[:12]).stdout == f"{cid[:12]}\n"
    assert not Path(f"/proc/{host_pid}").exists()
    cli("rm", "sleeper")


def test_hostname_default_and_given(cli: Cli) -> None:
    assert cli(*RUN, "-h", "box", "busybox", "hostname").stdout == "box\n"
    out = cli("run", "--network", "none", "--name", "h", "busybox", "cat", "/etc/hostname").stdout
    cid = cli("ps", "-aq", "--no-trunc").stdout.strip()
    assert out == f"{cid[:12]}\n"
    cli("rm", "h")


def test_bridge_container_sees_only_lo_and_eth0(cli: Cli) -> None:
    out = cli("run", "--rm", "busybox", "sh", "-c", "ls /sys/class/net | tr '\\n' ' '; "
              "echo; ip -4 -o addr show eth0").stdout
    names, addr = out.split("\n", 1)
    assert names.split() == ["eth0", "lo"]
    assert cli.session.net.subnet.rsplit(".", 1)[0] in addr


def test_two_containers_over_the_bridge_and_a_published_port(cli: Cli) -> None:
    port = free_port()
    cli("run", "-d", "--name", "web", "-p", f"{port}:80", "busybox", "sh", "-c",
        "mkdir /www && echo hello-web > /www/index.html && exec httpd -f -p 80 -h /www")
    address = inspect(cli, "web")["NetworkSettings"]["IPAddress"]
    assert address and str(address).startswith(cli.session.net.subnet.rsplit(".", 1)[0])
    # Another container reaches it over the bridge ...
    out = cli("run", "--rm", "busybox", "sh", "-c", f"for i in $(seq 50); do wget -q -O - "
              f"http://{address}/ && break; sleep 0.1; done").stdout
    assert out == "hello-web\n"

    # ... and the published port answers on the host's loopback.
    def get() -> str:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            return data.decode()
        except OSError:
            return ""
    wait_for(lambda: "hello-web" in get(), what="the published port")
    ps = json.loads(cli("ps", "--json").stdout)
    assert ps[0]["ports"] == [f"{port}:80/tcp"]
    cli("rm", "-f", "web")      # the fixture checks: no veth, no rule, no lease left


def test_exec_joins_the_namespaces_and_the_cgroup(cli: Cli) -> None:
    cli("run", "-d", "--network", "none", "--name", "target", "-h", "inside", "-e", "A=1",
        "-w", "/tmp", "busybox", "sleep", "60")
    paths = inspect(cli, "target")["Layerfs"]["Cgroup"]["paths"]
    procs = Path(sorted(paths.values())[0]) / "cgroup.procs"
    out = cli("exec", "target", "sh", "-c", "hostname; echo $A; pwd; "
              "cat /proc/2/comm").stdout
    assert out.split() == ["inside", "1", "/tmp", "sleep"]   # pid 2: the container's command
    before = procs.read_text().split()
    cli("exec", "-d", "target", "sleep", "30")
    wait_for(lambda: len(procs.read_text().split()) == len(before) + 1,
             what="the exec'd process in the container's cgroup")
    assert cli("exec", "target", "no-such-command", check=False).returncode == 127
    cli("rm", "-f", "target")


# --- limits ------------------------------------------------------------------------------------------

def test_memory_limit_kills_with_137_and_says_oom(cli: Cli) -> None:
    proc = cli(*RUN, "-m", "16m", "busybox", "sh", "-c",
               "x=0123456789; while :; do x=$x$x; done", check=False)
    assert proc.returncode == 137, proc.stderr
    assert "OOM killed" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_pids_limit_stops_forks(cli: Cli) -> None:
    proc = cli(*RUN, "--pids-limit", "8", "busybox", "sh", "-c",
               "i=0; while [ $i -lt 20 ]; do sleep 5 & i=$((i + 1)); echo $i; done", check=False)
    assert "can't fork" in proc.stderr and proc.returncode != 0, proc
    # 8 tasks at most: layerfs-init, sh, and fewer than 7 sleeps.
    assert int(proc.stdout.split()[-1]) < 7, proc.stdout


# --- images in use, crash cleanup --------------------------------------------------------------------

def test_rmi_is_refused_while_a_container_exists(cli: Cli) -> None:
    cli("run", "--network", "none", "--name", "user", "busybox", "true")
    proc = cli("rmi", "busybox", check=False)
    assert proc.returncode == 1 and "used by 1 container" in proc.stderr, proc.stderr
    cli("rm", "user")
    assert "Deleted" in cli("rmi", "busybox").stdout


@pytest.mark.parametrize("mode", ["attached --rm", "attached", "detached"])
def test_kill_9_of_the_runner_then_the_next_command_cleans_up(cli: Cli, mode: str) -> None:
    args = ["run", "--network", "bridge", "--name", "victim"]
    args += {"attached --rm": ["--rm"], "attached": [], "detached": ["-d"]}[mode]
    runner = cli.popen(*args, "busybox", "sleep", "60")
    with cli.manager() as mgr:
        wait_for(lambda: any(c.status == "running" for c in mgr.containers()), 20,
                 "the container to run")
        (st,) = mgr.containers()
    # The process that started the container: `layerfs run` (through a daemon: its
    # worker, whose death kills the client the same way), or -d's monitor.
    runner_pid = st.record["runner_pid"]
    assert mode == "detached" or runner_pid == runner.pid or cli.mode == "daemon"
    if mode == "detached":
        runner.wait(10)
    os.kill(runner_pid, signal.SIGKILL)
    if mode != "detached":
        runner.wait(10)
    # The container dies with its runner (PID 1 gets SIGIO from the runner's liveness pipe).
    wait_for(lambda: not Path(f"/proc/{st.pid}").exists(), what="the container to die")
    ps = json.loads(cli("ps", "-a", "--json").stdout)   # any command cleans up
    if cli.mode == "daemon":
        # ... and so does the daemon itself, at once, after a worker died of a signal:
        # the listing may catch its recovery half-way.
        def settled() -> bool:
            nonlocal ps
            ps = json.loads(cli("ps", "-a", "--json").stdout)
            return all(c["status"] == "exited" for c in ps)
        wait_for(settled, what="the daemon's recovery")
    if mode == "attached --rm":
        assert ps == []
    else:
        assert [(c["name"], c["status"]) for c in ps] == [("victim", "exited")]
        with cli.manager() as mgr:
            assert not mgr.store.list_mounts()
        cli("rm", "victim")
    # The fixture checks the rest: no cgroup, veth, rule, lease, mount, layer, image user.


def test_a_failed_start_leaves_nothing(cli: Cli) -> None:
    proc = cli(*RUN, "--name", "bad", "busybox", "/no/such/binary", check=False)
    assert proc.returncode == 127 and "not found" in proc.stderr
    proc = cli(*RUN, "-u", "nobody-here", "busybox", "true", check=False)
    assert proc.returncode == 1 and "no such user" in proc.stderr
    proc = cli(*RUN, "no-such-image", check=False)
    assert proc.returncode == 1 and "not found" in proc.stderr
    proc = cli("run", "-d", "--network", "none", "busybox", "/no/such/binary", check=False)
    assert proc.returncode == 1 and "not found" in proc.stderr
    assert json.loads(cli("ps", "-a", "--json").stdout) == []


# --- the rest of the commands -------------------------------------------------------------------------

def test_detached_logs_stop_and_users(cli: Cli) -> None:
    cid = cli("run", "-d", "--network", "none", "--name", "d", "-u", "daemon", "busybox", "sh",
              "-c", "id; trap 'echo got-term; exit 7' TERM; echo ready; "
              "while :; do sleep 0.1; done").stdout.strip()
    assert len(cid) == 64
    wait_for(lambda: "ready" in cli("logs", "d").stdout, what="the container's output")
    assert cli("logs", "d").stdout.startswith("uid=1(daemon) gid=1(daemon)")
    follower = cli.popen("logs", "-f", "d")
    cli("stop", "d")
    out, _ = follower.communicate(timeout=20)
    assert out.endswith("got-term\n") and follower.returncode == 0
    (st,) = json.loads(cli("ps", "-a", "--json").stdout)
    assert (st["status"], st["exit_code"]) == ("exited", 7)
    assert cli("logs", "--tail", "1", "d").stdout == "got-term\n"
    assert cli("rm", "d").returncode == 0


def test_rm_refuses_a_running_container_unless_forced(cli: Cli) -> None:
    cli("run", "-d", "--network", "none", "--name", "busy", "busybox", "sleep", "60")
    proc = cli("rm", "busy", check=False)
    assert proc.returncode == 1 and "running" in proc.stderr
    proc = cli("run", "-d", "--network", "none", "--name", "busy", "busybox", "true",
               check=False)
    assert proc.returncode == 1 and "already in use" in proc.stderr
    assert cli("kill", "-s", "TERM", "busy").returncode == 0
    with cli.manager() as mgr:
        st = mgr.wait("busy")
    assert st.exit_code == 128 + signal.SIGTERM
    assert cli("rm", "busy").returncode == 0


def test_signals_to_an_attached_run_go_to_the_container(cli: Cli) -> None:
    runner = cli.popen("run", "--rm", "--network", "none", "busybox", "sh", "-c",
                       "trap 'echo got-int; exit 5' INT; echo ready; "
                       "while :; do sleep 0.1; done")
    assert runner.stdout is not None
    assert runner.stdout.readline() == "ready\n"
    runner.send_signal(signal.SIGINT)
    out, _ = runner.communicate(timeout=20)
    assert out == "got-int\n" and runner.returncode == 5


# --- one escape attempt at the CLI level (tests/runtime/test_escapes.py has the rest) ------------------

def test_a_hostile_image_cannot_reach_the_host(cli: Cli, tmp_path: Path) -> None:
    """An image whose mount points and /etc/passwd are symlinks to host paths: the engine
    mounts inside the container, and the runner reads the image's passwd without following
    links out of it. A container writing through /proc/1/root stays inside."""
    marker = f"lfs-escape-{os.urandom(4).hex()}"
    host_file = Path("/tmp") / marker
    hostile = (timg.LayerTar().dir("etc").symlink("etc/hostname", str(host_file))
               .symlink("etc/passwd", "/etc/passwd").symlink("data", "/tmp")).bytes()
    archive = timg.build_image(tmp_path / "hostile.tar", [busybox_layer(cli), hostile],
                               name="hostile:latest", cmd=["sh"])
    cli.load(archive.path)
    out = cli(*RUN, "-h", "evil", "hostile", "sh", "-c",
              f"cat /etc/hostname; echo pwned > /proc/1/root/tmp/{marker} 2>/dev/null "
              f"|| echo refused; ls /data/ | grep -c lfs-escape; true").stdout
    assert out == "evil\nrefused\n0\n", out
    assert not host_file.exists()
    # A volume whose target is a symlink to /tmp: mounted inside the container or refused,
    # never on the host's /tmp.
    proc = cli(*RUN, "-v", f"{tmp_path}:/data", "hostile", "sh", "-c",
               f"echo pwned > /data/{marker}-vol", check=False)
    assert proc.returncode == 0 or "move_mount" in proc.stderr, proc
    assert not (Path("/tmp") / f"{marker}-vol").exists()
    proc = cli(*RUN, "-u", "root", "hostile", "id", check=False)
    assert proc.returncode == 1 and "symbolic link" in proc.stderr  # /etc/passwd not followed


def test_help_texts_teach(cli: Cli) -> None:
    for command in ("run", "ps", "stop", "kill", "rm", "exec", "logs", "inspect", "commit"):
        proc = cli(command, "--help")
        assert "examples:" in proc.stdout, command
    assert "--pids-limit" in cli("run", "--help").stdout
    assert subprocess.run(cli.argv("run", "-it", "busybox", "sh"), capture_output=True,
                          text=True, env=cli.env()).returncode == 1


def test_ps_lists_running_and_all(cli: Cli) -> None:
    cli("run", "-d", "--network", "none", "--name", "up", "busybox", "sleep", "60")
    cli("run", "--network", "none", "--name", "down", "busybox", "true")
    running = json.loads(cli("ps", "--json").stdout)
    every = json.loads(cli("ps", "-a", "--json").stdout)
    assert [c["name"] for c in running] == ["up"]
    assert sorted(c["name"] for c in every) == ["down", "up"]
    table = cli("ps", "-a").stdout
    assert "Up " in table and "Exited (0)" in table
    assert len(cli("ps", "-q").stdout.split()) == 1
    assert cli("rm", "-f", "up", "down").stdout.split() == ["up", "down"]
