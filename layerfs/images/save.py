"""Images out: ``docker save`` archives, OCI layout tars and directories.

Layer tars are written again *exactly* (same bytes, so the same digests and image id)
from the layer's files plus the tar-split record kept at load time
(:class:`~layerfs.tar.split.TarSplitRecorder`), the technique Docker uses.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import zstandard

from .. import oci
from ..digests import HashingWriter, sha256_digest, short_id
from ..driver import scratch_prefix
from ..errors import AlreadyExists, CorruptState, InvalidArgument, LayerfsError
from ..tar.split import TarSplitAssembler
from ..tar.stream import Readable
from .catalog import Catalog, Image, ImageLayer, Progress

# --- archive writers ------------------------------------------------------------------------

class TarArchiveWriter:
    """Writes members into a tar stream (a file or stdout); directories are implied."""

    def __init__(self, out: IO[bytes]) -> None:
        self._tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                                 bufsize=1 << 20)
        self._tar.copybufsize = 1 << 20  # type: ignore[attr-defined]  # not in typeshed
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

    def add_stream(self, name: str, size: int, stream: Readable) -> None:
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
        # tarfile has no abort: a closed TarFile and a closed stream write nothing more
        # (the stream's finalizer would otherwise flush the end-of-archive blocks).
        stream: Any = self._tar.fileobj  # tarfile's private _Stream in "w|" mode
        self._tar.closed = True  # type: ignore[attr-defined]  # not in typeshed
        stream.closed = True


class DirArchiveWriter:
    """Writes members as files under a directory (an OCI layout directory)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._names: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._names

    def _target(self, name: str) -> Path:
        path = self.root / oci.clean_name(name, str(self.root))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._names.add(name)
        return path

    def add_stream(self, name: str, size: int, stream: Readable) -> None:
        with open(self._target(name), "wb") as f:
            copied = 0
            while copied < size:
                chunk = stream.read(min(1 << 20, size - copied))
                if not chunk:
                    raise CorruptState(f"writing {name}: source ended after {copied} of "
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
    return oci.canonical_json({"imageLayoutVersion": "1.0.0"})


#: Where a save goes: an archive being written as a tar stream, or a layout directory.
ArchiveWriter = TarArchiveWriter | DirArchiveWriter


class Saving(Catalog):
    """The saving half of :class:`~layerfs.images.ImageStore`."""

    # --- saving ---------------------------------------------------------------------------------
    def save(self, refs: Sequence[str], output: str | os.PathLike[str] | None = None, *,
             stream: IO[bytes] | None = None, format: str = "docker",
             compression: str = "none", progress: Progress | None = None) -> None:
        """Write images as a ``docker save`` archive (``docker``), an OCI layout tar
        (``oci``) or an OCI layout directory (``oci-dir``), to ``output`` or ``stream``.

        Layer tars are re-created byte for byte, so digests and image ids are the
        ones the images were loaded with. ``compression`` (``gzip``, ``zstd``)
        applies to OCI layer blobs. A file or directory output appears complete
        or not at all.
        """
        if format not in ("docker", "oci", "oci-dir"):
            raise InvalidArgument(f"unknown format {format!r}: use docker, oci or oci-dir")
        if compression not in oci.COMPRESSIONS:
            raise InvalidArgument(f"unknown compression {compression!r}: use "
                                  f"{', '.join(oci.COMPRESSIONS)}")
        if format == "docker" and compression != "none":
            raise InvalidArgument("docker archives hold uncompressed layers; compression "
                                  "applies to --format oci")
        if not refs:
            raise InvalidArgument("name at least one image to save")
        selected = self._select(refs)
        if format == "oci-dir":
            if output is None:
                raise InvalidArgument("--format oci-dir needs an output directory")
            self._save_to_dir(selected, Path(output), compression, progress)
            return
        if stream is not None:
            self._write_tar(stream, selected, format, compression, progress)
            return
        assert output is not None
        out_path = Path(output)
        if out_path.is_dir():
            raise InvalidArgument(f"{out_path} is a directory; use --format oci-dir to write "
                                  f"an OCI layout directory")
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".partial",
                                   dir=out_path.parent if str(out_path.parent) else ".")
        try:
            with os.fdopen(fd, "wb") as f:
                self._write_tar(f, selected, format, compression, progress)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _save_to_dir(self, selected: list[tuple[Image, list[str]]], out: Path,
                     compression: str, progress: Progress | None) -> None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AlreadyExists(f"{out} exists and is not an empty directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            writer = DirArchiveWriter(tmp)
            self._write(selected, writer, "oci", compression, progress)
            if out.exists():
                out.rmdir()
            os.chmod(tmp, 0o755)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _select(self, refs: Sequence[str]) -> list[tuple[Image, list[str]]]:
        """Images to save with the names to record: the name given, or all names for an id."""
        chosen: dict[str, tuple[Image, list[str]]] = {}
        for ref in refs:
            image_id, name = self._resolve(ref)
            if image_id not in chosen:
                chosen[image_id] = (self.get(image_id), [])
            image, names = chosen[image_id]
            for n in ([name] if name is not None else image.names):
                if n not in names:
                    names.append(n)
        return list(chosen.values())

    def _write_tar(self, f: IO[bytes], selected: list[tuple[Image, list[str]]], format: str,
                   compression: str, progress: Progress | None) -> None:
        """The archive as one tar stream. On an error the writer aborts: no end-of-archive
        blocks, so what was written never passes for a complete archive."""
        writer = TarArchiveWriter(f)
        try:
            self._write(selected, writer, format, compression, progress)
        except BaseException:
            writer.abort()
            raise
        writer.close()

    def _write(self, selected: list[tuple[Image, list[str]]], writer: ArchiveWriter, format: str,
               compression: str, progress: Progress | None) -> None:
        written: dict[str, tuple[str, int]] = {}   # diff id -> (digest, size) as written
        docker_manifest: list[dict[str, Any]] = []
        index: list[dict[str, Any]] = []
        if format == "oci":
            writer.add_bytes("oci-layout", oci_layout_bytes())
        for image, names in selected:
            layer_entries = []
            for layer in image.layers:
                if layer.diff_id not in written:
                    written[layer.diff_id] = self._write_layer(layer, writer, format,
                                                               compression, progress)
                layer_entries.append(written[layer.diff_id])
            config_bytes = self.config_bytes(image.id)
            hex_id = image.id.split(":", 1)[1]
            if format == "docker":
                config_name = f"{hex_id}.json"
                if not writer.has(config_name):
                    writer.add_bytes(config_name, config_bytes)
                docker_manifest.append({
                    "Config": config_name,
                    "RepoTags": names or None,
                    "Layers": [f"{d.split(':', 1)[1]}/layer.tar"
                               for d in (la.diff_id for la in image.layers)],
                })
                continue
            config_blob = f"blobs/sha256/{hex_id}"
            if not writer.has(config_blob):
                writer.add_bytes(config_blob, config_bytes)
            layer_type = oci.OCI_LAYER_TYPE[compression]
            manifest = {
                "schemaVersion": 2,
                "mediaType": oci.MT_OCI_MANIFEST,
                "config": {"mediaType": oci.MT_OCI_CONFIG, "digest": image.id,
                           "size": len(config_bytes)},
                "layers": [{"mediaType": layer_type, "digest": d, "size": s}
                           for d, s in layer_entries],
            }
            manifest_bytes = oci.canonical_json(manifest)
            manifest_digest = sha256_digest(manifest_bytes)
            blob = f"blobs/sha256/{manifest_digest.split(':', 1)[1]}"
            if not writer.has(blob):
                writer.add_bytes(blob, manifest_bytes)
            descriptor = {"mediaType": oci.MT_OCI_MANIFEST, "digest": manifest_digest,
                          "size": len(manifest_bytes), "platform": {
                              "architecture": image.config.get("architecture", "amd64"),
                              "os": image.config.get("os", "linux")}}
            if not names:
                index.append(descriptor)
            for name in names:
                index.append({**descriptor, "annotations": {
                    oci.ANNOTATION_CONTAINERD_NAME: name,
                    oci.ANNOTATION_REF_NAME: name.rsplit(":", 1)[1]}})
        if format == "docker":
            writer.add_bytes("manifest.json", json.dumps(docker_manifest).encode())
        else:
            writer.add_bytes("index.json", oci.canonical_json({
                "schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": index}))

    @contextlib.contextmanager
    def open_layer_tar(self, layer: ImageLayer) -> Iterator[TarSplitAssembler]:
        """The layer's tar byte for byte as loaded (its sha256 is the diff id), re-created
        from the layer's files and its tar-split record; reading it to the end fails if
        the result does not hash to the diff id. What save and push send."""
        rows = self._query("SELECT tar_split, tar_size FROM image_layers WHERE chain_id = ?",
                           (layer.chain_id,))
        if not rows or rows[0]["tar_split"] is None:
            raise CorruptState(f"image layer {layer.chain_id} has no tar-split record; it "
                               f"cannot be saved with its original digest")
        record, tar_size = bytes(rows[0]["tar_split"]), rows[0]["tar_size"]
        with self.layers.mounted(layer.layer_id, readonly=True) as root:
            reader = TarSplitAssembler(record, root, layer.diff_id, tar_size,
                                           f"layer {short_id(layer.diff_id)}")
            try:
                yield reader
            finally:
                reader.close()

    def _write_layer(self, layer: ImageLayer, writer: ArchiveWriter, format: str, compression: str,
                     progress: Progress | None) -> tuple[str, int]:
        """Write one layer blob; returns its (digest, size) as stored."""
        hex_diff = layer.diff_id.split(":", 1)[1]
        key = f"save:{layer.chain_id}"
        try:
            with self.open_layer_tar(layer) as reader:
                tar_size = reader.size
                if progress is not None:
                    progress.begin(key, f"layer {hex_diff[:12]}", tar_size)
                counted = _ProgressReader(reader, progress, key)
                if format == "docker":
                    writer.add_stream(f"{hex_diff}/layer.tar", tar_size, counted)
                    return layer.diff_id, tar_size
                if compression == "none":
                    writer.add_stream(f"blobs/sha256/{hex_diff}", tar_size, counted)
                    return layer.diff_id, tar_size
                return self._write_compressed(counted, writer, compression)
        finally:
            if progress is not None:
                progress.end(key)

    def _write_compressed(self, reader: Readable, writer: ArchiveWriter,
                          compression: str) -> tuple[str, int]:

        fd, tmp = tempfile.mkstemp(prefix=scratch_prefix("images-save", "blob"),
                                   dir=self.scratch)
        try:
            with os.fdopen(fd, "w+b") as f:
                hashed = HashingWriter(f)
                if compression == "gzip":
                    with gzip.GzipFile(fileobj=hashed, mode="wb", compresslevel=6,
                                       mtime=0) as gz:
                        shutil.copyfileobj(reader, gz, 1 << 20)
                else:
                    cctx = zstandard.ZstdCompressor(level=3)
                    with cctx.stream_writer(hashed, closefd=False) as zw:  # type: ignore[arg-type]
                        shutil.copyfileobj(reader, zw, 1 << 20)
                digest = hashed.digest
                size = hashed.size
            name = f"blobs/sha256/{digest.split(':', 1)[1]}"
            if not writer.has(name):
                writer.add_file(name, Path(tmp))
            return digest, size
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)



class _ProgressReader:
    """Reports bytes read to a progress sink."""

    def __init__(self, raw: TarSplitAssembler, progress: Progress | None, key: str) -> None:
        self._raw = raw
        self._progress = progress
        self._key = key

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if self._progress is not None and data:
            self._progress.advance(self._key, len(data))
        return data

    def readinto(self, buf: Any) -> int:
        n = self._raw.readinto(buf)
        if self._progress is not None and n:
            self._progress.advance(self._key, n)
        return n
