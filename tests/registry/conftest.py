"""Fixtures for the registry tests: real registries (Debian's docker-registry, i.e. CNCF
Distribution 2.8) on 127.0.0.1, started once per session, each with its own scratch
storage under /tmp/lfs-reg/<pid>:

* ``plain_registry``: plain HTTP, no auth;
* ``proxy``: a :class:`FaultProxy` in front of it (cuts, corruption, stalls, request log);
* ``basic_registry``: TLS from a test CA + htpasswd basic auth;
* ``token_registry``: TLS + bearer tokens from an in-test token server (RS256 JWTs signed
  by a certificate of the test CA, which the registry trusts via ``rootcertbundle``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs.images import ImageStore
from layerfs.testing import images as timg
from tests.support import registry as treg

from ..conftest import root_for
from ..daemons import cli_env
from ..host_resources import sweep_dead_sessions
from ..images.conftest import IMAGE_DRIVERS, image_store, open_images_or_skip
from ..support import timeouts

SCRATCH = Path("/tmp/lfs-reg")
USER, PASSWORD = "alice", "wonderland-7f3a"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A hung registry or daemon must not eat the CI budget: bound every registry test."""
    timeouts.bound(config, items, Path(__file__).parent, 300)


@pytest.fixture(scope="session")
def reg_scratch() -> Iterator[Path]:
    reason = treg.unavailable()
    if reason:
        pytest.skip(f"registry tests: {reason}")
    sweep_dead_sessions(SCRATCH)
    path = SCRATCH / str(os.getpid())
    path.mkdir(parents=True, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def test_ca(reg_scratch: Path) -> treg.TestCA:
    return treg.TestCA(reg_scratch / "ca")


@pytest.fixture(scope="session")
def plain_registry(reg_scratch: Path) -> Iterator[treg.Distribution]:
    with treg.Distribution(reg_scratch / "plain") as reg:
        yield reg


@pytest.fixture(scope="session")
def proxy_server(plain_registry: treg.Distribution) -> Iterator[treg.FaultProxy]:
    with treg.FaultProxy(plain_registry.url) as proxy:
        yield proxy


@pytest.fixture
def proxy(proxy_server: treg.FaultProxy) -> Iterator[treg.FaultProxy]:
    """The proxy with no faults and an empty request log (cleared again afterwards)."""
    proxy_server.clear()
    yield proxy_server
    proxy_server.clear()


@pytest.fixture(scope="session")
def basic_registry(reg_scratch: Path, test_ca: treg.TestCA) -> Iterator[treg.Distribution]:
    with treg.Distribution(reg_scratch / "basic", tls=test_ca.issue("basic-registry"),
                           htpasswd={USER: PASSWORD}, ca=test_ca) as reg:
        yield reg


@pytest.fixture(scope="session")
def token_server(test_ca: treg.TestCA) -> Iterator[treg.TokenServer]:
    with treg.TokenServer(test_ca, {USER: PASSWORD}) as server:
        yield server


@pytest.fixture(scope="session")
def token_registry(reg_scratch: Path, test_ca: treg.TestCA,
                   token_server: treg.TokenServer) -> Iterator[treg.Distribution]:
    with treg.Distribution(reg_scratch / "token", tls=test_ca.issue("token-registry"),
                           token=token_server, ca=test_ca) as reg:
        yield reg


# --- images ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Samples:
    dir: Path
    sample: timg.BuiltImage          # three layers, deletions; runs SAMPLE_CMD
    busybox: timg.BuiltImage         # one layer (the sample's base)
    layers: tuple[bytes, ...]        # the sample's layer tars


@pytest.fixture(scope="session")
def samples(reg_scratch: Path) -> Samples:
    d = reg_scratch / "archives"
    d.mkdir(exist_ok=True)
    layers = timg.sample_layers(d)
    sample = timg.sample_image(d / "sample.tar", d)
    busybox = timg.build_image(d / "busybox.tar", [layers[0]], name="busybox:latest",
                               cmd=["sh"], history=["busybox-static rootfs"])
    return Samples(d, sample, busybox, tuple(layers))


@pytest.fixture(params=IMAGE_DRIVERS)  # devicemapper too, inside the qemu guest
def image_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def images_on(image_driver: str, tmp_path: Path,
              request: pytest.FixtureRequest) -> Iterator[ImageStore]:
    """An ImageStore on a fresh root, for every native driver."""
    with image_store(image_driver, root_for(image_driver, tmp_path, request)) as store:
        yield store


def open_overlay2(root: Path) -> ImageStore:
    return open_images_or_skip("overlay2", root)


@pytest.fixture
def images(tmp_path: Path) -> Iterator[ImageStore]:
    with image_store("overlay2", tmp_path / "root") as store:
        yield store


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty credential folder for each test (``LAYERFS_CONFIG``; inherited by the CLI)."""
    d = tmp_path / "config"
    monkeypatch.setenv("LAYERFS_CONFIG", str(d))
    return d


# --- the CLI ------------------------------------------------------------------------------------

def layerfs(root: Path, *args: str, input: bytes | None = None, check: bool = True,
            env: dict[str, str] | None = None, driver: str = "overlay2",
            timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                           driver, *args], input=input.decode() if input else None,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, COLUMNS="5000", **cli_env(root), **(env or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr}")
    return proc


def manifest_of(registry_url: str, repo: str, ref: str, **client: object) -> dict[str, object]:
    """The manifest a registry serves (straight from its API, not through layerfs)."""
    import httpx

    from layerfs.distribution import MANIFEST_ACCEPT

    r = httpx.get(f"{registry_url}/v2/{repo}/manifests/{ref}",
                  headers={"Accept": MANIFEST_ACCEPT}, **client)  # type: ignore[arg-type]
    r.raise_for_status()
    doc: dict[str, object] = json.loads(r.content)
    return doc
