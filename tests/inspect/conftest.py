"""Fixtures for the inspect tests: images on every driver (devicemapper in the qemu
guest), built from busybox-static and the deterministic sample of layerfs.testing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.images import ImageStore
from layerfs.testing import images as timg

from ..conftest import root_for
from ..images.conftest import IMAGE_DRIVERS, image_store

REPO = Path(__file__).resolve().parents[2]
LAYERFS = [sys.executable, "-m", "layerfs"]


@pytest.fixture(scope="session")
def sample_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three-layer sample (adds, overwrites, whiteouts, an opaque directory)."""
    d = tmp_path_factory.mktemp("inspect-archives")
    return timg.sample_image(d / "sample.tar", d).path


@pytest.fixture(scope="session")
def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("inspect-busybox")
    return timg.busybox_image_tar(d / "busybox.tar", d).path


@pytest.fixture(params=IMAGE_DRIVERS)
def inspect_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sample_on(inspect_driver: str, tmp_path: Path, request: pytest.FixtureRequest,
              sample_archive: Path) -> Iterator[ImageStore]:
    """An image store on ``inspect_driver`` holding ``sample:latest``."""
    with image_store(inspect_driver, root_for(inspect_driver, tmp_path, request)) as images:
        images.load(sample_archive)
        yield images


def cli(root: Path, *args: str, driver: str | None = None, check: bool = False,
        stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """``layerfs --root ROOT ARGS`` as a user runs it (a separate process)."""
    env = dict(os.environ, LAYERFS_ROOT=str(root), COLUMNS="200")
    env.pop("LAYERFS_DRIVER", None)
    argv = [*LAYERFS, *(["--driver", driver] if driver else []), *args]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=stdin,
                          timeout=300, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Bad input: exit status 1, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
