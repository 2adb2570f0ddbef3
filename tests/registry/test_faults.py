"""Pulls that go wrong: a connection cut mid-blob (resumed with Range), a pull killed
mid-layer (with ``--resume`` the next ``--resume`` pull continues from the staged partial
file; otherwise the partial is discarded), a registry that keeps failing (gives up; keeps
the partial only when asked), and registries serving wrong bytes (rejected with a digest
mismatch, nothing left behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs.distribution import RegistryError, RegistryOptions, pull, push, staged_blobs
from layerfs.errors import InvalidArgument, LayerfsError
from layerfs.images import ImageStore
from layerfs.testing import images as timg
from tests.support.registry import Distribution, Fault, FaultProxy

from ..daemons import CliMode, cli_env, cli_settle, daemon_log
from ..images.conftest import close_images, snapshot
from .conftest import Samples, layerfs, manifest_of, open_overlay2

INSECURE = RegistryOptions(insecure=True)
BIG = 8 << 20


@dataclass(frozen=True)
class BigImage:
    repo: str
    id: str
    blob: str        # digest of the big layer's blob
    size: int        # its size
    content: bytes   # the big file


@pytest.fixture(scope="module")
def big_image(plain_registry: Distribution, samples: Samples, reg_scratch: Path,
              tmp_path_factory: pytest.TempPathFactory) -> BigImage:
    """busybox + an 8 MiB random file (gzip cannot shrink it), pushed once."""
    d = tmp_path_factory.mktemp("big")
    content = os.urandom(BIG)
    layer = timg.LayerTar().dir("big").file("big/blob", content).bytes()
    built = timg.build_image(d / "big.tar", [samples.layers[0], layer], name="big:1",
                             cmd=["sh"])
    store = open_overlay2(d / "root")
    try:
        store.load(built.path)
        push(store, "big:1", f"{plain_registry.host}/faults/big:1", options=INSECURE)
    finally:
        close_images(store)
    top = manifest_of(plain_registry.url, "faults/big", "1")["layers"][1]  # type: ignore[index]
    return BigImage("faults/big:1", built.id, top["digest"], top["size"], content)


def big_blob_gets(proxy: FaultProxy, big: BigImage) -> list[tuple[str | None, int]]:
    return [(r.range, r.body_bytes) for r in proxy.requests("GET", big.blob)]


def read_big_file(images: ImageStore, ref: str) -> bytes:
    top = images.get(ref).top_layer
    assert top is not None
    with images.layers.mounted(top, readonly=True) as root:
        return (root / "big/blob").read_bytes()


def test_a_cut_connection_is_resumed_with_range(images: ImageStore, proxy: FaultProxy,
                                                big_image: BigImage) -> None:
    cut = 3 << 20
    proxy.add(Fault(path=big_image.blob, cut_after=cut))
    result = pull(images, f"{proxy.host}/{big_image.repo}", options=INSECURE)
    assert result.image.id == big_image.id
    assert result.resumes == 1
    gets = big_blob_gets(proxy, big_image)
    assert gets == [(None, cut), (f"bytes={cut}-", big_image.size - cut)]
    assert read_big_file(images, f"{proxy.host}/{big_image.repo}") == big_image.content
    assert staged_blobs(images) == []


def test_a_registry_that_keeps_failing_gives_up_and_the_next_pull_resumes(
        images: ImageStore, proxy: FaultProxy, big_image: BigImage) -> None:
    cut = 2 << 20
    proxy.add(Fault(path=big_image.blob, cut_after=cut))
    proxy.add(Fault(path=big_image.blob, status=503, times=100))
    before = snapshot(images)
    with pytest.raises(RegistryError, match=rf"^{proxy.host}/faults/big: layer {big_image.blob}"
                                            rf": download failed at byte {cut} of "
                                            rf"{big_image.size}: HTTP 503 \(3 attempts without "
                                            r"progress; pull again with --resume to continue "
                                            r"from there\)$"):
        pull(images, f"{proxy.host}/{big_image.repo}",
             options=RegistryOptions(insecure=True, retries=2), resume=True)
    after = snapshot(images)
    staged = after.pop("scratch")
    before.pop("scratch")
    assert after == before, "a failed pull left something in the store"
    partial = [p for p in staged_blobs(images) if p.name.endswith(".partial")]
    assert [p.stat().st_size for p in partial] == [cut]
    assert staged == ["registry-blobs"]

    proxy.clear()
    result = pull(images, f"{proxy.host}/{big_image.repo}", options=INSECURE, resume=True)
    assert result.image.id == big_image.id
    assert big_blob_gets(proxy, big_image) == [(f"bytes={cut}-", big_image.size - cut)]
    assert result.downloaded_bytes < big_image.size
    assert staged_blobs(images) == []


def test_a_failed_pull_not_asked_to_resume_removes_its_partial_blob(
        images: ImageStore, proxy: FaultProxy, big_image: BigImage) -> None:
    cut = 2 << 20
    proxy.add(Fault(path=big_image.blob, cut_after=cut))
    proxy.add(Fault(path=big_image.blob, status=503, times=100))
    with pytest.raises(RegistryError, match=rf"download failed at byte {cut} of "
                                            rf"{big_image.size}: HTTP 503 \(3 attempts without "
                                            r"progress; the partial download is removed, "
                                            r"--resume would keep it\)$"):
        pull(images, f"{proxy.host}/{big_image.repo}",
             options=RegistryOptions(insecure=True, retries=2))
    assert staged_blobs(images) == []
    assert not (images.scratch / "registry-blobs").exists(), "a lock file was left"

    proxy.clear()
    assert pull(images, f"{proxy.host}/{big_image.repo}", options=INSECURE).image.id == \
        big_image.id
    assert big_blob_gets(proxy, big_image) == [(None, big_image.size)]


def test_system_df_counts_kept_downloads_and_prune_removes_those_no_pull_holds(
        tmp_path: Path, proxy: FaultProxy, big_image: BigImage) -> None:
    """A partial blob a failed ``--resume`` pull kept (or a pull killed with -9 left) would
    otherwise stay until a pull of that blob, or a day: ``system df`` shows it, ``system
    prune`` gives it back, but never one a running pull holds (its lock)."""
    from layerfs.downloads import blob_lock

    root = tmp_path / "root"
    images = open_overlay2(root)
    cut = 2 << 20
    try:
        proxy.add(Fault(path=big_image.blob, cut_after=cut))
        proxy.add(Fault(path=big_image.blob, status=503, times=100))
        with pytest.raises(RegistryError, match="pull again with --resume to continue"):
            pull(images, f"{proxy.host}/{big_image.repo}", resume=True,
                 options=RegistryOptions(insecure=True, retries=0))
        # Kept: the big blob's first bytes, and the whole base blob (its layer was
        # applied, then rolled back with the failed pull).
        staged = staged_blobs(images)
        [partial] = [p for p in staged if p.name.endswith(".partial")]
        [base] = [p for p in staged if p != partial]
        assert partial.stat().st_size == cut
        base_size = base.stat().st_size
    finally:
        close_images(images)

    def downloads() -> dict[str, int]:
        rows = json.loads(layerfs(root, "system", "df", "--json").stdout)["rows"]
        return next(r for r in rows if r["kind"] == "Downloads")

    # What no pull makes is neither counted nor followed nor removed.
    outside = tmp_path / "outside"
    outside.write_text("not the root's\n")
    (partial.parent / "sha256-dir.lock").mkdir()
    (partial.parent / "sha256-link.lock").symlink_to(outside)
    (partial.parent / "sha256-link").symlink_to(outside)
    total = cut + base_size
    assert downloads() == {"kind": "Downloads", "total": 2, "active": 0, "size": total,
                           "reclaimable": total}
    lock = partial.with_name(partial.name.removesuffix(".partial") + ".lock")
    with blob_lock(lock, wait=False) as held:        # as a running pull holds it
        assert held
        assert downloads() == {"kind": "Downloads", "total": 2, "active": 1, "size": total,
                               "reclaimable": base_size}
        kept = layerfs(root, "system", "prune", "-f").stdout
        assert big_image.blob not in kept and partial.exists() and not base.exists(), kept
    pruned = layerfs(root, "system", "prune", "-f").stdout
    assert f"Deleted Downloads:\n{big_image.blob}\n" in pruned, pruned
    assert pruned.endswith("Total reclaimed space: 2.0 MiB\n"), pruned
    assert not partial.exists() and not lock.exists()
    assert downloads()["total"] == 0
    assert outside.read_text() == "not the root's\n"
    assert sorted(p.name for p in partial.parent.iterdir()) == \
        ["sha256-dir.lock", "sha256-link", "sha256-link.lock"]


@pytest.mark.parametrize(("killed", "then"), [("--resume", "--resume"), ("", ""),
                                              ("--resume", "")],
                         ids=["asked", "not-asked", "kept-but-not-asked-again"])
def test_a_killed_pull_resumes_where_it_stopped(tmp_path: Path, proxy: FaultProxy,
                                                big_image: BigImage, killed: str,
                                                then: str, cli_mode: CliMode) -> None:
    """A pull killed with -9 cannot clean up: the next pull continues its partial blob
    only if both were asked to (``--resume``); otherwise it starts that blob afresh."""
    root = tmp_path / "root"
    open_overlay2(root).layers.close()
    stall = 5 << 20
    fault = proxy.add(Fault(path=big_image.blob, stall_after=stall))
    ref = f"{proxy.host}/{big_image.repo}"
    proc = subprocess.Popen([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                             "overlay2", "pull", "-q", "--insecure", *filter(None, [killed]),
                             ref],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, **cli_env(root)))
    try:
        assert fault.stalled.wait(60), "the pull never reached the big blob"
        partial = root / "tmp/registry-blobs" / (big_image.blob.replace(":", "-") + ".partial")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if partial.exists() and partial.stat().st_size >= stall:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        cli_settle(root)    # through a daemon, the hung-up worker stops just after
    finally:
        fault.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Through a daemon the pull's worker outlives the kill and cleans up as any failed
    # pull does: without --resume nothing stays. In process, kill -9 leaves the partial.
    have = partial.stat().st_size if partial.exists() else 0
    assert have >= stall or (not killed and cli_mode.name == "daemon")

    proxy.clear()
    images = open_overlay2(root)      # recovers what the killed pull left in the store
    try:
        assert images.images() == []
        result = pull(images, ref, options=INSECURE, resume=bool(then))
        assert result.image.id == big_image.id
        if then:
            assert big_blob_gets(proxy, big_image) == [(f"bytes={have}-",
                                                        big_image.size - have)]
        else:
            assert big_blob_gets(proxy, big_image) == [(None, big_image.size)]
        assert read_big_file(images, ref) == big_image.content
        assert staged_blobs(images) == []
        assert snapshot(images)["leases"] == 0
    finally:
        close_images(images)


def test_a_corrupted_blob_is_rejected_and_nothing_is_left(images: ImageStore,
                                                          proxy: FaultProxy,
                                                          big_image: BigImage) -> None:
    proxy.add(Fault(path=big_image.blob, corrupt_at=1 << 20))
    before = snapshot(images)
    ref = f"{proxy.host}/{big_image.repo}"
    with pytest.raises(InvalidArgument) as info:
        pull(images, ref, options=INSECURE)
    message = str(info.value)
    assert message.startswith(f"{proxy.host}/faults/big: layer {big_image.blob}: digest "
                              f"mismatch: expected {big_image.blob}, got sha256:"), message
    assert "\n" not in message
    after = snapshot(images)
    assert after["images"] == after["chains"] == after["layers"] == []
    assert after["leases"] == after["mounts"] == 0
    assert before["images"] == []
    assert not any(big_image.blob.split(":")[1] in p.name for p in staged_blobs(images)), \
        "the corrupt blob was kept"

    # Nothing was poisoned: the same pull works once the bytes are right.
    proxy.clear()
    assert pull(images, ref, options=INSECURE).image.id == big_image.id


@pytest.mark.usefixtures("cli_mode")
def test_cli_reports_a_corrupt_blob_in_one_line(tmp_path: Path, proxy: FaultProxy,
                                                big_image: BigImage) -> None:
    proxy.add(Fault(path=big_image.blob, corrupt_at=BIG // 2))
    failed = layerfs(tmp_path / "root", "pull", "--insecure", f"{proxy.host}/{big_image.repo}",
                     check=False)
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: error: ")
    assert f"digest mismatch: expected {big_image.blob}" in lines[0]
    assert "Traceback" not in failed.stderr
    assert layerfs(tmp_path / "root", "images", "-q").stdout == ""


def test_a_registry_serving_a_tampered_blob_is_rejected(images: ImageStore, tmp_path: Path,
                                                        plain_registry: Distribution,
                                                        samples: Samples) -> None:
    """The registry itself serves wrong bytes (its stored blob was changed on disk)."""
    layer = timg.LayerTar().dir("t").file("t/data", os.urandom(256 << 10)).bytes()
    built = timg.build_image(tmp_path / "t.tar", [samples.layers[0], layer], name="t:1",
                             cmd=["sh"])
    src = open_overlay2(tmp_path / "src")
    try:
        src.load(built.path)
        push(src, "t:1", f"{plain_registry.host}/faults/tampered:1", compression="none",
             options=INSECURE)
    finally:
        close_images(src)
    digest = built.diff_ids[1]          # uncompressed: the blob digest is the diff id
    stored = plain_registry.blob_path(digest)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(LayerfsError, match=rf"layer {digest}: digest mismatch: expected "
                                           rf"{digest}, got sha256:"):
        pull(images, f"{plain_registry.host}/faults/tampered:1", options=INSECURE)
    assert images.images() == [] and images.layers.layers() == []


def test_a_corrupted_manifest_is_rejected(images: ImageStore, proxy: FaultProxy,
                                          plain_registry: Distribution,
                                          big_image: BigImage) -> None:
    import httpx

    from layerfs.distribution import MANIFEST_ACCEPT

    r = httpx.get(f"{plain_registry.url}/v2/faults/big/manifests/1",
                  headers={"Accept": MANIFEST_ACCEPT})
    digest = r.headers["docker-content-digest"]
    proxy.add(Fault(path="/manifests/", corrupt_at=len(r.content) - 3, times=10))
    with pytest.raises(InvalidArgument, match=rf"manifest: digest mismatch: expected {digest}"):
        pull(images, f"{proxy.host}/faults/big@{digest}", options=INSECURE)
    with pytest.raises(InvalidArgument, match="manifest digest mismatch: the registry says"):
        pull(images, f"{proxy.host}/faults/big:1", options=INSECURE)
    assert images.images() == []


@pytest.mark.usefixtures("cli_mode")
@pytest.mark.parametrize("resume", [True, False], ids=["resume", "no-resume"])
def test_ctrl_c_stops_a_pull_at_once_and_keeps_the_partial_blob_if_asked(
        tmp_path: Path, proxy: FaultProxy, big_image: BigImage, resume: bool) -> None:
    root = tmp_path / "root"
    fault = proxy.add(Fault(path=big_image.blob, stall_after=3 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                             "overlay2", "pull", "-q", "--insecure",
                             *(["--resume"] if resume else []),
                             f"{proxy.host}/{big_image.repo}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **cli_env(root)))
    try:
        assert fault.stalled.wait(60), "the pull never reached the big blob"
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        assert took < 10, (f"Ctrl-C took {took:.1f} s; exit {proc.returncode}; stderr:\n"
                           f"{stderr[-4000:]}\n{daemon_log(root)}")
    finally:
        fault.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    images = open_overlay2(root)
    try:
        state = snapshot(images)
        assert state["images"] == state["chains"] == state["layers"] == []
        assert state["leases"] == 0
        partial = [p for p in staged_blobs(images) if p.name.endswith(".partial")]
        if resume:
            assert len(partial) == 1 and partial[0].stat().st_size >= 3 << 20
        else:
            assert staged_blobs(images) == []
    finally:
        close_images(images)
