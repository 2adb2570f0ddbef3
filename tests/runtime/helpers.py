"""Helpers shared by the runtime tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from layerfs.runtime import ContainerSpec, ExitStatus, RunningContainer, RuntimeConfig, start


def run(spec: ContainerSpec, state: Path, config: RuntimeConfig, timeout: float = 20,
        **kw: object) -> tuple[ExitStatus, str]:
    """Start, wait, and return the exit status and the combined stdout+stderr."""
    c, out_path = start_logged(spec, state, config, **kw)
    try:
        status = c.wait(timeout=timeout)
    except TimeoutError:
        c.kill(9)
        c.wait()
        raise
    return status, out_path.read_text(errors="replace")


# Every container the helpers start, so that the ``state`` fixture can stop what a
# failing test left running before it checks for leaks.
STARTED: list[RunningContainer] = []


def start_logged(spec: ContainerSpec, state: Path, config: RuntimeConfig,
                 **kw: object) -> tuple[RunningContainer, Path]:
    """Start with stdin from /dev/null and stdout+stderr into a file; returns (container, file)."""
    out_path = state / f"out-{spec.id}"
    with open(out_path, "wb") as out, open(os.devnull, "rb") as null:
        c = start(spec, state, config, stdin=null, stdout=out, stderr=out, **kw)  # type: ignore[arg-type]
    STARTED.append(c)
    return c, out_path


def stop_all_started() -> None:
    while STARTED:
        c = STARTED.pop()
        if c.poll() is None:
            c.kill(9)
            c.wait()


def sh(rootfs: Path, script: str, **kw: object) -> ContainerSpec:
    """A spec running ``sh -c script``; network "none" unless given."""
    kw.setdefault("network", "none")
    return ContainerSpec(rootfs=rootfs, argv=["sh", "-c", script], **kw)  # type: ignore[arg-type]


def wait_for(cond: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def nft_rules(table: str) -> str:
    return subprocess.run(["nft", "-a", "list", "table", "ip", table], capture_output=True,
                          text=True).stdout
