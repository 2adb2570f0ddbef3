"""The image catalog: which images a root has, under which names, which layers they stand
on, and who uses them (tables ``images``, ``image_names``, ``image_layers``,
``image_leases``, ``image_users`` in the root's database).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

from ..digests import short_id
from ..driver import scratch_owner
from ..errors import CorruptState, InUse, InvalidArgument, LayerfsError, NotFound
from ..layers import LayerStore
from ..metastore import now, process_alive, process_token
from ..reference import looks_like_reference, parse_reference
from .config import RunConfig, rfc3339

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


class Progress(Protocol):
    """Where long operations report bytes done (the CLI draws rich progress bars)."""

    def begin(self, key: str, description: str, total: int | None) -> None: ...
    def advance(self, key: str, amount: int) -> None: ...
    def end(self, key: str) -> None: ...



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
    #: The names the load (or pull) that returned this image gave it -- those in the
    #: archive -- unlike ``names``, which has every name the image has. Empty otherwise.
    loaded_as: tuple[str, ...] = ()

    @property
    def short_id(self) -> str:
        return short_id(self.id)

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


def token_alive(token: str | None) -> bool:
    return token is not None and process_alive(token.split("/", 1)[0])


# --- the catalog -------------------------------------------------------------------------------

class Catalog:
    """The image tables of one root: names, lookups, users, removal and crash recovery.
    :class:`~layerfs.images.ImageStore` adds loading and saving on top."""


    def __init__(self, layers: LayerStore, *, recover: bool = True) -> None:
        self.layers = layers
        self.store = layers.store
        self.store.extend_schema(_SCHEMA)
        writable = self.store.full is None   # a full disk: read-only (MetaStore)
        if writable and self.store.get_setting("images_schema") is None:
            self.store.set_setting("images_schema", IMAGES_SCHEMA_VERSION)
        self._owns_layers = False
        if recover and writable:
            self.recover()

    @classmethod
    def open(cls, root: str | os.PathLike[str], driver: str | None = None,
             options: dict[str, str] | list[str] | None = None) -> Self:
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

    def __enter__(self) -> Self:
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
                if not token_alive(row["owner"]):
                    db.execute("DELETE FROM image_leases WHERE chain_id = ? AND owner = ?",
                               (row["chain_id"], row["owner"]))
        stale = self._query("SELECT chain_id, layer, state, owner FROM image_layers "
                            "WHERE state != 'ready'")
        for row in stale:
            if token_alive(row["owner"]):
                continue
            self._drop_stale(row["chain_id"], row["layer"])
            actions.append(f"rolled back {row['state']} image layer {row['chain_id']}")
        # Layers an import applied but never recorded (killed in between).
        known = {r[0] for r in self._query("SELECT layer FROM image_layers")}
        for rec in self.layers.layers():
            owner = rec.labels.get(LABEL_OWNER)
            if owner and rec.id not in known and not token_alive(owner) \
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
        if looks_like_reference(text) and not (text.startswith("sha256:")):
            name = parse_reference(text)
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

    def image_layers_by_layer(self) -> dict[str, ImageLayer]:
        """Every ready image layer, by its layer-store id."""
        rows = self._query("SELECT chain_id, diff_id, layer, size, tar_size FROM image_layers "
                           "WHERE state = 'ready'")
        return {r["layer"]: ImageLayer(r["chain_id"], r["diff_id"], r["layer"], r["size"],
                                       r["tar_size"]) for r in rows}

    def tar_split_of(self, layer_id: str) -> tuple[bytes, int | None] | None:
        """The tar-split record of the image layer stored as ``layer_id`` (and its tar's
        size), or None if that layer is no image layer."""
        rows = self._query("SELECT tar_split, tar_size FROM image_layers WHERE layer = ? AND "
                           "state = 'ready'", (layer_id,))
        if not rows or rows[0]["tar_split"] is None:
            return None
        return bytes(rows[0]["tar_split"]), rows[0]["tar_size"]

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
                "Loaded": rfc3339(image.created),
                "TopLayer": top,
                "Layers": [dataclasses.asdict(la) for la in image.layers],
                "Users": self.users(image.id),
            },
        }

    # --- names --------------------------------------------------------------------------------
    def tag(self, ref: str, name: str) -> str:
        """Point ``name`` (``repo[:tag]``) at the image ``ref`` names; returns the name."""
        target = parse_reference(name)
        with self.store.transaction() as db:
            image_id = self.resolve(ref)
            db.execute("INSERT OR REPLACE INTO image_names (name, image, created) VALUES "
                       "(?, ?, ?)", (target, image_id, now()))
        return target

    def untag(self, name: str) -> None:
        full = parse_reference(name)
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
                raise InUse(f"image {short_id(image_id)} has {len(names)} names "
                            f"({', '.join(names)}): remove them one by one, or use force")
            users = [r[0] for r in db.execute(
                "SELECT container FROM image_users WHERE image = ?", (image_id,))]
            if users:
                raise InUse(f"image {ref} ({short_id(image_id)}) is used by "
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
                    raise InUse(f"image {ref} ({short_id(image_id)}) has a container "
                                f"layer on it: {others[0]}")
                mounts = self.store.list_mounts(top_layer)
                if mounts:
                    raise InUse(f"image {ref} ({short_id(image_id)}) is mounted at "
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
                if held or any(token_alive(o) for o in leases) \
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
