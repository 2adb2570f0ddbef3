"""Running the CLI test suites in both modes: in-process and through ``layerfs daemon``.

A test (or a CLI fixture) that starts ``layerfs`` requests :func:`cli_mode`,
which parametrizes it over ``in-process`` and ``daemon``; the CLI helpers add
:func:`cli_env` ``(root)`` to every command's environment. That is
``LAYERFS_DAEMON=0``, or ``LAYERFS_DAEMON=1`` after making sure a daemon serves
``root`` (so a command meant for the daemon fails loudly instead of quietly
running in-process). The daemons a test needed are stopped after it.

Starting ``layerfs daemon`` costs an interpreter and the warm-up imports (about a
second on a busy CI machine), and the suites make a fresh root per test. So one
*factory* process per session does the warm-up once and forks a daemon
(:meth:`layerfs.daemon.server.Supervisor.serve`, the code ``layerfs daemon``
runs) for each root in milliseconds. tests/daemon/ starts the real command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.daemon import wire

from .host_resources import wait_gone

MODES = ["in-process", "daemon"]

_FACTORY = r"""
import logging, os, signal, sys
from layerfs.daemon.server import Supervisor, log
from layerfs.daemon.warm import warm_up
from layerfs.runtime import _sys

_sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGKILL)     # never outlive the test session
warm_up()
print("ready", flush=True)
for line in sys.stdin:
    root, logfile = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        _sys.prctl(_sys.PR_SET_PDEATHSIG, signal.SIGTERM)
        fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(fd, 2)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s layerfs daemon: %(message)s"))
        log.addHandler(handler)
        log.setLevel("INFO")
        log.propagate = False
        code = 1
        try:
            code = Supervisor(root).serve()
        except BaseException as err:
            log.error("daemon failed: %s", err)
        finally:
            os._exit(code)
    print(pid, flush=True)
    while True:                      # reap daemons that stopped since
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
"""


def wait_for_socket(root: Path, timeout: float = 60) -> None:
    """Until ROOT/daemon.sock accepts a connection."""
    import socket

    path = wire.socket_path(root)
    deadline = time.monotonic() + timeout
    while True:
        address, dir_fd = (None, None)
        try:
            address, dir_fd = wire.short_address(path)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(address)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no daemon answered at {path}") from None
            time.sleep(0.02)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)


class Daemons:
    """The session's daemon factory; :meth:`serve` runs a daemon for one root."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.proc = subprocess.Popen([sys.executable, "-c", _FACTORY], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the daemon factory did not start")

    def start(self, root: Path) -> int:
        """A daemon for ``root`` (created if missing); its pid, once it answers."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        root.mkdir(parents=True, exist_ok=True)
        log = self.log_path(root)
        self.proc.stdin.write(f"{root}\t{log}\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        try:
            wait_for_socket(root)
        except TimeoutError:
            raise RuntimeError(f"daemon for {root} did not start: "
                               f"{log.read_text()[-2000:] if log.exists() else ''}") from None
        return pid

    def log_path(self, root: Path) -> Path:
        """Where the daemon of ``root`` logs (its stderr)."""
        return self.logs / (root.parent.name + "-" + root.name + ".log")

    @contextlib.contextmanager
    def serve(self, root: Path) -> Iterator[int]:
        """A daemon for ``root`` for the duration; stopped (SIGTERM, and waited for) after."""
        pid = self.start(root)
        try:
            yield pid
        finally:
            stop(pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


def workers_of(daemon: int) -> list[int]:
    """Pids of a daemon's workers: the children that lead a session of their own (its
    recovery child, store keeper, fork server and services do not)."""
    found = []
    for child in Path(f"/proc/{daemon}/task/{daemon}/children").read_text().split():
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{child}/stat").read_bytes().rsplit(b")", 1)[1].split()
            if int(fields[3]) == int(child) and fields[0] != b"Z":   # session id
                found.append(int(child))
    return found


def stop(pid: int, timeout: float = 60) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    wait_gone(pid, timeout)


class CliMode:
    """How one test's ``layerfs`` commands run, and the daemons it started."""

    def __init__(self, name: str, daemons: Daemons | None) -> None:
        self.name = name
        self.daemons = daemons
        self.served: dict[Path, int] = {}

    def env(self, root: Path | str) -> dict[str, str]:
        if self.daemons is None:
            return {"LAYERFS_DAEMON": "0"}
        path = Path(root).absolute()
        if path not in self.served:
            self.served[path] = self.daemons.start(path)
        return {"LAYERFS_DAEMON": "1"}

    def settle(self, root: Path | str, timeout: float = 60) -> None:
        """Until the commands the daemon of ``root`` runs are over: a client that is
        killed leaves its worker to be hung up (SIGHUP, like a closed terminal), which
        stops it shortly after, not at once. Nothing to wait for in-process."""
        pid = self.served.get(Path(root).absolute())
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while workers_of(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon of {root} still runs {workers_of(pid)}")
            time.sleep(0.02)

    def close(self) -> None:
        for pid in self.served.values():
            stop(pid)
        self.served.clear()


#: The mode of the running test, for CLI helpers that are plain functions.
ACTIVE: CliMode | None = None


def cli_settle(root: Path | str) -> None:
    """After killing a client: until its command is over (:meth:`CliMode.settle`)."""
    if ACTIVE is not None:
        ACTIVE.settle(root)


def daemon_log(root: Path | str, tail: int = 4000) -> str:
    """The end of the log of the daemon that serves ``root`` in this test ("" in-process),
    for a failure message: it says when the daemon relayed a signal and how workers ended."""
    if ACTIVE is None or ACTIVE.daemons is None:
        return ""
    path = ACTIVE.daemons.log_path(Path(root).absolute())
    try:
        return "daemon log:\n" + path.read_text(errors="replace")[-tail:]
    except FileNotFoundError:
        return f"daemon log: {path} is missing"


def cli_env(root: Path | str) -> dict[str, str]:
    """Environment for a ``layerfs --root ROOT`` of the running test (empty outside
    :func:`cli_mode` tests); in daemon mode, a daemon serves ``root`` from now on."""
    return ACTIVE.env(root) if ACTIVE is not None else {}


@pytest.fixture(scope="session")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    factory = Daemons(tmp_path_factory.mktemp("daemon-logs"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(params=MODES)
def cli_mode(request: pytest.FixtureRequest) -> Iterator[CliMode]:
    """Run this test's ``layerfs`` commands in-process, then again through a daemon."""
    global ACTIVE
    mode = CliMode(request.param, request.getfixturevalue("daemons")
                   if request.param == "daemon" else None)
    ACTIVE = mode
    try:
        yield mode
    finally:
        ACTIVE = None
        mode.close()
