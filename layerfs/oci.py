"""Image formats: OCI image layouts and Docker's ``docker save`` archives.

Nothing here touches the layer store; :mod:`layerfs.images` drives it. This
module knows how images are written down:

* **descriptors** (``{mediaType, digest, size}``: :func:`parse_descriptor`), configs
  and platforms (:class:`Platform`); digests are :mod:`layerfs.digests`'s, names
  :mod:`layerfs.reference`'s;
* **sources**: an image archive as a directory or a tar, read member by member
  without unpacking it (:func:`open_source`; tars are indexed by
  :mod:`layerfs.tar.index`), with every name confined to the archive;
* **readers** for the two layouts, turning an archive into :class:`ImageToLoad`
  descriptions whose digests the loader then verifies while it streams;
* the writers for saving live with saving (:mod:`layerfs.images.save`).

Two layouts are accepted, in one archive each:

``docker save`` (docker-archive)::

    manifest.json              [{"Config": "<hex>.json", "RepoTags": [...], "Layers": [...]}]
    <hex>.json                 the image config; its sha256 is the image id
    <dir>/layer.tar            one uncompressed layer tar per layer (gzip/zstd accepted)
    repositories               legacy, ignored

OCI image layout (a directory, or a tar of one)::

    oci-layout                 {"imageLayoutVersion": "1.0.0"}
    index.json                 manifests (or nested indexes), names in annotations
    blobs/sha256/<hex>         manifests, configs and layers, each named by its digest

Docker 25 writes both at once; ``manifest.json`` wins when both are present,
since it carries the names.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .digests import (
    check_digest,
    hasher_for,
    is_digest,
    is_sha256_hex,
    sha256_digest,
    short_id,
    verify_bytes,
)
from .errors import InvalidArgument, LayerfsError, NotFound
from .reference import is_tag, looks_like_reference, parse_reference
from .tar.index import Member, members
from .tar.split import TarSplitRecorder
from .tar.stream import MAGIC_SIZE, Readable, compression_of, open_layer_stream

# --- media types ----------------------------------------------------------------------------

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = MT_OCI_LAYER + "+gzip"
MT_OCI_LAYER_ZSTD = MT_OCI_LAYER + "+zstd"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_LAYER_GZIP = MT_DOCKER_LAYER + ".gzip"
MT_DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = {MT_OCI_INDEX, MT_DOCKER_LIST}
MANIFEST_TYPES = {MT_OCI_MANIFEST, MT_DOCKER_MANIFEST}
LAYER_TYPES = {
    MT_OCI_LAYER, MT_OCI_LAYER_GZIP, MT_OCI_LAYER_ZSTD, MT_DOCKER_LAYER, MT_DOCKER_LAYER_GZIP,
    MT_DOCKER_FOREIGN,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
}
COMPRESSIONS = ("none", "gzip", "zstd")
OCI_LAYER_TYPE = {"none": MT_OCI_LAYER, "gzip": MT_OCI_LAYER_GZIP, "zstd": MT_OCI_LAYER_ZSTD}

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

#: Limits for the JSON documents read whole into memory (layers are streamed).
MAX_JSON = 32 << 20
#: Most image names one archive may give (every tag of every image): each becomes a row,
#: written in one transaction. ``docker save`` of a whole host rarely has a thousand.
MAX_NAMES = 10_000

# --- platform -------------------------------------------------------------------------------

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


def host_platform() -> dict[str, str]:
    machine = platform.machine().lower()
    return {"os": "linux", "architecture": _ARCH.get(machine, machine)}


@dataclass(frozen=True)
class Platform:
    """``OS/ARCH[/VARIANT]``, as image indexes and ``--platform`` name one."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> Platform:
        """``linux/arm64/v8``; empty or None: this host's platform."""
        if not text:
            host = host_platform()
            return cls(host["os"], host["architecture"])
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"platform {text!r}: expected OS/ARCH[/VARIANT], e.g. "
                                  f"linux/amd64 or linux/arm64/v8")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, p: dict[str, Any]) -> bool:
        """Whether an index entry's ``platform`` object is this platform."""
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        variant = p.get("variant")
        return variant == self.variant or (variant is None and self.architecture == "arm64"
                                           and self.variant == "v8")

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


# --- JSON -----------------------------------------------------------------------------------

def parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"{what} is not valid JSON: {err}") from None
    except RecursionError:
        # json's decoder recurses once per level: 100,000 '[' end the interpreter's stack.
        raise InvalidArgument(f"{what}: JSON nested too deep") from None


def canonical_json(value: Any) -> bytes:
    """Compact, key-sorted JSON: what layerfs writes, so equal content has equal digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def parse_config(data: bytes, what: str) -> dict[str, Any]:
    """Parse and sanity-check an image config (OCI and Docker share the format)."""
    config = parse_json(data, what)
    if not isinstance(config, dict):
        raise InvalidArgument(f"{what}: an image config must be a JSON object")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidArgument(f"{what}: rootfs.type must be \"layers\"")
    diff_ids = rootfs.get("diff_ids")
    if diff_ids is None:
        diff_ids = rootfs["diff_ids"] = []
    if not isinstance(diff_ids, list):
        raise InvalidArgument(f"{what}: rootfs.diff_ids must be a list")
    for i, d in enumerate(diff_ids):
        check_digest(d, f"{what}: rootfs.diff_ids[{i}]")
    for key in ("config", "history"):
        if key in config and config[key] is not None and not isinstance(
                config[key], dict if key == "config" else list):
            raise InvalidArgument(f"{what}: {key!r} has the wrong type")
    return config


# --- sources: reading members of an archive ---------------------------------------------

class Source(Protocol):
    """An image archive opened for reading; names are relative, ``/``-separated."""

    description: str

    def exists(self, name: str) -> bool: ...
    def size(self, name: str) -> int: ...
    def open(self, name: str) -> BinaryIO: ...


def clean_name(name: str, what: str) -> str:
    """Normalise a member name and refuse ones that leave the archive."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise InvalidArgument(f"{what}: bad path {name!r}")
    clean = posixpath.normpath(name.lstrip("/"))
    if clean in (".", "") or clean == ".." or clean.startswith("../"):
        raise InvalidArgument(f"{what}: path {name!r} points outside the archive")
    return clean


def read_member(src: Source, name: str, what: str, limit: int = MAX_JSON) -> bytes:
    if not src.exists(name):
        raise NotFound(f"{src.description}: {what} {name} is missing")
    size = src.size(name)
    if size > limit:
        raise InvalidArgument(f"{src.description}: {what} {name} is {size} bytes, "
                              f"more than the {limit}-byte limit")
    with src.open(name) as f:
        data = f.read(size + 1)
    if len(data) != size:
        raise InvalidArgument(f"{src.description}: {what} {name} is truncated")
    return data


class RangeReader(io.RawIOBase):
    """Reads ``size`` bytes at ``offset`` of an open fd (pread: no shared file position)."""

    def __init__(self, fd: int, offset: int, size: int, name: str) -> None:
        self._fd = fd
        self._pos = offset
        self._end = offset + size
        self.name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._end - self._pos)
        if n <= 0:
            return 0
        view = memoryview(buf).cast("B")[:n]
        got = os.preadv(self._fd, [view], self._pos)
        if got == 0:
            raise InvalidArgument(f"{self.name}: archive is truncated (member cut short)")
        self._pos += got
        return got


class DirSource:
    """An OCI layout or unpacked docker-archive in a directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.description = str(root)

    def _path(self, name: str) -> Path:
        clean = clean_name(name, self.description)
        path = (self.root / clean).resolve()
        if path != self.root and self.root not in path.parents:
            raise InvalidArgument(f"{self.description}: {name!r} resolves outside the layout")
        return path

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def open(self, name: str) -> BinaryIO:
        path = self._path(name)
        try:
            return open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise NotFound(f"{self.description}: {name} is missing") from None


class TarSource:
    """An uncompressed, seekable image tar, indexed once; members are read with pread.

    The index is strict where :mod:`tarfile` is lenient: a bad header checksum,
    a member running past the end of the file, or a missing end-of-archive
    marker each say the archive is corrupt or truncated.
    """

    def __init__(self, path: Path, description: str | None = None) -> None:
        self.path = Path(path)
        self.description = description or str(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.members = self._index()
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _index(self) -> dict[str, Member]:
        found: dict[str, Member] = {}
        for name, member in members(self._fd, self.description):
            with contextlib.suppress(InvalidArgument):
                found[clean_name(name, self.description)] = member
        return found

    def _resolve(self, name: str) -> Member | None:
        clean = clean_name(name, self.description)
        for _ in range(16):
            m = self.members.get(clean)
            if m is None or m.kind in (b"0", b"5"):
                return m
            if m.kind == b"1":
                clean = clean_name(m.link, self.description)
            elif m.kind == b"2":
                target = m.link if m.link.startswith("/") else posixpath.join(
                    posixpath.dirname(clean), m.link)
                clean = clean_name(target, self.description)
            else:
                return None
        raise InvalidArgument(f"{self.description}: archive is corrupt: too many links "
                              f"resolving {name!r}")

    def exists(self, name: str) -> bool:
        m = self._resolve(name)
        return m is not None and m.kind == b"0"

    def size(self, name: str) -> int:
        m = self._resolve(name)
        if m is None or m.kind != b"0":
            raise NotFound(f"{self.description}: {name} is missing")
        return m.size

    def open(self, name: str) -> BinaryIO:
        m = self._resolve(name)
        if m is None or m.kind != b"0":
            raise NotFound(f"{self.description}: {name} is missing")
        return RangeReader(self._fd, m.offset, m.size,  # type: ignore[return-value]
                           f"{self.description}: {name}")


@contextlib.contextmanager
def open_source(path: str | os.PathLike[str] | None, scratch: Path, *,
                stream: BinaryIO | None = None,
                progress: Any = None) -> Iterator[Source]:
    """Open an image archive: a directory, a tar, a gzip/zstd-compressed tar, or ``stream``.

    Compressed archives and streams are first copied (decompressed) into
    ``scratch``, because layers are read in the order the manifest names them,
    not in archive order.
    """
    if stream is None:
        assert path is not None
        p = Path(path)
        if p.is_dir():
            yield DirSource(p)
            return
        if not p.exists():
            raise NotFound(f"{p}: no such file or directory")
        with open(p, "rb") as f:
            compression = compression_of(f.read(MAGIC_SIZE))
        if not compression:
            src = TarSource(p)
            try:
                yield src
            finally:
                src.close()
            return
        raw_cm: Any = open(p, "rb")
        description = str(p)
        total: int | None = p.stat().st_size
    else:
        raw_cm = contextlib.nullcontext(stream)
        description = "stdin"
        total = None
    scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix="load-", suffix=".tar", dir=scratch)
    try:
        with raw_cm as raw, os.fdopen(fd, "wb") as out:
            counted = _Counting(raw, progress, "reading archive", total)
            try:
                plain = open_layer_stream(counted)
                shutil.copyfileobj(plain, out, 1 << 20)
            except (EOFError, OSError, ValueError) as err:
                if isinstance(err, LayerfsError):
                    raise
                raise InvalidArgument(f"{description}: archive is corrupt or truncated: "
                                      f"{err}") from err
            finally:
                counted.done()
        src = TarSource(Path(tmp_name), description)
        try:
            yield src
        finally:
            src.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


class _Counting(io.RawIOBase):
    """Pass-through reader reporting progress (bytes read of the compressed input)."""

    def __init__(self, raw: Readable, progress: Any, what: str, total: int | None) -> None:
        self._raw = raw
        self._progress = progress
        self._key = f"archive:{id(self)}"
        if progress is not None:
            progress.begin(self._key, what, total)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        readinto = getattr(self._raw, "readinto", None)
        if readinto is not None:
            n = readinto(buf) or 0
        else:
            data = self._raw.read(len(buf))
            n = len(data)
            buf[:n] = data
        if self._progress is not None and n:
            self._progress.advance(self._key, n)
        return n

    def done(self) -> None:
        if self._progress is not None:
            self._progress.end(self._key)


# --- reading image descriptions -------------------------------------------------------------

@dataclass
class LayerToLoad:
    """One layer blob named by a manifest."""

    path: str                  # member of the source
    diff_id: str               # sha256 of the uncompressed tar (from the config)
    digest: str | None         # sha256 of the blob as stored (None: docker-archive, unknown)
    size: int | None           # size of the blob as stored, if the manifest says
    media_type: str | None = None


@dataclass
class ImageToLoad:
    """An image found in an archive, with everything needed to verify it."""

    config_bytes: bytes
    config: dict[str, Any]
    layers: list[LayerToLoad]
    names: list[str] = field(default_factory=list)
    where: str = ""

    @property
    def id(self) -> str:
        return sha256_digest(self.config_bytes)


def read_images(src: Source, *, repo: str | None = None) -> list[ImageToLoad]:
    """Every image in the archive (docker-archive or OCI layout), digests not yet verified.

    ``repo`` names images whose OCI ``ref.name`` is a bare tag (``latest``), as
    umoci and skopeo write them; without it such images load untagged.
    """
    if src.exists("manifest.json"):
        images = read_docker_archive(src)
    elif src.exists("index.json"):
        images = read_oci_layout(src, repo=repo)
    else:
        raise InvalidArgument(f"{src.description}: not an image archive: neither manifest.json "
                              f"(docker save) nor index.json (OCI layout) found")
    for image in images:
        for layer in image.layers:
            if not src.exists(layer.path):
                raise NotFound(f"{src.description}: {image.where} names layer blob "
                               f"{layer.path}, which is missing from the archive")
            if layer.size is not None and src.size(layer.path) != layer.size:
                raise InvalidArgument(f"{src.description}: layer blob {layer.path} is "
                                      f"{src.size(layer.path)} bytes, the manifest says "
                                      f"{layer.size}")
    return images


def _digest_in_name(path: str) -> str | None:
    """The digest a docker-archive member name encodes (``<hex>.json``, ``blobs/sha256/<hex>``)."""
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and is_digest(f"{parts[1]}:{parts[2]}"):
        return f"{parts[1]}:{parts[2]}"
    base = parts[-1].removesuffix(".json")
    if is_sha256_hex(base):
        return f"sha256:{base}"
    return None


def read_docker_archive(src: Source) -> list[ImageToLoad]:
    manifest = parse_json(read_member(src, "manifest.json", "manifest"),
                          f"{src.description}: manifest.json")
    if not isinstance(manifest, list):
        raise InvalidArgument(f"{src.description}: manifest.json must be a JSON list")
    # One image listed N times (one entry per tag) is read once, its names merged:
    # reading and loading it N times cost N² (N=4000: 64 s, 1.2 GB).
    images: dict[str, ImageToLoad] = {}
    names_seen: dict[str, set[str]] = {}
    total_names = 0
    for i, entry in enumerate(manifest):
        where = f"manifest.json entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or \
                not isinstance(entry.get("Layers"), list):
            raise InvalidArgument(f"{src.description}: {where} needs \"Config\" and \"Layers\"")
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list):
            raise InvalidArgument(f"{src.description}: {where}: RepoTags must be a list")
        total_names += len(tags)
        if total_names > MAX_NAMES:
            raise InvalidArgument(f"{src.description}: manifest.json gives more than "
                                  f"{MAX_NAMES} image names")
        config_path = clean_name(entry["Config"], where)
        known = images.get(config_path)
        if known is not None:
            if [clean_name(p, where) if isinstance(p, str) else p for p in entry["Layers"]] \
                    != [la.path for la in known.layers]:
                raise InvalidArgument(f"{src.description}: {where} lists other layers for "
                                      f"{config_path} than an earlier entry")
            _add_names(known, names_seen[config_path], tags, src.description, where)
            continue
        config_bytes = read_member(src, config_path, f"{where}: config")
        named = _digest_in_name(config_path)
        if named is not None:
            verify_bytes(config_bytes, named, f"{src.description}: config {config_path}")
        config = parse_config(config_bytes, f"{src.description}: config {config_path}")
        diff_ids = config["rootfs"]["diff_ids"]
        paths = entry["Layers"]
        if len(paths) != len(diff_ids):
            raise InvalidArgument(f"{src.description}: {where} lists {len(paths)} layers, "
                                  f"its config has {len(diff_ids)} diff ids")
        layers = []
        for path, diff_id in zip(paths, diff_ids, strict=True):
            if not isinstance(path, str):
                raise InvalidArgument(f"{src.description}: {where}: bad layer path {path!r}")
            clean = clean_name(path, where)
            layers.append(LayerToLoad(clean, diff_id, _digest_in_name(clean), None))
        image = ImageToLoad(config_bytes, config, layers, [], f"{where} ({config_path})")
        names_seen[config_path] = set()
        _add_names(image, names_seen[config_path], tags, src.description, where)
        images[config_path] = image
    return list(images.values())


def _add_names(image: ImageToLoad, seen: set[str], tags: list[Any], description: str,
               where: str) -> None:
    for tag in tags:
        if not isinstance(tag, str):
            raise InvalidArgument(f"{description}: {where}: bad RepoTags entry {tag!r}")
        name = parse_reference(tag)
        if name not in seen:
            seen.add(name)
            image.names.append(name)


def _blob_path(digest: str) -> str:
    alg, hexpart = digest.split(":", 1)
    return f"blobs/{alg}/{hexpart}"


@dataclass(frozen=True)
class Descriptor:
    """What a manifest or index says about a blob: its media type, digest and size."""

    media_type: str     # "" when the descriptor names none
    digest: str
    size: int


def parse_descriptor(desc: object, what: str) -> Descriptor:
    """A descriptor object, checked: a JSON object with a well-formed digest and a size
    that is a non-negative integer (JSON ``true`` is not a size)."""
    if not isinstance(desc, dict):
        raise InvalidArgument(f"{what}: a descriptor must be a JSON object")
    digest = check_digest(desc.get("digest"), f"{what}: digest")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what}: bad size {size!r}")
    media_type = desc.get("mediaType")
    return Descriptor(media_type if isinstance(media_type, str) else "", digest, size)


def _read_blob(src: Source, digest: str, size: int, what: str) -> bytes:
    path = _blob_path(digest)
    if not src.exists(path):
        raise NotFound(f"{src.description}: {what} names blob {digest}, which is missing "
                       f"from the archive")
    data = read_member(src, path, what)
    if len(data) != size:
        raise InvalidArgument(f"{src.description}: {what} {digest} is {len(data)} bytes, "
                              f"the descriptor says {size}")
    verify_bytes(data, digest, f"{src.description}: {what}")
    return data


def read_oci_layout(src: Source, *, repo: str | None = None) -> list[ImageToLoad]:
    if src.exists("oci-layout"):
        layout = parse_json(read_member(src, "oci-layout", "oci-layout"),
                            f"{src.description}: oci-layout")
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise InvalidArgument(f"{src.description}: unsupported OCI layout version "
                                  f"{version!r}")
    index = parse_json(read_member(src, "index.json", "index"), f"{src.description}: index.json")
    images: dict[str, ImageToLoad] = {}
    _walk_index(src, index, "index.json", None, images, repo, depth=0)
    for image in images.values():
        image.names = list(dict.fromkeys(image.names))
    if sum(len(image.names) for image in images.values()) > MAX_NAMES:
        raise InvalidArgument(f"{src.description}: the index gives more than {MAX_NAMES} "
                              f"image names")
    return list(images.values())


def _names_from(annotations: object, repo: str | None) -> list[str]:
    if not isinstance(annotations, dict):
        return []
    full = annotations.get(ANNOTATION_CONTAINERD_NAME)
    if isinstance(full, str) and looks_like_reference(full):
        return [parse_reference(full)]
    ref = annotations.get(ANNOTATION_REF_NAME)
    if not isinstance(ref, str) or not ref:
        return []
    if ":" in ref or "/" in ref:
        return [parse_reference(ref)] if looks_like_reference(ref) else []
    if repo is not None and is_tag(ref):
        return [parse_reference(f"{repo}:{ref}")]
    return []


def _walk_index(src: Source, index: object, where: str, annotations: object,
                images: dict[str, ImageToLoad], repo: str | None, depth: int) -> None:
    if depth > 4:
        raise InvalidArgument(f"{src.description}: {where}: indexes nested too deep")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidArgument(f"{src.description}: {where} must have a \"manifests\" list")
    want = Platform.parse(None)
    candidates = index["manifests"]
    matching = [d for d in candidates if isinstance(d, dict) and (
        not isinstance(d.get("platform"), dict) or want.matches(d["platform"]))]
    if depth > 0:
        # A multi-platform index: the manifest for this host only.
        if candidates and not matching:
            raise InvalidArgument(f"{src.description}: {where} has no image for {want}")
        candidates = matching[:1]
    elif matching:
        # Top level: images for other platforms are skipped when this one has some.
        candidates = matching
    for i, desc in enumerate(candidates):
        what = f"{where} manifests[{i}]"
        d = parse_descriptor(desc, what)
        digest, media_type = d.digest, d.media_type
        names = _names_from(desc.get("annotations"), repo) or _names_from(annotations, repo)
        data = _read_blob(src, digest, d.size, what)
        doc = parse_json(data, f"{src.description}: {what} ({digest})")
        media_type = media_type or (doc.get("mediaType", "") if isinstance(doc, dict) else "")
        if media_type in INDEX_TYPES or (isinstance(doc, dict) and "manifests" in doc):
            _walk_index(src, doc, f"index {short_id(digest)}", desc.get("annotations")
                        or annotations, images, repo, depth + 1)
            continue
        image = _read_manifest(src, doc, f"manifest {digest}")
        known = images.get(image.id)
        if known is None:
            image.names = names
            images[image.id] = image
        else:
            known.names.extend(names)   # duplicates go in read_oci_layout, once
        if len(images[image.id].names) > MAX_NAMES:
            raise InvalidArgument(f"{src.description}: the index gives more than {MAX_NAMES} "
                                  f"image names")


def manifest_config(doc: object, where: str) -> Descriptor:
    """The config descriptor of an image manifest (which must also list its layers)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
        raise InvalidArgument(f"{where} must have a \"layers\" list")
    return parse_descriptor(doc.get("config"), f"{where}: config")


def manifest_layers(doc: dict[str, Any], diff_ids: list[str], where: str) -> list[Descriptor]:
    """The layer descriptors of an image manifest, one per diff id of its config, each
    naming a layer tar."""
    descs = doc["layers"]
    if len(descs) != len(diff_ids):
        raise InvalidArgument(f"{where} lists {len(descs)} layers, its config has "
                              f"{len(diff_ids)} diff ids")
    layers = [parse_descriptor(desc, f"{where}: layers[{i}]") for i, desc in enumerate(descs)]
    for d in layers:
        if d.media_type and d.media_type not in LAYER_TYPES:
            raise InvalidArgument(f"{where}: layer {d.digest} has media type "
                                  f"{d.media_type!r}, which is not a layer tar")
    return layers


def _read_manifest(src: Source, doc: object, where: str) -> ImageToLoad:
    where = f"{src.description}: {where}"
    c = manifest_config(doc, where)
    assert isinstance(doc, dict)
    config_bytes = _read_blob(src, c.digest, c.size, f"{where}: config")
    config = parse_config(config_bytes, f"{src.description}: config {c.digest}")
    diff_ids = config["rootfs"]["diff_ids"]
    layers = []
    for d, diff_id in zip(manifest_layers(doc, diff_ids, where), diff_ids, strict=True):
        path = _blob_path(d.digest)
        if not src.exists(path) and ("foreign" in d.media_type or
                                     "nondistributable" in d.media_type):
            raise NotFound(f"{where}: foreign layer {d.digest} is not in the archive "
                           f"(layerfs does not download layers)")
        layers.append(LayerToLoad(path, diff_id, d.digest, d.size, d.media_type))
    return ImageToLoad(config_bytes, config, layers, [], where)


# --- verifying readers ------------------------------------------------------------------------

class DigestReader(io.RawIOBase):
    """Pass-through reader that hashes (and counts) what it reads and checks it at the end.

    ``expected`` and ``expected_size`` are checked as soon as the stream ends,
    inside the read that sees the end, so a consumer that reads to the end
    (:func:`~layerfs.tar.apply_layer` drains its input) fails *before* it
    returns; :meth:`finish` drains and checks for consumers that stop early.
    With a :class:`TarSplitRecorder` the stream is also recorded for an exact
    re-export later.
    """

    def __init__(self, raw: Readable, what: str, *, expected: str | None = None,
                 expected_size: int | None = None, algorithm: str = "sha256",
                 recorder: TarSplitRecorder | None = None, progress: Any = None,
                 progress_key: str | None = None, hashing: bool = True) -> None:
        self._raw = raw
        self._readinto = getattr(raw, "readinto", None)
        self.what = what
        self.expected = expected
        self.expected_size = expected_size
        # Without an expected digest the hash is only worth computing if asked for.
        self._hash = hasher_for(expected) if expected else (
            hashlib.new(algorithm) if hashing else None)
        self._alg = expected.split(":", 1)[0] if expected else algorithm
        self.size = 0
        self.recorder = recorder
        self._progress = progress
        self._key = progress_key
        self._checked = False
        self.digest: str | None = None

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1, /) -> bytes:
        return super().read(n) or b""  # None only from a non-blocking raw stream

    def readinto(self, buf: Any) -> int:
        if self._readinto is not None:
            n = self._readinto(buf) or 0
        else:
            data = self._raw.read(len(buf))
            n = len(data)
            buf[:n] = data
        if n:
            view = memoryview(buf)[:n]
            if self._hash is not None:
                self._hash.update(view)
            self.size += n
            if self.recorder is not None:
                self.recorder.feed(view)
            if self._progress is not None:
                self._progress.advance(self._key, n)
            if self.expected_size is not None and self.size > self.expected_size:
                raise InvalidArgument(f"{self.what}: longer than the {self.expected_size} "
                                      f"bytes the manifest says")
        else:
            self._check()
        return n

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._hash is None:
            self.digest = None
        else:
            self.digest = f"{self._alg}:{self._hash.hexdigest()}"
        if self.expected_size is not None and self.size != self.expected_size:
            raise InvalidArgument(f"{self.what}: truncated: {self.size} of "
                                  f"{self.expected_size} bytes")
        if self.expected is not None and self.digest != self.expected:
            raise InvalidArgument(f"{self.what}: digest mismatch: expected {self.expected}, "
                                  f"got {self.digest}")

    def finish(self) -> str | None:
        """Read whatever is left, check size and digest, return the digest (if hashed)."""
        buf = bytearray(1 << 20)
        while self.readinto(buf):
            pass
        self._check()
        return self.digest
