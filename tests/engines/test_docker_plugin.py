"""Docker 20.10 on layerfs storage: ``dockerd --experimental --storage-driver layerfs-<driver>``.

For each native driver a layerfs server serves Docker's graphdriver plugin
protocol as ``layerfs-<driver>-<tag>`` (a name unique to the run, since
/run/docker/plugins/ is shared by the whole machine), and a private dockerd
uses it as its storage driver. Through it: ``docker load``, ``docker run``,
a three-step ``docker build``, ``docker diff``, ``docker commit``, ``docker
save`` and ``docker rmi``. A second dockerd on its own overlay2 is the
reference: the same archive loads with the same image id, ``docker diff``
lists the same changes, ``docker save`` writes byte-identical layers, and an
image built on layerfs, saved and loaded there, keeps its id and runs the same.

The aufs case is Docker's AUFS storage driver on a kernel without aufs, end to
end through layerfs's FUSE union filesystem. Everything runs on every native driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from layerfs_bench.engine_peers import EngineServer
from layerfs_bench.peers import DockerDaemon

from layerfs.layers import LayerStore
from layerfs.testing.images import SAMPLE_OUTPUT

from .conftest import engine_fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DRIVERS = ["aufs", "overlay2", "btrfs", "vfs"]
TAG = secrets.token_hex(3)
DOCKERFILE = """\
FROM sample
RUN echo one > /one && rm /sample/keep.txt
RUN mkdir /two && echo two > /two/f && ln -s /two/f /two/link
COPY hello.txt /three
"""
BUILT_CMD = ["sh", "-c", "cat /one /two/link /three; ls /sample"]
BUILT_OUTPUT = "one\ntwo\nhello\nchanged.txt\ndir\nreplaced\ntree\n"
EDIT = ["sh", "-c", "echo x > /new; rm /sample/keep.txt; echo y >> /sample/changed.txt; "
        "rm -r /sample/tree"]


@dataclass
class Docker:
    driver: str
    server: EngineServer | None
    daemon: DockerDaemon

    def run(self, image: str, *argv: str) -> str:
        return str(self.daemon.docker("run", "--rm", "--network", "none", image, *argv).stdout)


def docker_base(name: str) -> Path:
    # Short: containerd's and the shims' sockets live under the exec root (108-byte limit).
    return Path("/tmp") / f"lfs-dk-{TAG}-{name}"


@pytest.fixture(scope="module")
def native(sample_tar: Path) -> Iterator[Docker]:
    """The reference: dockerd on its own overlay2."""
    if DockerDaemon.unavailable():
        pytest.skip(str(DockerDaemon.unavailable()))
    daemon = DockerDaemon(docker_base("native"))
    with daemon:
        daemon.docker("load", "-i", str(sample_tar))
        yield Docker("overlay2", None, daemon)
    daemon.remove_data()


@pytest.fixture(scope="module", params=DRIVERS)
def plugin(request: pytest.FixtureRequest, module_scratch: Path, sockets: Path,
           native: Docker) -> Iterator[Docker]:
    driver = request.param
    base = module_scratch / f"docker-{driver}"
    base.mkdir()
    with engine_fleet(base, sockets, request, snapshotter=False, docker_tag=TAG) as fleet:
        server = fleet.server(driver)
        assert server.docker_plugin is not None
        daemon = DockerDaemon(docker_base(driver), storage_driver=server.docker_plugin,
                              extra_args=("--experimental",))
        try:
            with daemon:
                yield Docker(driver, server, daemon)
        finally:
            daemon.remove_data()


def saved_layers(archive: Path) -> list[str]:
    """sha256 of each layer tar of a ``docker save`` archive, in the manifest's order."""
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        digests = []
        for path in manifest[0]["Layers"]:
            member = tar.extractfile(path)
            assert member is not None
            digests.append(hashlib.sha256(member.read()).hexdigest())
    return digests


def docker_layers(server: EngineServer) -> list[str]:
    with LayerStore.open(server.root, server.driver) as store:
        return [r.id for r in store.layers()]


def test_docker_runs_on_the_plugin(plugin: Docker, native: Docker, sample_tar: Path) -> None:
    assert plugin.server is not None
    info = plugin.daemon.docker("info", "--format", "{{.Driver}}|{{json .DriverStatus}}").stdout
    name, status = info.strip().split("|", 1)
    assert name == plugin.server.docker_plugin
    assert ["Storage Driver", plugin.driver] in json.loads(status)
    socket = Path("/run/docker/plugins") / f"{name}.sock"
    st = os.stat(socket)
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)

    loaded = plugin.daemon.docker("load", "-i", str(sample_tar)).stdout
    assert "sample:latest" in loaded
    assert plugin.daemon.image_id("sample") == native.daemon.image_id("sample")
    assert len(docker_layers(plugin.server)) == 3
    assert plugin.run("sample") == SAMPLE_OUTPUT
    if plugin.driver == "aufs":
        # Docker's AUFS, on this kernel without aufs: the container's root is the FUSE union.
        mounts = plugin.run("sample", "cat", "/proc/self/mountinfo").splitlines()
        root = next(line for line in mounts if line.split()[4] == "/")
        assert root.split(" - ")[1].split()[0] == "fuse.layerfs-union", root


@pytest.mark.parametrize("plugin", DRIVERS, indirect=True)
def test_build_diff_commit_save_rmi(plugin: Docker, native: Docker, tmp_path: Path) -> None:
    assert plugin.server is not None
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "hello.txt").write_text("hello\n")
    plugin.daemon.docker("build", "--network", "none", "-t", "built", str(context))
    assert plugin.run("built", *BUILT_CMD) == BUILT_OUTPUT

    # docker diff: the same changes as Docker's own overlay2 lists for the same edit.
    diffs = []
    for docker in (plugin, native):
        docker.daemon.docker("run", "--name", f"edit-{TAG}", "--network", "none", "sample", *EDIT)
        diffs.append(sorted(docker.daemon.docker("diff", f"edit-{TAG}").stdout.splitlines()))
    assert diffs[0] == diffs[1], diffs
    assert "A /new" in diffs[0] and "D /sample/tree" in diffs[0] and "C /sample" in diffs[0]
    native.daemon.docker("rm", f"edit-{TAG}")

    plugin.daemon.docker("commit", f"edit-{TAG}", "committed")
    plugin.daemon.docker("rm", f"edit-{TAG}")
    assert plugin.run("committed", "sh", "-c", "cat /new /sample/changed.txt; ls /sample") == \
        "x\nversion 2\ny\nchanged.txt\ndir\nreplaced\n"

    # docker save: the loaded image's layers come back byte for byte as Docker's overlay2
    # writes them; built and committed images keep their ids in the other daemon.
    saves = {}
    for docker in (plugin, native):
        saves[docker.driver if docker is plugin else "native"] = path = \
            tmp_path / f"sample-{'plugin' if docker is plugin else 'native'}.tar"
        docker.daemon.docker("save", "-o", str(path), "sample")
    assert saved_layers(saves[plugin.driver]) == saved_layers(saves["native"])
    archive = tmp_path / "built.tar"
    plugin.daemon.docker("save", "-o", str(archive), "built", "committed")
    native.daemon.docker("load", "-i", str(archive))
    for image in ("built", "committed"):
        assert native.daemon.image_id(image) == plugin.daemon.image_id(image)
    assert native.run("built", *BUILT_CMD) == BUILT_OUTPUT
    native.daemon.docker("rmi", "built", "committed")

    # docker rmi: every layer goes, from Docker and from the layerfs root.
    plugin.daemon.docker("rmi", "built", "committed", "sample")
    assert plugin.daemon.images() == []
    assert docker_layers(plugin.server) == []


@pytest.mark.parametrize("plugin", ["overlay2"], indirect=True)  # driver-independent
def test_a_killed_plugin_fails_cleanly_and_serves_again(plugin: Docker,
                                                        sample_tar: Path) -> None:
    assert plugin.server is not None
    plugin.daemon.docker("load", "-i", str(sample_tar))
    plugin.server.kill()
    try:
        proc = plugin.daemon.docker("run", "--rm", "--network", "none", "sample", check=False)
        assert proc.returncode != 0
        # dockerd retries a plugin for ~15 s, then says which socket refused.
        message = proc.stderr.strip().splitlines()[0]
        assert "connection refused" in message and f"{plugin.server.docker_plugin}.sock" \
            in message, message
    finally:
        plugin.server.start()
    assert plugin.run("sample") == SAMPLE_OUTPUT
    plugin.daemon.docker("rmi", "sample")
    assert docker_layers(plugin.server) == []
