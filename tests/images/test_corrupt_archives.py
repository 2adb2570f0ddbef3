"""Broken and hostile archives: each is one clear error, from the library and from
``layerfs load`` (exit 1, one line), and leaves no image, name, layer or scratch file.

Every case starts from a root that already holds busybox, whose layer the sample
shares: a failed load must not remove layers that existed before it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from layerfs.errors import InvalidArgument, LayerfsError, NotFound, UnsafeArchive
from layerfs.images import ImageStore
from layerfs.testing import images as timg

from .. import hostile_tars
from ..daemons import cli_env
from .conftest import Archives, snapshot


def _flip(path: Path, needle: bytes) -> None:
    """Change one byte of the first occurrence of ``needle`` (same length, new digest)."""
    data = bytearray(path.read_bytes())
    pos = data.find(needle)
    assert pos >= 0, needle
    data[pos] ^= 0x20
    path.write_bytes(bytes(data))


def _sample(tmp: Path, archives: Archives, fmt: str = "docker", compression: str = "none",
            **kw: object) -> timg.BuiltImage:
    return timg.build_image(tmp / f"sample-{fmt}", list(archives.layers), name="sample:latest",
                            format=fmt, compression=compression, cmd=["sh"], **kw)  # type: ignore[arg-type]


def _rewrite_member(archive: Path, name: str, edit: Callable[[bytes], bytes | None]) -> None:
    """Rewrite (or with None, drop) one member of a tar archive."""
    tmp = archive.with_suffix(".new")
    with tarfile.open(archive) as src, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            if info.name == name and data is not None:
                data = edit(data)
                if data is None:
                    continue
                info.size = len(data)
            dst.addfile(info, None if data is None else io.BytesIO(data))
    tmp.replace(archive)


def truncated(tmp: Path, a: Archives) -> Path:
    path = tmp / "truncated.tar"
    data = a.sample.path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_at_member_end(tmp: Path, a: Archives) -> Path:
    """Cut right after a complete member: no end-of-archive marker."""
    path = tmp / "cut.tar"
    with tarfile.open(a.sample.path) as tar:
        last = tar.getmembers()[2]
        end = last.offset_data + last.size + (-last.size % 512)
    path.write_bytes(a.sample.path.read_bytes()[:end])
    return path


def truncated_gzip(tmp: Path, a: Archives) -> Path:
    path = tmp / "truncated.tar.gz"
    data = gzip.compress(a.sample.path.read_bytes())
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def flipped_layer_byte(tmp: Path, a: Archives) -> Path:
    built = _sample(tmp, a)
    _flip(built.path, b"version 2")        # content of the third layer
    return built.path


def flipped_oci_blob_byte(tmp: Path, a: Archives) -> Path:
    built = _sample(tmp, a, fmt="oci-dir")
    _flip(built.path / built.layer_blobs[1], b"version 1")
    return built.path


def flipped_gzip_blob_byte(tmp: Path, a: Archives) -> Path:
    built = _sample(tmp, a, fmt="oci-dir", compression="gzip")
    blob = built.path / built.layer_blobs[0]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    return built.path


def flipped_config_byte(tmp: Path, a: Archives) -> Path:
    built = _sample(tmp, a)
    _flip(built.path, b'"architecture"')
    return built.path


def oci_missing_blob(tmp: Path, a: Archives) -> Path:
    built = _sample(tmp, a, fmt="oci-dir")
    (built.path / built.layer_blobs[2]).unlink()
    return built.path


def oci_missing_manifest(tmp: Path, a: Archives) -> Path:
    built = _sample(tmp, a, fmt="oci-dir")
    index = json.loads((built.path / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    (built.path / "blobs/sha256" / digest).unlink()
    return built.path


def docker_missing_layer(tmp: Path, a: Archives) -> Path:
    built = _sample(tmp, a)

    def edit(data: bytes) -> bytes:
        manifest = json.loads(data)
        manifest[0]["Layers"][1] = "0000/layer.tar"
        return json.dumps(manifest).encode()

    _rewrite_member(built.path, "manifest.json", edit)
    return built.path


def oci_wrong_size(tmp: Path, a: Archives) -> Path:
    layers = list(a.layers)
    built = _sample(tmp, a, fmt="oci-dir")
    index = json.loads((built.path / "index.json").read_text())
    mpath = built.path / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(mpath.read_text())
    manifest["layers"][1]["size"] = len(layers[1]) - 512
    data = json.dumps(manifest).encode()
    mpath.unlink()
    new = timg._sha256(data)
    (built.path / "blobs/sha256" / new.split(":")[1]).write_bytes(data)
    index["manifests"][0].update(digest=new, size=len(data))
    (built.path / "index.json").write_text(json.dumps(index))
    return built.path


def bad_manifest_json(tmp: Path, a: Archives) -> Path:
    built = _sample(tmp, a)
    _rewrite_member(built.path, "manifest.json", lambda d: d[:-7] + b"oops")
    return built.path


def bad_index_json(tmp: Path, a: Archives) -> Path:
    built = _sample(tmp, a, fmt="oci-dir")
    (built.path / "index.json").write_text('{"schemaVersion": 2, "manifests": [')
    return built.path


def bad_config_json(tmp: Path, a: Archives) -> Path:
    """Valid digest, invalid JSON: the config is what is broken, not the transport."""
    built = timg.build_image(tmp / "badcfg", list(a.layers), name="sample:latest",
                             format="oci-dir", config={"rootfs": {"type": "layers"}})
    index = json.loads((built.path / "index.json").read_text())
    mpath = built.path / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(mpath.read_text())
    garbage = b'{"rootfs": {"type": "layers", "diff_ids": ['
    gdigest = timg._sha256(garbage)
    (built.path / "blobs/sha256" / gdigest.split(":")[1]).write_bytes(garbage)
    manifest["config"].update(digest=gdigest, size=len(garbage))
    data = json.dumps(manifest).encode()
    new = timg._sha256(data)
    (built.path / "blobs/sha256" / new.split(":")[1]).write_bytes(data)
    index["manifests"][0].update(digest=new, size=len(data))
    (built.path / "index.json").write_text(json.dumps(index))
    return built.path


def layer_count_mismatch(tmp: Path, a: Archives) -> Path:
    cfg = timg.image_config([timg._sha256(x) for x in a.layers[:2]], cmd=["sh"])
    return timg.build_image(tmp / "count.tar", list(a.layers), config=cfg).path


def not_an_archive(tmp: Path, a: Archives) -> Path:
    path = tmp / "plain.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(a.busybox_layer, arcname="something.tar")
    return path


def hostile_dotdot(tmp: Path, a: Archives) -> Path:
    info = tarfile.TarInfo("../../escaped")
    info.size = 4
    layer = timg.LayerTar().dir("x").raw(info, b"evil").bytes()
    return timg.build_image(tmp / "hostile.tar", [a.layers[0], layer], name="evil:1",
                            cmd=["sh"]).path


def hostile_symlink(tmp: Path, a: Archives) -> Path:
    layer = (timg.LayerTar().symlink("escape", "/tmp").file("escape/lfs-evil", "evil")
             .bytes())
    return timg.build_image(tmp / "hostile-link.tar", [a.layers[0], layer], name="evil:1",
                            cmd=["sh"]).path


def deep_manifest_json(tmp: Path, a: Archives) -> Path:
    """100,000 levels of nesting: json's decoder recursed until RecursionError."""
    built = _sample(tmp, a)
    _rewrite_member(built.path, "manifest.json", lambda d: b"[" * 100_000 + b"]" * 100_000)
    return built.path


def _listed_many_times(tmp: Path, a: Archives, n: int) -> Path:
    """The sample listed ``n`` times in manifest.json, once per tag (as ``docker save``
    of n tags of one image could write it)."""
    built = _sample(tmp, a)

    def many(data: bytes) -> bytes:
        entry = json.loads(data)[0]
        return json.dumps([dict(entry, RepoTags=[f"many:t{i}"]) for i in range(n)]).encode()
    _rewrite_member(built.path, "manifest.json", many)
    return built.path


def too_many_names(tmp: Path, a: Archives) -> Path:
    return _listed_many_times(tmp, a, 20_000)


def pax_pile_in_archive(tmp: Path, a: Archives) -> Path:
    """PAX headers with new keys, each under the 1 MiB limit, before the archive's first
    member: the index held them all (32 MiB headers were seen)."""
    path = tmp / "pax-pile.tar"
    pile = b"".join(hostile_tars.pax({b"comment%d" % i: b"x" * (600 << 10)})
                    for i in range(4))
    path.write_bytes(pile + a.sample.path.read_bytes())
    return path


CASES: dict[str, tuple[Callable[[Path, Archives], Path], type[LayerfsError], str]] = {
    "truncated": (truncated, InvalidArgument, "truncated"),
    "truncated-at-member-end": (truncated_at_member_end, InvalidArgument, "truncated"),
    "truncated-gzip": (truncated_gzip, InvalidArgument, "truncated"),
    "flipped-layer-byte": (flipped_layer_byte, InvalidArgument, "digest mismatch"),
    "flipped-oci-blob-byte": (flipped_oci_blob_byte, InvalidArgument, "digest mismatch"),
    "flipped-gzip-blob-byte": (flipped_gzip_blob_byte, InvalidArgument, "corrupt|mismatch"),
    "flipped-config-byte": (flipped_config_byte, InvalidArgument, "digest mismatch"),
    "oci-missing-blob": (oci_missing_blob, NotFound, "missing"),
    "oci-missing-manifest": (oci_missing_manifest, NotFound, "missing"),
    "docker-missing-layer": (docker_missing_layer, NotFound, "missing"),
    "oci-wrong-size": (oci_wrong_size, InvalidArgument, "bytes"),
    "bad-manifest-json": (bad_manifest_json, InvalidArgument, "not valid JSON"),
    "bad-index-json": (bad_index_json, InvalidArgument, "not valid JSON"),
    "bad-config-json": (bad_config_json, InvalidArgument, "not valid JSON"),
    "layer-count-mismatch": (layer_count_mismatch, InvalidArgument, "diff ids"),
    "not-an-archive": (not_an_archive, InvalidArgument, "not an image archive"),
    "hostile-dotdot": (hostile_dotdot, UnsafeArchive, r"'\.\.'"),
    "hostile-symlink": (hostile_symlink, UnsafeArchive, "symlink"),
    "deep-manifest-json": (deep_manifest_json, InvalidArgument, "nested too deep"),
    "too-many-names": (too_many_names, InvalidArgument, "more than 10000 image names"),
    "pax-pile-in-archive": (pax_pile_in_archive, InvalidArgument, "extended headers"),
}


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A wide COLUMNS keeps rich from wrapping the message (see the report on cli.py).
    env = dict(os.environ, COLUMNS="5000", **cli_env(root))
    return subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                           "overlay2", *args], capture_output=True, text=True, env=env)


@pytest.mark.usefixtures("cli_mode")
@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_archive_is_one_clear_error(images: ImageStore, archives: Archives,
                                          tmp_path: Path, case: str) -> None:
    make, error, pattern = CASES[case]
    images.load(archives.busybox.path)
    before = snapshot(images)
    path = make(tmp_path, archives)
    with pytest.raises(error, match=pattern) as info:
        images.load(path)
    assert "\n" not in str(info.value)
    assert snapshot(images) == before, "the failed load left something behind"
    assert not list(Path("/tmp").glob("lfs-evil*")) and not (tmp_path.parent / "escaped").exists()
    # The same through the CLI: exit 1, one line, no traceback; still nothing left.
    proc = _cli(images.layers.root, "load", "-q", "-i", str(path))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: error:"), proc.stderr
    assert proc.stdout == ""
    assert snapshot(images) == before


@pytest.mark.parametrize("case", ["hostile-dotdot", "hostile-symlink", "flipped-layer-byte"])
def test_broken_layers_leave_nothing_on_every_driver(images_on: ImageStore,
                                                     archives: Archives, tmp_path: Path,
                                                     case: str) -> None:
    make, error, pattern = CASES[case]
    images_on.load(archives.busybox.path)
    before = snapshot(images_on)
    with pytest.raises(error, match=pattern):
        images_on.load(make(tmp_path, archives))
    assert snapshot(images_on) == before


@pytest.mark.usefixtures("cli_mode")
def test_stdin_garbage_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                           "overlay2", "load", "-q"], input=b"\x1f\x8bnot really gzip",
                          capture_output=True,
                          env=dict(os.environ, COLUMNS="500", **cli_env(root)))
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("layerfs: error:")
    shutil.rmtree(root, ignore_errors=True)


def test_one_image_listed_many_times_is_read_once(images: ImageStore, archives: Archives,
                                                   tmp_path: Path) -> None:
    """8000 entries for one image, one tag each: read and loaded once with every name,
    in a child limited to 1 GiB (before: quadratic; N=4000 took 64 s and 1.2 GB)."""
    path = _listed_many_times(tmp_path, archives, 8000)
    root = images.layers.root

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                           "overlay2", "load", "-q", "-i", str(path)], capture_output=True,
                          text=True, timeout=120, preexec_fn=limit,
                          env=dict(os.environ, COLUMNS="5000"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = snapshot(images)["names"]
    assert isinstance(names, list)
    assert len([n for n in names if "many:t" in n]) == 8000
