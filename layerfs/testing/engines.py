"""A layerfs engine server (containerd snapshotter, Docker graphdriver plugin) for tests.

:class:`EngineServer` runs the servers of :mod:`layerfs.engines` for one root
in their own process, as a real deployment does, waits until they listen,
and stops them by pid; :meth:`EngineServer.kill` is ``kill -9`` for the crash
tests::

    with EngineServer(root, "overlay2", snapshotter_socket=sock) as server:
        ...                      # containerd's proxy_plugins point at sock
        server.kill(); server.start()
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from .peers import log_tail, stop_by_pid


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
