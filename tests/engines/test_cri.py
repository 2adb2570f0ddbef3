"""Kubernetes' node path on layerfs: containerd's CRI plugin with a layerfs snapshotter.

The kubelet runs pods through the CRI; containerd's CRI plugin picks its
snapshotter by name (``snapshotter = "layerfs-overlay2"``). Here a small CRI
client (tests/engines/cri.py) makes the kubelet's calls -- RunPodSandbox,
CreateContainer, StartContainer, ContainerStatus, StopPodSandbox,
RemovePodSandbox -- against a containerd configured as docs/engines.md shows,
with a sandbox image built and imported locally (a pause-like busybox that
waits for SIGTERM), on host networking. The pod's sandbox and its container
run on layerfs snapshots; the container prints the sample image's output to
its CRI log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from layerfs_bench.engine_peers import ContainerdDaemon, CriConfig, EngineServer

from layerfs.engines.proto import cri_pb2 as cri
from layerfs.layers import LayerStore
from layerfs.testing.images import SAMPLE_OUTPUT, busybox_image_tar

from .conftest import engine_fleet
from .cri import CriClient, log_lines, pod_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PAUSE = "localhost/layerfs/pause:1"
SAMPLE = "docker.io/library/sample:latest"
# pause's job: exist, and go away on SIGTERM (sh as PID 1 ignores it unless trapped).
PAUSE_CMD = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]


@dataclass
class Node:
    driver: str
    server: EngineServer
    containerd: ContainerdDaemon
    cri: CriClient
    logs: Path


@pytest.fixture(scope="module", params=["overlay2", "aufs"])
def node(request: pytest.FixtureRequest, module_scratch: Path, sockets: Path,
         sample_tar: Path) -> Iterator[Node]:
    driver = request.param
    if ContainerdDaemon.unavailable():
        pytest.skip(str(ContainerdDaemon.unavailable()))
    base = module_scratch / f"cri-{driver}"
    base.mkdir()
    pause_tar = base / "pause.tar"
    busybox_image_tar(pause_tar, base, name=PAUSE, cmd=PAUSE_CMD)
    with engine_fleet(base, sockets, request) as fleet:
        server = fleet.server(driver)
        assert server.snapshotter_socket is not None
        snapshotter = f"layerfs-{driver}"
        daemon = ContainerdDaemon(base / "containerd",
                                  proxy_snapshotters={snapshotter: server.snapshotter_socket},
                                  cri=CriConfig(snapshotter=snapshotter, sandbox_image=PAUSE))
        with daemon:
            for archive in (pause_tar, sample_tar):
                daemon.ctr("image", "import", "--snapshotter", snapshotter, str(archive),
                           namespace="k8s.io")
            client = CriClient(daemon.socket)
            try:
                yield Node(driver, server, daemon, client, base / "logs")
            finally:
                client.close()


def layer_counts(root: Path, driver: str) -> tuple[int, int]:
    """(read-only, read-write) layers in a root, read through a second store handle."""
    with LayerStore.open(root, driver) as store:
        layers = store.layers()
    return (sum(r.readonly for r in layers), sum(not r.readonly for r in layers))


def test_a_pod_runs_on_layerfs_storage(node: Node) -> None:
    version = node.cri.version()
    assert version.runtime_name == "containerd" and version.runtime_api_version == "v1"
    assert node.cri.image_status(SAMPLE).image.id.startswith("sha256:")
    images_only = layer_counts(node.server.root, node.driver)
    assert images_only == (3, 0)  # busybox (one layer, shared by both images) + sample's two

    config = pod_config(f"pod-{node.driver}", node.logs)
    pod = node.cri.run_pod_sandbox(config)
    try:
        assert node.cri.pod_sandbox_status(pod).state == cri.SANDBOX_READY
        container = node.cri.create_container(pod, cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="sample"), image=cri.ImageSpec(image=SAMPLE),
            log_path="sample.log"), config)
        # The sandbox's and the container's root filesystems: layerfs layers.
        assert layer_counts(node.server.root, node.driver) == (3, 2)
        node.cri.start_container(container)
        status = node.cri.wait_exited(container)
        assert (status.exit_code, status.reason) == (0, "Completed")
        assert log_lines(node.logs / "sample.log") == SAMPLE_OUTPUT.splitlines()
    finally:
        node.cri.stop_pod_sandbox(pod)
        node.cri.remove_pod_sandbox(pod)
    # containerd's garbage collector removes the snapshots it no longer uses: ask for a
    # collection and wait for it (a scheduled one can miss the sandbox's deletion when it
    # lands while a collection finishes: ContainerdDaemon.collect_garbage).
    node.containerd.collect_garbage(namespace="k8s.io")
    assert layer_counts(node.server.root, node.driver) == images_only, "pod snapshots left"
