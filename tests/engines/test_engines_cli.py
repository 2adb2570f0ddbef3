"""Starting the engine servers: bad arguments and taken sockets give one line, not a traceback.

``python -m layerfs.engines`` (and the daemon's services, which call the same
``serve``) must refuse a socket path that is not a socket or that a live server
holds, replace a stale socket a killed server left, and say what is wrong with
their arguments in one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from layerfs.engines.server import (
    _service_args,
    containerd_snapshotter_service,
    docker_plugin_service,
    docker_plugin_socket,
    setter_for_signals,
)
from layerfs.engines.sockets import claim_socket_path, listen_unix
from layerfs.errors import AlreadyExists, InvalidArgument


def engines(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "layerfs.engines", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_nothing_to_serve(tmp_path: Path) -> None:
    assert "nothing to serve" in one_line_error(engines("--root", str(tmp_path / "r")))


def test_a_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "file"
    taken.write_text("mine")
    message = one_line_error(engines("--root", str(tmp_path / "r"), "--driver", "vfs",
                                     "--containerd-snapshotter", str(taken)))
    assert "is not a socket" in message
    assert taken.read_text() == "mine"


def test_a_live_socket_is_refused_and_a_stale_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    live = listen_unix(path)
    try:
        with pytest.raises(AlreadyExists, match="another server"):
            claim_socket_path(path)
        message = one_line_error(engines("--root", str(tmp_path / "r"), "--driver", "vfs",
                                         "--containerd-snapshotter", str(path)))
        assert "another server is listening" in message
    finally:
        live.close()
    # Closed without unlinking: what a killed server leaves.
    assert path.exists()
    claim_socket_path(path)
    assert not path.exists()


def test_a_root_of_another_driver_is_refused(tmp_path: Path) -> None:
    from layerfs.layers import LayerStore

    with LayerStore.open(tmp_path / "r", "vfs") as store:
        store.create()  # a root without layers is handed to the driver asked for
    message = one_line_error(engines("--root", str(tmp_path / "r"), "--driver", "overlay2",
                                     "--containerd-snapshotter", str(tmp_path / "s.sock")))
    assert "holds layers of driver 'vfs'" in message


def test_service_arguments() -> None:
    assert _service_args(["/run/x.sock"], "containerd-snapshotter") == ("/run/x.sock", None)
    assert _service_args(["layerfs-aufs", "driver=aufs"], "docker-plugin") == \
        ("layerfs-aufs", "aufs")
    for bad in ([], ["a", "b"], ["a", "colour=red"]):
        with pytest.raises(InvalidArgument, match="expected 'docker-plugin TARGET"):
            _service_args(bad, "docker-plugin")
    assert docker_plugin_socket("layerfs-aufs") == Path("/run/docker/plugins/layerfs-aufs.sock")
    for bad_name in ("", "../x", ".hidden"):
        with pytest.raises(InvalidArgument):
            docker_plugin_socket(bad_name)


def test_a_refused_service_is_one_line_and_status_2(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """What the daemon logs and restarts on: no traceback, a non-zero status."""
    assert containerd_snapshotter_service(tmp_path, ["a.sock", "b.sock"]) == 2
    assert docker_plugin_service(tmp_path, ["../escape"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("layerfs daemon: service containerd-snapshotter: --service")
    assert lines[1].startswith("layerfs daemon: service docker-plugin: bad Docker plugin name")


def test_a_stop_signal_landing_while_the_main_thread_holds_the_events_lock_stops_it() -> None:
    """SIGTERM's handler runs in the main thread, between two bytecodes of whatever it was
    doing: inside ``stop.wait()`` that may be while it holds the event's lock. Setting
    the event right there waited for that lock forever (a testsuite server that never
    stopped). Here the handler is called at exactly that point."""
    stop = threading.Event()
    handler = setter_for_signals(stop)
    returned = threading.Event()

    def main_thread_mid_wait() -> None:
        with stop._cond:                  # type: ignore[attr-defined]  # Event's own lock
            handler(signal.SIGTERM, None)
        returned.set()

    threading.Thread(target=main_thread_mid_wait, daemon=True).start()
    assert returned.wait(10), "the handler blocked on the lock its own thread holds"
    assert stop.wait(10)
