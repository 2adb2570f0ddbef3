"""The protobuf modules are generated from our .proto files at install time (setup.py).

An edited .proto without a reinstall would leave stale modules: this regenerates
them the way setup.py does and compares. It also checks that the messages carry
the field numbers of the published APIs that containerd and the kubelet speak.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_setup() -> object:
    spec = importlib.util.spec_from_file_location("layerfs_setup", REPO / "setup.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    import setuptools

    real_setup = setuptools.setup
    setuptools.setup = lambda **kw: None  # load the module without running a build
    try:
        spec.loader.exec_module(module)
    finally:
        setuptools.setup = real_setup
    return module


def test_generated_modules_match_the_proto_files(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) is not installed")
    setup = load_setup()
    monkeypatch.chdir(REPO)
    setup.generate_protos(tmp_path)  # type: ignore[attr-defined]
    fresh = sorted((tmp_path / "layerfs/engines/proto").glob("*_pb2.py*"))
    assert [p.name for p in fresh] == ["cri_pb2.py", "cri_pb2.pyi", "mount_pb2.py",
                                       "mount_pb2.pyi", "snapshots_pb2.py", "snapshots_pb2.pyi"]
    for path in fresh:
        installed = REPO / "layerfs/engines/proto" / path.name
        assert installed.read_bytes() == path.read_bytes(), \
            f"{installed} is stale: run `pip install -e .` (or ./scripts/setup) again"


def test_field_numbers_are_the_published_ones() -> None:
    from layerfs.engines.proto import cri_pb2, mount_pb2, snapshots_pb2

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert snapshots_pb2.DESCRIPTOR.package == "containerd.services.snapshots.v1"
    assert numbers(mount_pb2.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    assert numbers(snapshots_pb2.Info) == {"name": 1, "parent": 2, "kind": 3, "created_at": 4,
                                           "updated_at": 5, "labels": 6}
    assert numbers(snapshots_pb2.CommitSnapshotRequest) == {"snapshotter": 1, "name": 2,
                                                            "key": 3, "labels": 4}
    assert numbers(snapshots_pb2.UpdateSnapshotRequest) == {"snapshotter": 1, "info": 2,
                                                            "update_mask": 3}
    assert numbers(snapshots_pb2.UsageResponse) == {"size": 1, "inodes": 2}
    assert [(v.name, v.number) for v in snapshots_pb2.Kind.DESCRIPTOR.values] == \
        [("UNKNOWN", 0), ("VIEW", 1), ("ACTIVE", 2), ("COMMITTED", 3)]
    assert cri_pb2.DESCRIPTOR.package == "runtime.v1"
    assert numbers(cri_pb2.PodSandboxConfig)["linux"] == 8
    assert numbers(cri_pb2.ContainerConfig)["log_path"] == 11
    assert numbers(cri_pb2.ContainerStatus)["exit_code"] == 7
