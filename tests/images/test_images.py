"""The image store: loading every format on every driver, sharing layers by chain id,
saving byte for byte, names, removal rules, imports, concurrency and crashes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import zstandard

from layerfs.digests import chain_ids
from layerfs.errors import AlreadyExists, InUse, InvalidArgument, NotFound
from layerfs.images import ImageStore, RunConfig, apply_change
from layerfs.layers import LayerStore
from layerfs.reference import parse_reference
from layerfs.testing import images as timg

from .conftest import Archives, run_image, snapshot


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_sample_tree(images: ImageStore, ref: str) -> None:
    image = images.get(ref)
    assert image.top_layer is not None
    with images.layers.mounted(image.top_layer, readonly=True) as root:
        for rel, content in timg.SAMPLE_EXPECTED.items():
            path = root / rel
            if content is None:
                assert path.is_dir(), rel
            else:
                assert path.read_text() == content, rel
        for rel in timg.SAMPLE_DELETED:
            assert not os.path.lexists(root / rel), f"{rel} should be deleted"
        assert sorted(os.listdir(root / "sample/replaced")) == ["new.txt"]
        assert sorted(os.listdir(root / "sample/tree")) == ["fresh.txt"]


# --- pure helpers -----------------------------------------------------------------------------

def test_chain_ids_follow_the_oci_spec() -> None:
    d = [sha256(b"a"), sha256(b"b"), sha256(b"c")]
    c = chain_ids(d)
    assert c[0] == d[0]
    assert c[1] == sha256(f"{d[0]} {d[1]}".encode())
    assert c[2] == sha256(f"{c[1]} {d[2]}".encode())
    assert chain_ids([]) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("busybox", "busybox:latest"),
    ("busybox:1.36", "busybox:1.36"),
    ("docker.io/library/busybox:1", "busybox:1"),
    ("docker.io/lab/app", "lab/app:latest"),
    ("localhost:5000/lab/app:v1.2", "localhost:5000/lab/app:v1.2"),
    ("registry.example.com:443/a/b", "registry.example.com:443/a/b:latest"),
])
def test_references_are_normalised(text: str, expected: str) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize("text", ["Busybox", "bad name", "a:b:c", "x:-tag", "a@sha256:00", ""])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)


def test_changes_build_a_run_config() -> None:
    cfg: dict[str, object] = {}
    for change in ['CMD ["/bin/echo", "hi"]', "ENTRYPOINT /bin/sh", "ENV A=1 B=two",
                   "ENV C three words", "WORKDIR /srv", "USER 1000:1000", "EXPOSE 80 53/udp",
                   "LABEL org.x=y", "STOPSIGNAL SIGINT", "VOLUME /data"]:
        apply_change(cfg, change)
    rc = RunConfig.from_config({"config": cfg})
    assert rc.cmd == ["/bin/echo", "hi"]
    assert rc.entrypoint == ["/bin/sh", "-c", "/bin/sh"]
    assert rc.env == ["A=1", "B=two", "C=three words"]
    assert rc.working_dir == "/srv" and rc.user == "1000:1000"
    assert rc.exposed_ports == ["53/udp", "80/tcp"]
    assert rc.labels == {"org.x": "y"} and rc.stop_signal == "SIGINT"
    assert rc.volumes == ["/data"]
    assert rc.environment()["PATH"].startswith("/usr/local/sbin")
    with pytest.raises(InvalidArgument):
        apply_change(cfg, "RUN rm -rf /")


# --- loading ------------------------------------------------------------------------------------

def test_load_applies_deletions_on_every_driver(images_on: ImageStore,
                                                archives: Archives) -> None:
    """The sample's whiteouts (files, a directory, an opaque re-created directory) reach
    every driver in its native form and read back as deletions."""
    loaded = images_on.load(archives.sample.path)
    assert [i.id for i in loaded] == [archives.sample.id]
    assert loaded[0].names == ["sample:latest"]
    check_sample_tree(images_on, "sample")
    assert run_image(images_on, "sample") == timg.SAMPLE_OUTPUT
    # Saving re-creates the exact layer tars on every driver.
    out = images_on.layers.root.parent / f"resaved-{images_on.layers.driver.name}.tar"
    images_on.save(["sample"], out)
    with tarfile.open(out) as tar:
        names = tar.getnames()
        for layer in archives.layers:
            member = f"{sha256(layer).split(':')[1]}/layer.tar"
            assert member in names
            assert tar.extractfile(member).read() == layer  # type: ignore[union-attr]
    out.unlink()


@pytest.mark.parametrize(("fmt", "compression"), [
    ("docker", "none"), ("docker", "gzip"), ("oci", "none"), ("oci", "gzip"), ("oci", "zstd"),
    ("oci-dir", "gzip"), ("oci-dir", "zstd")])
def test_load_every_format(images: ImageStore, archives: Archives, tmp_path: Path, fmt: str,
                           compression: str) -> None:
    path = tmp_path / "image"
    built = timg.build_image(path, list(archives.layers), name="lab/sample:v1", format=fmt,
                             compression=compression, cmd=timg.SAMPLE_CMD,
                             env=["GREETING=hello"], workdir="/sample")
    loaded = images.load(path)
    assert [i.id for i in loaded] == [built.id]
    assert loaded[0].names == ["lab/sample:v1"]
    check_sample_tree(images, "lab/sample:v1")
    assert run_image(images, "lab/sample:v1") == timg.SAMPLE_OUTPUT


@pytest.mark.parametrize("compressor", ["gzip", "zstd"])
def test_load_compressed_archive_and_stdin(images: ImageStore, archives: Archives,
                                           tmp_path: Path, compressor: str) -> None:
    data = archives.sample.path.read_bytes()
    packed = gzip.compress(data) if compressor == "gzip" else \
        zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"sample.tar.{compressor}"
    path.write_bytes(packed)
    assert images.load(path)[0].id == archives.sample.id
    images.remove("sample")
    assert images.load(stream=io.BytesIO(packed))[0].id == archives.sample.id
    check_sample_tree(images, "sample")


def test_oci_bare_tag_needs_a_repository(images: ImageStore, archives: Archives,
                                         tmp_path: Path) -> None:
    built = timg.build_image(tmp_path / "layout", [archives.layers[0]], name="v1",
                             format="oci-dir", cmd=["sh"])
    untagged = images.load(tmp_path / "layout")
    assert untagged[0].names == [] and untagged[0].id == built.id
    named = images.load(tmp_path / "layout", repo="lab/box")
    assert named[0].names == ["lab/box:v1"]


def test_shared_layers_are_stored_once(images: ImageStore, archives: Archives,
                                       tmp_path: Path) -> None:
    base, two, three = archives.layers
    other = timg.LayerTar().dir("other").file("other/x", "x\n").bytes()
    a = timg.build_image(tmp_path / "a.tar", [base, two, three], name="a:1", cmd=["sh"])
    b = timg.build_image(tmp_path / "b.tar", [base, two, other], name="b:1", cmd=["sh"])
    c = timg.build_image(tmp_path / "c.tar", [other], name="c:1", cmd=["sh"])
    images.load(a.path)
    assert len(images.layers.layers()) == 3
    images.load(b.path)
    assert len(images.layers.layers()) == 4          # base and two are shared
    images.load(c.path)
    assert len(images.layers.layers()) == 5          # same diff, other parent: new chain
    ia, ib = images.get("a:1"), images.get("b:1")
    assert [la.layer_id for la in ia.layers[:2]] == [la.layer_id for la in ib.layers[:2]]
    assert ia.layers[2].layer_id != ib.layers[2].layer_id
    assert images.get("c:1").layers[0].diff_id == ib.layers[2].diff_id
    images.remove("a:1")
    assert len(images.layers.layers()) == 4          # only a's own top went
    with images.layers.mounted(images.get("b:1").top_layer, readonly=True) as root:
        assert (root / "other/x").read_text() == "x\n"
        assert (root / "sample/gone.txt").read_text() == "bye\n"
    images.remove("b:1")
    images.remove("c:1")
    assert images.layers.layers() == []
    assert snapshot(images)["chains"] == []


def test_loading_the_same_archive_twice_adds_nothing(images: ImageStore,
                                                     archives: Archives) -> None:
    images.load(archives.sample.path)
    before = snapshot(images)
    images.load(archives.sample.path)
    assert snapshot(images) == before


# --- saving ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fmt", "compression"), [
    ("docker", "none"), ("oci", "none"), ("oci", "gzip"), ("oci", "zstd"), ("oci-dir", "none")])
def test_save_round_trip_keeps_ids(images: ImageStore, archives: Archives, tmp_path: Path,
                                   fmt: str, compression: str) -> None:
    images.load(archives.sample.path)
    images.tag("sample", "lab/copy:2")
    out = tmp_path / "saved"
    images.save(["sample", "lab/copy:2"], out, format=fmt, compression=compression)
    assert not list(tmp_path.glob(".saved.*")), "no partial output is left"
    other = ImageStore(LayerStore.open(tmp_path / "other-root", "vfs"))
    try:
        loaded = other.load(out)
        assert [i.id for i in loaded] == [archives.sample.id]
        assert sorted(loaded[0].names) == ["lab/copy:2", "sample:latest"]
        assert other.config_bytes("sample") == images.config_bytes("sample")
        check_sample_tree(other, "lab/copy:2")
    finally:
        other.layers.wipe()
        other.layers.close()


def test_save_refuses_a_changed_layer(images: ImageStore, archives: Archives,
                                      tmp_path: Path) -> None:
    """Saving re-creates the tar from the layer's files; a layer altered on disk is
    detected by its digest and no output is left."""
    images.load(archives.sample.path)
    top = images.get("sample").layers[-1].layer_id
    with images.layers.driver.writable_view(top) as root:
        (root / "sample/changed.txt").write_text("version X\n")  # same size, other bytes
    out = tmp_path / "out.tar"
    with pytest.raises(Exception, match="digest"):
        images.save(["sample"], out)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tar.*"))


def test_save_to_stream_and_errors(images: ImageStore, archives: Archives,
                                   tmp_path: Path) -> None:
    images.load(archives.sample.path)
    buf = io.BytesIO()
    images.save(["sample"], stream=buf)
    assert images.load(stream=io.BytesIO(buf.getvalue()))[0].id == archives.sample.id
    with pytest.raises(NotFound):
        images.save(["nope"], tmp_path / "x.tar")
    with pytest.raises(InvalidArgument):
        images.save(["sample"], tmp_path / "x.tar", format="docker", compression="gzip")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(AlreadyExists):
        images.save(["sample"], tmp_path / "full", format="oci-dir")


# --- names, removal, users -----------------------------------------------------------------

def test_tags_and_removal_rules(images: ImageStore, archives: Archives) -> None:
    images.load(archives.sample.path)
    image_id = archives.sample.id
    assert images.tag("sample", "lab/one:1") == "lab/one:1"
    images.tag(image_id[7:19], "lab/two")                       # by id prefix
    assert images.get("lab/two").id == image_id
    assert images.resolve(image_id) == image_id
    assert sorted(images.get(image_id).names) == ["lab/one:1", "lab/two:latest", "sample:latest"]
    # A name among several: only untagged.
    assert images.remove("lab/one:1") == [("Untagged", "lab/one:1")]
    # By id with several names: refused without force.
    with pytest.raises(InUse, match="names"):
        images.remove(image_id)
    # A container uses it: refused until it is gone.
    images.add_user("sample", "box1")
    assert images.users(image_id) == ["box1"]
    with pytest.raises(InUse, match="box1"):
        images.remove(image_id, force=True)
    images.remove_user(image_id, "box1")
    # A layer on top of it (a container that did not register): refused too.
    box = images.layers.create(parent=images.get("sample").top_layer)
    with pytest.raises(InUse, match="container layer"):
        images.remove(image_id, force=True)
    images.layers.remove(box.id)
    # Mounted: refused.
    with images.layers.mounted(images.get("sample").top_layer, readonly=True), \
            pytest.raises(InUse, match="mounted"):
        images.remove(image_id, force=True)
    result = images.remove(image_id, force=True)
    assert result[-1] == ("Deleted", image_id)
    assert {r[1] for r in result[:-1]} == {"sample:latest", "lab/two:latest"}
    assert images.images() == [] and images.layers.layers() == []
    with pytest.raises(NotFound):
        images.get("sample")
    with pytest.raises(NotFound):
        images.add_user("sample", "box2")


def test_ambiguous_and_unknown_references(images: ImageStore, archives: Archives,
                                          tmp_path: Path) -> None:
    images.load(archives.sample.path)
    with pytest.raises(NotFound):
        images.get("ffff0000")
    with pytest.raises(NotFound):
        images.get("sample:nope")
    with pytest.raises(InvalidArgument):
        images.tag("sample", "Bad Name")


def test_history_and_inspect(images: ImageStore, archives: Archives) -> None:
    images.load(archives.sample.path)
    history = images.history("sample")
    assert [h.created_by for h in history] == ["delete and replace", "add /sample",
                                               "busybox-static rootfs"]
    assert history[2].size and history[2].size > 1_000_000   # the busybox binary
    assert [h.diff_id for h in history] == list(reversed(archives.sample.diff_ids))
    info = images.inspect("sample")
    assert info["Id"] == archives.sample.id
    assert info["RepoTags"] == ["sample:latest"]
    assert info["RootFS"]["Layers"] == archives.sample.diff_ids
    assert info["Config"]["Cmd"] == timg.SAMPLE_CMD
    assert info["Config"]["WorkingDir"] == "/sample"
    assert info["GraphDriver"]["Name"] == "overlay2"
    assert info["Layerfs"]["TopLayer"] == images.get("sample").top_layer
    json.dumps(info)  # JSON-serialisable as is


# --- import ---------------------------------------------------------------------------------------

def test_import_tar_dir_and_stream(images: ImageStore, archives: Archives, scratch: Path,
                                   tmp_path: Path) -> None:
    tar_bytes = archives.busybox_layer.read_bytes()
    a = images.import_rootfs(archives.busybox_layer, "imp/tar", changes=[
        'CMD ["/bin/sh", "-c", "echo $A in $(pwd)"]', "ENV A=imported", "WORKDIR /tmp"])
    assert a.names == ["imp/tar:latest"]
    assert a.layers[0].diff_id == sha256(tar_bytes)
    assert a.config["history"][0]["comment"].startswith("Imported from")
    assert run_image(images, "imp/tar") == "imported in /tmp\n"
    # The same tar zstd-compressed through a stream: same layer, stored once.
    packed = zstandard.ZstdCompressor().compress(tar_bytes)
    b = images.import_rootfs(None, "imp/stream:z", stream=io.BytesIO(packed), message="hello")
    assert b.layers[0].layer_id == a.layers[0].layer_id
    assert b.config["history"][0]["comment"] == "hello"
    assert len(images.layers.layers()) == 1
    # A directory.
    tree = timg.busybox_rootfs(tmp_path / "tree")
    (tree / "etc/motd").write_text("from a directory\n")
    os.link(tree / "etc/motd", tree / "etc/motd.link")
    c = images.import_rootfs(tree, "imp/dir", changes=["CMD cat /etc/motd.link"])
    assert run_image(images, "imp/dir") == "from a directory\n"
    # Saved and loaded again: same id (the imported tar is re-created exactly).
    out = tmp_path / "imp.tar"
    images.save(["imp/dir", "imp/tar"], out)
    images.remove("imp/dir")
    images.remove("imp/tar")
    images.remove("imp/stream:z")
    assert images.layers.layers() == []
    assert sorted(i.id for i in images.load(out)) == sorted([a.id, c.id])


def test_import_refuses_what_is_not_a_rootfs(images: ImageStore, tmp_path: Path) -> None:
    before = snapshot(images)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar" * 100)
    with pytest.raises(InvalidArgument):
        images.import_rootfs(bad, "bad")
    with pytest.raises(NotFound):
        images.import_rootfs(tmp_path / "missing.tar", "bad")
    assert snapshot(images) == before


def test_tar_split_reproduces_odd_tars(images: ImageStore, tmp_path: Path) -> None:
    """GNU and PAX tars with long names, hardlinks, symlinks and odd sizes come back
    byte for byte: saving never changes a digest."""
    src = tmp_path / "src"
    deep = src / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / ("f" * 150)).write_bytes(os.urandom(70_001))
    (src / "empty").touch()
    (src / "one").write_bytes(b"1")
    os.link(src / "one", src / "one.hard")
    os.symlink("x" * 200, src / "longlink")
    (src / "ünïcødé").write_text("utf-8 name\n")
    for fmt in ("gnu", "posix", "ustar"):
        if fmt == "ustar":
            opts = ["--format=ustar", "--exclude=" + "d" * 120, "--exclude=longlink"]
        else:
            opts = [f"--format={fmt}"]
        tar_path = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", "-C", str(src), *opts, "-cf", str(tar_path), "."], check=True)
        image = images.import_rootfs(tar_path, f"odd/{fmt}")
        out = tmp_path / f"{fmt}-saved.tar"
        images.save([f"odd/{fmt}"], out)
        with tarfile.open(out) as tar:
            member = f"{image.layers[0].diff_id.split(':')[1]}/layer.tar"
            assert tar.extractfile(member).read() == tar_path.read_bytes()  # type: ignore[union-attr]


# --- concurrency and crashes ------------------------------------------------------------------

LOAD_SCRIPT = """
import sys, time
from pathlib import Path
from layerfs.images import ImageStore

class Waits:
    waited = False
    def begin(self, key, description, total):
        if key.startswith("wait:"):
            Waits.waited = True
    def advance(self, key, amount): pass
    def end(self, key): pass

go = Path(sys.argv[3])
with ImageStore.open(sys.argv[1], "overlay2") as images:
    while not go.exists():
        time.sleep(0.002)
    images.load(sys.argv[2], progress=Waits())
print("waited" if Waits.waited else "applied")
"""


def test_concurrent_loads_apply_a_shared_base_once(tmp_path: Path, archives: Archives) -> None:
    base = timg.LayerTar().dir("big").file("big/blob", os.urandom(48 << 20)).bytes()
    a = timg.build_image(tmp_path / "a.tar", [base, archives.layers[1]], name="a:1", cmd=["sh"])
    b = timg.build_image(tmp_path / "b.tar", [base, archives.layers[2]], name="b:1", cmd=["sh"])
    root = tmp_path / "root"
    ImageStore.open(root, "overlay2").close()
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(root), str(p), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in (a.path, b.path)]
    time.sleep(1.0)
    go.touch()
    outcomes = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        outcomes.append(stdout.strip())
    assert "waited" in outcomes, "both loads should have met at the shared base"
    with ImageStore.open(root, "overlay2") as images:
        assert sorted(n for i in images.images() for n in i.names) == ["a:1", "b:1"]
        assert len(images.layers.layers()) == 3, "the shared base was applied once"
        assert images.get("a:1").layers[0].layer_id == images.get("b:1").layers[0].layer_id
        assert snapshot(images)["leases"] == 0
        images.layers.wipe()


KILL_SCRIPT = """
import sys
from layerfs.images import ImageStore
with ImageStore.open(sys.argv[1], "overlay2") as images:
    images.load(sys.argv[2])
"""


def test_kill_during_load_leaves_nothing(tmp_path: Path, archives: Archives) -> None:
    big = timg.LayerTar().dir("big")
    for i in range(48):
        big.file(f"big/f{i}", os.urandom(1 << 20))
    image = timg.build_image(tmp_path / "big.tar", [archives.layers[0], big.bytes()],
                             name="big:1", cmd=["sh"])
    root = tmp_path / "root"
    with ImageStore.open(root, "overlay2") as images:
        images.load(archives.busybox.path)           # a base that must survive
        before = snapshot(images)
    # Kill while the big layer is being written (the base is shared and reused).
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root), str(image.path)])
    deadline = time.monotonic() + 60
    with LayerStore.open(root, "overlay2", recover=False) as probe:
        while time.monotonic() < deadline:
            if any(r.state == "creating" for r in probe.store.list_layers(state=None)):
                break
            if proc.poll() is not None:
                pytest.fail("the load finished before it could be killed")
            time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with ImageStore.open(root, "overlay2") as images:
        after = snapshot(images)
        assert after == before, "a killed load left something behind"
        assert images.load(image.path)[0].names == ["big:1"]
        images.layers.wipe()


def test_failed_load_keeps_layers_that_existed(images: ImageStore, archives: Archives,
                                               tmp_path: Path) -> None:
    images.load(archives.busybox.path)
    before = snapshot(images)
    bad_layer = timg.LayerTar().file("ok", "fine").bytes()
    built = timg.build_image(tmp_path / "bad.tar", [archives.layers[0], bad_layer],
                             name="bad:1", cmd=["sh"])
    # Corrupt the second layer's bytes (same length): its digest no longer matches.
    data = bytearray(built.path.read_bytes())
    pos = data.find(b"fine")
    data[pos:pos + 4] = b"FINE"
    built.path.write_bytes(bytes(data))
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        images.load(built.path)
    assert snapshot(images) == before
    assert run_image(images, "busybox", ["/bin/echo", "still here"]) == "still here\n"


def test_recover_cleans_dead_leases_and_unused_layers(images: ImageStore,
                                                      archives: Archives) -> None:
    images.load(archives.sample.path)
    db = images.store.db
    with images.store.transaction():
        db.execute("INSERT INTO image_leases VALUES ('sha256:x', '1:1/dead')")
        # A load that died after applying but before publishing: its layers are orphans.
        db.execute("DELETE FROM image_names")
        db.execute("DELETE FROM images")
    actions = images.recover()
    assert any("unused image layer" in a for a in actions)
    assert snapshot(images)["chains"] == [] and images.layers.layers() == []
    assert snapshot(images)["leases"] == 0
