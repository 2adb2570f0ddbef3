"""Fixtures for the daemon tests: the real ``layerfs daemon`` command on a fresh root.

Containers run with ``--network none`` under a cgroup parent of this session
(``lfsd<hex>``), removed by name at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.layers import LayerStore
from layerfs.runtime import RuntimeConfig
from layerfs.runtime.cgroups import DEFAULT_ROOT, detect
from layerfs.runtime.containers import LABEL_CONTAINER, ContainerManager
from layerfs.testing import images as timg

from ..daemons import stop, wait_for_socket, wait_gone, workers_of
from ..host_resources import rmdir_retry

HERE = Path(__file__).parent


@dataclass
class Env:
    tag: str
    busybox: Path
    env: dict[str, str]

    def cgroup_dirs(self) -> list[Path]:
        if detect(DEFAULT_ROOT) == "v2":
            return [DEFAULT_ROOT / self.tag]
        return [DEFAULT_ROOT / c / self.tag for c in ("memory", "cpu", "pids", "devices")]


@pytest.fixture(scope="session")
def denv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if os.geteuid() != 0:
        pytest.fail("the daemon tests need root")
    tag = "lfsd" + os.urandom(3).hex()
    base = tmp_path_factory.mktemp("daemon-env")
    busybox = timg.busybox_image_tar(base / "busybox.tar", base).path
    env = dict(os.environ, LAYERFS_CGROUP_PARENT=tag, COLUMNS="5000")
    for key in ("LAYERFS_ROOT", "LAYERFS_DRIVER", "LAYERFS_STORAGE_OPTS", "LAYERFS_DAEMON"):
        env.pop(key, None)
    yield Env(tag, busybox, env)
    for d in Env(tag, busybox, env).cgroup_dirs():
        if d.exists():
            for child in d.iterdir():     # only after a failure
                if child.is_dir():
                    rmdir_retry(child)
            rmdir_retry(d)


@dataclass
class Daemon:
    """``layerfs daemon --root ROOT`` as a child process, its log in ``log``."""

    root: Path
    log: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*self.argv, "daemon", "--root", str(self.root),
                                          *self.extra], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env={**os.environ, **self.env})
        try:
            wait_for_socket(self.root, timeout=60)
        except TimeoutError:
            self.proc.kill()
            raise AssertionError(f"daemon did not start:\n{self.log.read_text()}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int:
        assert self.proc is not None
        stop(self.proc.pid)
        return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def text(self) -> str:
        return self.log.read_text()

    def workers(self) -> list[int]:
        return workers_of(self.pid)


@dataclass
class Root:
    path: Path
    env: Env

    def layerfs(self, *args: str, mode: str = "daemon", check: bool = True,
                input: bytes | None = None, env: dict[str, str] | None = None,
                cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), input=input, capture_output=True,
                              timeout=timeout, cwd=cwd, env=self.environ(mode, env))
        result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                             proc.stdout.decode(errors="replace"),
                                             proc.stderr.decode(errors="replace"))
        if check and proc.returncode != 0:
            raise AssertionError(f"layerfs {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def popen(self, *args: str, mode: str = "daemon", env: dict[str, str] | None = None,
              stdout: int | None = None, stderr: int | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*args), env=self.environ(mode, env), stdout=stdout,
                                stderr=stderr)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "layerfs", "--root", str(self.path), *args]

    def environ(self, mode: str, extra: dict[str, str] | None) -> dict[str, str]:
        return {**self.env.env, "LAYERFS_DAEMON": "1" if mode == "daemon" else "0",
                **(extra or {})}

    def manager(self) -> ContainerManager:
        return ContainerManager(self.path, config=RuntimeConfig(cgroup_parent=self.env.tag),
                                recover=False)

    def leftovers(self) -> list[str]:
        found: list[str] = []
        with self.manager() as mgr:
            found += [f"container {c.short_id} ({c.status})" for c in mgr.containers()]
            found += [f"container layer {r.id[:12]}" for r in mgr.layers.layers()
                      if LABEL_CONTAINER in r.labels]
            found += [f"layer {r.id[:12]} {r.state}" for r in mgr.store.list_layers(state=None)
                      if r.state != "ready"]
            found += [f"mount record {m.target}" for m in mgr.store.list_mounts()]
        found += [f"mount {m.target}" for m in mountlib.mounts_under(self.path)]
        for d in self.env.cgroup_dirs():
            if d.exists():
                found += [f"cgroup {c}" for c in d.iterdir() if c.is_dir()]
        return found


@pytest.fixture
def root(denv: Env, tmp_path: Path) -> Iterator[Root]:
    """A fresh overlay2 root with busybox:latest."""
    path = tmp_path / "root"
    with LayerStore.open(path, "overlay2"):
        pass
    r = Root(path, denv)
    from layerfs.images import ImageStore

    with ImageStore.open(path, "overlay2") as images:
        images.load(denv.busybox)
    yield r
    with contextlib.suppress(Exception), ContainerManager(
            path, config=RuntimeConfig(cgroup_parent=denv.tag)) as mgr:
        for c in mgr.containers():
            with contextlib.suppress(Exception):
                mgr.remove(c.id, force=True)
    with LayerStore.open(path) as store:
        store.wipe()


def daemon_starter(path: Path, logs: Path) -> Iterator[Callable[..., Daemon]]:
    """``start(hooks=False, extra=[...], env={...})``: the real command on the root at
    ``path`` (``env`` added to the daemon's own environment, not to its commands'); every
    daemon started is stopped when the generator finishes."""
    started: list[Daemon] = []

    def start(hooks: bool = False, extra: list[str] | None = None,
              env: dict[str, str] | None = None) -> Daemon:
        argv = [sys.executable, str(HERE / "crash_hooks.py")] if hooks else \
            [sys.executable, "-m", "layerfs"]
        d = Daemon(path, logs / f"{path.name}-daemon-{len(started)}.log", argv,
                   extra=extra or [], env=env or {}).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


@pytest.fixture
def start_daemon(root: Root, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Daemons on ``root`` (:func:`daemon_starter`)."""
    yield from daemon_starter(root.path, tmp_path)


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


def wait_for(cond: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def zombies_of(pid: int) -> list[int]:
    """Children of ``pid`` that exited and were not reaped."""
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{child}/stat").read_bytes()
            if stat.rsplit(b")", 1)[1].split()[0] == b"Z":
                out.append(int(child))
    return out


__all__ = ["Daemon", "Env", "Root", "daemon_starter", "wait_for", "wait_gone", "zombies_of"]
