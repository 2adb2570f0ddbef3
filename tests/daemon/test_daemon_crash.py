"""kill -9 of the daemon at each step of ``run``, ``layer apply`` and ``layer rm``.

The command's client gets one clear line and exit 1; its worker dies with the
daemon (PR_SET_PDEATHSIG), so the container it ran dies too (the runtime's
liveness pipe). A restarted daemon (its recovery child, or the next command)
finishes or rolls back the half-done work: nothing is left behind, and the
root keeps working.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from layerfs.layers import LayerStore

from .conftest import Daemon, Root, wait_for

KILLED = ("layerfs: error: the layerfs daemon stopped while running the command; what it left "
          "half-done is recovered by the next command on this root\n")


def big_tar(files: int = 300, size: int = 64 << 10) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(files):
            info = tarfile.TarInfo(f"d{i % 10}/f{i}")
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    return buf.getvalue()


def restart_and_check(root: Root, start_daemon: Callable[..., Daemon]) -> Daemon:
    daemon = start_daemon()
    # The restarted daemon's recovery, or this very command, cleans up.
    root.layerfs("ps", "-a", "-q")
    wait_for(lambda: root.leftovers() == [], what=f"a clean root: {root.leftovers()}")
    out = root.layerfs("run", "--rm", "--network", "none", "busybox", "echo", "still works")
    assert out.stdout == "still works\n"
    return daemon


@pytest.mark.parametrize("step", ["run-created", "run-mounted", "run-started", "run-exited"])
@pytest.mark.parametrize("rm", [True, False], ids=["rm", "keep"])
def test_kill_daemon_during_run(step: str, rm: bool, root: Root, tmp_path: Path,
                                start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(hooks=True)
    marker = tmp_path / "marker"
    proc = root.popen("run", *(["--rm"] if rm else []), "--name", "victim", "--network", "none",
                      "busybox", "sh", "-c", "exit 0" if step == "run-exited" else "sleep 60",
                      env={"LAYERFS_TEST_HANG": step, "LAYERFS_TEST_HANG_MARKER": str(marker)},
                      stdout=-1, stderr=-1)
    wait_for(marker.exists, what=f"the command to reach {step}")
    daemon.kill9()
    _out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.decode()) == (1, KILLED)
    if rm:
        restart_and_check(root, start_daemon)
        return
    # As after a killed runner: a container that had started stays, exited, until rm.
    start_daemon()
    listed = root.layerfs("ps", "-a", "-q").stdout.split()
    if step in ("run-created", "run-mounted"):
        assert listed == []               # never started: removed
    else:
        assert len(listed) == 1
        assert '"Status": "exited"' in root.layerfs("inspect", "victim").stdout
        root.layerfs("rm", "victim")
    wait_for(lambda: root.leftovers() == [], what=f"a clean root: {root.leftovers()}")


def test_first_command_after_restart_waits_for_recovery(root: Root, tmp_path: Path,
                                                         start_daemon: Callable[..., Daemon]
                                                         ) -> None:
    """As without a daemon (the next command recovers before it does anything), the
    first command a restarted daemon serves sees the root recovered, not half-way:
    clients wait while its recovery child runs, here held 2 s per container."""
    daemon = start_daemon(hooks=True)
    marker = tmp_path / "marker"
    proc = root.popen("run", "--name", "victim", "--network", "none", "busybox", "sleep", "60",
                      env={"LAYERFS_TEST_HANG": "run-mounted",
                           "LAYERFS_TEST_HANG_MARKER": str(marker)}, stdout=-1, stderr=-1)
    wait_for(marker.exists, what="the command to reach run-mounted")
    daemon.kill9()
    proc.communicate(timeout=30)
    start_daemon(hooks=True, env={"LAYERFS_TEST_SLOW_RECOVERY": "2"})
    assert root.layerfs("ps", "-a", "-q").stdout.split() == []
    wait_for(lambda: root.leftovers() == [], what=f"a clean root: {root.leftovers()}")


def test_kill_daemon_during_apply(root: Root, tmp_path: Path,
                                  start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    fifo = tmp_path / "layer.fifo"
    os.mkfifo(fifo)
    data = big_tar()
    proc = root.popen("layer", "apply", "--id", "half", str(fifo), stdout=-1, stderr=-1)
    with open(fifo, "wb") as w:
        w.write(data[: len(data) // 2])
        w.flush()
        with LayerStore.open(root.path, recover=False) as store:
            wait_for(lambda: (r := store.store.get_layer("half")) is not None
                     and r.state == "creating", what="the layer row")
        time.sleep(0.3)               # let the worker apply what it got
        daemon.kill9()
        _out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.decode()) == (1, KILLED)
    with LayerStore.open(root.path, recover=False) as store:
        rec = store.store.get_layer("half")
        assert rec is not None and rec.state == "creating"   # the kill really hit mid-apply
        assert not store.exists("half")
    restart_and_check(root, start_daemon)
    with LayerStore.open(root.path) as store:
        assert store.store.get_layer("half") is None and not store.driver.exists("half")


def test_kill_daemon_during_remove(root: Root, tmp_path: Path,
                                   start_daemon: Callable[..., Daemon]) -> None:
    layer = root.layerfs("layer", "apply", "-", input=big_tar(files=20, size=1024),
                         mode="in-process").stdout.strip()
    daemon = start_daemon(hooks=True)
    marker = tmp_path / "marker"
    proc = root.popen("layer", "rm", layer, env={"LAYERFS_TEST_HANG": "remove",
                                                 "LAYERFS_TEST_HANG_MARKER": str(marker)},
                      stdout=-1, stderr=-1)
    wait_for(marker.exists, what="the removal to start")
    daemon.kill9()
    _out, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.decode()) == (1, KILLED)
    with LayerStore.open(root.path, recover=False) as store:
        assert store.store.get_layer(layer).state == "removing"   # type: ignore[union-attr]
    restart_and_check(root, start_daemon)
    with LayerStore.open(root.path) as store:
        assert store.store.get_layer(layer) is None and not store.driver.exists(layer)
