"""The qemu guest runs, started when the test session starts and run in the background.

A guest run is TCG emulation on one core for minutes, while the host-side tests use
the other core: waiting for each guest in turn, as tests/vm's tests used to, left a
core idle for a third of CI. Each guest test module declares its run as data, a
:class:`GuestRun`, and marks its test with it (``@pytest.mark.guest(RUN)``). When the
session's first test starts, :func:`background_guests` (a session fixture that
tests/conftest.py uses automatically) queues the runs of the selected tests on one
worker thread: one guest at a time, in collection order. tests/vm's tests are moved to
the end of the session (:func:`run_guest_tests_last`); by then their runs are done or
nearly, and :meth:`GuestRun.result` waits for the rest. A test run without the fixture
(or one whose run was never queued) runs its guest itself, in the foreground.

At the end of the session a guest still running (the session was stopped early, by
``-x`` or Ctrl-C) is killed, with its process group, and queued runs never start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import qemu


class Cancelled(Exception):
    """The session ended before this guest run started."""


@dataclass(eq=False)
class GuestRun:
    """One guest boot running ``argv`` (in the repo, as root), and what it needs.

    ``before`` runs on the host first, in the worker (e.g. building a Go test binary
    that the guest only runs). ``results`` (set when it runs) is the folder the guest
    sees as qemu.GUEST_RESULTS: junit.xml and what else the command writes there.
    """

    name: str
    argv: Sequence[str]
    timeout: float
    disk_size: str = "0"
    env: Mapping[str, str] = field(default_factory=dict)
    before: Callable[[], None] | None = None
    results: Path | None = None
    _future: Future[qemu.GuestResult] | None = None
    _proc: subprocess.Popen[bytes] | None = None

    def execute(self, results: Path, cancel: threading.Event | None = None) -> qemu.GuestResult:
        self.results = results
        if self.before is not None:
            self.before()
        if cancel is not None and cancel.is_set():
            raise Cancelled(self.name)

        def started(proc: subprocess.Popen[bytes]) -> None:
            self._proc = proc
            if cancel is not None and cancel.is_set():
                kill_group(proc)

        return qemu.run_in_guest(self.argv, timeout=self.timeout, disk_size=self.disk_size,
                                 env=self.env, results_dir=results, echo=False,
                                 on_start=started)

    def result(self, results: Path) -> qemu.GuestResult:
        """The run's result: from the background if it was queued, else run now."""
        if self._future is None:
            return self.execute(results)
        return self._future.result()

    def kill(self) -> None:
        if self._proc is not None:
            kill_group(self._proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


class BackgroundGuests:
    """One worker thread running the queued guest runs one after the other."""

    def __init__(self, results_base: Path) -> None:
        self.results_base = results_base
        self.queue: list[GuestRun] = []
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._work, name="guest-runs", daemon=True)

    def start(self, runs: Sequence[GuestRun]) -> None:
        for run in runs:
            if run._future is None:
                run._future = Future()
                self.queue.append(run)
        if self.queue:
            self.thread.start()

    def _work(self) -> None:
        for run in self.queue:
            assert run._future is not None
            if self.cancel.is_set():
                run._future.set_exception(Cancelled(run.name))
                continue
            run._future.set_running_or_notify_cancel()
            try:
                results = self.results_base / run.name
                results.mkdir(parents=True, exist_ok=True)
                run._future.set_result(run.execute(results, self.cancel))
            except BaseException as err:  # the test reports it
                run._future.set_exception(err)

    def stop(self) -> None:
        self.cancel.set()
        for run in self.queue:
            run.kill()
        if self.thread.is_alive():
            self.thread.join(timeout=120)
        for run in self.queue:
            run._future = None


def runs_of(items: Sequence[pytest.Item]) -> list[GuestRun]:
    """The guest runs of these tests, once each, in order."""
    runs: list[GuestRun] = []
    for item in items:
        for mark in item.iter_markers("guest"):
            run = mark.args[0]
            if isinstance(run, GuestRun) and run not in runs:
                runs.append(run)
    return runs


def run_guest_tests_last(items: list[pytest.Item]) -> None:
    """Tests that wait for a guest run go last (stable order otherwise)."""
    items.sort(key=lambda item: item.get_closest_marker("guest") is not None)


@pytest.fixture(scope="session", autouse=True)
def background_guests(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    runs = runs_of(request.session.items)
    if not runs or os.environ.get("LAYERFS_IN_GUEST") == "1":
        yield
        return
    worker = BackgroundGuests(tmp_path_factory.mktemp("guest-runs"))
    worker.start(runs)
    print(f"\nguest runs started in the background: {', '.join(r.name for r in runs)}",
          file=sys.stderr)
    try:
        yield
    finally:
        worker.stop()
