"""Interop with Docker 20.10 (Debian's docker.io), one private dockerd per session.

* An image built by ``docker build`` (deletions, an opaque re-created directory,
  Env, WorkingDir, Cmd) and ``docker save``d loads into layerfs on every driver,
  keeps its id, and runs with the same output.
* What ``layerfs save`` writes from every driver, ``docker load`` takes (it re-checks
  every diff id) and runs, with the image id unchanged.
* devicemapper needs dm, which only the qemu guest has, and the guest has no dockerd:
  the host builds and saves the image and hands the archive, id and output to the guest
  through the results share; the guest loads and runs it on devicemapper and leaves what
  it saved there for the host's ``docker load`` after the boot (one boot, with the other
  deletion and skopeo tests).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from layerfs_bench.peers import DockerDaemon

from layerfs.images import ImageStore
from layerfs.testing import images as timg
from tests.support import qemu

from ..vm.guest import guest_test, pytest_passes_in_guest
from .conftest import Archives, run_image

DOCKERFILE = """\
FROM lfs-test/busybox:base
RUN mkdir -p /data/keep /data/replace /data/tree/sub \\
 && echo one > /data/keep/a && echo old > /data/replace/old && echo bye > /data/gone \\
 && echo deep > /data/tree/sub/deep && echo t > /data/tree/t
RUN rm /data/gone && rm -rf /data/replace /data/tree/sub && mkdir /data/replace \\
 && echo new > /data/replace/new && echo two >> /data/keep/a
ENV GREETING=hi
WORKDIR /data
COPY show.sh /usr/local/bin/show
CMD ["/bin/sh", "/usr/local/bin/show"]
"""
SHOW = """\
ls -R /data
cat /data/keep/a /data/replace/*
test -e /data/gone || echo gone
echo "$GREETING from $(pwd)"
"""
BUILT = "lfs-test/built:1"
# Set in the guest: the host's DockerBuilt.save_to went here, and what layerfs saves for
# Docker is left here for the host to load after the boot.
HANDOFF_ENV = "LAYERFS_DOCKER_HANDOFF"


@dataclass(frozen=True)
class DockerBuilt:
    archive: Path
    id: str
    output: str

    def save_to(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.archive, directory / "image.tar")
        (directory / "built.json").write_text(json.dumps({"id": self.id, "output": self.output}))

    @classmethod
    def read_from(cls, directory: Path) -> DockerBuilt:
        meta = json.loads((directory / "built.json").read_text())
        return cls(directory / "image.tar", meta["id"], meta["output"])


def docker_run(daemon: DockerDaemon, ref: str) -> str:
    return str(daemon.docker("run", "--rm", "--network", "none", ref).stdout)


@pytest.fixture(scope="module")
def docker_built(request: pytest.FixtureRequest) -> Iterator[DockerBuilt]:
    handoff = os.environ.get(HANDOFF_ENV)
    if handoff:  # in the guest: built by the host, no dockerd needed
        yield DockerBuilt.read_from(Path(handoff) / "built")
        return
    d: DockerDaemon = request.getfixturevalue("docker_daemon")
    archives: Archives = request.getfixturevalue("archives")
    scratch: Path = request.getfixturevalue("scratch")
    d.docker("import", str(archives.busybox_layer), "lfs-test/busybox:base")
    ctx = scratch / "docker-context"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "show.sh").write_text(SHOW)
    d.docker("build", "--network", "none", "-q", "-t", BUILT, str(ctx))
    archive = scratch / "docker-built.tar"
    d.docker("save", "-o", str(archive), BUILT)
    try:
        yield DockerBuilt(archive, d.image_id(BUILT), docker_run(d, BUILT))
    finally:
        d.docker("rmi", "-f", BUILT, "lfs-test/busybox:base", check=False)
        archive.unlink(missing_ok=True)


def test_docker_saved_image_loads_and_runs_the_same(images_on: ImageStore,
                                                    docker_built: DockerBuilt) -> None:
    loaded = images_on.load(docker_built.archive)
    assert [i.id for i in loaded] == [docker_built.id]
    assert loaded[0].names == [BUILT]
    assert "gone\n" in docker_built.output and "hi from /data" in docker_built.output
    assert run_image(images_on, BUILT) == docker_built.output
    image = images_on.get(BUILT)
    with images_on.layers.mounted(image.top_layer, readonly=True) as root:
        assert not (root / "data/gone").exists()
        assert sorted(p.name for p in (root / "data/replace").iterdir()) == ["new"]
        assert sorted(p.name for p in (root / "data/tree").iterdir()) == ["t"]


@dataclass(frozen=True)
class SavedByLayerfs:
    """What ``layerfs save`` wrote, and the ids Docker must report after ``docker load``."""
    archive: Path
    sample_id: str
    imported_id: str

    def save_to(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.archive, directory / "saved.tar")
        (directory / "ids.json").write_text(json.dumps([self.sample_id, self.imported_id]))

    @classmethod
    def read_from(cls, directory: Path) -> SavedByLayerfs:
        sample_id, imported_id = json.loads((directory / "ids.json").read_text())
        return cls(directory / "saved.tar", sample_id, imported_id)


def check_in_docker(d: DockerDaemon, saved: SavedByLayerfs) -> None:
    try:
        loaded = d.docker("load", "-i", str(saved.archive)).stdout
        assert "lfs-test/sample:1" in loaded and "lfs-test/imported:1" in loaded
        assert d.image_id("lfs-test/sample:1") == saved.sample_id
        assert d.image_id("lfs-test/imported:1") == saved.imported_id
        assert docker_run(d, "lfs-test/sample:1") == timg.SAMPLE_OUTPUT
        assert docker_run(d, "lfs-test/imported:1") == "imported by layerfs\n"
    finally:
        d.docker("rmi", "-f", "lfs-test/sample:1", "lfs-test/imported:1", check=False)


def test_layerfs_saved_images_load_and_run_in_docker(images_on: ImageStore, archives: Archives,
                                                     request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    """Saved from every driver's storage. In the guest (no dockerd) the archive goes back
    to the host, which loads it after the boot."""
    images = images_on
    images.load(archives.sample.path)
    images.tag("sample", "lfs-test/sample:1")
    tree = timg.busybox_rootfs(tmp_path / "tree")
    (tree / "etc/motd").write_text("imported by layerfs\n")
    imported = images.import_rootfs(tree, "lfs-test/imported:1", changes=["CMD cat /etc/motd"])
    out = tmp_path / "from-layerfs.tar"
    images.save(["lfs-test/sample:1", "lfs-test/imported:1"], out)
    assert run_image(images, "lfs-test/sample:1") == timg.SAMPLE_OUTPUT
    assert run_image(images, "lfs-test/imported:1") == "imported by layerfs\n"
    saved = SavedByLayerfs(out, archives.sample.id, imported.id)
    handoff = os.environ.get(HANDOFF_ENV)
    if handoff:
        saved.save_to(Path(handoff) / f"saved-{images.layers.driver.name}")
    else:
        check_in_docker(request.getfixturevalue("docker_daemon"), saved)


def test_round_trip_keeps_dockers_image_id(images: ImageStore, docker_daemon: DockerDaemon,
                                           docker_built: DockerBuilt, tmp_path: Path) -> None:
    """docker save -> layerfs load -> layerfs save -> docker load: Docker re-hashes every
    layer tar and gets its own diff ids and image id back."""
    d = docker_daemon
    images.load(docker_built.archive)
    images.tag(BUILT, "lfs-test/roundtrip:1")
    out = tmp_path / "roundtrip.tar"
    images.save(["lfs-test/roundtrip:1"], out)
    try:
        d.docker("load", "-i", str(out))
        assert d.image_id("lfs-test/roundtrip:1") == docker_built.id
        assert docker_run(d, "lfs-test/roundtrip:1") == docker_built.output
    finally:
        d.docker("rmi", "lfs-test/roundtrip:1", check=False)


# The image tests whose point is deletions, peers' formats and Docker's own output, and
# the registry round trip, run on devicemapper.
GUEST_TESTS = [f"tests/images/{name}" for name in (
    "test_interop_docker.py::test_docker_saved_image_loads_and_runs_the_same",
    "test_interop_docker.py::test_layerfs_saved_images_load_and_run_in_docker",
    "test_images.py::test_load_applies_deletions_on_every_driver",
    "test_interop_umoci_skopeo.py::test_umoci_layout_loads_with_deletions",
    "test_interop_umoci_skopeo.py::test_skopeo_converts_layerfs_output")] + [
    "tests/registry/test_roundtrip.py::test_push_then_pull_on_every_driver"]


@guest_test
def test_images_interop_on_devicemapper_in_the_guest(docker_built: DockerBuilt,
                                                     docker_daemon: DockerDaemon,
                                                     tmp_path: Path) -> None:
    """One boot: the host's Docker-built archive loads and runs with Docker's output on
    devicemapper; what layerfs saves from devicemapper comes back and Docker loads it;
    push to and pull from a registry server started in the guest."""
    handoff = tmp_path / "docker-handoff"
    docker_built.save_to(handoff / "built")
    summary = pytest_passes_in_guest(
        [*GUEST_TESTS, "-k", "devicemapper"], tmp_path, timeout=500,
        env={HANDOFF_ENV: f"{qemu.GUEST_RESULTS}/{handoff.name}"},
        must_run=["test_docker_saved_image_loads_and_runs_the_same[devicemapper]",
                  "test_layerfs_saved_images_load_and_run_in_docker[devicemapper]",
                  "test_load_applies_deletions_on_every_driver[devicemapper]",
                  "[devicemapper-dir]", "[devicemapper-tar]",
                  "[devicemapper-docker-none-oci]", "[devicemapper-oci-gzip-docker-archive]",
                  "test_push_then_pull_on_every_driver[devicemapper]"])
    assert summary.tests == 8, summary
    check_in_docker(docker_daemon, SavedByLayerfs.read_from(handoff / "saved-devicemapper"))
