"""Push then pull through a real registry (Distribution 2.8, plain HTTP) on every driver;
manifest formats, indexes and platforms, pulls by digest, the CLI, and what pushes and
pulls skip (HEAD, cross-repository mounts, layers already stored)."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from layerfs import oci
from layerfs.digests import sha256_digest
from layerfs.distribution import (
    RegistryError,
    RegistryOptions,
    pull,
    push,
    staged_blobs,
)
from layerfs.errors import InvalidArgument, LayerfsError, NotFound
from layerfs.images import ImageStore
from layerfs.testing import images as timg
from tests.support.registry import Distribution, FaultProxy

from ..daemons import CliMode
from ..images.conftest import close_images, image_store, run_image
from .conftest import Samples, layerfs, manifest_of, open_overlay2

INSECURE = RegistryOptions(insecure=True)


def second_root(driver: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    if driver == "btrfs":
        pool: Path = request.getfixturevalue("btrfs_pool")
        root = pool / f"{tmp_path.name}-pull"
        root.mkdir()
        return root
    return tmp_path / "pulled"


@pytest.fixture
def pulled(image_driver: str, tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[ImageStore]:
    """A second, empty root on the same driver as ``images_on``."""
    with image_store(image_driver, second_root(image_driver, tmp_path, request)) as store:
        yield store


def test_push_then_pull_on_every_driver(images_on: ImageStore, pulled: ImageStore,
                                        image_driver: str, plain_registry: Distribution,
                                        samples: Samples) -> None:
    images_on.load(samples.sample.path)
    dest = f"{plain_registry.host}/roundtrip/{image_driver}:v1"
    pushed = push(images_on, "sample:latest", dest, options=INSECURE)
    assert len(pushed.uploaded) == 4 and not pushed.existing and not pushed.mounted

    result = pull(pulled, dest, options=INSECURE)
    assert result.image.id == samples.sample.id
    assert result.image.names == [dest]
    assert result.manifest_digest == pushed.digest
    assert [la.diff_id for la in result.image.layers] == samples.sample.diff_ids
    assert (result.layers_downloaded, result.layers_present) == (3, 0)
    assert run_image(pulled, dest) == timg.SAMPLE_OUTPUT
    assert staged_blobs(pulled) == []

    again = pull(pulled, dest, options=INSECURE)
    assert again.up_to_date and again.layers_downloaded == 0 and again.layers_present == 3

    # What a pull stored can be pushed on: exact tars (tar-split recorded while pulling),
    # and every blob is known to be in roundtrip/<driver>, so all are cross-mounted.
    onward = push(pulled, dest, f"{plain_registry.host}/roundtrip/{image_driver}-onward:v1",
                  options=INSECURE)
    assert onward.digest == pushed.digest
    assert sorted(onward.mounted) == sorted(pushed.uploaded) and not onward.uploaded


def test_cli_push_and_pull(tmp_path: Path, plain_registry: Distribution,
                           samples: Samples, cli_mode: CliMode) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    layerfs(src, "load", "-q", "-i", str(samples.sample.path))
    repo = f"{plain_registry.host}/cli-{cli_mode.name}/sample"    # each mode pushes anew
    name = f"{repo}:v1"
    out = layerfs(src, "push", "sample", name, "--insecure").stdout
    assert out.count(": Pushed") == 3
    assert "v1: digest: sha256:" in out

    refused = layerfs(dst, "pull", name, check=False)
    assert refused.returncode == 1
    assert "--insecure" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    out = layerfs(dst, "pull", "--insecure", name).stdout.splitlines()
    assert out[0] == f"v1: Pulling from {repo}"
    assert sum(line.endswith(": Pull complete") for line in out) == 3
    assert out[-3].startswith("Digest: sha256:")
    assert out[-2] == f"Status: Downloaded newer image for {name}"
    assert out[-1] == name
    assert layerfs(dst, "images", "-q", "--no-trunc").stdout == samples.sample.id + "\n"
    again = layerfs(dst, "pull", "--insecure", name).stdout
    assert f"Status: Image is up to date for {name}" in again
    assert "Already exists" in again
    assert layerfs(dst, "pull", "-q", "--insecure", name).stdout == samples.sample.id + "\n"

    # push with the image's own name as the destination
    layerfs(dst, "tag", name, f"{repo}:v2")
    digest = layerfs(dst, "push", "-q", "--insecure", f"{repo}:v2")
    assert digest.stdout.strip() == out[-3].split()[1]


@pytest.mark.parametrize("fmt,compression", [("docker", "gzip"), ("docker", "none"),
                                             ("oci", "gzip"), ("oci", "zstd"),
                                             ("oci", "none")])
def test_manifest_formats(images: ImageStore, tmp_path: Path, plain_registry: Distribution,
                          samples: Samples, fmt: str, compression: str) -> None:
    images.load(samples.sample.path)
    repo = f"formats/{fmt}-{compression}"
    pushed = push(images, "sample", f"{plain_registry.host}/{repo}:1", format=fmt,
                  compression=compression, options=INSECURE)
    doc = manifest_of(plain_registry.url, repo, "1")
    expected_type = oci.MT_DOCKER_MANIFEST if fmt == "docker" else oci.MT_OCI_MANIFEST
    assert doc["mediaType"] == expected_type == pushed.media_type
    layer_types = {la["mediaType"] for la in doc["layers"]}  # type: ignore[attr-defined]
    from layerfs.distribution import MEDIA_TYPES
    assert layer_types == {MEDIA_TYPES[(fmt, compression)]}
    if compression == "none":
        assert [la["digest"] for la in doc["layers"]] == samples.sample.diff_ids  # type: ignore[attr-defined]
    other = open_overlay2(tmp_path / "other")
    try:
        result = pull(other, f"{plain_registry.host}/{repo}:1", options=INSECURE)
        assert result.image.id == samples.sample.id
        assert run_image(other, f"{plain_registry.host}/{repo}:1") == timg.SAMPLE_OUTPUT
    finally:
        close_images(other)


def test_docker_manifests_cannot_name_zstd(images: ImageStore, plain_registry: Distribution,
                                           samples: Samples) -> None:
    images.load(samples.sample.path)
    with pytest.raises(InvalidArgument, match="zstd"):
        push(images, "sample", f"{plain_registry.host}/x/y:1", format="docker",
             compression="zstd", options=INSECURE)


@pytest.mark.skipif(oci.host_platform()["architecture"] != "amd64",
                    reason=f"the index test image is amd64; this host is {platform.machine()}")
@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_index_resolves_to_a_platform(images: ImageStore, tmp_path: Path,
                                      plain_registry: Distribution, samples: Samples,
                                      fmt: str) -> None:
    images.load(samples.sample.path)
    cfg = timg.image_config([samples.busybox.diff_ids[0]], cmd=["sh"])
    cfg["architecture"], cfg["variant"] = "arm64", "v8"
    arm = timg.build_image(tmp_path / "arm.tar", [samples.layers[0]], name="bb-arm:1",
                           config=cfg)
    images.load(arm.path)
    repo = f"multi/{fmt}"
    host = plain_registry.host
    amd_push = push(images, "sample", f"{host}/{repo}:amd64", format=fmt, options=INSECURE)
    arm_push = push(images, "bb-arm:1", f"{host}/{repo}:arm64", format=fmt, options=INSECURE)
    index_type = oci.MT_OCI_INDEX if fmt == "oci" else oci.MT_DOCKER_LIST
    index = {"schemaVersion": 2, "mediaType": index_type, "manifests": [
        {"mediaType": arm_push.media_type, "digest": arm_push.digest, "size": arm_push.size,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": amd_push.media_type, "digest": amd_push.digest, "size": amd_push.size,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": amd_push.media_type, "digest": amd_push.digest, "size": amd_push.size,
         "platform": {"os": "unknown", "architecture": "unknown"}},
    ]}
    data = json.dumps(index).encode()
    r = httpx.put(f"{plain_registry.url}/v2/{repo}/manifests/latest", content=data,
                  headers={"Content-Type": index_type})
    assert r.status_code == 201, r.text

    native = open_overlay2(tmp_path / "native")
    try:
        result = pull(native, f"{host}/{repo}:latest", options=INSECURE)
        assert result.image.id == samples.sample.id
        assert result.index_digest == sha256_digest(data)
        assert result.manifest_digest == amd_push.digest
        arm_result = pull(native, f"{host}/{repo}:latest", platform="linux/arm64",
                          options=INSECURE)
        assert arm_result.image.id == arm.id
        # the layer the two platforms share is stored once
        assert native.get(arm.id).layers[0].layer_id == \
            native.get(samples.sample.id).layers[0].layer_id
        with pytest.raises(NotFound, match=r"no image for linux/s390x .*linux/arm64/v8, "
                                           r"linux/amd64\)"):
            pull(native, f"{host}/{repo}:latest", platform="linux/s390x", options=INSECURE)
        with pytest.raises(InvalidArgument, match="the image is linux/arm64, not linux/amd64"):
            pull(native, f"{host}/{repo}:arm64", platform="linux/amd64", options=INSECURE)
    finally:
        close_images(native)


def test_pull_by_digest_leaves_the_image_untagged(images: ImageStore, tmp_path: Path,
                                                  plain_registry: Distribution,
                                                  samples: Samples) -> None:
    images.load(samples.sample.path)
    pushed = push(images, "sample", f"{plain_registry.host}/bydigest/sample:1",
                  options=INSECURE)
    other = open_overlay2(tmp_path / "other")
    try:
        # one download at a time: the upper layers' downloads start while the base applies
        result = pull(other, f"{plain_registry.host}/bydigest/sample@{pushed.digest}",
                      options=RegistryOptions(insecure=True, max_concurrent=1))
        assert result.image.id == samples.sample.id and result.image.names == []
        assert result.name is None
    finally:
        close_images(other)


def test_pull_errors_are_one_clear_line(images: ImageStore, plain_registry: Distribution,
                                        samples: Samples) -> None:
    host = plain_registry.host
    with pytest.raises(NotFound, match=rf"{host}/nothing/here:1: not found \(HTTP 404\): "
                                       r"(manifest unknown|name unknown)"):
        pull(images, f"{host}/nothing/here:1", options=INSECURE)
    images.load(samples.sample.path)
    push(images, "sample", f"{host}/errors/sample:1", options=INSECURE)
    with pytest.raises(NotFound, match="manifest unknown"):
        pull(images, f"{host}/errors/sample:2", options=INSECURE)
    with pytest.raises(RegistryError, match=rf"^{host}: TLS handshake failed \(TLS: wrong "
                                            r"version number\); if it serves plain HTTP, "
                                            r"pass --insecure"):
        pull(images, f"{host}/errors/sample:1")
    with pytest.raises(InvalidArgument, match="names its registry"):
        pull(images, "busybox:latest", options=INSECURE)
    with pytest.raises(InvalidArgument, match="invalid image reference"):
        pull(images, f"{host}/Upper/Case:1", options=INSECURE)
    with pytest.raises(RegistryError, match="cannot reach"):
        pull(images, "127.0.0.1:1/x/y:1", options=RegistryOptions(insecure=True, retries=0))
    assert isinstance(RegistryError("x"), LayerfsError)


# --- what pushes and pulls skip -----------------------------------------------------------------

def test_push_skips_what_the_registry_has_and_mounts_across_repos(
        images: ImageStore, proxy: FaultProxy, samples: Samples) -> None:
    images.load(samples.sample.path)
    first = push(images, "sample", f"{proxy.host}/mount/a:1", options=INSECURE)
    assert len(first.uploaded) == 4
    assert len(proxy.requests("PATCH")) == 4

    proxy.clear()
    again = push(images, "sample", f"{proxy.host}/mount/a:1", options=INSECURE)
    assert again.digest == first.digest and not again.uploaded
    assert not proxy.requests("POST") and not proxy.requests("PATCH")
    assert len(proxy.requests("HEAD", r"/v2/mount/a/blobs/")) >= 4

    proxy.clear()
    other = push(images, "sample", f"{proxy.host}/mount/b:1", options=INSECURE)
    assert sorted(other.mounted) == sorted(first.uploaded) and not other.uploaded
    posts = proxy.requests("POST")
    assert len(posts) == 4
    assert all("mount=sha256" in p.path and "from=mount%2Fa" in p.path and p.status == 201
               for p in posts)
    assert not proxy.requests("PATCH")


def test_pull_skips_layers_already_stored(images: ImageStore, tmp_path: Path,
                                          plain_registry: Distribution, proxy: FaultProxy,
                                          samples: Samples) -> None:
    extra = timg.LayerTar().dir("extra").file("extra/x.txt", "x\n").bytes()
    derived = timg.build_image(tmp_path / "derived.tar", [samples.layers[0], extra],
                               name="derived:1", cmd=["cat", "/extra/x.txt"])
    images.load(samples.sample.path)
    images.load(derived.path)
    push(images, "sample", f"{plain_registry.host}/skip/sample:1", options=INSECURE)
    pushed = push(images, "derived:1", f"{plain_registry.host}/skip/derived:1",
                  options=INSECURE)
    base_blob = manifest_of(plain_registry.url, "skip/derived", "1")["layers"][0]["digest"]  # type: ignore[index]

    other = open_overlay2(tmp_path / "other")
    try:
        pull(other, f"{proxy.host}/skip/sample:1", options=INSECURE)
        assert len(proxy.requests("GET", base_blob)) == 1
        proxy.clear()
        result = pull(other, f"{proxy.host}/skip/derived:1", options=INSECURE)
        assert result.manifest_digest == pushed.digest
        assert (result.layers_present, result.layers_downloaded) == (1, 1)
        assert not proxy.requests("GET", base_blob), "the stored base was downloaded again"
        assert run_image(other, f"{proxy.host}/skip/derived:1") == "x\n"
        assert other.get(derived.id).layers[0].layer_id == \
            other.get(samples.sample.id).layers[0].layer_id
    finally:
        close_images(other)
