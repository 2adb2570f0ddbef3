"""containerd and layerfs's own engine server as processes, for tests and the bench.

:class:`ContainerdDaemon` is a private containerd (Debian's 1.6) under a scratch folder::

    with ContainerdDaemon(Path("/tmp/lfs-x/containerd"),
                          proxy_snapshotters={"layerfs-overlay2": sock}) as c:
        c.ctr("image", "import", "--snapshotter", "layerfs-overlay2", "busybox.tar")
        print(c.ctr("run", "--rm", "--snapshotter", "layerfs-overlay2",
                    "docker.io/library/busybox:latest", "t1", "echo", "hi").stdout)

Its root, state directory, sockets and configuration are all under the folder,
so it never touches a system containerd. The configuration is the one
``docs/engines.md`` shows: layerfs snapshotters as ``proxy_plugins`` and, when
``cri`` is given, the CRI plugin with a layerfs snapshotter and a local sandbox
image (otherwise the CRI plugin is disabled, which starts faster). Stopping
kills the daemon by its pid, then the shims of tasks still running (by the pid
each recorded in its bundle), and unmounts what is left under the folder.

:class:`EngineServer` runs the servers of :mod:`layerfs.engines` for one root
in their own process, as a real deployment does, waits until they listen, and
stops them by pid; :meth:`EngineServer.kill` is ``kill -9`` for the crash tests::

    with EngineServer(root, "overlay2", snapshotter_socket=sock) as server:
        ...                      # containerd's proxy_plugins point at sock
        server.kill(); server.start()
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .peers import NetState, ScratchDaemon, _run, log_tail, missing, stop_by_pid, wait_ready

CAP_SYS_RESOURCE = 24


def has_capability(cap: int) -> bool:
    """Whether this process holds ``cap`` in its effective set."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


@dataclass(frozen=True)
class CriConfig:
    """The CRI plugin's settings a test chooses."""

    snapshotter: str
    sandbox_image: str
    cni_bin_dir: str = "/usr/lib/cni"
    cni_conf_dir: str = ""


def toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_toml(base: Path, proxy_snapshotters: dict[str, Path],
                cri: CriConfig | None) -> str:
    """containerd's configuration (version 2) for a daemon under ``base``."""
    lines = [
        "version = 2",
        f"root = {toml_string(str(base / 'root'))}",
        f"state = {toml_string(str(base / 'state'))}",
    ]
    if cri is None:
        lines.append('disabled_plugins = ["io.containerd.grpc.v1.cri"]')
    lines += [
        "",
        "[grpc]",
        f"  address = {toml_string(str(base / 'containerd.sock'))}",
        "[ttrpc]",
        f"  address = {toml_string(str(base / 'containerd.sock.ttrpc'))}",
        "",
    ]
    for name, socket in proxy_snapshotters.items():
        lines += [f"[proxy_plugins.{toml_string(name)}]",
                  '  type = "snapshot"',
                  f"  address = {toml_string(str(socket))}", ""]
    if cri is not None:
        section = '[plugins."io.containerd.grpc.v1.cri"'
        lines += [f"{section}]",
                  f"  sandbox_image = {toml_string(cri.sandbox_image)}"]
        if not has_capability(CAP_SYS_RESOURCE):
            # The kubelet asks for oom_score_adj -998 for a sandbox; lowering it needs
            # CAP_SYS_RESOURCE, which a containerd in a container (or this CI VM) lacks.
            lines.append("  restrict_oom_score_adj = true")
        lines += [
                  f"{section}.containerd]",
                  f"  snapshotter = {toml_string(cri.snapshotter)}",
                  f"{section}.cni]",
                  f"  bin_dir = {toml_string(cri.cni_bin_dir)}",
                  f"  conf_dir = {toml_string(cri.cni_conf_dir or str(base / 'cni'))}",
                  ""]
    return "\n".join(lines)


class ContainerdDaemon(ScratchDaemon):
    """A containerd under ``base``; a context manager (start on enter, stop on exit)."""

    def __init__(self, base: str | os.PathLike[str], *,
                 proxy_snapshotters: dict[str, Path] | None = None, cri: CriConfig | None = None,
                 startup_timeout: float = 60.0, log_level: str = "warn") -> None:
        self.base = Path(base)
        self.log_level = log_level
        self.socket = self.base / "containerd.sock"
        self.config_path = self.base / "config.toml"
        self.log_path = self.base / "containerd.log"
        self.proxy_snapshotters = dict(proxy_snapshotters or {})
        self.cri = cri
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._net: NetState | None = None

    @staticmethod
    def unavailable() -> str | None:
        return missing("containerd", "ctr", "runc")

    def start(self) -> ContainerdDaemon:
        reason = self.unavailable()
        if reason:
            raise FileNotFoundError(reason)
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "cni").mkdir(exist_ok=True)
        self.config_path.write_text(config_toml(self.base, self.proxy_snapshotters, self.cri))
        self._net = NetState()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [shutil.which("containerd") or "containerd", "--config", str(self.config_path),
                 "--log-level", self.log_level],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        finally:
            log.close()

        def answers() -> bool:
            if not self.socket.exists():
                return False
            return self.ctr("version", check=False, timeout=30).returncode == 0

        try:
            wait_ready(self.proc, answers, what="containerd", where=str(self.socket),
                       timeout=self.startup_timeout, log=self.log_path, interval=0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def ctr(self, *args: str, namespace: str = "default", check: bool = True,
            timeout: float | None = 600, input: bytes | str | None = None,
            text: bool = True) -> subprocess.CompletedProcess[Any]:
        """Run ``ctr`` against this daemon; failures raise one readable line."""
        return _run(["ctr", "--address", str(self.socket), "--namespace", namespace, *args],
                    check=check, timeout=timeout, input=input, text=text)

    def collect_garbage(self, namespace: str = "default") -> None:
        """A garbage collection now, waited for: containerd runs one, synchronously, when
        a lease is deleted with ``--sync`` (so: a throwaway lease). Its scheduled ones can
        miss a deletion: one that lands while a collection is finishing is dropped (1.6's
        scheduler ignores events older than the end of the last run), and nothing then
        collects what it freed until the next deletion."""
        lease = f"layerfs-gc-{os.getpid()}-{time.monotonic_ns()}"
        self.ctr("leases", "create", "--id", lease, namespace=namespace)
        self.ctr("leases", "delete", "--sync", lease, namespace=namespace)

    def log_tail(self, lines: int = 5) -> str:
        return log_tail(self.log_path, lines)

    def shim_pids(self) -> list[int]:
        """Pids of the shims of tasks this daemon started (recorded in their bundles)."""
        pids = []
        for pidfile in (self.base / "state").glob("io.containerd.runtime.v2.task/*/*/shim.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pidfile.read_text().strip()))
        return pids

    def stop(self) -> None:
        """Stop the daemon and its shims by pid, unmount leftovers, restore host networking."""
        try:
            shims = self.shim_pids()
            stop_by_pid(self.proc, timeout=30)
            for pid in shims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._unmount_leftovers()
        finally:
            if self._net is not None:
                self._net.restore()
                self._net = None


class EngineServer:
    def __init__(self, root: str | os.PathLike[str], driver: str, *,
                 snapshotter_socket: Path | None = None, docker_plugin: str | None = None,
                 options: list[str] | None = None, log_path: Path | None = None,
                 startup_timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.driver = driver
        self.snapshotter_socket = snapshotter_socket
        self.docker_plugin = docker_plugin
        self.options = list(options or [])
        self.log_path = log_path or self.root.with_name(self.root.name + "-engines.log")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "layerfs.engines", "--root", str(self.root),
                "--driver", self.driver, "-v"]
        for opt in self.options:
            argv += ["-s", opt]
        if self.snapshotter_socket is not None:
            argv += ["--containerd-snapshotter", str(self.snapshotter_socket)]
        if self.docker_plugin is not None:
            argv += ["--docker-plugin", self.docker_plugin]
        return argv

    def start(self) -> EngineServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            answered = bool(sel.select(self.startup_timeout))
        line = self.proc.stdout.readline() if answered else b""
        if line.strip() != b"ready":
            self.kill()
            raise RuntimeError(f"layerfs engine server for {self.root} did not start: "
                               f"{log_tail(self.log_path)}")
        return self

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 30 s): the server closes its sockets and store."""
        stop_by_pid(self.proc, timeout=30)
        self._close()

    def kill(self) -> None:
        """SIGKILL: a crash, leaving whatever the server was doing half-done."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def log_tail(self, lines: int = 10) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> EngineServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
