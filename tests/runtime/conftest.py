"""Fixtures for the runtime tests: a busybox rootfs, test-unique host names, leak checks.

Everything here is real: namespaces, cgroups (v1 on the dev VM), veth pairs, nft
rules. To never touch anything that is not ours, every host-side name is unique
to the session and removed by that exact name at the end:

* cgroup parent ``lfst<hex>`` (under each v1 controller, or the v2 root);
* bridge and nft table ``lfst<hex>``, on a free ``10.x.y.0/24``;
* scratch files under ``/tmp/lfs-runtime/<hex>``.

After every test, the ``state`` fixture asserts that the test's containers left
no cgroup, no veth, no nft rule and no address lease behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs.runtime import RuntimeConfig
from layerfs.runtime.cgroups import DEFAULT_ROOT, detect
from layerfs.runtime.network import Ipam, NetworkConfig, link_exists, remove_network

from ..host_resources import free_subnet, rmdir_retry
from .helpers import stop_all_started

SCRATCH = Path("/tmp/lfs-runtime")
APPLETS_NEEDED = ("sh", "true", "nc", "httpd", "wget", "ps", "mknod", "mount", "tail", "seq")


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the runtime tests need root (namespaces, cgroups, veth, nft)")


def build_rootfs(dest: Path) -> Path:
    """A minimal busybox root: /bin/busybox, one relative symlink per applet, empty dirs."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", dest / "bin" / applet)
    missing = [a for a in APPLETS_NEEDED if a not in applets]
    assert not missing, f"busybox lacks {missing}"
    for d in ("proc", "sys", "dev", "etc", "root", "www", "mnt"):
        (dest / d).mkdir()
    (dest / "tmp").mkdir(mode=0o1777)
    os.chmod(dest / "tmp", 0o1777)
    return dest


@dataclass
class Session:
    tag: str
    base: Path
    rootfs: Path
    net: NetworkConfig
    cgroup_parent: str

    def config(self, **kw: object) -> RuntimeConfig:
        return RuntimeConfig(cgroup_parent=self.cgroup_parent, network=self.net, **kw)  # type: ignore[arg-type]

    def cgroup_dirs(self) -> list[Path]:
        if detect(DEFAULT_ROOT) == "v2":
            return [DEFAULT_ROOT / self.cgroup_parent]
        return [DEFAULT_ROOT / c / self.cgroup_parent
                for c in ("memory", "cpu", "pids", "devices")]


@pytest.fixture(scope="session")
def lfs() -> Iterator[Session]:
    _require_root()
    tag = "lfst" + os.urandom(3).hex()
    base = SCRATCH / tag
    base.mkdir(parents=True)
    sess = Session(tag, base, build_rootfs(base / "rootfs"),
                   NetworkConfig(bridge=tag, subnet=free_subnet(), table=tag, ip_forward=False),
                   tag)
    try:
        yield sess
    finally:
        if link_exists(tag) or subprocess.run(["nft", "list", "table", "ip", tag],
                                              capture_output=True).returncode == 0:
            # Leases were checked after each test; drop any a failed test left so the
            # network itself can go.
            for state in base.glob("state-*"):
                if (state / "network.db").exists():
                    with Ipam(state) as ipam:
                        for _, owner in ipam.leases():
                            ipam.release(owner)
            remove_network(sess.net, base / "state-teardown")
        for d in sess.cgroup_dirs():
            if d.exists():
                for child in d.iterdir():  # only after a failure: a container's cgroup
                    if child.is_dir():
                        for pid in (child / "cgroup.procs").read_text().split():
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(int(pid), signal.SIGKILL)
                        rmdir_retry(child)
                d.rmdir()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def state(lfs: Session, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh state directory; on teardown, asserts its containers left nothing behind."""
    path = lfs.base / f"state-{request.node.name.replace('/', '_')[:80]}"
    path.mkdir()
    yield path
    stop_all_started()  # what a failed test left running; a passing test waited for all
    assert_no_leftovers(lfs, path)


def build_probe(dest: Path) -> Path:
    """tests/runtime/syscall_probe.c, built static (the test rootfs has no libc)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler: scripts/setup installs gcc and libc6-dev")
    src = Path(__file__).with_name("syscall_probe.c")
    proc = subprocess.run([cc, "-static", "-O2", "-o", str(dest), str(src), "-lpthread"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building {src.name} failed:\n{proc.stderr}")
    return dest


@pytest.fixture(scope="session")
def probe(lfs: Session) -> str:
    """``lfs-probe`` in the test rootfs (see syscall_probe.c): the command to run inside."""
    build_probe(lfs.rootfs / "bin" / "lfs-probe")
    return "/bin/lfs-probe"


@pytest.fixture
def config(lfs: Session) -> RuntimeConfig:
    return lfs.config()


@pytest.fixture
def rootfs(lfs: Session) -> Path:
    return lfs.rootfs


def assert_no_leftovers(sess: Session, state: Path) -> None:
    """No cgroup, veth, nft rule or lease of any container recorded in ``state``."""
    containers = state / "containers"
    ids = [p.name for p in containers.iterdir()] if containers.exists() else []
    for d in sess.cgroup_dirs():
        for cid in ids:
            assert not (d / cid).exists(), f"cgroup {d / cid} left behind"
    for cid in ids:
        assert not link_exists("lfv" + cid[:12]), f"veth lfv{cid[:12]} left behind"
    if (state / "network.db").exists():
        with Ipam(state) as ipam:
            assert ipam.leases() == [], "address leases left behind"
            assert ipam.ports() == [], "port leases left behind"
    listing = subprocess.run(["nft", "-a", "list", "table", "ip", sess.net.table],
                             capture_output=True, text=True).stdout
    for cid in ids:
        assert cid not in listing, f"nft rules of {cid[:12]} left behind:\n{listing}"
