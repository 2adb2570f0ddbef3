"""Images in: ``docker save`` archives and OCI layouts (:meth:`Loading.load`), blobs from a
registry (:meth:`Loading.load_images`), root filesystems (``import``) and container
changes (``commit``).

Loading is all or nothing. Every digest is checked while the bytes stream into the
driver (so a bad layer fails inside the apply and the layer store removes it); an image
row and its names appear in one transaction at the end; on any error the layers this
load made are removed again, and layers that already existed are left alone. Two loads
that need the same chain id meet at the ``image_layers`` primary key: the first inserts
an ``applying`` row inside a store transaction and applies; the second sees that row and
waits for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import zstandard

from .. import oci
from ..changes import naive_changes
from ..digests import chain_ids, sha256_digest, short_id
from ..driver import scratch_prefix
from ..errors import InvalidArgument, LayerfsError, NotFound
from ..layers import new_layer_id
from ..metastore import now, process_token
from ..reference import parse_reference
from ..tar import export_changes, open_layer_stream
from ..tar.split import TarSplitRecorder
from .catalog import (
    LABEL_CHAIN,
    LABEL_DIFF,
    LABEL_OWNER,
    Catalog,
    Image,
    Progress,
    token_alive,
)
from .config import apply_change, rfc3339

log = logging.getLogger(__name__)

@dataclass
class Operation:
    """One load/import: its lease token and the layers it made (for rollback)."""

    token: str
    created: list[str] = field(default_factory=list)


def with_context(err: LayerfsError, where: str) -> LayerfsError:
    """The same error type, its message prefixed with where it happened."""
    try:
        new = type(err)(f"{where}: {err}")
    except TypeError:
        return err
    new.__cause__ = err
    return new


class Loading(Catalog):
    """The loading half of :class:`~layerfs.images.ImageStore`."""

    # --- loading ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _operation(self) -> Iterator[Operation]:
        op = Operation(f"{process_token()}/{secrets.token_hex(4)}")
        try:
            yield op
        except BaseException:
            self._rollback(op)
            raise
        finally:
            with self.store.transaction() as db:
                db.execute("DELETE FROM image_leases WHERE owner = ?", (op.token,))

    def _rollback(self, op: Operation) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM image_leases WHERE owner = ?", (op.token,))
        for chain in reversed(op.created):
            try:
                self._gc_chain(chain, op.token, parents=False)
            except LayerfsError as err:  # pragma: no cover - best effort
                log.warning("rollback: cannot remove image layer %s: %s", chain, err)

    def load(self, source: str | os.PathLike[str] | None = None, *,
             stream: BinaryIO | None = None, repo: str | None = None,
             progress: Progress | None = None) -> list[Image]:
        """Load every image of a ``docker save`` archive or an OCI layout (dir or tar).

        ``source`` may be gzip or zstd compressed; ``stream`` reads one from a pipe.
        ``repo`` names OCI images whose ``ref.name`` is a bare tag (umoci, skopeo).
        Either every image is loaded, with all digests verified, or nothing is.
        """
        if repo is not None:
            repo = parse_reference(repo).rsplit(":", 1)[0]
        self.scratch.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=scratch_prefix("images-load", "archive"),
                                        dir=self.scratch))
        try:
            with self._operation() as op, \
                    oci.open_source(source, staging, stream=stream, progress=progress) as src:
                todo = oci.read_images(src, repo=repo)
                if not todo:
                    raise InvalidArgument(f"{src.description}: the archive holds no image")
                tops = []
                for image in todo:
                    tops.append(self._unpack(src, image, op, progress))
                self._publish(todo, tops, op)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._loaded(todo)

    def _loaded(self, todo: Sequence[oci.ImageToLoad]) -> list[Image]:
        return [dataclasses.replace(self.get(image.id), loaded_as=tuple(image.names))
                for image in todo]

    def load_images(self, src: oci.Source, todo: Sequence[oci.ImageToLoad], *,
                    verify_present: bool = True,
                    progress: Progress | None = None) -> list[Image]:
        """Load images already described (``todo``) from a source that is not an archive
        (the registry client's downloads): the same checks, sharing and all-or-nothing
        publication as :meth:`load`. Blobs are opened through ``src.open(layer.path)``.
        With ``verify_present=False`` blobs of layers already stored are not read at all
        (a pull does not download them)."""
        if not todo:
            raise InvalidArgument(f"{src.description}: no image to load")
        with self._operation() as op:
            tops = [self._unpack(src, image, op, progress, verify_present=verify_present)
                    for image in todo]
            self._publish(todo, tops, op)
        return self._loaded(todo)

    def layer_chain_ready(self, chain_id: str) -> bool:
        """Whether the layer for ``chain_id`` is stored and complete (a pull skips it)."""
        return bool(self._query("SELECT 1 FROM image_layers WHERE chain_id = ? AND "
                                "state = 'ready'", (chain_id,)))

    def _unpack(self, src: oci.Source, image: oci.ImageToLoad, op: Operation,
                progress: Progress | None, *,
                verify_present: bool = True) -> tuple[str | None, int]:
        diff_ids = [layer.diff_id for layer in image.layers]
        chains = chain_ids(diff_ids)
        parent_layer: str | None = None
        parent_chain: str | None = None
        total = 0
        for layer, chain in zip(image.layers, chains, strict=True):
            layer_id, size, fresh = self._acquire(chain, layer.diff_id, parent_chain, op,
                                                  progress)
            if fresh:
                try:
                    size = self._apply_blob(src, layer, parent_layer, layer_id, chain, op,
                                            progress)
                except BaseException:
                    self._abandon(chain, op)
                    raise
            elif verify_present:
                self._verify_blob(src, layer, progress)
            total += size or 0
            parent_layer, parent_chain = layer_id, chain
        return parent_chain, total

    def _acquire(self, chain: str, diff_id: str, parent_chain: str | None, op: Operation,
                 progress: Progress | None) -> tuple[str, int | None, bool]:
        """Reuse the layer for ``chain`` or reserve it for us: (layer id, size, must apply)."""
        key = f"wait:{chain}"
        try:
            return self._acquire_loop(chain, diff_id, parent_chain, op, progress, key)
        finally:
            if progress is not None:
                progress.end(key)

    def _acquire_loop(self, chain: str, diff_id: str, parent_chain: str | None,
                      op: Operation, progress: Progress | None,
                      key: str) -> tuple[str, int | None, bool]:
        delay = 0.02
        waiting = False
        while True:
            stale = None
            with self.store.transaction() as db:
                row = db.execute("SELECT layer, state, owner, size FROM image_layers WHERE "
                                 "chain_id = ?", (chain,)).fetchone()
                if row is None:
                    layer_id = new_layer_id()
                    db.execute("INSERT INTO image_layers (chain_id, diff_id, parent_chain, "
                               "layer, state, owner, created) VALUES (?, ?, ?, ?, 'applying', "
                               "?, ?)", (chain, diff_id, parent_chain, layer_id, op.token, now()))
                    db.execute("INSERT OR IGNORE INTO image_leases VALUES (?, ?)",
                               (chain, op.token))
                    return layer_id, None, True
                if row["state"] == "ready":
                    db.execute("INSERT OR IGNORE INTO image_leases VALUES (?, ?)",
                               (chain, op.token))
                    return row["layer"], row["size"], False
                if not token_alive(row["owner"]):
                    stale = row["layer"]
            if stale is not None:
                self._drop_stale(chain, stale)
                continue
            # Another process is applying (or removing) this very layer: wait for it.
            if progress is not None and not waiting:
                progress.begin(key, f"waiting for another load of layer "
                               f"{short_id(chain)}", None)
            waiting = True
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _abandon(self, chain: str, op: Operation) -> None:
        """Undo a reservation whose apply failed (the layer store already removed the layer)."""
        with self.store.transaction() as db:
            row = db.execute("SELECT layer FROM image_layers WHERE chain_id = ? AND owner = ? "
                             "AND state = 'applying'", (chain, op.token)).fetchone()
            if row is None:
                return
        if self.layers.exists(row["layer"]):
            with contextlib.suppress(LayerfsError):
                self.layers.remove(row["layer"])
        with self.store.transaction() as db:
            db.execute("DELETE FROM image_leases WHERE chain_id = ? AND owner = ?",
                       (chain, op.token))
            db.execute("DELETE FROM image_layers WHERE chain_id = ? AND owner = ? AND "
                       "state = 'applying'", (chain, op.token))

    def _apply_blob(self, src: oci.Source, layer: oci.LayerToLoad, parent_layer: str | None,
                    layer_id: str, chain: str, op: Operation,
                    progress: Progress | None) -> int:
        """Stream one blob into the driver, verifying both digests; mark the chain ready."""
        where = f"{src.description}: layer {layer.path}"
        blob_size = layer.size if layer.size is not None else src.size(layer.path)
        key = f"layer:{chain}"
        if progress is not None:
            progress.begin(key, f"layer {short_id(layer.diff_id)}", blob_size)
        recorder = TarSplitRecorder()
        try:
            with src.open(layer.path) as raw:
                blob = oci.DigestReader(raw, where, expected=layer.digest,
                                        expected_size=blob_size, progress=progress,
                                        progress_key=key, hashing=False)
                plain = open_layer_stream(blob)
                diff = oci.DigestReader(plain, f"{where} (uncompressed)",
                                        expected=layer.diff_id, recorder=recorder)
                try:
                    labels = {LABEL_OWNER: op.token, LABEL_CHAIN: chain,
                              LABEL_DIFF: layer.diff_id}
                    rec = self.layers.apply(diff, parent_layer,
                                            layer_id=layer_id, labels=labels)
                except LayerfsError as err:
                    if str(err).startswith(where):
                        raise
                    raise with_context(err, where) from err
                try:
                    diff.finish()
                    blob.finish()
                except BaseException:
                    self.layers.remove(layer_id)
                    raise
        finally:
            if progress is not None:
                progress.end(key)
        with self.store.transaction() as db:
            db.execute("UPDATE image_layers SET state = 'ready', owner = NULL, size = ?, "
                       "tar_size = ?, tar_split = ? WHERE chain_id = ?",
                       (rec.size, diff.size, recorder.result(), chain))
        op.created.append(chain)
        return rec.size or 0

    def _verify_blob(self, src: oci.Source, layer: oci.LayerToLoad,
                     progress: Progress | None) -> None:
        """Check the digests of a blob whose layer is already stored (nothing is applied):
        a load vouches for the whole archive, not only for the layers it needed."""
        where = f"{src.description}: layer {layer.path}"
        blob_size = layer.size if layer.size is not None else src.size(layer.path)
        key = f"verify:{layer.path}"
        if progress is not None:
            progress.begin(key, f"verify {short_id(layer.diff_id)}", blob_size)
        try:
            with src.open(layer.path) as raw:
                blob = oci.DigestReader(raw, where, expected=layer.digest,
                                        expected_size=blob_size, progress=progress,
                                        progress_key=key, hashing=False)
                try:
                    plain = open_layer_stream(blob)
                    oci.DigestReader(plain, where, expected=layer.diff_id).finish()
                except (EOFError, OSError, zlib.error, zstandard.ZstdError) as err:
                    raise InvalidArgument(f"{where}: layer stream is corrupt: {err}") from err
                blob.finish()
        finally:
            if progress is not None:
                progress.end(key)

    def _publish(self, todo: Sequence[oci.ImageToLoad], tops: Sequence[tuple[str | None, int]],
                 op: Operation) -> None:
        with self.store.transaction() as db:
            for image, (top_chain, size) in zip(todo, tops, strict=True):
                db.execute("INSERT OR IGNORE INTO images (id, config, top_chain, created, size)"
                           " VALUES (?, ?, ?, ?, ?)",
                           (image.id, image.config_bytes, top_chain, now(), size))
                for name in image.names:
                    db.execute("INSERT OR REPLACE INTO image_names (name, image, created) "
                               "VALUES (?, ?, ?)", (name, image.id, now()))
            db.execute("DELETE FROM image_leases WHERE owner = ?", (op.token,))

    # --- importing a root filesystem ------------------------------------------------------------
    def import_rootfs(self, source: str | os.PathLike[str] | None, name: str | None = None, *,
                      stream: BinaryIO | None = None, changes: Iterable[str] = (),
                      message: str | None = None, progress: Progress | None = None) -> Image:
        """A one-layer image from a root filesystem: a tar (gzip/zstd/plain), a directory,
        or ``stream`` (like ``docker import``). ``changes`` are Dockerfile instructions
        (``CMD``, ``ENTRYPOINT``, ``ENV``, ``WORKDIR``, ``USER``, ``EXPOSE``, ``LABEL``,
        ``STOPSIGNAL``, ``VOLUME``) applied to the config."""
        target = parse_reference(name) if name else None
        run_config: dict[str, Any] = {}
        for change in changes:
            apply_change(run_config, change)
        label = "-" if source is None else str(source)
        with self._operation() as op, self._rootfs_stream(source, stream) as (raw, total):
            layer_id = new_layer_id()
            key = f"import:{layer_id}"
            if progress is not None:
                progress.begin(key, f"importing {label}", total)
            try:
                blob = oci.DigestReader(raw, label, progress=progress, progress_key=key,
                                        hashing=False)
                recorder = TarSplitRecorder()
                diff = oci.DigestReader(open_layer_stream(blob),
                                        f"{label} (uncompressed)", recorder=recorder)
                rec = self.layers.apply(diff, None,
                                        layer_id=layer_id, labels={LABEL_OWNER: op.token})
                try:
                    diff_id = diff.finish()
                    assert diff_id is not None
                except BaseException:
                    self.layers.remove(layer_id)
                    raise
            finally:
                if progress is not None:
                    progress.end(key)
            layer_id, size = self._record_import(diff_id, layer_id, rec.size or 0, diff.size,
                                                 recorder.result(), op)
            created = rfc3339()
            config: dict[str, Any] = {
                **oci.host_platform(),
                "created": created,
                "config": run_config,
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created": created, "created_by": "layerfs import",
                             "comment": message or f"Imported from {label}"}],
            }
            config_bytes = oci.canonical_json(config)
            image = oci.ImageToLoad(config_bytes, config, [], [target] if target else [],
                                    "import")
            self._publish([image], [(diff_id, size)], op)
        return self.get(image.id)

    # --- committing a container's changes -------------------------------------------------------
    def commit(self, ref: str, diff: str | os.PathLike[str], name: str | None = None, *,
               run_config: dict[str, Any] | None = None, changes: Iterable[str] = (),
               message: str | None = None, author: str | None = None,
               created_by: str = "") -> Image:
        """A new image: ``ref``'s layers plus one layer from the tar file ``diff`` (a
        container's changes, as ``LayerStore.diff`` writes them), like ``docker commit``.

        ``run_config`` keys (``Cmd``, ``Env``, ...) replace the base image's, then
        ``changes`` (Dockerfile instructions, as for :meth:`import_rootfs`) apply.
        The layer is applied on the base's top layer under its chain id, through the
        same reservation and rollback as :meth:`load`.
        """
        target = parse_reference(name) if name else None
        base = self.get(ref)
        path = Path(diff)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        diff_id = f"sha256:{digest.hexdigest()}"
        parent_chain = base.layers[-1].chain_id if base.layers else None
        chain = diff_id if parent_chain is None else \
            sha256_digest(f"{parent_chain} {diff_id}".encode())
        with self._operation() as op:
            layer_id, size, fresh = self._acquire(chain, diff_id, parent_chain, op, None)
            if fresh:
                blob = oci.LayerToLoad(path.name, diff_id, None, path.stat().st_size)
                try:
                    size = self._apply_blob(oci.DirSource(path.parent), blob, base.top_layer,
                                            layer_id, chain, op, None)
                except BaseException:
                    self._abandon(chain, op)
                    raise
            config: dict[str, Any] = json.loads(json.dumps(base.config))
            run = dict(config.get("config") or {})
            run.update(run_config or {})
            for change in changes:
                apply_change(run, change)
            created = rfc3339()
            config["config"] = run
            config["created"] = created
            if author:
                config["author"] = author
            config["rootfs"] = {"type": "layers",
                                "diff_ids": [la.diff_id for la in base.layers] + [diff_id]}
            entry = {"created": created, "created_by": created_by}
            if message:
                entry["comment"] = message
            if author:
                entry["author"] = author
            config["history"] = [*(config.get("history") or []), entry]
            image = oci.ImageToLoad(oci.canonical_json(config), config, [],
                                    [target] if target else [], "commit")
            self._publish([image], [(chain, base.size + (size or 0))], op)
        return self.get(image.id)

    @contextlib.contextmanager
    def _rootfs_stream(self, source: str | os.PathLike[str] | None,
                       stream: BinaryIO | None) -> Iterator[tuple[IO[bytes], int | None]]:
        if stream is not None:
            yield stream, None
            return
        assert source is not None
        path = Path(source)
        if path.is_dir():
            with _tar_directory(path) as pipe:
                yield pipe, None
            return
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file or directory") from None
        with f:
            yield f, os.fstat(f.fileno()).st_size

    def _record_import(self, diff_id: str, layer_id: str, size: int, tar_size: int,
                       tar_split: bytes, op: Operation) -> tuple[str, int]:
        """Record an imported layer under its chain id (= diff id), or drop it for an
        identical one already stored. Returns the layer id used and its size."""
        delay = 0.02
        while True:
            with self.store.transaction() as db:
                row = db.execute("SELECT layer, state, owner, size FROM image_layers WHERE "
                                 "chain_id = ?", (diff_id,)).fetchone()
                if row is None:
                    db.execute("INSERT INTO image_layers (chain_id, diff_id, parent_chain, "
                               "layer, state, owner, size, tar_size, tar_split, created) "
                               "VALUES (?, ?, NULL, ?, 'ready', NULL, ?, ?, ?, ?)",
                               (diff_id, diff_id, layer_id, size, tar_size, tar_split, now()))
                    db.execute("INSERT OR IGNORE INTO image_leases VALUES (?, ?)",
                               (diff_id, op.token))
                    op.created.append(diff_id)
                    return layer_id, size
                if row["state"] == "ready":
                    db.execute("INSERT OR IGNORE INTO image_leases VALUES (?, ?)",
                               (diff_id, op.token))
                    break
                stale = not token_alive(row["owner"])
            if stale:
                self._drop_stale(diff_id, row["layer"])
                continue
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        # The same layer is already stored: keep that one.
        self.layers.remove(layer_id)
        return row["layer"], row["size"] or 0



@contextlib.contextmanager
def _tar_directory(path: Path) -> Iterator[IO[bytes]]:
    """A layer tar of a directory's contents, produced by a thread into a pipe."""
    r, w = os.pipe()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with open(w, "wb", buffering=1 << 20) as out:
                export_changes(path, naive_changes(None, path), out)
        except BrokenPipeError:
            pass  # the reader gave up (its error is the one reported)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=produce, name="layerfs-import-tar", daemon=True)
    thread.start()
    reader = open(r, "rb", buffering=0)
    try:
        yield reader
    except BaseException:
        reader.close()
        thread.join()
        if errors:  # the producer's failure is the cause of the consumer's
            raise _as_layerfs_error(errors[0], path) from errors[0]
        raise
    reader.close()
    thread.join()
    if errors:
        raise _as_layerfs_error(errors[0], path) from errors[0]


def _as_layerfs_error(err: BaseException, path: Path) -> BaseException:
    if isinstance(err, LayerfsError) or not isinstance(err, OSError):
        return err
    return LayerfsError(f"reading {path}: {err.filename or ''}: {err.strerror or err}")
