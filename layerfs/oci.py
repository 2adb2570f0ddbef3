"""Image formats: OCI image layouts and Docker's ``docker save`` archives.

Nothing here touches the layer store; :mod:`layerfs.images` drives it. This
module knows how images are written down:

* **digests** (``sha256:<hex>``) and **chain ids**, the content addresses of
  blobs and of layer stacks;
* **references** (``NAME[:TAG]``), normalised the way ``docker`` shows them
  (``docker.io/library/busybox:latest`` is ``busybox:latest``);
* **sources**: an image archive as a directory or a tar, read member by member
  without unpacking it (:func:`open_source`), with every name confined to the
  archive;
* **readers** for the two layouts, turning an archive into :class:`ImageToLoad`
  descriptions whose digests the loader then verifies while it streams;
* **writers** for saving (:class:`TarArchiveWriter`, :class:`DirArchiveWriter`).

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
import re
import shutil
import stat
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from .errors import InvalidArgument, LayerfsError, NotFound

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

# --- digests --------------------------------------------------------------------------------

_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_HEX64_RE = re.compile(r"^[a-f0-9]{64}$")


def check_digest(value: object, what: str) -> str:
    """``value`` if it is a well-formed ``sha256:``/``sha512:`` digest, else InvalidArgument."""
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise InvalidArgument(f"{what}: {value!r} is not a sha256/sha512 digest")
    return value


def hasher_for(digest: str) -> Any:
    """A fresh hashlib object of ``digest``'s algorithm."""
    return hashlib.new(digest.split(":", 1)[0])


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Chain ids of a layer stack (OCI image spec): ``C0 = D0``, ``Cn = sha256(Cn-1 + " " + Dn)``.

    The chain id names a layer *together with everything below it*: the same
    diff applied on two different parents gives two different layers on disk.
    """
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


def short_id(digest: str, n: int = 12) -> str:
    return digest.split(":", 1)[-1][:n]


# --- references -----------------------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?|localhost)"
_REPO_RE = re.compile(rf"^(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DEFAULT_TAG = "latest"


def split_reference(text: str) -> tuple[str, str | None]:
    """``repo[:tag]`` → (repo, tag or None). A ``:`` before the last ``/`` is a port."""
    repo, tag = text, None
    colon = text.rfind(":")
    if colon > text.rfind("/"):
        repo, tag = text[:colon], text[colon + 1:]
    return repo, tag


def normalize_repo(repo: str) -> str:
    """Docker Hub names in their short form: ``docker.io/library/x`` → ``x``."""
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/",
                   "index.docker.io/"):
        if repo.startswith(prefix) and len(repo) > len(prefix):
            return repo[len(prefix):]
    return repo


def parse_reference(text: str, *, default_tag: str = DEFAULT_TAG) -> str:
    """Validate ``NAME[:TAG]`` and return it normalised as ``name:tag``."""
    if "@" in text:
        raise InvalidArgument(f"image name {text!r}: digest references (NAME@sha256:...) are "
                              f"not supported here; use NAME[:TAG] or an image id")
    repo, tag = split_reference(text)
    repo = normalize_repo(repo)
    if not _REPO_RE.match(repo) or len(repo) > 255:
        raise InvalidArgument(f"invalid image name {text!r}: use lowercase letters, digits and "
                              f"'._-' separated by '/', e.g. busybox or lab/busybox:1.36")
    if tag is None:
        tag = default_tag
    if not _TAG_RE.match(tag):
        raise InvalidArgument(f"invalid tag in {text!r}: use letters, digits and '_.-' "
                              f"(at most 128, not starting with '.' or '-')")
    return f"{repo}:{tag}"


def looks_like_reference(text: str) -> bool:
    try:
        parse_reference(text)
    except InvalidArgument:
        return False
    return True


# --- platform -------------------------------------------------------------------------------

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


def host_platform() -> dict[str, str]:
    machine = platform.machine().lower()
    return {"os": "linux", "architecture": _ARCH.get(machine, machine)}


# --- JSON -----------------------------------------------------------------------------------

def parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"{what} is not valid JSON: {err}") from None


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


def _clean_name(name: str, what: str) -> str:
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
        self.name = name  # type: ignore[misc]

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
        clean = _clean_name(name, self.description)
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
            return open(path, "rb", buffering=0)  # type: ignore[return-value]
        except FileNotFoundError:
            raise NotFound(f"{self.description}: {name} is missing") from None


@dataclass(frozen=True)
class _Member:
    kind: bytes     # b"0" file, b"1" hardlink, b"2" symlink, b"5" dir
    offset: int
    size: int
    link: str = ""


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

    def _corrupt(self, msg: str) -> InvalidArgument:
        return InvalidArgument(f"{self.description}: archive is corrupt: {msg}")

    def _truncated(self, msg: str) -> InvalidArgument:
        return InvalidArgument(f"{self.description}: archive is truncated: {msg}")

    def _index(self) -> dict[str, _Member]:
        total = os.fstat(self._fd).st_size
        members: dict[str, _Member] = {}
        pos = 0
        pax: dict[str, str] = {}
        long_name: str | None = None
        long_link: str | None = None
        while True:
            block = os.pread(self._fd, 512, pos)
            if len(block) < 512:
                if pos == 0:
                    raise InvalidArgument(f"{self.description}: not an image archive (empty "
                                          f"or not a tar)")
                raise self._truncated("it ends without an end-of-archive marker")
            if block == bytes(512):
                return members
            name_b = block[0:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar":
                prefix = block[345:500].split(b"\0", 1)[0]
                if prefix:
                    name_b = prefix + b"/" + name_b
            try:
                stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                stored = -1
            unsigned = sum(block[:148]) + sum(block[156:]) + 256
            if stored != unsigned:
                if pos == 0:
                    raise InvalidArgument(f"{self.description}: not an image archive (not a "
                                          f"tar, or compressed with something other than "
                                          f"gzip or zstd)")
                raise self._corrupt(f"bad header checksum at offset {pos}")
            size = _tar_number(block[124:136])
            flag = block[156:157]
            data = pos + 512
            end = data + size + (-size % 512)
            if data + size > total:
                raise self._truncated(f"member {os.fsdecode(name_b)!r} is cut short")
            if flag in (b"x", b"g", b"L", b"K"):
                if size > MAX_JSON:
                    raise self._corrupt(f"extended header of {size} bytes")
                payload = os.pread(self._fd, size, data)
                if flag == b"x":
                    pax.update(_pax_records(payload))
                elif flag == b"L":
                    long_name = os.fsdecode(payload.rstrip(b"\0"))
                elif flag == b"K":
                    long_link = os.fsdecode(payload.rstrip(b"\0"))
                pos = end
                continue
            name = pax.get("path") or long_name or os.fsdecode(name_b)
            link = pax.get("linkpath") or long_link or os.fsdecode(
                block[157:257].split(b"\0", 1)[0])
            if "size" in pax:
                size = int(pax["size"])
                end = data + size + (-size % 512)
                if data + size > total:
                    raise self._truncated(f"member {name!r} is cut short")
            pax, long_name, long_link = {}, None, None
            kind = b"0" if flag in (b"\0", b"7") else flag
            if kind == b"0" and name.endswith("/"):
                kind = b"5"
            with contextlib.suppress(InvalidArgument):
                members[_clean_name(name, self.description)] = _Member(
                    kind, data, size if kind == b"0" else 0, link)
            pos = end

    def _resolve(self, name: str) -> _Member | None:
        clean = _clean_name(name, self.description)
        for _ in range(16):
            m = self.members.get(clean)
            if m is None or m.kind in (b"0", b"5"):
                return m
            if m.kind == b"1":
                clean = _clean_name(m.link, self.description)
            elif m.kind == b"2":
                target = m.link if m.link.startswith("/") else posixpath.join(
                    posixpath.dirname(clean), m.link)
                clean = _clean_name(target, self.description)
            else:
                return None
        raise self._corrupt(f"too many links resolving {name!r}")

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


def _tar_number(field: bytes) -> int:
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise InvalidArgument(f"archive is corrupt: bad number field {field!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[os.fsdecode(key)] = os.fsdecode(value)
        pos += length
    return out


_MAGIC_GZIP = b"\x1f\x8b"
_MAGIC_ZSTD = b"\x28\xb5\x2f\xfd"


@contextlib.contextmanager
def open_source(path: str | os.PathLike[str] | None, scratch: Path, *,
                stream: BinaryIO | None = None,
                progress: Any = None) -> Iterator[Source]:
    """Open an image archive: a directory, a tar, a gzip/zstd-compressed tar, or ``stream``.

    Compressed archives and streams are first copied (decompressed) into
    ``scratch``, because layers are read in the order the manifest names them,
    not in archive order.
    """
    from .tarlayer import open_layer_stream

    if stream is None:
        assert path is not None
        p = Path(path)
        if p.is_dir():
            yield DirSource(p)
            return
        if not p.exists():
            raise NotFound(f"{p}: no such file or directory")
        with open(p, "rb") as f:
            magic = f.read(4)
        if not (magic.startswith(_MAGIC_GZIP) or magic.startswith(_MAGIC_ZSTD)):
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
                plain = open_layer_stream(counted)  # type: ignore[arg-type]
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

    def __init__(self, raw: IO[bytes], progress: Any, what: str, total: int | None) -> None:
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
    if len(parts) == 3 and parts[0] == "blobs" and _DIGEST_RE.match(f"{parts[1]}:{parts[2]}"):
        return f"{parts[1]}:{parts[2]}"
    base = parts[-1].removesuffix(".json")
    if _HEX64_RE.match(base):
        return f"sha256:{base}"
    return None


def _verify(data: bytes, digest: str, what: str) -> None:
    h = hasher_for(digest)
    h.update(data)
    got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
    if got != digest:
        raise InvalidArgument(f"{what}: digest mismatch: expected {digest}, got {got}")


def read_docker_archive(src: Source) -> list[ImageToLoad]:
    manifest = parse_json(read_member(src, "manifest.json", "manifest"),
                          f"{src.description}: manifest.json")
    if not isinstance(manifest, list):
        raise InvalidArgument(f"{src.description}: manifest.json must be a JSON list")
    images = []
    for i, entry in enumerate(manifest):
        where = f"manifest.json entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or \
                not isinstance(entry.get("Layers"), list):
            raise InvalidArgument(f"{src.description}: {where} needs \"Config\" and \"Layers\"")
        config_path = _clean_name(entry["Config"], where)
        config_bytes = read_member(src, config_path, f"{where}: config")
        named = _digest_in_name(config_path)
        if named is not None:
            _verify(config_bytes, named, f"{src.description}: config {config_path}")
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
            clean = _clean_name(path, where)
            layers.append(LayerToLoad(clean, diff_id, _digest_in_name(clean), None))
        names = []
        for tag in entry.get("RepoTags") or []:
            if not isinstance(tag, str):
                raise InvalidArgument(f"{src.description}: {where}: bad RepoTags entry {tag!r}")
            names.append(parse_reference(tag))
        images.append(ImageToLoad(config_bytes, config, layers, names,
                                  f"{where} ({config_path})"))
    return images


def _blob_path(digest: str) -> str:
    alg, hexpart = digest.split(":", 1)
    return f"blobs/{alg}/{hexpart}"


def _descriptor(desc: object, what: str) -> tuple[str, str, int]:
    if not isinstance(desc, dict):
        raise InvalidArgument(f"{what}: a descriptor must be a JSON object")
    digest = check_digest(desc.get("digest"), f"{what}: digest")
    size = desc.get("size")
    if not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"{what}: bad size {size!r}")
    media_type = desc.get("mediaType")
    return digest, media_type if isinstance(media_type, str) else "", size


def _read_blob(src: Source, digest: str, size: int, what: str) -> bytes:
    path = _blob_path(digest)
    if not src.exists(path):
        raise NotFound(f"{src.description}: {what} names blob {digest}, which is missing "
                       f"from the archive")
    data = read_member(src, path, what)
    if len(data) != size:
        raise InvalidArgument(f"{src.description}: {what} {digest} is {len(data)} bytes, "
                              f"the descriptor says {size}")
    _verify(data, digest, f"{src.description}: {what}")
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
    if repo is not None and _TAG_RE.match(ref):
        return [parse_reference(f"{repo}:{ref}")]
    return []


def _walk_index(src: Source, index: object, where: str, annotations: object,
                images: dict[str, ImageToLoad], repo: str | None, depth: int) -> None:
    if depth > 4:
        raise InvalidArgument(f"{src.description}: {where}: indexes nested too deep")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidArgument(f"{src.description}: {where} must have a \"manifests\" list")
    want = host_platform()
    candidates = index["manifests"]
    matching = [d for d in candidates if isinstance(d, dict) and (
        not isinstance(d.get("platform"), dict)
        or (d["platform"].get("os") == want["os"]
            and d["platform"].get("architecture") == want["architecture"]))]
    if depth > 0:
        # A multi-platform index: the manifest for this host only.
        if candidates and not matching:
            raise InvalidArgument(f"{src.description}: {where} has no image for "
                                  f"{want['os']}/{want['architecture']}")
        candidates = matching[:1]
    elif matching:
        # Top level: images for other platforms are skipped when this one has some.
        candidates = matching
    for i, desc in enumerate(candidates):
        what = f"{where} manifests[{i}]"
        digest, media_type, size = _descriptor(desc, what)
        names = _names_from(desc.get("annotations"), repo) or _names_from(annotations, repo)
        data = _read_blob(src, digest, size, what)
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
            known.names += [n for n in names if n not in known.names]


def _read_manifest(src: Source, doc: object, where: str) -> ImageToLoad:
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
        raise InvalidArgument(f"{src.description}: {where} must have a \"layers\" list")
    c_digest, _, c_size = _descriptor(doc.get("config"), f"{where}: config")
    config_bytes = _read_blob(src, c_digest, c_size, f"{where}: config")
    config = parse_config(config_bytes, f"{src.description}: config {c_digest}")
    diff_ids = config["rootfs"]["diff_ids"]
    descs = doc["layers"]
    if len(descs) != len(diff_ids):
        raise InvalidArgument(f"{src.description}: {where} lists {len(descs)} layers, its "
                              f"config has {len(diff_ids)} diff ids")
    layers = []
    for i, (desc, diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
        digest, media_type, size = _descriptor(desc, f"{where}: layers[{i}]")
        if media_type and media_type not in LAYER_TYPES:
            raise InvalidArgument(f"{src.description}: {where}: layer {digest} has media "
                                  f"type {media_type!r}, which is not a layer tar")
        path = _blob_path(digest)
        if not src.exists(path) and ("foreign" in media_type or "nondistributable" in
                                     media_type):
            raise NotFound(f"{src.description}: {where}: foreign layer {digest} is not in "
                           f"the archive (layerfs does not download layers)")
        layers.append(LayerToLoad(path, diff_id, digest, size, media_type))
    return ImageToLoad(config_bytes, config, layers, [], where)


# --- writing archives -----------------------------------------------------------------------

class ArchiveWriter(Protocol):
    def abort(self) -> None: ...
    def add_bytes(self, name: str, data: bytes) -> None: ...
    def add_stream(self, name: str, size: int, stream: IO[bytes]) -> None: ...
    def add_file(self, name: str, path: Path) -> None: ...
    def has(self, name: str) -> bool: ...


class TarArchiveWriter:
    """Writes members into a tar stream (a file or stdout); directories are implied."""

    def __init__(self, out: IO[bytes]) -> None:
        self._tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                                 bufsize=1 << 20)
        self._tar.copybufsize = 1 << 20  # type: ignore[attr-defined]
        self._names: set[str] = set()
        self._dirs: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._names

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                info = tarfile.TarInfo(d)
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                self._tar.addfile(info)

    def add_stream(self, name: str, size: int, stream: IO[bytes]) -> None:
        """Add ``size`` bytes read from ``stream`` (which must deliver exactly that many)."""
        self._parents(name)
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        try:
            self._tar.addfile(info, stream)
        except OSError as err:
            raise LayerfsError(f"writing {name} into the archive: {err}") from err
        self._names.add(name)

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add_stream(name, len(data), io.BytesIO(data))

    def add_file(self, name: str, path: Path) -> None:
        with open(path, "rb") as f:
            self.add_stream(name, os.fstat(f.fileno()).st_size, f)

    def close(self) -> None:
        self._tar.close()

    def abort(self) -> None:
        """Give up on a half-written archive without writing its end (the caller deletes it)."""
        self._tar.closed = True  # type: ignore[attr-defined]
        self._tar.fileobj.closed = True  # type: ignore[union-attr,attr-defined]


class DirArchiveWriter:
    """Writes members as files under a directory (an OCI layout directory)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._names: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._names

    def _target(self, name: str) -> Path:
        path = self.root / _clean_name(name, str(self.root))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._names.add(name)
        return path

    def add_stream(self, name: str, size: int, stream: IO[bytes]) -> None:
        with open(self._target(name), "wb") as f:
            copied = 0
            while copied < size:
                chunk = stream.read(min(1 << 20, size - copied))
                if not chunk:
                    raise LayerfsError(f"writing {name}: source ended after {copied} of "
                                       f"{size} bytes")
                f.write(chunk)
                copied += len(chunk)

    def add_bytes(self, name: str, data: bytes) -> None:
        self._target(name).write_bytes(data)

    def add_file(self, name: str, path: Path) -> None:
        target = self._target(name)
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def oci_layout_bytes() -> bytes:
    return canonical_json({"imageLayoutVersion": "1.0.0"})


def is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        return False


# --- verifying readers ------------------------------------------------------------------------

class DigestReader(io.RawIOBase):
    """Pass-through reader that hashes (and counts) what it reads and checks it at the end.

    ``expected`` and ``expected_size`` are checked as soon as the stream ends,
    inside the read that sees the end, so a consumer that reads to the end
    (:func:`~layerfs.tarlayer.apply_layer` drains its input) fails *before* it
    returns; :meth:`finish` drains and checks for consumers that stop early.
    With a :class:`TarSplitRecorder` the stream is also recorded for an exact
    re-export later.
    """

    def __init__(self, raw: IO[bytes], what: str, *, expected: str | None = None,
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


# --- tar-split: re-creating a layer tar byte for byte ---------------------------------------
#
# An image's config names each layer by the sha256 of its tar (the diff id). To
# save an image again with the same digests, layerfs must write the *same*
# bytes, and a tar generated afresh from the files would differ (order, header
# fields, padding). Like Docker's tar-split, the loader records every byte of
# the tar except file contents, plus (path, size) where contents go; the saver
# replays that, reading contents from the layer itself. The record is small
# (headers and padding: about 1 KiB per file before compression).

_TS_MAGIC = b"LFTS1\n"
_TS_RAW = b"R"
_TS_FILE = b"F"
_REG_FLAGS = (b"0", b"\0", b"7")
_SPECIAL_FLAGS = (b"x", b"g", b"L", b"K")


def _layer_rel(name: str) -> str:
    """A member name as :func:`~layerfs.tarlayer.apply_layer` resolves it ("./a//b" → "a/b")."""
    return "/".join(p for p in name.split("/") if p and p != ".")


class TarSplitRecorder:
    """Records a layer tar as it streams past, minus the contents of regular files.

    It follows the tar the way :mod:`layerfs.tarlayer` reads it (ustar/GNU/PAX
    headers, GNU long names, PAX ``path``/``size``; link, directory and device
    entries carry no data). If the stream is not a tar it stops recording
    (``broken``); the apply fails anyway.
    """

    def __init__(self) -> None:
        self._out = bytearray(_TS_MAGIC)
        self._raw = bytearray()
        self._hdr = bytearray()
        self._skip = 0          # file content still to pass (not recorded)
        self._after = 0         # padding after that content (recorded)
        self._rawleft = 0       # bytes to record as they are
        self._capture: bytearray | None = None
        self._capture_left = 0
        self._capture_flag = b""
        self._pax: dict[str, str] = {}
        self._long: str | None = None
        self._ended = False
        self.broken = False
        self.files = 0

    def feed(self, view: memoryview) -> None:
        p, n = 0, len(view)
        while p < n:
            if self._ended:
                self._raw += view[p:]
                return
            if self._skip:
                t = min(self._skip, n - p)
                self._skip -= t
                p += t
                if not self._skip:
                    self._rawleft, self._after = self._after, 0
                continue
            if self._rawleft:
                t = min(self._rawleft, n - p)
                chunk = view[p:p + t]
                self._raw += chunk
                if self._capture is not None and self._capture_left:
                    c = min(self._capture_left, t)
                    self._capture += chunk[:c]
                    self._capture_left -= c
                    if not self._capture_left:
                        self._special_done()
                self._rawleft -= t
                p += t
                continue
            t = min(512 - len(self._hdr), n - p)
            self._hdr += view[p:p + t]
            p += t
            if len(self._hdr) == 512:
                block = bytes(self._hdr)
                self._hdr.clear()
                self._header(block)

    def _header(self, block: bytes) -> None:
        self._raw += block
        if block == bytes(512):
            self._ended = True
            return
        try:
            size = _tar_number(block[124:136])
        except InvalidArgument:
            self._ended = self.broken = True
            return
        flag = block[156:157]
        pad = -size % 512
        if flag in _SPECIAL_FLAGS:
            self._capture, self._capture_left, self._capture_flag = bytearray(), size, flag
            self._rawleft = size + pad
            if not size:
                self._special_done()
            return
        pax, long_name = self._pax, self._long
        self._pax, self._long = {}, None
        name_b = block[0:100].split(b"\0", 1)[0]
        if block[257:265] == b"ustar\x0000":
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name_b = prefix + b"/" + name_b
        name = pax.get("path") or long_name or os.fsdecode(name_b)
        if flag not in _REG_FLAGS or (flag == b"\0" and name.endswith("/")):
            return  # header-only entry: no data follows, whatever the size field says
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                self._ended = self.broken = True
                return
            pad = -size % 512
        rel = _layer_rel(name)
        if size and rel and not any(part.startswith(".wh.") for part in rel.split("/")):
            self._flush_raw()
            path = os.fsencode(rel)
            self._out += _TS_FILE + struct.pack(">QI", size, len(path)) + path
            self._skip, self._after = size, pad
            self.files += 1
        else:
            self._rawleft = size + pad

    def _special_done(self) -> None:
        data = bytes(self._capture or b"")
        self._capture = None
        if self._capture_flag == b"x":
            self._pax.update({k: v for k, v in _pax_records(data).items() if v})
        elif self._capture_flag == b"L":
            self._long = os.fsdecode(data.rstrip(b"\0"))

    def _flush_raw(self) -> None:
        raw = self._raw
        for start in range(0, len(raw), 1 << 30):
            piece = raw[start:start + (1 << 30)]
            self._out += _TS_RAW + struct.pack(">I", len(piece)) + piece
        self._raw = bytearray()

    def result(self) -> bytes:
        """The record, zstd-compressed."""
        import zstandard

        self._flush_raw()
        return zstandard.ZstdCompressor(level=3).compress(bytes(self._out))


def _open_beneath(root_fd: int, rel: str) -> int:
    """Open ``rel`` under the directory ``root_fd`` without following any symlink."""
    parts = rel.split("/")
    fd = root_fd
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nfd
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)


class TarSplitAssembler(io.RawIOBase):
    """Replays a :class:`TarSplitRecorder` record, reading file contents from ``root``.

    Produces exactly the bytes that were loaded, or fails: the output is
    hashed and compared with ``expected`` (the diff id) when the last byte is
    produced, before it is handed out.
    """

    def __init__(self, record: bytes, root: Path, expected: str, size: int, what: str) -> None:
        import zstandard

        self._data = memoryview(zstandard.ZstdDecompressor().decompress(
            record, max_output_size=1 << 34))
        if bytes(self._data[:len(_TS_MAGIC)]) != _TS_MAGIC:
            raise LayerfsError(f"{what}: tar-split record is damaged")
        self._pos = len(_TS_MAGIC)
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fd = -1
        self._left = 0          # bytes left in the current segment
        self._raw_at = 0        # position of the current raw segment's next byte
        self._path = ""
        self._hash = hasher_for(expected)
        self.expected = expected
        self.size = size
        self.produced = 0
        self.what = what

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
        super().close()

    def _next_segment(self) -> bool:
        if self._pos >= len(self._data):
            return False
        kind = bytes(self._data[self._pos:self._pos + 1])
        if kind == _TS_RAW:
            (length,) = struct.unpack_from(">I", self._data, self._pos + 1)
            self._raw_at = self._pos + 5
            self._pos = self._raw_at + length
            self._left = length
            self._path = ""
        elif kind == _TS_FILE:
            size, plen = struct.unpack_from(">QI", self._data, self._pos + 1)
            start = self._pos + 13
            rel = os.fsdecode(bytes(self._data[start:start + plen]))
            self._pos = start + plen
            try:
                self._fd = _open_beneath(self._root_fd, rel)
            except OSError as err:
                raise LayerfsError(f"{self.what}: cannot re-create the layer tar: /{rel}: "
                                   f"{err.strerror}") from err
            self._path = rel
            self._left = size
        else:
            raise LayerfsError(f"{self.what}: tar-split record is damaged")
        return True

    def readinto(self, buf: Any) -> int:
        """Fill ``buf`` as far as the tar goes (short only at the end)."""
        view = memoryview(buf).cast("B")
        filled = 0
        while filled < len(view):
            got = self._read_some(view[filled:])
            if not got:
                break
            filled += got
        return filled

    def _read_some(self, view: memoryview) -> int:
        while not self._left:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self._next_segment():
                return 0
        want = min(len(view), self._left)
        if self._path:
            got = os.readv(self._fd, [view[:want]])
            if got == 0:
                raise LayerfsError(f"{self.what}: /{self._path} is shorter than when the "
                                   f"layer was loaded")
        else:
            view[:want] = self._data[self._raw_at:self._raw_at + want]
            self._raw_at += want
            got = want
        self._left -= got
        self._hash.update(view[:got])
        self.produced += got
        if self.produced > self.size:
            raise LayerfsError(f"{self.what}: re-created tar is longer than recorded")
        if self.produced == self.size:
            digest = f"{self.expected.split(':', 1)[0]}:{self._hash.hexdigest()}"
            if digest != self.expected:
                raise LayerfsError(f"{self.what}: re-created layer tar has digest {digest}, "
                                   f"not {self.expected}: the layer changed on disk")
        return got
