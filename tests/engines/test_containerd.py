"""containerd 1.6 on layerfs storage: ``ctr`` through the layerfs proxy snapshotter.

One containerd for the module, configured as docs/engines.md shows, with one
layerfs server per native driver as ``proxy_plugins.layerfs-<driver>``. On each:
``ctr image import --snapshotter`` of a locally built docker-archive (three
layers with deletions and an opaque directory), ``ctr run`` prints the image's
output, and ``ctr snapshots ls/info/usage/tree/diff`` agree with containerd's
own overlayfs snapshotter on the same image: same chain, same content.
devicemapper runs the same checks in the qemu guest (tests/vm/test_engines_in_guest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from layerfs_bench.engine_peers import ContainerdDaemon, EngineServer

from layerfs.testing.images import SAMPLE_OUTPUT

from .conftest import ALL, EngineFleet, engine_fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

IMAGE = "docker.io/library/sample:latest"
RAW_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class Stack:
    containerd: ContainerdDaemon
    fleet: EngineFleet
    sample_tar: Path
    imported: set[str]

    def server(self, driver: str) -> EngineServer:
        fresh = driver not in self.fleet.servers
        server = self.fleet.server(driver)
        if fresh:
            wait_until_served(self.containerd, f"layerfs-{driver}")
        return server

    def import_sample(self, snapshotter: str) -> None:
        if snapshotter not in self.imported:
            self.containerd.ctr("image", "import", "--snapshotter", snapshotter,
                                str(self.sample_tar))
            self.imported.add(snapshotter)

    def snapshots(self, snapshotter: str, *args: str, check: bool = True,
                  text: bool = True) -> str:
        proc = self.containerd.ctr("snapshots", "--snapshotter", snapshotter, *args,
                                   check=check, text=text)
        return proc.stdout  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def stack(module_scratch: Path, sockets: Path, sample_tar: Path,
          request: pytest.FixtureRequest) -> Iterator[Stack]:
    reason = ContainerdDaemon.unavailable()
    if reason:
        pytest.skip(reason)
    with engine_fleet(module_scratch, sockets, request) as fleet:
        # Every driver's snapshotter is declared; its server starts when a test needs it.
        daemon = ContainerdDaemon(module_scratch / "containerd", proxy_snapshotters={
            f"layerfs-{d}": fleet.snapshotter_socket(d) for d in ALL})
        with daemon:
            yield Stack(daemon, fleet, sample_tar, set())


def wait_until_served(containerd: ContainerdDaemon, snapshotter: str, timeout: float = 15) -> None:
    """Wait until containerd reaches a proxy snapshotter whose server just (re)started:
    it redials a proxy plugin with backoff, at most 3 s apart. The probe must reach
    the server (``ls`` may not: containerd lists from its own metadata)."""
    deadline = time.monotonic() + timeout
    probe = f"probe-{os.getpid()}"
    while True:
        proc = containerd.ctr("snapshots", "--snapshotter", snapshotter, "prepare", probe,
                              check=False)
        if proc.returncode == 0:
            containerd.ctr("snapshots", "--snapshotter", snapshotter, "rm", probe)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"containerd does not reach {snapshotter}: {proc.stderr.strip()}")
        time.sleep(0.2)


def snapshot_rows(listing: str) -> set[tuple[str, ...]]:
    """``ctr snapshots ls`` as a set of (key, parent, kind) rows."""
    rows = set()
    for line in listing.splitlines()[1:]:
        fields = line.split()
        rows.add((fields[0], fields[1], fields[2]) if len(fields) == 3
                 else (fields[0], "", fields[1]))
    return rows


def tar_entries(data: bytes) -> list[tuple[object, ...]]:
    """What a layer tar says about each entry; a whiteout's mtime is the time of the
    diff (containerd stamps it when it writes one), so it is left out."""
    entries = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            content = b""
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                content = hashlib.sha256(extracted.read()).digest()
            whiteout = Path(member.name).name.startswith(".wh.")
            entries.append((member.name, member.type, member.mode, member.uid, member.gid,
                            member.size, member.linkname, content,
                            None if whiteout else member.mtime))
    return entries


@pytest.mark.parametrize("driver", ALL)
def test_import_and_run(stack: Stack, driver: str) -> None:
    server = stack.server(driver)
    snapshotter = f"layerfs-{driver}"
    stack.import_sample(snapshotter)
    out = stack.containerd.ctr("run", "--rm", "--snapshotter", snapshotter, IMAGE,
                               f"run-{driver}").stdout
    assert out == SAMPLE_OUTPUT
    # The image's three layers are layerfs layers of that root (containerd's view of
    # them is the snapshot chain; the container's own snapshot is gone with --rm).
    chain = snapshot_rows(stack.snapshots(snapshotter, "ls"))
    assert len(chain) == 3 and {kind for _, _, kind in chain} == {"Committed"}
    assert (server.root / "layerfs.db").exists()


@pytest.mark.parametrize("driver", ALL)
def test_snapshots_agree_with_containerds_overlayfs(stack: Stack, driver: str) -> None:
    stack.server(driver)
    ours, theirs = f"layerfs-{driver}", "overlayfs"
    stack.import_sample(ours)
    stack.import_sample(theirs)
    rows = snapshot_rows(stack.snapshots(ours, "ls"))
    assert rows == snapshot_rows(stack.snapshots(theirs, "ls"))
    assert stack.snapshots(ours, "tree") == stack.snapshots(theirs, "tree")
    usage = {line.split()[0]: line.split()[1:] for line in
             stack.snapshots(ours, "usage").splitlines()[1:]}
    assert set(usage) == {key for key, _, _ in rows}
    for key, parent, _kind in rows:
        info, their_info = (json.loads(stack.snapshots(s, "info", key)) for s in (ours, theirs))
        for stamp in ("Created", "Updated"):
            info.pop(stamp), their_info.pop(stamp)
        assert info == their_info  # name, parent, kind, labels
        # Usage counts what each snapshotter keeps on disk (overlay2's link files,
        # btrfs's whole subvolume), so it is reported, not compared.
        assert int(usage[key][-1]) > 0
        diff, their_diff = (stack.snapshots(s, "diff", "--media-type", RAW_TAR, key, text=False)
                            for s in (ours, theirs))
        assert tar_entries(diff) == tar_entries(their_diff), f"{key} (parent {parent})"
