"""Build and run containerd's snapshotter testsuite against layerfs (gosuite/).

The Go program is built offline, in GOPATH mode, against the Go packages
Debian ships (``golang-go`` 1.19 and ``golang-github-containerd-containerd-dev``
1.6.20 under /usr/share/gocode): nothing is downloaded. The binary is cached in
the repository's git-ignored ``.cache/engines/``, keyed by the program's source
and the Go and containerd package versions, so only the first run pays the
~40 s build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("gosuite")
CACHE = REPO / ".cache" / "engines"
GOPATH = Path("/usr/share/gocode")
PACKAGES = ("golang-go", "golang-github-containerd-containerd-dev")
SUITE_PACKAGE = GOPATH / "src/github.com/containerd/containerd/snapshots/testsuite"


def missing() -> str | None:
    """Why the program cannot be built here, or None."""
    if shutil.which("go") is None:
        return "go is not installed (apt-get install golang-go)"
    if not SUITE_PACKAGE.is_dir():
        return ("containerd's Go source is not installed "
                "(apt-get install golang-github-containerd-containerd-dev)")
    return None


def _versions() -> str:
    proc = subprocess.run(["dpkg-query", "-W", *PACKAGES], capture_output=True, text=True)
    return proc.stdout


def build() -> Path:
    """The test binary, built if the cache has none for this source and these packages."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(_versions().encode())
    binary = CACHE / f"gosuite-{digest.hexdigest()[:16]}.test"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    # One build at a time: the guest runs' worker thread (tests/vm/background.py) and the
    # host's testsuite fixture may ask together; the second finds the first's binary.
    with open(CACHE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        env = dict(os.environ, GO111MODULE="off", GOPATH=str(GOPATH), GOFLAGS="",
                   GOCACHE=str(CACHE / "go-build"), GOTOOLCHAIN="local")
        tmp = binary.with_suffix(".partial")
        proc = subprocess.run(["go", "test", "-c", "-o", str(tmp), "."], cwd=SOURCE, env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"building the containerd testsuite program failed:\n"
                               f"{proc.stderr}")
        tmp.rename(binary)
        for old in CACHE.glob("gosuite-*.test"):
            if old != binary:
                old.unlink()
    return binary


@dataclass
class SuiteResult:
    returncode: int
    output: str
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): TestLayerfsSnapshotter/(\S+)", re.MULTILINE)


def run(binary: Path, driver: str, *, tmpdir: Path, sockdir: Path, timeout: float = 1200,
        parallel: int = 2, only: list[str] | None = None) -> SuiteResult:
    """Run the suite against ``driver``; the suite's roots go under ``tmpdir``.
    ``only`` limits it to the named scenarios."""
    zygote_socket = sockdir / "zygote.sock"
    env = dict(os.environ, TMPDIR=str(tmpdir), LAYERFS_SUITE_ZYGOTE=str(zygote_socket),
               LAYERFS_SUITE_NAME=f"layerfs-{driver}", LAYERFS_SUITE_SOCKDIR=str(sockdir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    zygote = subprocess.Popen([sys.executable, "-m", "tests.engines.suite_helper",
                               str(zygote_socket), driver], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert zygote.stdout is not None
        if zygote.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the layerfs fork server for {driver} did not start")
        argv = [str(binary), "-test.v", f"-test.parallel={parallel}",
                f"-test.timeout={int(timeout)}s"]
        if only:
            argv.append(f"-test.run=^TestLayerfsSnapshotter$/^({'|'.join(only)})$")
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout + 60)
    finally:
        zygote.terminate()
        zygote.wait(timeout=30)
    output = proc.stdout + proc.stderr
    result = SuiteResult(proc.returncode, output)
    for status, name in _RESULT.findall(proc.stdout):
        {"PASS": result.passed, "FAIL": result.failed, "SKIP": result.skipped}[status].append(name)
    return result
