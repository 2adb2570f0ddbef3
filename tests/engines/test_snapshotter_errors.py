"""Bad input, crashes and permissions of the containerd snapshotter.

* Refusals carry containerd's status codes (containerd's clients turn them
  back into its error kinds, ``errdefs``): unknown keys are NotFound, a taken
  key AlreadyExists, a parent that is not committed InvalidArgument, committing
  a view or removing a parent FailedPrecondition -- checked on the wire with a
  plain gRPC client, and as ``ctr`` reports them.
* A server killed with SIGKILL in the middle of a Prepare or a Remove leaves
  no half-made snapshot: the next start rolls the first back and finishes the
  second. containerd meanwhile fails with a clear error, and works again once
  the server is back.
* The socket is root's alone (mode 0600): another user cannot even connect.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from layerfs_bench.engine_peers import ContainerdDaemon, EngineServer

from layerfs.engines.containerd import SERVICE
from layerfs.engines.proto import snapshots_pb2 as api
from layerfs.engines.snapshots import Snapshots
from layerfs.errors import LayerfsError
from layerfs.layers import LayerStore

from .conftest import engine_fleet, wipe_root
from .test_containerd import wait_until_served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DRIVER = "overlay2"
SNAPSHOTTER = f"layerfs-{DRIVER}"


@pytest.fixture(scope="module")
def server(module_scratch: Path, sockets: Path,
           request: pytest.FixtureRequest) -> Iterator[EngineServer]:
    with engine_fleet(module_scratch, sockets, request) as fleet:
        yield fleet.server(DRIVER)


class Client:
    """Calls the snapshots service by method name, as any gRPC client would."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket}")

    def call(self, method: str, request: object, response: type) -> object:
        stub = self.channel.unary_unary(f"/{SERVICE}/{method}",
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response.FromString)
        return stub(request, timeout=30)

    def code(self, method: str, request: object, response: type = api.StatSnapshotResponse,
             ) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as err:
            self.call(method, request, response)
        return err.value.code()  # type: ignore[no-any-return]

    def prepare(self, key: str, parent: str = "") -> None:
        self.call("Prepare", api.PrepareSnapshotRequest(key=key, parent=parent),
                  api.PrepareSnapshotResponse)

    def commit(self, name: str, key: str) -> None:
        from google.protobuf import empty_pb2

        self.call("Commit", api.CommitSnapshotRequest(name=name, key=key), empty_pb2.Empty)


@pytest.fixture
def client(server: EngineServer) -> Iterator[Client]:
    assert server.snapshotter_socket is not None
    c = Client(server.snapshotter_socket)
    yield c
    c.channel.close()


def test_refusals_carry_containerds_status_codes(client: Client) -> None:
    codes = grpc.StatusCode
    client.prepare("e-base-a")
    client.commit("e-base", "e-base-a")
    client.prepare("e-active", "e-base")
    client.call("View", api.ViewSnapshotRequest(key="e-view", parent="e-base"),
                api.ViewSnapshotResponse)

    assert client.code("Stat", api.StatSnapshotRequest(key="e-nothing")) == codes.NOT_FOUND
    assert client.code("Mounts", api.MountsRequest(key="e-nothing")) == codes.NOT_FOUND
    assert client.code("Remove", api.RemoveSnapshotRequest(key="e-nothing")) == codes.NOT_FOUND
    assert client.code("Prepare", api.PrepareSnapshotRequest(key="e-x", parent="e-nothing")) \
        == codes.NOT_FOUND
    assert client.code("Prepare", api.PrepareSnapshotRequest(key="e-active", parent="e-base")) \
        == codes.ALREADY_EXISTS
    assert client.code("Commit", api.CommitSnapshotRequest(name="e-base", key="e-active")) \
        == codes.ALREADY_EXISTS
    # A parent must be committed: an active snapshot or a view is not one.
    for not_committed in ("e-active", "e-view"):
        assert client.code("Prepare", api.PrepareSnapshotRequest(key="e-y", parent=not_committed)
                           ) == codes.INVALID_ARGUMENT
    assert client.code("Commit", api.CommitSnapshotRequest(name="e-c", key="e-view")) \
        == codes.FAILED_PRECONDITION
    assert client.code("Mounts", api.MountsRequest(key="e-base")) == codes.FAILED_PRECONDITION
    assert client.code("Remove", api.RemoveSnapshotRequest(key="e-base")) \
        == codes.FAILED_PRECONDITION
    assert client.code("Prepare", api.PrepareSnapshotRequest(key="")) == codes.INVALID_ARGUMENT
    update = api.UpdateSnapshotRequest(info=api.Info(name="e-base", parent="e-other"))
    update.update_mask.paths.append("parent")
    assert client.code("Update", update) == codes.INVALID_ARGUMENT
    stream = client.channel.unary_stream(f"/{SERVICE}/List",
                                         request_serializer=api.ListSnapshotsRequest.SerializeToString,
                                         response_deserializer=api.ListSnapshotsResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(stream(api.ListSnapshotsRequest(filters=['name=="unterminated'])))
    assert err.value.code() == codes.INVALID_ARGUMENT
    # Nothing above changed anything.
    names = {i.name for r in stream(api.ListSnapshotsRequest(filters=["name~=^e-"])) for i in r.info}
    assert names == {"e-base", "e-active", "e-view"}
    for key in ("e-view", "e-active", "e-base"):
        client.call("Remove", api.RemoveSnapshotRequest(key=key), api.StatSnapshotResponse)


def test_ctr_reports_the_refusals(server: EngineServer, module_scratch: Path) -> None:
    if ContainerdDaemon.unavailable():
        pytest.skip(str(ContainerdDaemon.unavailable()))
    assert server.snapshotter_socket is not None
    with ContainerdDaemon(module_scratch / "ctr-errors",
                          proxy_snapshotters={SNAPSHOTTER: server.snapshotter_socket}) as c:
        def ctr_error(*args: str) -> str:
            proc = c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, *args, check=False)
            assert proc.returncode != 0, args
            return str(proc.stderr)

        assert "not found" in ctr_error("info", "no-such-snapshot")
        c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "prepare", "c-active")
        assert "already exists" in ctr_error("prepare", "c-active")
        c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "commit", "c-base", "c-active")
        c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "view", "c-view", "c-base")
        message = ctr_error("commit", "c-committed", "c-view")
        assert "failed precondition" in message and "not active" in message, message
        c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "c-view", "c-base")


def spawn_snapshots(code: str, root: Path, *args: str) -> subprocess.Popen[bytes]:
    prelude = textwrap.dedent("""
        import pathlib, sys, time
        from layerfs.layers import LayerStore
        from layerfs.engines.snapshots import Snapshots
        snapshots = Snapshots(LayerStore.open(sys.argv[1], sys.argv[2]))
        marker = pathlib.Path(sys.argv[3])
        def then_hang(real):
            def wrapped(*a, **kw):
                result = real(*a, **kw)
                marker.touch()
                time.sleep(600)
                return result
            return wrapped
    """)
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code), str(root),
                             DRIVER, *args])


def killed_when(proc: subprocess.Popen[bytes], marker: Path) -> None:
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, "the child died before reaching the crash point"
        assert time.monotonic() < deadline, "the child never reached the crash point"
        time.sleep(0.02)
    proc.kill()
    proc.wait()


def test_kill_mid_prepare_and_mid_remove_leaves_no_half_made_snapshot(tmp_path: Path) -> None:
    root = tmp_path / "root"
    snapshots = Snapshots(LayerStore.open(root, DRIVER))
    for name in ("k-base", "k-other"):
        snapshots.prepare(f"{name}-a")
        snapshots.commit(name, f"{name}-a")
    snapshots.layers.close()
    # Killed after the layer exists, before the snapshot is ready.
    marker = tmp_path / "created"
    killed_when(spawn_snapshots("""
        snapshots.layers.create = then_hang(snapshots.layers.create)
        snapshots.prepare("k-half", "k-base")
    """, root, str(marker)), marker)
    # Killed after the layer is gone, before the row is.
    marker = tmp_path / "removed"
    killed_when(spawn_snapshots("""
        snapshots.layers.remove = then_hang(snapshots.layers.remove)
        snapshots.remove("k-other")
    """, root, str(marker)), marker)
    layers = LayerStore.open(root, DRIVER)
    snapshots = Snapshots(layers)
    rows = {r["key"]: r["state"] for r in layers.store.db.execute("SELECT * FROM snapshots")}
    # The kills hit mid-way, and nothing half-made is visible.
    assert rows == {"k-base": "ready", "k-half": "creating", "k-other": "removing"}
    assert [i.name for i in snapshots.walk()] == ["k-base"]
    actions = snapshots.recover()
    assert sorted(actions) == ["finished removing snapshot k-other",
                               "rolled back snapshot k-half"]
    assert [r["key"] for r in layers.store.db.execute("SELECT key FROM snapshots")] == ["k-base"]
    assert [r.id for r in layers.layers()] == [snapshots.stat("k-base").layer]
    with pytest.raises(LayerfsError):
        snapshots.stat("k-half")
    snapshots.prepare("k-half", "k-base")  # the key is free again
    layers.close()
    assert wipe_root(root, DRIVER) == []


def test_killed_server_fails_cleanly_and_serves_again_after_restart(
        server: EngineServer, module_scratch: Path, sample_tar: Path) -> None:
    if ContainerdDaemon.unavailable():
        pytest.skip(str(ContainerdDaemon.unavailable()))
    assert server.snapshotter_socket is not None
    with ContainerdDaemon(module_scratch / "ctr-kill",
                          proxy_snapshotters={SNAPSHOTTER: server.snapshotter_socket}) as c:
        c.ctr("image", "import", "--snapshotter", SNAPSHOTTER, str(sample_tar))
        before = c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout
        server.kill()
        try:
            for args in (("snapshots", "--snapshotter", SNAPSHOTTER, "ls"),
                         ("run", "--rm", "--snapshotter", SNAPSHOTTER,
                          "docker.io/library/sample:latest", "k1")):
                proc = c.ctr(*args, check=False, timeout=120)
                assert proc.returncode != 0
                message = proc.stderr.strip().splitlines()[-1]
                assert "unavailable" in message or "connection refused" in message, message
        finally:
            server.start()
        wait_until_served(c, SNAPSHOTTER)
        assert c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout == before
        out = c.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER,
                    "docker.io/library/sample:latest", "k2").stdout
        assert out.startswith("kept\n")
        c.ctr("image", "rm", "docker.io/library/sample:latest")


def test_the_socket_is_root_only(server: EngineServer) -> None:
    sock = server.snapshotter_socket
    assert sock is not None
    st = os.stat(sock)
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)
    probe = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
         str(sock)], capture_output=True, text=True)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
