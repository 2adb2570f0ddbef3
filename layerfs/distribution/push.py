"""Pushing an image (:func:`push`): for each layer, a blob the registry already has
(``HEAD``) is skipped, a blob known to be in another repository of the same registry is
cross-mounted (``POST ...?mount=&from=``), and only the rest is compressed (gzip by
default, zstd or none for OCI) and uploaded, in parallel. The config is pushed verbatim,
so the image id is the same everywhere.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from .. import oci
from ..digests import HashingWriter, short_id
from ..downloads import Cancelled
from ..driver import scratch_prefix
from ..errors import InvalidArgument
from ..reference import RemoteReference
from ..tar import Readable
from .blobs import compression_of, ensure_schema, known_blobs, record_blobs
from .errors import RegistryError
from .transport import CHUNK, Registry, RegistryOptions

if TYPE_CHECKING:
    from ..images import ImageLayer, ImageStore, Progress

log = logging.getLogger(__name__)

# --- push ---------------------------------------------------------------------------------

@dataclass
class PushResult:
    reference: RemoteReference
    digest: str                 # of the manifest pushed
    size: int                   # of the manifest
    media_type: str
    uploaded: list[str] = field(default_factory=list)    # blob digests uploaded
    existing: list[str] = field(default_factory=list)    # already in the repository
    mounted: list[str] = field(default_factory=list)     # cross-mounted from another repo


class _FileBody:
    """A request body read from a file, re-iterable (httpx may send it again after a 401)."""

    def __init__(self, path: Path, progress: Progress | None = None, key: str = "",
                 cancel: threading.Event | None = None) -> None:
        self.path = path
        self.progress = progress
        self.key = key
        self.cancel = cancel

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                if self.cancel is not None and self.cancel.is_set():
                    raise Cancelled("push cancelled")
                if self.progress is not None:
                    self.progress.advance(self.key, len(chunk))
                yield chunk


MEDIA_TYPES = {
    ("docker", "gzip"): oci.MT_DOCKER_LAYER_GZIP, ("docker", "none"): oci.MT_DOCKER_LAYER,
    ("oci", "gzip"): oci.MT_OCI_LAYER_GZIP, ("oci", "none"): oci.MT_OCI_LAYER,
    ("oci", "zstd"): oci.MT_OCI_LAYER_ZSTD,
}


def _prepare_blob(images: ImageStore, layer: ImageLayer, compression: str,
                  progress: Progress | None) -> tuple[Path, str, int]:
    """Write the layer's blob (its exact tar, compressed) to a scratch file: (path, digest,
    size). gzip uses a zero mtime and no name, so the same layer gives the same blob."""
    import zstandard

    images.scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix("images-push", layer.chain_id[7:]),
                               dir=images.scratch)
    key = f"compress:{layer.chain_id}"
    if progress is not None:
        progress.begin(key, f"{short_id(layer.diff_id)} prepare", layer.tar_size)
    try:
        with os.fdopen(fd, "wb") as f, images.open_layer_tar(layer) as tar:
            out = HashingWriter(f)
            if compression == "gzip":
                with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6,
                                   mtime=0, filename="") as gz:
                    _copy(tar, gz, progress, key)
            elif compression == "zstd":
                cctx = zstandard.ZstdCompressor(level=3)
                with cctx.stream_writer(out, closefd=False) as zw:  # type: ignore[arg-type]
                    _copy(tar, zw, progress, key)
            else:
                _copy(tar, out, progress, key)
        return Path(tmp), out.digest, out.size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if progress is not None:
            progress.end(key)


def _copy(src: Readable, dst: Any, progress: Progress | None, key: str) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        if progress is not None:
            progress.advance(key, len(chunk))


def push(images: ImageStore, source: str, destination: str | None = None, *,
         format: str = "docker", compression: str = "gzip",
         options: RegistryOptions | None = None, progress: Progress | None = None,
         report: Callable[[str], None] | None = None) -> PushResult:
    """Push image ``source`` (a name or id) to ``destination`` (``REGISTRY/REPO[:TAG]``;
    default: ``source`` itself). ``format``: ``docker`` (v2 schema 2, what ``docker
    push`` writes) or ``oci``; ``compression`` of new layer blobs: ``gzip``, ``zstd``
    (oci only) or ``none``."""
    if format not in ("docker", "oci"):
        raise InvalidArgument(f"unknown manifest format {format!r}: use docker or oci")
    if (format, compression) not in MEDIA_TYPES:
        raise InvalidArgument(f"compression {compression!r} with format {format!r}: docker "
                              f"manifests take gzip or none; oci takes gzip, zstd or none")
    image = images.get(source)
    ref = RemoteReference.parse(destination or source)
    if ref.digest:
        raise InvalidArgument(f"{ref}: push to a tag, not a digest (the digest is the "
                              f"result)")
    assert ref.tag is not None
    opts = options or RegistryOptions()
    if opts.insecure and not ref.explicit_registry:
        raise InvalidArgument(f"{ref}: --insecure needs a reference that names its registry "
                              f"host explicitly")
    say = report or (lambda line: None)
    ensure_schema(images)
    config_bytes = images.config_bytes(image.id)
    repo = ref.repository
    result_layers: list[dict[str, Any]] = []
    result = PushResult(ref, "", 0, "")
    temps: list[Path] = []
    cancel = threading.Event()
    with Registry(ref.registry, opts) as reg, \
            ThreadPoolExecutor(max_workers=max(1, opts.max_concurrent),
                               thread_name_prefix="layerfs-push") as pool:
        reg.auth.add_scope(f"repository:{repo}:pull,push")
        candidates = {la.diff_id: [row for row in known_blobs(images, la.diff_id, ref.registry)
                                   if compression_of(row["media_type"]) == compression]
                      for la in image.layers}
        config_rows = known_blobs(images, image.id, ref.registry)
        sources = sorted({row["repository"] for rows in [*candidates.values(), config_rows]
                          for row in rows if row["repository"] != repo})[:8]
        for other in sources:
            reg.auth.add_scope(f"repository:{other}:pull")
        reg.ping()
        uploads: list[Future[None]] = []
        done: dict[str, tuple[str, int]] = {}
        recorded: list[tuple[str, str, str, int]] = []
        media_type = MEDIA_TYPES[(format, compression)]
        try:
            for layer in image.layers:
                short = short_id(layer.diff_id)
                if layer.diff_id in done:
                    digest, size = done[layer.diff_id]
                    result_layers.append({"mediaType": media_type, "digest": digest,
                                          "size": size})
                    continue
                found = _reuse(reg, repo, candidates[layer.diff_id], result, say)
                if found is None:
                    path, digest, size = _prepare_blob(images, layer, compression, progress)
                    temps.append(path)
                    if reg.blob_exists(repo, digest) is not None:
                        result.existing.append(digest)
                        say(f"{short_id(digest)}: Layer already exists")
                    else:
                        uploads.append(pool.submit(_upload, reg, repo, digest, size, path,
                                                   progress, say, result, cancel))
                    found = (digest, size)
                done[layer.diff_id] = found
                recorded.append((layer.diff_id, found[0], media_type, found[1]))
                result_layers.append({"mediaType": media_type, "digest": found[0],
                                      "size": found[1]})
                log.debug("layer %s -> %s", short, found[0])
            image_id = image.id
            if reg.blob_exists(repo, image_id) is None and \
                    _reuse(reg, repo, config_rows, result, lambda line: None) is None:
                body_path = _write_temp(images, config_bytes)
                temps.append(body_path)
                uploads.append(pool.submit(_upload, reg, repo, image_id, len(config_bytes),
                                           body_path, None, None, result, cancel))
            for fut in uploads:
                fut.result()
        except BaseException:
            cancel.set()
            for fut in uploads:
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for path in temps:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if format == "docker":
            manifest_type, config_type = oci.MT_DOCKER_MANIFEST, oci.MT_DOCKER_CONFIG
        else:
            manifest_type, config_type = oci.MT_OCI_MANIFEST, oci.MT_OCI_CONFIG
        manifest = {"schemaVersion": 2, "mediaType": manifest_type,
                    "config": {"mediaType": config_type, "digest": image_id,
                               "size": len(config_bytes)},
                    "layers": result_layers}
        data = json.dumps(manifest, indent=3).encode()
        result.digest = reg.put_manifest(repo, ref.tag, data, manifest_type)
        recorded.append((image_id, image_id, config_type, len(config_bytes)))
        result.size = len(data)
        result.media_type = manifest_type
    record_blobs(images, ref.registry, repo, recorded)
    say(f"{ref.tag}: digest: {result.digest} size: {result.size}")
    return result


def _write_temp(images: ImageStore, data: bytes) -> Path:
    images.scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=scratch_prefix("images-push", "config"),
                               dir=images.scratch)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(tmp)


def _reuse(reg: Registry, repo: str, rows: Sequence[Any], result: PushResult,
           say: Callable[[str], None]) -> tuple[str, int] | None:
    """A blob for this layer the registry has (HEAD) or can mount from another repository."""
    for row in rows:
        if row["repository"] == repo and reg.blob_exists(repo, row["digest"]) is not None:
            result.existing.append(row["digest"])
            say(f"{short_id(row['digest'])}: Layer already exists")
            return row["digest"], row["size"]
    for row in rows:
        if row["repository"] == repo:
            continue
        try:
            location = reg.mount_blob(repo, row["digest"], row["repository"])
        except RegistryError as err:
            log.debug("mount of %s from %s failed: %s", row["digest"], row["repository"], err)
            continue
        if location is None:
            result.mounted.append(row["digest"])
            say(f"{short_id(row['digest'])}: Mounted from {row['repository']}")
            return row["digest"], row["size"]
        with contextlib.suppress(RegistryError, httpx.HTTPError):
            reg.request("DELETE", "", url=location, expect=(200, 202, 204, 404),
                        what="cancel upload", retry=False)
        if reg.blob_exists(repo, row["digest"]) is not None:
            result.existing.append(row["digest"])
            return row["digest"], row["size"]
    return None


def _upload(reg: Registry, repo: str, digest: str, size: int, path: Path,
            progress: Progress | None, say: Callable[[str], None] | None,
            result: PushResult, cancel: threading.Event) -> None:
    key = f"upload:{digest}"
    if progress is not None:
        progress.begin(key, f"{short_id(digest)} upload", size)
    try:
        reg.upload_blob(repo, digest, size, _FileBody(path, progress, key, cancel))
    finally:
        if progress is not None:
            progress.end(key)
    result.uploaded.append(digest)
    if say is not None:
        say(f"{short_id(digest)}: Pushed")

