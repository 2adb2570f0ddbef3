"""Real peers for interop tests and benchmarks: Docker, umoci, skopeo (all from Debian).

:class:`DockerDaemon` runs a private ``dockerd`` under a scratch folder, with
its own data root, exec root, pid file and socket, so it never touches a
system Docker::

    with DockerDaemon(Path("/tmp/lfs-images/docker")) as d:
        d.docker("load", "-i", "busybox.tar")
        print(d.docker("run", "--rm", "--network", "none", "busybox", "echo", "hi").stdout)

It is started without networking of its own (``--bridge=none``,
``--iptables=false``, ``--ip-forward=false``): containers run with
``--network none`` and builds with ``docker build --network none``. dockerd
can still flip ``net.ipv4.ip_forward`` and the iptables FORWARD policy, so
both are recorded before the start and restored after the stop whatever
happened. The daemon is stopped by its pid (SIGTERM, then SIGKILL), and mounts
it left under the folder are unmounted.

:func:`umoci` and :func:`skopeo` run those tools with errors turned into one
readable line; :func:`missing` says which peer is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from layerfs import mount as mountlib
from layerfs.errors import ExternalCommandFailed, command_error

#: Debian packages that provide each peer (for skip messages).
PACKAGES = {"dockerd": "docker.io", "docker": "docker.io", "umoci": "umoci",
            "skopeo": "skopeo", "containerd": "containerd", "runc": "runc"}


def missing(*tools: str) -> str | None:
    """None if every tool is installed, else a message naming the Debian package(s)."""
    absent = [t for t in tools if shutil.which(t) is None]
    if not absent:
        return None
    pkgs = sorted({PACKAGES.get(t, t) for t in absent})
    return f"{', '.join(absent)} not installed (apt-get install {' '.join(pkgs)})"


def _run(argv: list[str], *, check: bool = True, input: bytes | str | None = None,
         timeout: float | None = 600, env: dict[str, str] | None = None,
         cwd: str | os.PathLike[str] | None = None,
         text: bool = True) -> subprocess.CompletedProcess[Any]:
    try:
        return subprocess.run(argv, check=check, capture_output=True, input=input,
                              timeout=timeout, env=env, cwd=cwd, text=text)
    except subprocess.CalledProcessError as err:
        raise command_error(err) from err


# --- host network state dockerd may change ----------------------------------------------------

class NetState:
    """``net.ipv4.ip_forward`` and the iptables FORWARD policy, saved and restored."""

    IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

    def __init__(self) -> None:
        self.ip_forward = self.IP_FORWARD.read_text().strip()
        self.forward_policy = self._policy()

    @staticmethod
    def _policy() -> str | None:
        if shutil.which("iptables") is None:
            return None
        proc = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if parts[:2] == ["-P", "FORWARD"] and len(parts) == 3:
                return parts[2]
        return None

    def restore(self) -> None:
        if self.IP_FORWARD.read_text().strip() != self.ip_forward:
            self.IP_FORWARD.write_text(self.ip_forward + "\n")
        if self.forward_policy is not None and self._policy() != self.forward_policy:
            subprocess.run(["iptables", "-P", "FORWARD", self.forward_policy], check=False,
                           capture_output=True)


# --- dockerd ------------------------------------------------------------------------------------

# --- a daemon we started, under a scratch folder -----------------------------------------

def log_tail(path: Path, lines: int = 5) -> str:
    """The last lines of a daemon's log, on one line, for an error message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def stop_by_pid(proc: subprocess.Popen[Any] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds: only the process we started."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def wait_ready(proc: subprocess.Popen[Any], ready: Callable[[], bool], *, what: str,
               where: str, timeout: float, log: Path, interval: float) -> None:
    """Poll ``ready()`` until true; fail early with the log's tail if the daemon exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting: "
                               f"{log_tail(log)}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer on {where} within {timeout:.0f}s: "
                               f"{log_tail(log)}")
        time.sleep(interval)


def docker_client() -> str:
    """The Debian client (matches the 20.10 daemon) if present, else any ``docker``."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("docker client not installed (apt-get install docker.io)")


class ScratchDaemon:
    """A daemon that keeps everything under one scratch folder, ``base``: what stopping it
    and removing its data have in common. Subclasses implement ``start`` and ``stop``."""

    base: Path

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _unmount_leftovers(self) -> None:
        for info in mountlib.mounts_under(self.base):
            mountlib.unmount(info.target, lazy=True)

    def remove_data(self) -> None:
        """Delete the daemon's folder (after :meth:`stop`), unmounting what it left there."""
        self._unmount_leftovers()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class DockerDaemon(ScratchDaemon):
    """A private dockerd under ``base``; a context manager (start on enter, stop on exit)."""

    def __init__(self, base: str | os.PathLike[str], *, storage_driver: str = "overlay2",
                 startup_timeout: float = 90.0, extra_args: tuple[str, ...] = ()) -> None:
        self.base = Path(base)
        self.data_root = self.base / "data"
        self.exec_root = self.base / "exec"
        self.pidfile = self.base / "dockerd.pid"
        self.socket = self.base / "docker.sock"
        self.log_path = self.base / "dockerd.log"
        self.host = f"unix://{self.socket}"
        self.storage_driver = storage_driver
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self._net: NetState | None = None
        # The classic builder: what 20.10 runs by default, and it needs no frontend image.
        self._env = dict(os.environ, DOCKER_CONFIG=str(self.base / "client"),
                         DOCKER_BUILDKIT="0")
        self._env.pop("DOCKER_HOST", None)
        self._env.pop("DOCKER_CONTEXT", None)

    @staticmethod
    def unavailable() -> str | None:
        """Why no daemon can be started here (dockerd or the client missing), or None."""
        reason = missing("dockerd")
        if reason:
            return reason
        try:
            docker_client()
        except FileNotFoundError as err:
            return str(err)
        return None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> DockerDaemon:
        reason = self.unavailable()
        if reason:
            raise FileNotFoundError(reason)
        self.base.mkdir(parents=True, exist_ok=True)
        for d in (self.data_root, self.exec_root, self.base / "client"):
            d.mkdir(exist_ok=True)
        config = self.base / "daemon.json"  # not /etc/docker/daemon.json
        config.write_text("{}\n")
        self._net = NetState()
        argv = [shutil.which("dockerd") or "dockerd",
                "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "--pidfile", str(self.pidfile), "-H", self.host,
                "--config-file", str(config), "--storage-driver", self.storage_driver,
                "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
                "--userland-proxy=false", "--log-level=warn", *self.extra_args]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=self._env)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None

        def answers() -> bool:
            if not self.socket.exists():
                return False
            probe = subprocess.run([docker_client(), "-H", self.host, "version", "--format",
                                    "{{.Server.Version}}"], capture_output=True, text=True,
                                   env=self._env, timeout=30)
            if probe.returncode == 0 and probe.stdout.strip():
                self.version = probe.stdout.strip()
                return True
            return False

        wait_ready(self.proc, answers, what="dockerd", where=str(self.socket),
                   timeout=self.startup_timeout, log=self.log_path, interval=0.2)

    def log_tail(self, lines: int = 5) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop the daemon by its pid, unmount its leftovers, restore host networking."""
        try:
            stop_by_pid(self.proc, timeout=30)
            self._unmount_leftovers()
        finally:
            if self._net is not None:
                self._net.restore()
                self._net = None

    # -- using it ------------------------------------------------------------------------------
    def docker(self, *args: str, check: bool = True, input: bytes | str | None = None,
               timeout: float | None = 600, text: bool = True,
               cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[Any]:
        """Run the docker client against this daemon; failures raise one readable line."""
        return _run([docker_client(), "-H", self.host, *args], check=check, input=input,
                    timeout=timeout, env=self._env, text=text, cwd=cwd)

    @property
    def client_env(self) -> dict[str, str]:
        """The environment a docker client run against this daemon needs (for pipelines
        that :meth:`docker` cannot express, such as ``docker save | tar -t``)."""
        return dict(self._env)

    def image_id(self, ref: str) -> str:
        return str(self.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip())

    def images(self) -> list[dict[str, Any]]:
        out = self.docker("images", "--no-trunc", "--format", "{{json .}}").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


# --- umoci and skopeo --------------------------------------------------------------------------

def umoci(*args: str, check: bool = True, cwd: str | os.PathLike[str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    """Run ``umoci`` (e.g. ``umoci("init", "--layout", "img")``)."""
    if shutil.which("umoci") is None:
        raise ExternalCommandFailed(str(missing("umoci")))
    return _run(["umoci", *args], check=check, cwd=cwd)


def skopeo(*args: str, check: bool = True, tmpdir: str | os.PathLike[str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """Run ``skopeo`` without a signature policy file (``--insecure-policy``): only local
    transports (``docker-archive:``, ``oci:``, ``oci-archive:``, ``dir:``) are used here.
    ``tmpdir`` is where it unpacks archives (default: /var/tmp)."""
    if shutil.which("skopeo") is None:
        raise ExternalCommandFailed(str(missing("skopeo")))
    env = dict(os.environ)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return _run(["skopeo", "--insecure-policy", *args], check=check, env=env)
