"""Fixtures for the runner tests: the real ``layerfs`` command, on a fresh root per test.

Everything is real (namespaces, v1 cgroups, veth pairs, nft rules, driver mounts), so
every host-side name is unique to the session and removed by that exact name at the end:
bridge and nft table ``lfsr<hex>`` on a free ``10.x.y.0/24``, cgroup parent
``lfsr<hex>``, scratch under ``/tmp/lfs-run/<tag>``. They reach each ``layerfs``
process through its environment (``LAYERFS_BRIDGE``, ``LAYERFS_SUBNET``,
``LAYERFS_NFT_TABLE``, ``LAYERFS_IP_FORWARD=0``, ``LAYERFS_CGROUP_PARENT``).

After every test the root is checked: no container row, no image user, no container
layer, nothing mounted, no cgroup under the session's parent, no veth on the bridge, no
nft rule, no lease. Then the root is wiped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.errors import DriverNotSupported
from layerfs.images import ImageStore
from layerfs.layers import LayerStore
from layerfs.runtime import RuntimeConfig
from layerfs.runtime.cgroups import DEFAULT_ROOT, detect
from layerfs.runtime.containers import LABEL_CONTAINER, ContainerManager
from layerfs.runtime.network import Ipam, NetworkConfig, link_exists, remove_network
from layerfs.testing import images as timg

from ..conftest import root_for
from ..daemons import CliMode, cli_env
from ..host_resources import free_subnet, rmdir_retry
from ..support import timeouts

SCRATCH = Path("/tmp/lfs-run")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A hung container must not eat the CI budget: bound every runner test."""
    timeouts.bound(config, items, Path(__file__).parent, 180)


@dataclass
class Session:
    tag: str
    base: Path
    net: NetworkConfig
    env: dict[str, str]
    busybox: Path

    def runtime_config(self) -> RuntimeConfig:
        return RuntimeConfig(cgroup_parent=self.tag, network=self.net)

    def cgroup_dirs(self) -> list[Path]:
        if detect(DEFAULT_ROOT) == "v2":
            return [DEFAULT_ROOT / self.tag]
        return [DEFAULT_ROOT / c / self.tag for c in ("memory", "cpu", "pids", "devices")]


@pytest.fixture(scope="session")
def session() -> Iterator[Session]:
    if os.geteuid() != 0:
        pytest.fail("the runner tests need root (namespaces, cgroups, mounts, veth, nft)")
    tag = "lfsr" + os.urandom(3).hex()
    base = SCRATCH / tag
    base.mkdir(parents=True)
    net = NetworkConfig(bridge=tag, subnet=free_subnet(), table=tag, ip_forward=False)
    env = dict(os.environ, LAYERFS_BRIDGE=net.bridge, LAYERFS_SUBNET=net.subnet,
               LAYERFS_NFT_TABLE=net.table, LAYERFS_IP_FORWARD="0", LAYERFS_CGROUP_PARENT=tag,
               PYTHONPYCACHEPREFIX=str(SCRATCH / "pycache"))
    for key in ("PYTHONDONTWRITEBYTECODE", "LAYERFS_ROOT", "LAYERFS_DRIVER",
                "LAYERFS_STORAGE_OPTS"):
        env.pop(key, None)
    busybox = timg.busybox_image_tar(base / "busybox.tar", base).path
    sess = Session(tag, base, net, env, busybox)
    try:
        yield sess
    finally:
        if link_exists(net.bridge) or subprocess.run(["nft", "list", "table", "ip", net.table],
                                                     capture_output=True).returncode == 0:
            remove_network(net, base / "teardown")
        for d in sess.cgroup_dirs():
            if d.exists():
                for child in d.iterdir():   # only after a failure
                    if child.is_dir():
                        for pid in (child / "cgroup.procs").read_text().split():
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(int(pid), signal.SIGKILL)
                        rmdir_retry(child)
                d.rmdir()
        shutil.rmtree(base, ignore_errors=True)


class Cli:
    """``layerfs --root ROOT --driver DRIVER ...`` as a child process, with the session's
    environment; returns the CompletedProcess (text)."""

    def __init__(self, session: Session, root: Path, driver: str, mode: str) -> None:
        self.session = session
        self.root = root
        self.driver = driver
        self.mode = mode              # in-process | daemon

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "layerfs", "--root", str(self.root), "--driver",
                self.driver, *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 60,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, input=input,
                              timeout=timeout, env=self.env(),
                              stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"layerfs {' '.join(args)} exited {proc.returncode}:\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def env(self) -> dict[str, str]:
        """The session's environment, and LAYERFS_DAEMON for the test's mode."""
        return {**self.session.env, **cli_env(self.root)}

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), env=self.env(), text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def manager(self, recover: bool = False) -> ContainerManager:
        """The same root in this process (for checks; ``recover=False``: it cleans nothing)."""
        return ContainerManager(self.root, self.driver, config=self.session.runtime_config(),
                                recover=recover)

    def load(self, archive: Path) -> None:
        with ImageStore.open(self.root, self.driver) as images:
            images.load(archive)


def leftovers(cli: Cli) -> list[str]:
    """What the test's containers left behind (empty when everything was cleaned up)."""
    found: list[str] = []
    with cli.manager() as mgr:
        found += [f"container {c.short_id} ({c.status})" for c in mgr.containers()]
        db = mgr.store.db
        found += [f"image user {r[1][:12]} of {r[0][:19]}"
                  for r in db.execute("SELECT image, container FROM image_users")]
        found += [f"container layer {rec.id[:12]}" for rec in mgr.layers.layers()
                  if LABEL_CONTAINER in rec.labels]
        found += [f"mount record {m.target}" for m in mgr.store.list_mounts()]
    found += [f"mount {m.target}" for m in mountlib.mounts_under(cli.root)]
    for d in cli.session.cgroup_dirs():
        if d.exists():
            found += [f"cgroup {child}" for child in d.iterdir() if child.is_dir()]
    if link_exists(cli.session.net.bridge):
        veths = subprocess.run(["ip", "-o", "link", "show", "master", cli.session.net.bridge],
                               capture_output=True, text=True).stdout
        found += [f"veth {line.split(':')[1].strip()}" for line in veths.splitlines()]
    rules = subprocess.run(["nft", "-a", "list", "table", "ip", cli.session.net.table],
                           capture_output=True, text=True).stdout
    found += [f"nft rule {line.strip()}" for line in rules.splitlines() if "layerfs:" in line]
    if (cli.root / "network.db").exists():
        with Ipam(cli.root) as ipam:
            found += [f"lease {a} to {o[:12]}" for a, o in ipam.leases()]
            found += [f"port lease {p}" for p in ipam.ports()]
    return found


def _force_clean(cli: Cli) -> None:
    """After a failed test: remove what is left so the next tests start clean."""
    with contextlib.suppress(Exception), ContainerManager(
            cli.root, cli.driver, config=cli.session.runtime_config()) as mgr:
        for c in mgr.containers():
            with contextlib.suppress(Exception):
                mgr.remove(c.id, force=True)


@pytest.fixture
def make_cli(session: Session, tmp_path: Path, request: pytest.FixtureRequest,
             cli_mode: CliMode) -> Iterator[Callable[[str], Cli]]:
    """``make_cli(driver)``: a fresh root on that driver with busybox:latest loaded; its
    commands run in-process, then (a second run of the test) through a daemon."""
    made: list[Cli] = []

    def make(driver: str) -> Cli:
        root = root_for(driver, tmp_path, request)
        try:
            LayerStore.open(root, driver).close()
        except DriverNotSupported as e:
            pytest.skip(f"{driver} not supported here: {e.reason}")
        cli = Cli(session, root, driver, cli_mode.name)
        made.append(cli)
        cli.load(session.busybox)
        return cli

    yield make
    problems = []
    for cli in made:
        left = leftovers(cli)
        if left:
            _force_clean(cli)
            problems.append(f"{cli.driver} root {cli.root}: {left}")
        with LayerStore.open(cli.root, cli.driver) as store:
            store.wipe()
        if cli.driver == "btrfs":
            shutil.rmtree(cli.root, ignore_errors=True)
    assert not problems, "left behind: " + "; ".join(problems)


@pytest.fixture
def cli(make_cli: Callable[[str], Cli]) -> Cli:
    """A fresh overlay2 root with busybox:latest (for the tests that are not about drivers)."""
    return make_cli("overlay2")


def busybox_layer(cli: Cli) -> bytes:
    """The layer tar of the session's busybox image (to build hostile images on)."""
    import json
    import tarfile

    with tarfile.open(cli.session.busybox) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        layer = tar.extractfile(json.load(member)[0]["Layers"][0])
        assert layer is not None
        return layer.read()


def wait_for(cond: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
