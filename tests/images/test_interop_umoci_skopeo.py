"""Interop with umoci and skopeo (Debian's packages).

* An OCI layout made by ``umoci`` — busybox plus a layer that deletes a file and
  deletes and re-creates a directory, written the umoci way (one ``.wh.`` per
  deleted file, gzip blobs) — loads with the deletions applied on every driver,
  from the directory and from a tar of it.
* ``skopeo copy`` converts what ``layerfs save`` writes (docker-archive, OCI
  layout tar with gzip or zstd layers) to the other format without a warning,
  and layerfs loads the result back with the same image id; saved from every
  driver.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from layerfs_bench.peers import missing, skopeo, umoci

from layerfs.images import ImageStore
from layerfs.testing import images as timg

from .conftest import IMAGE_DRIVERS, Archives, run_image

UMOCI_CMD = "cat /data/keep; ls /data; ls /data/replaced; ls /data/dir; echo $GREETING in $(pwd)"
UMOCI_OUTPUT = "kept\ndir\nkeep\nreplaced\nnew\ny\numoci in /data\n"


@dataclass(frozen=True)
class UmociLayout:
    dir: Path
    tar: Path


@pytest.fixture(scope="module")
def umoci_layout(scratch: Path) -> Iterator[UmociLayout]:
    reason = missing("umoci")
    if reason:
        pytest.skip(f"umoci interop: {reason}")
    base = scratch / "umoci"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    layout, bundle = base / "layout", base / "bundle"
    image = f"{layout}:base"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", image)
    umoci("unpack", "--image", image, str(bundle))
    rootfs = bundle / "rootfs"
    timg.busybox_rootfs(rootfs)
    (rootfs / "data/dir").mkdir(parents=True)
    (rootfs / "data/replaced/sub").mkdir(parents=True)
    (rootfs / "data/keep").write_text("kept\n")
    (rootfs / "data/file").write_text("deleted later\n")
    (rootfs / "data/dir/x").write_text("x\n")
    (rootfs / "data/dir/y").write_text("y\n")
    (rootfs / "data/replaced/old").write_text("old\n")
    (rootfs / "data/replaced/sub/deep").write_text("deep\n")
    umoci("repack", "--refresh-bundle", "--image", image, str(bundle))
    # Layer 2: delete a file, delete a file in a kept directory, delete and re-create
    # a directory (with a subdirectory inside).
    (rootfs / "data/file").unlink()
    (rootfs / "data/dir/x").unlink()
    shutil.rmtree(rootfs / "data/replaced")
    (rootfs / "data/replaced").mkdir()
    (rootfs / "data/replaced/new").write_text("new\n")
    umoci("repack", "--refresh-bundle", "--image", image, str(bundle))
    umoci("config", "--image", image, "--config.cmd", "/bin/sh", "--config.cmd", "-c",
          "--config.cmd", UMOCI_CMD, "--config.env", "GREETING=umoci",
          "--config.workingdir", "/data")
    tar_path = base / "layout.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(tar_path), "."], check=True)
    yield UmociLayout(layout, tar_path)
    shutil.rmtree(base, ignore_errors=True)


def _top_layer_names(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs/sha256" / digest).read_text())
    blob = layout / "blobs/sha256" / manifest["layers"][-1]["digest"].split(":")[1]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob.read_bytes()))) as tar:
        return tar.getnames()


def test_umoci_writes_per_file_whiteouts(umoci_layout: UmociLayout) -> None:
    """What the next test relies on: umoci's own whiteout style, no opaque marker."""
    names = _top_layer_names(umoci_layout.dir)
    assert "data/.wh.file" in names and "data/dir/.wh.x" in names
    assert "data/replaced/.wh.old" in names and "data/replaced/.wh.sub" in names
    assert not any(n.endswith(".wh..wh..opq") for n in names)


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_umoci_layout_loads_with_deletions(images_on: ImageStore, umoci_layout: UmociLayout,
                                           form: str) -> None:
    source = umoci_layout.dir if form == "dir" else umoci_layout.tar
    loaded = images_on.load(source, repo="umoci")
    assert loaded[0].names == ["umoci:base"]
    image = images_on.get("umoci:base")
    with images_on.layers.mounted(image.top_layer, readonly=True) as root:
        assert not (root / "data/file").exists()
        assert sorted(p.name for p in (root / "data/dir").iterdir()) == ["y"]
        assert sorted(p.name for p in (root / "data/replaced").iterdir()) == ["new"]
        assert (root / "data/keep").read_text() == "kept\n"
    assert run_image(images_on, "umoci:base") == UMOCI_OUTPUT


# --- skopeo --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def skopeo_tmp(scratch: Path) -> Iterator[Path]:
    reason = missing("skopeo")
    if reason:
        pytest.skip(f"skopeo interop: {reason}")
    path = scratch / "skopeo-tmp"
    path.mkdir(exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _quiet(proc: subprocess.CompletedProcess[str]) -> None:
    for line in proc.stderr.splitlines():
        assert "warn" not in line.lower() and "error" not in line.lower(), proc.stderr


# Every output format from the default driver; from every other driver, one conversion
# each way (what a save reads back from storage is per driver).
SKOPEO_CASES = [("overlay2", "docker", "none", "oci"), ("overlay2", "oci", "none", "docker-archive"),
                ("overlay2", "oci", "gzip", "docker-archive"), ("overlay2", "oci", "zstd", "oci")] + [
    case for driver in IMAGE_DRIVERS if driver != "overlay2"
    for case in ((driver, "docker", "none", "oci"), (driver, "oci", "gzip", "docker-archive"))]


@pytest.mark.parametrize(("image_driver", "fmt", "compression", "target"), SKOPEO_CASES)
def test_skopeo_converts_layerfs_output(images_on: ImageStore, archives: Archives,
                                        skopeo_tmp: Path, tmp_path: Path, fmt: str,
                                        compression: str, target: str) -> None:
    """zstd layers go to an OCI layout (docker archives cannot hold zstd, skopeo says so).
    Converting docker -> OCI, skopeo re-serialises the config (new image id, same content)."""
    images = images_on
    images.load(archives.sample.path)
    images.tag("sample", "lfs/conv:1")
    saved = tmp_path / f"saved-{fmt}.tar"
    images.save(["lfs/conv:1"], saved, format=fmt, compression=compression)
    src = f"docker-archive:{saved}" if fmt == "docker" else f"oci-archive:{saved}"
    if target == "oci":
        dest_path = tmp_path / "converted-layout"
        dest = f"oci:{dest_path}:v1"
    else:
        dest_path = tmp_path / "converted.tar"
        dest = f"docker-archive:{dest_path}:lfs/back:v1"
    _quiet(skopeo("inspect", "--raw", src, tmpdir=skopeo_tmp))
    config = json.loads(skopeo("inspect", "--config", "--raw", src, tmpdir=skopeo_tmp).stdout)
    assert config["rootfs"]["diff_ids"] == archives.sample.diff_ids
    _quiet(skopeo("copy", "--quiet", src, dest, tmpdir=skopeo_tmp))
    # vfs: this only reads skopeo's output back, and vfs runs on any backing filesystem
    # (in the guest, a clone under /tmp sits on overlayfs, which overlay2 cannot use).
    other = ImageStore.open(tmp_path / "other", "vfs")
    try:
        loaded = other.load(dest_path, repo="lfs/back")
        assert loaded[0].names == ["lfs/back:v1"]
        assert loaded[0].config == archives.sample.config
        assert [la.diff_id for la in loaded[0].layers] == archives.sample.diff_ids
        if fmt == "oci":
            assert loaded[0].id == archives.sample.id
        assert run_image(other, "lfs/back:v1") == timg.SAMPLE_OUTPUT
    finally:
        other.layers.wipe()
        other.close()
