"""Interop with Docker 20.10 (Debian's docker.io) through a real registry: a private
dockerd (``--insecure-registry`` for the plain test registry) under /tmp/lfs-reg.

* An image built by ``docker build`` (deletions, a re-created directory, Env, WorkingDir,
  Cmd) and ``docker push``ed is pulled by layerfs on every driver, keeps Docker's image
  id and manifest digest, and runs with the same output as ``docker run``.
* An image ``layerfs push``ed (Docker schema 2 + gzip, and OCI + gzip) is ``docker
  pull``ed (Docker re-checks every digest) and runs in Docker, with the same image id.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from layerfs_bench.peers import DockerDaemon

from layerfs.distribution import RegistryOptions, pull, push
from layerfs.images import ImageStore
from layerfs.testing import images as timg
from tests.support.registry import Distribution

from ..host_resources import sweep_dead_sessions
from ..images.conftest import run_image
from ..images.test_interop_docker import DOCKERFILE, SHOW, docker_run
from .conftest import SCRATCH, Samples

INSECURE = RegistryOptions(insecure=True)


@pytest.fixture(scope="module")
def docker(plain_registry: Distribution) -> Iterator[DockerDaemon]:
    reason = DockerDaemon.unavailable()
    if reason:
        pytest.skip(f"docker interop: {reason}")
    sweep_dead_sessions(SCRATCH)
    # Short path: containerd's socket lives under the exec root (sun_path is 108 bytes).
    daemon = DockerDaemon(SCRATCH / f"docker-{os.getpid()}",
                          extra_args=("--insecure-registry", plain_registry.host))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        daemon.remove_data()


@dataclass(frozen=True)
class DockerPushed:
    ref: str
    id: str
    digest: str
    output: str


@pytest.fixture(scope="module")
def docker_pushed(docker: DockerDaemon, plain_registry: Distribution, samples: Samples,
                  reg_scratch: Path) -> DockerPushed:
    d = docker
    base_tar = reg_scratch / "busybox-layer.tar"
    base_tar.write_bytes(samples.layers[0])
    d.docker("import", str(base_tar), "lfs-test/busybox:base")
    ctx = reg_scratch / "docker-context"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "show.sh").write_text(SHOW)
    ref = f"{plain_registry.host}/docker/built:1"
    d.docker("build", "--network", "none", "-q", "-t", ref, str(ctx))
    pushed = d.docker("push", ref).stdout
    digest = next(word for line in pushed.splitlines() if "digest:" in line
                  for word in line.split() if word.startswith("sha256:"))
    return DockerPushed(ref, d.image_id(ref), digest, docker_run(d, ref))


def test_docker_pushed_image_pulls_and_runs_the_same(images_on: ImageStore,
                                                     docker_pushed: DockerPushed) -> None:
    result = pull(images_on, docker_pushed.ref, options=INSECURE)
    assert result.image.id == docker_pushed.id
    assert result.manifest_digest == docker_pushed.digest
    assert "gone\n" in docker_pushed.output and "hi from /data" in docker_pushed.output
    assert run_image(images_on, docker_pushed.ref) == docker_pushed.output
    top = images_on.get(docker_pushed.ref).top_layer
    assert top is not None
    with images_on.layers.mounted(top, readonly=True) as root:
        assert not (root / "data/gone").exists()
        assert sorted(p.name for p in (root / "data/replace").iterdir()) == ["new"]


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_layerfs_pushed_image_pulls_and_runs_in_docker(images: ImageStore, docker: DockerDaemon,
                                                       plain_registry: Distribution,
                                                       samples: Samples, fmt: str) -> None:
    images.load(samples.sample.path)
    ref = f"{plain_registry.host}/from-layerfs/sample:{fmt}"
    pushed = push(images, "sample", ref, format=fmt, options=INSECURE)
    try:
        out = docker.docker("pull", ref).stdout
        assert f"Digest: {pushed.digest}" in out
        assert docker.image_id(ref) == samples.sample.id
        assert docker_run(docker, ref) == timg.SAMPLE_OUTPUT
        digests = docker.docker("image", "inspect", "--format", "{{json .RepoDigests}}",
                                ref).stdout
        assert f"{plain_registry.host}/from-layerfs/sample@{pushed.digest}" in digests
    finally:
        docker.docker("rmi", "-f", ref, check=False)
