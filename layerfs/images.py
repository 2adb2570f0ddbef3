"""Images: named, content-addressed stacks of read-only layers, on top of the layer store.

An image is a *config* (a JSON document: how to run it, and which layers it
has, as ``rootfs.diff_ids``) plus those layers. Everything is named by digest:

* the **image id** is the sha256 of the config bytes, as in Docker;
* a layer's **diff id** is the sha256 of its uncompressed tar;
* a layer's **chain id** names it together with everything below it
  (:func:`~layerfs.oci.chain_ids`). Two images whose first layers are the same
  share those layers on disk: a layer is applied once per chain id, whatever
  archive or image it arrives in.

Tables (in the root's sqlite database, next to the layer store's own)::

    images        id (sha256 of config), config (bytes, verbatim), top_chain, created, size
    image_names   name ("repo:tag") -> image
    image_layers  chain_id -> diff_id, parent_chain, layer (id in the layer store), state,
                  owner, size, tar_size, tar_split (to re-create the tar byte for byte)
    image_leases  (chain_id, owner): a load in progress holds the layers it uses
    image_users   (image, container): containers using an image; rmi refuses while any

Loading is all or nothing. Every digest is checked while the bytes stream
into the driver (so a bad layer fails inside the apply and the layer store
removes it); an image row and its names appear in one transaction at the end;
on any error the layers this load made are removed again, and layers that
already existed are left alone. Two loads that need the same chain id meet at
the ``image_layers`` primary key: the first inserts an ``applying`` row inside
a store transaction and applies; the second sees that row and waits for it.
A process killed half-way leaves rows whose owner is dead; the next
:class:`ImageStore` finishes cleaning them up.

Saving writes each layer tar again *exactly* (same bytes, so the same digests
and image id) from the layer's files plus the tar-split record kept at load
time (:class:`~layerfs.oci.TarSplitRecorder`), the technique Docker uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import sqlite3
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

import zstandard

from . import oci
from .changes import naive_changes
from .driver import scratch_owner, scratch_prefix
from .errors import AlreadyExists, CorruptState, InUse, InvalidArgument, LayerfsError, NotFound
from .layers import LayerStore, new_layer_id
from .store import now, process_alive, process_token
from .tarlayer import export_changes, open_layer_stream

log = logging.getLogger(__name__)

IMAGES_SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS image_layers (
    chain_id      TEXT PRIMARY KEY,
    diff_id       TEXT NOT NULL,
    parent_chain  TEXT REFERENCES image_layers(chain_id),
    layer         TEXT NOT NULL UNIQUE,
    state         TEXT NOT NULL CHECK (state IN ('applying', 'ready', 'removing')),
    owner         TEXT,
    size          INTEGER,
    tar_size      INTEGER,
    tar_split     BLOB,
    created       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS image_layers_parent ON image_layers(parent_chain);
CREATE TABLE IF NOT EXISTS images (
    id         TEXT PRIMARY KEY,
    config     BLOB NOT NULL,
    top_chain  TEXT REFERENCES image_layers(chain_id),
    created    REAL NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS images_top ON images(top_chain);
CREATE TABLE IF NOT EXISTS image_names (
    name     TEXT PRIMARY KEY,
    image    TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    created  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS image_names_image ON image_names(image);
CREATE TABLE IF NOT EXISTS image_leases (
    chain_id  TEXT NOT NULL,
    owner     TEXT NOT NULL,
    PRIMARY KEY (chain_id, owner)
);
CREATE TABLE IF NOT EXISTS image_users (
    image      TEXT NOT NULL REFERENCES images(id),
    container  TEXT NOT NULL,
    created    REAL NOT NULL,
    PRIMARY KEY (image, container)
)
"""

#: Label on layers made by an import, before they are recorded in image_layers.
LABEL_OWNER = "layerfs.image.owner"
LABEL_CHAIN = "layerfs.image.chain-id"
LABEL_DIFF = "layerfs.image.diff-id"

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Progress(Protocol):
    """Where long operations report bytes done (the CLI draws rich progress bars)."""

    def begin(self, key: str, description: str, total: int | None) -> None: ...
    def advance(self, key: str, amount: int) -> None: ...
    def end(self, key: str) -> None: ...


# --- what an image looks like to callers ------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    """What a container runtime needs from an image config (``config`` in the JSON)."""

    env: list[str]
    cmd: list[str] | None
    entrypoint: list[str] | None
    working_dir: str
    user: str
    exposed_ports: list[str]
    labels: dict[str, str]
    stop_signal: str | None
    volumes: list[str]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RunConfig:
        c = config.get("config") or {}

        def strings(value: Any) -> list[str] | None:
            if value is None:
                return None
            if isinstance(value, str):
                return [value]
            return [str(v) for v in value]

        return cls(env=strings(c.get("Env")) or [], cmd=strings(c.get("Cmd")),
                   entrypoint=strings(c.get("Entrypoint")),
                   working_dir=str(c.get("WorkingDir") or ""), user=str(c.get("User") or ""),
                   exposed_ports=sorted(c.get("ExposedPorts") or {}),
                   labels=dict(c.get("Labels") or {}), stop_signal=c.get("StopSignal"),
                   volumes=sorted(c.get("Volumes") or {}))

    @property
    def argv(self) -> list[str]:
        """Entrypoint followed by Cmd, as ``docker run IMAGE`` runs it."""
        return [*(self.entrypoint or []), *(self.cmd or [])]

    def environment(self) -> dict[str, str]:
        """Env as a dict, with Docker's default PATH when the image sets none."""
        key, _, value = DEFAULT_PATH.partition("=")
        env = {key: value}
        for item in self.env:
            key, _, value = item.partition("=")
            env[key] = value
        return env


@dataclass(frozen=True)
class ImageLayer:
    chain_id: str
    diff_id: str
    layer_id: str
    size: int | None
    tar_size: int | None


@dataclass(frozen=True)
class HistoryEntry:
    created: str | None
    created_by: str
    comment: str
    author: str
    empty_layer: bool
    diff_id: str | None
    size: int | None


@dataclass(frozen=True)
class Image:
    """An image as stored: its id, names, config and layers (bottom first)."""

    id: str
    names: list[str]
    config: dict[str, Any]
    layers: list[ImageLayer]
    created: float
    size: int

    @property
    def short_id(self) -> str:
        return oci.short_id(self.id)

    @property
    def top_layer(self) -> str | None:
        """Layer-store id of the top layer: the parent for a container's layer."""
        return self.layers[-1].layer_id if self.layers else None

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.from_config(self.config)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "names": self.names, "created": self.created, "size": self.size,
                "config_created": self.config.get("created"), "top_layer": self.top_layer,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}


@dataclass
class _Operation:
    """One load/import: its lease token and the layers it made (for rollback)."""

    token: str
    created: list[str] = field(default_factory=list)


def _token_alive(token: str | None) -> bool:
    return bool(token) and process_alive(token.split("/", 1)[0])  # type: ignore[union-attr]


def _rfc3339(ts: float | None = None) -> str:
    when = datetime.datetime.fromtimestamp(time.time() if ts is None else ts,
                                           tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _with_context(err: LayerfsError, where: str) -> LayerfsError:
    """The same error type, its message prefixed with where it happened."""
    try:
        new = type(err)(f"{where}: {err}")
    except TypeError:
        return err
    new.__cause__ = err
    return new


# --- the store ---------------------------------------------------------------------------------

class ImageStore:
    """Images of one layerfs root. Construct on an open :class:`~layerfs.layers.LayerStore`::

        with layerfs.open_root(root) as layers:
            images = ImageStore(layers)
            loaded = images.load("busybox.tar")            # docker save / OCI layout
            image = images.get("busybox:latest")
            box = layers.create(parent=image.top_layer)    # a container's layer
    """

    def __init__(self, layers: LayerStore, *, recover: bool = True) -> None:
        self.layers = layers
        self.store = layers.store
        self.store.extend_schema(_SCHEMA)
        if self.store.get_setting("images_schema") is None:
            self.store.set_setting("images_schema", IMAGES_SCHEMA_VERSION)
        self._owns_layers = False
        if recover:
            self.recover()

    @classmethod
    def open(cls, root: str | os.PathLike[str], driver: str | None = None,
             options: dict[str, str] | list[str] | None = None) -> ImageStore:
        """Open a root's layer store and its images; :meth:`close` closes both."""
        layers = LayerStore.open(root, driver, options)
        try:
            self = cls(layers)
        except BaseException:
            layers.close()
            raise
        self._owns_layers = True
        return self

    def close(self) -> None:
        if self._owns_layers:
            self.layers.close()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def scratch(self) -> Path:
        return self.layers.driver.scratch

    def _db(self) -> sqlite3.Connection:
        return self.store.db

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self.store._lock:
            return self.store.db.execute(sql, args).fetchall()

    # --- crash recovery ---------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Clean up after loads and removals whose process died. Returns what was done."""
        actions: list[str] = []
        with self.store.transaction() as db:
            for row in db.execute("SELECT chain_id, owner FROM image_leases").fetchall():
                if not _token_alive(row["owner"]):
                    db.execute("DELETE FROM image_leases WHERE chain_id = ? AND owner = ?",
                               (row["chain_id"], row["owner"]))
        stale = self._query("SELECT chain_id, layer, state, owner FROM image_layers "
                            "WHERE state != 'ready'")
        for row in stale:
            if _token_alive(row["owner"]):
                continue
            self._drop_stale(row["chain_id"], row["layer"])
            actions.append(f"rolled back {row['state']} image layer {row['chain_id']}")
        # Layers an import applied but never recorded (killed in between).
        known = {r[0] for r in self._query("SELECT layer FROM image_layers")}
        for rec in self.layers.layers():
            owner = rec.labels.get(LABEL_OWNER)
            if owner and rec.id not in known and not _token_alive(owner) \
                    and not self.layers.children(rec.id):
                with contextlib.suppress(LayerfsError):
                    self.layers.remove(rec.id)
                    actions.append(f"removed unrecorded import layer {rec.id}")
        # Chain layers no image, child, lease or container holds (a load that died
        # between applying and publishing).
        actions += [f"removed unused image layer {c}" for c in self._gc_unused()]
        # Scratch files of dead loads and saves.
        for entry in self.scratch.glob("*_images-*"):
            owner = scratch_owner(entry.name)
            if owner and not process_alive(owner):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
        return actions

    def _gc_unused(self) -> list[str]:
        removed: list[str] = []
        for row in self._query("SELECT chain_id FROM image_layers l WHERE state = 'ready' "
                               "AND NOT EXISTS (SELECT 1 FROM images i WHERE i.top_chain = "
                               "l.chain_id) AND NOT EXISTS (SELECT 1 FROM image_layers c "
                               "WHERE c.parent_chain = l.chain_id)"):
            removed += self._gc_chain(row[0])
        return removed

    def _drop_stale(self, chain_id: str, layer_id: str) -> None:
        rec = self.store.get_layer(layer_id)
        if rec is not None and rec.state != "ready" and not process_alive(rec.owner):
            self.layers.recover()
            rec = self.store.get_layer(layer_id)
        if rec is not None and rec.state == "ready":
            try:
                self.layers.remove(layer_id)
            except LayerfsError as err:
                log.warning("cannot remove stale image layer %s: %s", layer_id, err)
                return
        with self.store.transaction() as db:
            db.execute("DELETE FROM image_leases WHERE chain_id = ?", (chain_id,))
            db.execute("DELETE FROM image_layers WHERE chain_id = ? AND state != 'ready'",
                       (chain_id,))

    # --- looking images up ----------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The image id that ``ref`` names: ``name[:tag]``, a full id, or an id prefix."""
        return self._resolve(ref)[0]

    def _resolve(self, ref: str) -> tuple[str, str | None]:
        """(image id, the name used or None if ``ref`` was an id)."""
        text = ref.strip()
        if not text:
            raise InvalidArgument("empty image reference")
        hex_part = text.removeprefix("sha256:")
        if oci.looks_like_reference(text) and not (text.startswith("sha256:")):
            name = oci.parse_reference(text)
            rows = self._query("SELECT image FROM image_names WHERE name = ?", (name,))
            if rows:
                return rows[0][0], name
        if all(c in "0123456789abcdef" for c in hex_part) and len(hex_part) >= 4:
            rows = self._query("SELECT id FROM images WHERE id LIKE ?",
                               (f"sha256:{hex_part}%",))
            if len(rows) == 1:
                return rows[0][0], None
            if len(rows) > 1:
                raise InvalidArgument(f"image id prefix {hex_part!r} is ambiguous "
                                      f"({len(rows)} images); give more digits")
        raise NotFound(f"image {ref!r} not found")

    def exists(self, ref: str) -> bool:
        try:
            self.resolve(ref)
        except NotFound:
            return False
        return True

    def _layers_of(self, top_chain: str | None) -> list[ImageLayer]:
        out: list[ImageLayer] = []
        chain = top_chain
        while chain is not None:
            rows = self._query("SELECT chain_id, diff_id, parent_chain, layer, size, tar_size "
                               "FROM image_layers WHERE chain_id = ?", (chain,))
            if not rows:
                raise CorruptState(f"image layer {chain} is missing from the store")
            row = rows[0]
            out.append(ImageLayer(row["chain_id"], row["diff_id"], row["layer"], row["size"],
                                  row["tar_size"]))
            chain = row["parent_chain"]
        out.reverse()
        return out

    def _image(self, row: sqlite3.Row) -> Image:
        names = [r[0] for r in self._query(
            "SELECT name FROM image_names WHERE image = ? ORDER BY created, name", (row["id"],))]
        config = json.loads(row["config"])
        return Image(row["id"], names, config, self._layers_of(row["top_chain"]),
                     row["created"], row["size"])

    def get(self, ref: str) -> Image:
        image_id = self.resolve(ref)
        rows = self._query("SELECT * FROM images WHERE id = ?", (image_id,))
        if not rows:
            raise NotFound(f"image {ref!r} not found")
        return self._image(rows[0])

    def images(self) -> list[Image]:
        """All images, newest first."""
        return [self._image(r) for r in
                self._query("SELECT * FROM images ORDER BY created DESC, id")]

    def config_bytes(self, ref: str) -> bytes:
        """The config exactly as loaded (its sha256 is the image id)."""
        rows = self._query("SELECT config FROM images WHERE id = ?", (self.resolve(ref),))
        return bytes(rows[0][0])

    def history(self, ref: str) -> list[HistoryEntry]:
        """The config's history, newest first, with each layer's size (like ``docker history``)."""
        image = self.get(ref)
        entries = image.config.get("history") or []
        layers = list(image.layers)
        out: list[HistoryEntry] = []
        for h in entries:
            if not isinstance(h, dict):
                continue
            empty = bool(h.get("empty_layer"))
            layer = None if empty or not layers else layers.pop(0)
            out.append(HistoryEntry(h.get("created"), str(h.get("created_by") or ""),
                                    str(h.get("comment") or ""), str(h.get("author") or ""),
                                    empty, layer.diff_id if layer else None,
                                    0 if layer is None else layer.size))
        for layer in layers:  # layers the history does not describe
            out.append(HistoryEntry(None, "", "", "", False, layer.diff_id, layer.size))
        out.reverse()
        return out

    def inspect(self, ref: str) -> dict[str, Any]:
        """Everything about an image, shaped like ``docker image inspect``."""
        image = self.get(ref)
        config = image.config
        top = image.top_layer
        return {
            "Id": image.id,
            "RepoTags": image.names,
            "Created": config.get("created"),
            "Author": config.get("author", ""),
            "Architecture": config.get("architecture"),
            "Os": config.get("os"),
            "Config": config.get("config") or {},
            "RootFS": {"Type": "layers", "Layers": [la.diff_id for la in image.layers]},
            "Size": image.size,
            "GraphDriver": {"Name": self.layers.driver.name,
                            "Data": self.layers.metadata(top) if top else {}},
            "Layerfs": {
                "Loaded": _rfc3339(image.created),
                "TopLayer": top,
                "Layers": [dataclasses.asdict(la) for la in image.layers],
                "Users": self.users(image.id),
            },
        }

    # --- names --------------------------------------------------------------------------------
    def tag(self, ref: str, name: str) -> str:
        """Point ``name`` (``repo[:tag]``) at the image ``ref`` names; returns the name."""
        target = oci.parse_reference(name)
        with self.store.transaction() as db:
            image_id = self.resolve(ref)
            db.execute("INSERT OR REPLACE INTO image_names (name, image, created) VALUES "
                       "(?, ?, ?)", (target, image_id, now()))
        return target

    def untag(self, name: str) -> None:
        full = oci.parse_reference(name)
        with self.store.transaction() as db:
            if db.execute("DELETE FROM image_names WHERE name = ?", (full,)).rowcount == 0:
                raise NotFound(f"image name {name!r} not found")

    # --- containers using images -------------------------------------------------------------
    def add_user(self, image: str, container_id: str) -> str:
        """Record that ``container_id`` uses ``image`` (the runner calls this before it
        creates the container's layer); ``remove`` refuses until :meth:`remove_user`.
        Returns the image id."""
        with self.store.transaction() as db:
            image_id = self.resolve(image)
            db.execute("INSERT OR IGNORE INTO image_users (image, container, created) "
                       "VALUES (?, ?, ?)", (image_id, container_id, now()))
        return image_id

    def remove_user(self, image: str, container_id: str) -> None:
        """Forget a container's use of an image (no error if it was not recorded)."""
        with self.store.transaction() as db:
            try:
                image_id = self.resolve(image)
            except NotFound:
                image_id = image
            db.execute("DELETE FROM image_users WHERE image = ? AND container = ?",
                       (image_id, container_id))

    def users(self, image: str) -> list[str]:
        image_id = self.resolve(image)
        return [r[0] for r in self._query(
            "SELECT container FROM image_users WHERE image = ? ORDER BY created", (image_id,))]

    # --- removing --------------------------------------------------------------------------
    def remove(self, ref: str, *, force: bool = False) -> list[tuple[str, str]]:
        """``docker rmi``: untag ``ref``; delete the image when no name is left.

        Refused while a container uses the image (:meth:`add_user`) or has a layer
        on it, or while its top layer is mounted. An image with several names
        removed by id needs ``force``. Returns ``[("Untagged", name), ("Deleted", id)]``.
        """
        result: list[tuple[str, str]] = []
        with self.store.transaction() as db:
            image_id, by_name = self._resolve(ref)
            names = [r[0] for r in db.execute(
                "SELECT name FROM image_names WHERE image = ? ORDER BY name", (image_id,))]
            if by_name is not None and len(names) > 1:
                db.execute("DELETE FROM image_names WHERE name = ?", (by_name,))
                return [("Untagged", by_name)]
            if by_name is None and len(names) > 1 and not force:
                raise InUse(f"image {oci.short_id(image_id)} has {len(names)} names "
                            f"({', '.join(names)}): remove them one by one, or use force")
            users = [r[0] for r in db.execute(
                "SELECT container FROM image_users WHERE image = ?", (image_id,))]
            if users:
                raise InUse(f"image {ref} ({oci.short_id(image_id)}) is used by "
                            f"{len(users)} container(s): {', '.join(users[:3])}")
            top_chain = db.execute("SELECT top_chain FROM images WHERE id = ?",
                                   (image_id,)).fetchone()[0]
            if top_chain is not None:
                top_layer = db.execute("SELECT layer FROM image_layers WHERE chain_id = ?",
                                       (top_chain,)).fetchone()[0]
                chain_layers = {r[0] for r in db.execute(
                    "SELECT layer FROM image_layers WHERE parent_chain = ?", (top_chain,))}
                others = [c for c in self.store.children(top_layer) if c not in chain_layers]
                if others:
                    raise InUse(f"image {ref} ({oci.short_id(image_id)}) has a container "
                                f"layer on it: {others[0]}")
                mounts = self.store.list_mounts(top_layer)
                if mounts:
                    raise InUse(f"image {ref} ({oci.short_id(image_id)}) is mounted at "
                                f"{mounts[0].target}")
            db.execute("DELETE FROM image_names WHERE image = ?", (image_id,))
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))
            result = [("Untagged", n) for n in names] + [("Deleted", image_id)]
        if top_chain is not None:
            self._gc_chain(top_chain)
        return result

    def _gc_chain(self, chain: str | None, token: str | None = None, *,
                  parents: bool = True) -> list[str]:
        """Remove ``chain`` and then (with ``parents``) its parents, while nothing holds them."""
        removed = []
        token = token or f"{process_token()}/{secrets.token_hex(4)}"
        while chain is not None:
            with self.store.transaction() as db:
                row = db.execute("SELECT layer, parent_chain, state FROM image_layers WHERE "
                                 "chain_id = ?", (chain,)).fetchone()
                if row is None or row["state"] != "ready":
                    break
                held = db.execute(
                    "SELECT (SELECT COUNT(*) FROM images WHERE top_chain = ?) + "
                    "(SELECT COUNT(*) FROM image_layers WHERE parent_chain = ?)",
                    (chain, chain)).fetchone()[0]
                leases = [r[0] for r in db.execute(
                    "SELECT owner FROM image_leases WHERE chain_id = ?", (chain,))]
                if held or any(_token_alive(o) for o in leases) \
                        or self.store.children(row["layer"]) \
                        or self.store.list_mounts(row["layer"]):
                    break
                db.execute("DELETE FROM image_leases WHERE chain_id = ?", (chain,))
                db.execute("UPDATE image_layers SET state = 'removing', owner = ? "
                           "WHERE chain_id = ?", (token, chain))
            try:
                if self.layers.exists(row["layer"]):
                    self.layers.remove(row["layer"])
            except LayerfsError as err:
                log.warning("keeping image layer %s: %s", chain, err)
                with self.store.transaction() as db:
                    db.execute("UPDATE image_layers SET state = 'ready', owner = NULL "
                               "WHERE chain_id = ?", (chain,))
                break
            with self.store.transaction() as db:
                db.execute("DELETE FROM image_layers WHERE chain_id = ?", (chain,))
            removed.append(chain)
            chain = row["parent_chain"] if parents else None
        return removed

    def prune(self) -> list[tuple[str, str]]:
        """Delete untagged images no container uses, then unused layers."""
        result: list[tuple[str, str]] = []
        for row in self._query("SELECT id FROM images i WHERE NOT EXISTS (SELECT 1 FROM "
                               "image_names n WHERE n.image = i.id) AND NOT EXISTS (SELECT 1 "
                               "FROM image_users u WHERE u.image = i.id)"):
            with contextlib.suppress(InUse, NotFound):
                result += self.remove(row[0])
        result += [("Deleted layer", c) for c in self._gc_unused()]
        return result

    # --- loading ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _operation(self) -> Iterator[_Operation]:
        op = _Operation(f"{process_token()}/{secrets.token_hex(4)}")
        try:
            yield op
        except BaseException:
            self._rollback(op)
            raise
        finally:
            with self.store.transaction() as db:
                db.execute("DELETE FROM image_leases WHERE owner = ?", (op.token,))

    def _rollback(self, op: _Operation) -> None:
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
            repo = oci.parse_reference(repo).rsplit(":", 1)[0]
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
        return [self.get(image.id) for image in todo]

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
        return [self.get(image.id) for image in todo]

    def layer_chain_ready(self, chain_id: str) -> bool:
        """Whether the layer for ``chain_id`` is stored and complete (a pull skips it)."""
        return bool(self._query("SELECT 1 FROM image_layers WHERE chain_id = ? AND "
                                "state = 'ready'", (chain_id,)))

    def _unpack(self, src: oci.Source, image: oci.ImageToLoad, op: _Operation,
                progress: Progress | None, *,
                verify_present: bool = True) -> tuple[str | None, int]:
        diff_ids = [layer.diff_id for layer in image.layers]
        chains = oci.chain_ids(diff_ids)
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

    def _acquire(self, chain: str, diff_id: str, parent_chain: str | None, op: _Operation,
                 progress: Progress | None) -> tuple[str, int | None, bool]:
        """Reuse the layer for ``chain`` or reserve it for us: (layer id, size, must apply)."""
        key = f"wait:{chain}"
        try:
            return self._acquire_loop(chain, diff_id, parent_chain, op, progress, key)
        finally:
            if progress is not None:
                progress.end(key)

    def _acquire_loop(self, chain: str, diff_id: str, parent_chain: str | None,
                      op: _Operation, progress: Progress | None,
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
                if not _token_alive(row["owner"]):
                    stale = row["layer"]
            if stale is not None:
                self._drop_stale(chain, stale)
                continue
            # Another process is applying (or removing) this very layer: wait for it.
            if progress is not None and not waiting:
                progress.begin(key, f"waiting for another load of layer "
                               f"{oci.short_id(chain)}", None)
            waiting = True
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _abandon(self, chain: str, op: _Operation) -> None:
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
                    layer_id: str, chain: str, op: _Operation,
                    progress: Progress | None) -> int:
        """Stream one blob into the driver, verifying both digests; mark the chain ready."""
        where = f"{src.description}: layer {layer.path}"
        blob_size = layer.size if layer.size is not None else src.size(layer.path)
        key = f"layer:{chain}"
        if progress is not None:
            progress.begin(key, f"layer {oci.short_id(layer.diff_id)}", blob_size)
        recorder = oci.TarSplitRecorder()
        try:
            with src.open(layer.path) as raw:
                blob = oci.DigestReader(raw, where, expected=layer.digest,
                                        expected_size=blob_size, progress=progress,
                                        progress_key=key, hashing=False)
                plain = open_layer_stream(blob)  # type: ignore[arg-type]
                diff = oci.DigestReader(plain, f"{where} (uncompressed)",
                                        expected=layer.diff_id, recorder=recorder)
                try:
                    labels = {LABEL_OWNER: op.token, LABEL_CHAIN: chain,
                              LABEL_DIFF: layer.diff_id}
                    rec = self.layers.apply(diff, parent_layer,  # type: ignore[arg-type]
                                            layer_id=layer_id, labels=labels)
                except LayerfsError as err:
                    if str(err).startswith(where):
                        raise
                    raise _with_context(err, where) from err
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
            progress.begin(key, f"verify {oci.short_id(layer.diff_id)}", blob_size)
        try:
            with src.open(layer.path) as raw:
                blob = oci.DigestReader(raw, where, expected=layer.digest,
                                        expected_size=blob_size, progress=progress,
                                        progress_key=key, hashing=False)
                try:
                    plain = open_layer_stream(blob)  # type: ignore[arg-type]
                    oci.DigestReader(plain, where, expected=layer.diff_id).finish()
                except (EOFError, OSError, zlib.error, zstandard.ZstdError) as err:
                    raise InvalidArgument(f"{where}: layer stream is corrupt: {err}") from err
                blob.finish()
        finally:
            if progress is not None:
                progress.end(key)

    def _publish(self, todo: Sequence[oci.ImageToLoad], tops: Sequence[tuple[str | None, int]],
                 op: _Operation) -> None:
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
        target = oci.parse_reference(name) if name else None
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
                recorder = oci.TarSplitRecorder()
                diff = oci.DigestReader(open_layer_stream(blob),  # type: ignore[arg-type]
                                        f"{label} (uncompressed)", recorder=recorder)
                rec = self.layers.apply(diff, None,  # type: ignore[arg-type]
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
            created = _rfc3339()
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
        target = oci.parse_reference(name) if name else None
        base = self.get(ref)
        path = Path(diff)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        diff_id = f"sha256:{digest.hexdigest()}"
        parent_chain = base.layers[-1].chain_id if base.layers else None
        chain = diff_id if parent_chain is None else \
            oci.sha256_digest(f"{parent_chain} {diff_id}".encode())
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
            created = _rfc3339()
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
                       tar_split: bytes, op: _Operation) -> tuple[str, int]:
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
                stale = not _token_alive(row["owner"])
            if stale:
                self._drop_stale(diff_id, row["layer"])
                continue
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        # The same layer is already stored: keep that one.
        self.layers.remove(layer_id)
        return row["layer"], row["size"] or 0

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
            writer = oci.DirArchiveWriter(tmp)
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
        writer = oci.TarArchiveWriter(f)
        try:
            self._write(selected, writer, format, compression, progress)
        except BaseException:
            writer.abort()
            raise
        writer.close()

    def _write(self, selected: list[tuple[Image, list[str]]], writer: Any, format: str,
               compression: str, progress: Progress | None) -> None:
        written: dict[str, tuple[str, int]] = {}   # diff id -> (digest, size) as written
        docker_manifest: list[dict[str, Any]] = []
        index: list[dict[str, Any]] = []
        if format == "oci":
            writer.add_bytes("oci-layout", oci.oci_layout_bytes())
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
            manifest_digest = oci.sha256_digest(manifest_bytes)
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
    def open_layer_tar(self, layer: ImageLayer) -> Iterator[IO[bytes]]:
        """The layer's tar byte for byte as loaded (its sha256 is the diff id), re-created
        from the layer's files and its tar-split record; reading it to the end fails if
        the result does not hash to the diff id. For pushing a layer to a registry."""
        rows = self._query("SELECT tar_split, tar_size FROM image_layers WHERE chain_id = ?",
                           (layer.chain_id,))
        if not rows or rows[0]["tar_split"] is None:
            raise CorruptState(f"image layer {layer.chain_id} has no tar-split record; it "
                               f"cannot be exported with its original digest")
        record, tar_size = bytes(rows[0]["tar_split"]), rows[0]["tar_size"]
        with self.layers.mounted(layer.layer_id, readonly=True) as root:
            reader = oci.TarSplitAssembler(record, root, layer.diff_id, tar_size,
                                           f"layer {oci.short_id(layer.diff_id)}")
            try:
                yield reader  # type: ignore[misc]
            finally:
                reader.close()

    def _write_layer(self, layer: ImageLayer, writer: Any, format: str, compression: str,
                     progress: Progress | None) -> tuple[str, int]:
        """Write one layer blob; returns its (digest, size) as stored."""
        rows = self._query("SELECT tar_split, tar_size FROM image_layers WHERE chain_id = ?",
                           (layer.chain_id,))
        if not rows or rows[0]["tar_split"] is None:
            raise CorruptState(f"image layer {layer.chain_id} has no tar-split record; it "
                               f"cannot be saved with its original digest")
        record, tar_size = bytes(rows[0]["tar_split"]), rows[0]["tar_size"]
        hex_diff = layer.diff_id.split(":", 1)[1]
        key = f"save:{layer.chain_id}"
        if progress is not None:
            progress.begin(key, f"layer {hex_diff[:12]}", tar_size)
        try:
            with self.layers.mounted(layer.layer_id, readonly=True) as root:
                reader = oci.TarSplitAssembler(record, root, layer.diff_id, tar_size,
                                               f"layer {hex_diff[:12]}")
                counted = _ProgressReader(reader, progress, key)
                try:
                    if format == "docker":
                        writer.add_stream(f"{hex_diff}/layer.tar", tar_size, counted)
                        return layer.diff_id, tar_size
                    if compression == "none":
                        writer.add_stream(f"blobs/sha256/{hex_diff}", tar_size, counted)
                        return layer.diff_id, tar_size
                    return self._write_compressed(counted, writer,  # type: ignore[arg-type]
                                                  compression)
                finally:
                    reader.close()
        finally:
            if progress is not None:
                progress.end(key)

    def _write_compressed(self, reader: IO[bytes], writer: Any,
                          compression: str) -> tuple[str, int]:
        import zstandard

        fd, tmp = tempfile.mkstemp(prefix=scratch_prefix("images-save", "blob"),
                                   dir=self.scratch)
        try:
            with os.fdopen(fd, "w+b") as f:
                hashed = _HashingWriter(f)
                if compression == "gzip":
                    with gzip.GzipFile(fileobj=hashed, mode="wb", compresslevel=6,  # type: ignore[arg-type]
                                       mtime=0) as gz:
                        shutil.copyfileobj(reader, gz, 1 << 20)
                else:
                    cctx = zstandard.ZstdCompressor(level=3)
                    with cctx.stream_writer(hashed, closefd=False) as zw:  # type: ignore[arg-type]
                        shutil.copyfileobj(reader, zw, 1 << 20)
                digest = "sha256:" + hashed.hash.hexdigest()
                size = hashed.size
            name = f"blobs/sha256/{digest.split(':', 1)[1]}"
            if not writer.has(name):
                writer.add_file(name, Path(tmp))
            return digest, size
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class _HashingWriter:
    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


class _ProgressReader:
    """Reports bytes read to a progress sink."""

    def __init__(self, raw: Any, progress: Progress | None, key: str) -> None:
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


# --- Dockerfile-style config changes (import --change) ------------------------------------

_CHANGE_KEYS = ("CMD", "ENTRYPOINT", "ENV", "WORKDIR", "USER", "EXPOSE", "LABEL",
                "STOPSIGNAL", "VOLUME")


def _argv(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"bad JSON array {value!r}: {err}") from None
        if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
            raise InvalidArgument(f"{value!r} must be a JSON array of strings")
        return parsed
    return ["/bin/sh", "-c", value]


def _pairs(value: str, what: str) -> list[tuple[str, str]]:
    words = shlex.split(value)
    if words and "=" not in words[0]:
        key, _, rest = value.strip().partition(" ")
        return [(key, rest.strip())]
    out = []
    for word in words:
        key, sep, val = word.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{what} {value!r}: expected KEY=VALUE")
        out.append((key, val))
    return out


def apply_change(config: dict[str, Any], change: str) -> None:
    """Apply one Dockerfile instruction (``docker import --change``) to a run config."""
    keyword, _, value = change.strip().partition(" ")
    keyword = keyword.upper()
    if keyword not in _CHANGE_KEYS:
        raise InvalidArgument(f"change {change!r}: supported instructions are "
                              f"{', '.join(_CHANGE_KEYS)}")
    if not value.strip():
        raise InvalidArgument(f"change {change!r}: {keyword} needs a value")
    if keyword == "CMD":
        config["Cmd"] = _argv(value)
    elif keyword == "ENTRYPOINT":
        config["Entrypoint"] = _argv(value)
    elif keyword == "ENV":
        env = [e for e in config.get("Env") or []]
        for key, val in _pairs(value, "ENV"):
            env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={val}"]
        config["Env"] = env
    elif keyword == "WORKDIR":
        config["WorkingDir"] = value.strip()
    elif keyword == "USER":
        config["User"] = value.strip()
    elif keyword == "EXPOSE":
        ports = dict(config.get("ExposedPorts") or {})
        for port in value.split():
            ports[port if "/" in port else f"{port}/tcp"] = {}
        config["ExposedPorts"] = ports
    elif keyword == "LABEL":
        config["Labels"] = {**(config.get("Labels") or {}), **dict(_pairs(value, "LABEL"))}
    elif keyword == "STOPSIGNAL":
        config["StopSignal"] = value.strip()
    elif keyword == "VOLUME":
        vols = _argv(value) if value.strip().startswith("[") else value.split()
        config["Volumes"] = {**(config.get("Volumes") or {}), **{v: {} for v in vols}}


def open_images(root: str | os.PathLike[str], driver: str | None = None,
                options: dict[str, str] | list[str] | None = None) -> ImageStore:
    """Open (creating if needed) a root and its image store."""
    return ImageStore.open(root, driver, options)
