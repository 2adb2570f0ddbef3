"""containerd's snapshot model on top of a layerfs root.

containerd asks a snapshotter for *snapshots*: directory trees that it mounts
to unpack image layers and to run containers. Its vocabulary maps onto
layerfs's layers one to one:

==================  ==========================================================
containerd          layerfs
==================  ==========================================================
key (active, view)  a row of the ``snapshots`` table below, naming one layer
name (committed)    the same row after Commit: ``key`` now holds the name
Prepare(key, P)     a new read-write layer whose parent is P's layer
View(key, P)        a new read-only layer on P's layer (cheap on every driver
                    but vfs, which copies, as containerd's native snapshotter)
Commit(name, key)   the active snapshot's layer becomes read-only *in place*
                    (:meth:`LayerStore.commit`): nothing is copied
Remove(key)         the layer is removed; refused while a snapshot names it as
                    parent
Mounts(key)         the driver's mounts, as data (see below)
==================  ==========================================================

A parent is always a committed snapshot, named by its name. Labels are
containerd's string labels; layerfs stores them and never interprets them.

Mounts are the driver's own when the kernel can do them from one description
(overlay2's ``overlay``, btrfs's and vfs's bind of the layer's directory,
devicemapper's thin device with its filesystem). A union that needs a process
(the aufs driver's FUSE filesystem) or several steps (kernel aufs beyond one
page of branches) is mounted by the service itself under ``ROOT/mnt/<layer>``,
and containerd gets a bind mount of it; that mount lives until the snapshot is
committed or removed.

Crash safety follows the layer store's rule, intent first: a row is inserted
as ``creating`` (owner = this process) before its layer is made and becomes
``ready`` after; removal marks it ``removing`` first. Readers only see
``ready`` rows, and :meth:`Snapshots.recover` (run on open and by Cleanup)
rolls back or finishes the rows of a dead process — so a service killed at
any point leaves no half-made snapshot, and a restarted one serves again.

The table lives in the root's layer database (``layerfs.db``)::

    snapshots(key PRIMARY KEY, kind, layer UNIQUE, parent, state, owner,
              created_ns, updated_ns, labels)
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LayerfsError,
    NotFound,
)
from layerfs.fsinfo import Usage
from layerfs.layers import LayerStore, new_layer_id
from layerfs.metastore import process_alive, process_token
from layerfs.mount import Mount

from . import filters

#: Label on every layer this module makes, so recovery can tell them from other layers of the root.
ENGINE_LABEL = "layerfs.engine"
ENGINE = "containerd"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    key        TEXT PRIMARY KEY,  -- key of an active snapshot or view, name of a committed one
    kind       TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    layer      TEXT NOT NULL UNIQUE,
    parent     TEXT,              -- name of the committed parent snapshot
    state      TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    owner      TEXT,              -- "pid:starttime" while creating or removing
    created_ns INTEGER NOT NULL,  -- UTC, nanoseconds since the epoch
    updated_ns INTEGER NOT NULL,
    labels     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""


class Kind(enum.Enum):
    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass(frozen=True)
class SnapshotInfo:
    """What Stat and List report about one snapshot."""

    name: str
    kind: Kind
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    layer: str = ""
    """The layerfs layer holding the snapshot's files (not part of containerd's API)."""

    def field_value(self, path: tuple[str, ...]) -> str | None:
        """The value of a filter field path (see :mod:`.filters`), None if absent."""
        if not path:
            return None
        head = path[0]
        if head == "kind":
            return self.kind.value
        if head == "name":
            return self.name
        if head == "parent":
            return self.parent
        if head == "labels" and len(path) > 1:
            return self.labels.get(".".join(path[1:]))
        return None


def _info(row: sqlite3.Row) -> SnapshotInfo:
    return SnapshotInfo(row["key"], Kind(row["kind"]), row["parent"] or "",
                        json.loads(row["labels"]), row["created_ns"], row["updated_ns"],
                        row["layer"])


def _clean_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    # containerd drops a label by setting it to the empty string.
    return {k: v for k, v in (labels or {}).items() if v != ""}


class Snapshots:
    """containerd's snapshotter operations on one :class:`LayerStore`.

    Thread-safe: operations that change state run one at a time (gRPC serves
    requests on a thread pool); reads go straight to the store.
    """

    def __init__(self, layers: LayerStore) -> None:
        self.layers = layers
        self.store = layers.store
        self.store.extend_schema(_SCHEMA)
        self._lock = threading.Lock()

    # --- reading ------------------------------------------------------------------------------
    def _row(self, key: str) -> sqlite3.Row | None:
        with self.store.transaction() as db:
            row: sqlite3.Row | None = db.execute(
                "SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
        return row

    def _ready(self, key: str) -> SnapshotInfo:
        if not key:
            raise InvalidArgument("a snapshot key must not be empty")
        row = self._row(key)
        if row is None or row["state"] != "ready":
            raise NotFound(f"snapshot {key}: not found")
        return _info(row)

    def stat(self, key: str) -> SnapshotInfo:
        return self._ready(key)

    def walk(self, expressions: Sequence[str] = ()) -> Iterator[SnapshotInfo]:
        """Ready snapshots matching any of containerd's filter ``expressions``."""
        wanted = filters.parse(expressions)
        with self.store.transaction() as db:
            rows = db.execute("SELECT * FROM snapshots WHERE state = 'ready' "
                              "ORDER BY key").fetchall()
        for row in rows:
            info = _info(row)
            if wanted.matches(info.field_value):
                yield info

    def usage(self, key: str) -> Usage:
        """Bytes and inodes the snapshot's own layer uses (not its parents')."""
        return self.layers.usage(self._ready(key).layer)

    def mounts(self, key: str) -> list[Mount]:
        info = self._ready(key)
        if info.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key} is committed: only an active snapshot or "
                                     "a view has mounts (make one with Prepare or View)")
        with self._lock:
            return self._mounts_of(info.layer, readonly=info.kind is Kind.VIEW)

    # --- creating -----------------------------------------------------------------------------
    def prepare(self, key: str, parent: str = "",
                labels: Mapping[str, str] | None = None) -> list[Mount]:
        """A new active (writable) snapshot ``key`` on the committed snapshot ``parent``."""
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str = "",
             labels: Mapping[str, str] | None = None) -> list[Mount]:
        """A new read-only snapshot ``key`` showing the committed snapshot ``parent``."""
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str,
                labels: Mapping[str, str] | None) -> list[Mount]:
        if not key:
            raise InvalidArgument("a snapshot key must not be empty")
        layer = new_layer_id()
        with self._lock:
            parent_layer = None
            with self.store.transaction() as db:
                if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                    raise AlreadyExists(f"snapshot {key}: already exists")
                if parent:
                    prow = db.execute("SELECT * FROM snapshots WHERE key = ? AND state = 'ready'",
                                      (parent,)).fetchone()
                    if prow is None:
                        raise NotFound(f"parent snapshot {parent}: not found")
                    if prow["kind"] != Kind.COMMITTED.value:
                        raise InvalidArgument(f"parent {parent} is not a committed snapshot "
                                              f"(it is {prow['kind']}): commit it first")
                    parent_layer = prow["layer"]
                stamp = time.time_ns()
                db.execute("INSERT INTO snapshots (key, kind, layer, parent, state, owner, "
                           "created_ns, updated_ns, labels) VALUES (?,?,?,?,'creating',?,?,?,?)",
                           (key, kind.value, layer, parent or None, process_token(), stamp,
                            stamp, json.dumps(_clean_labels(labels), sort_keys=True)))
            try:
                self.layers.create(parent_layer, layer_id=layer, readonly=kind is Kind.VIEW,
                                   labels={ENGINE_LABEL: ENGINE})
                mounts = self._mounts_of(layer, readonly=kind is Kind.VIEW)
            except BaseException:
                self._discard(key, layer)
                raise
            with self.store.transaction() as db:
                db.execute("UPDATE snapshots SET state = 'ready', owner = NULL WHERE key = ?",
                           (key,))
            return mounts

    def _discard(self, key: str, layer: str) -> None:
        """Undo a half-made snapshot: its mounts, its layer, its row."""
        with contextlib.suppress(LayerfsError):
            self._release(layer)
        if self.layers.exists(layer):
            self.layers.remove(layer)
        with self.store.transaction() as db:
            db.execute("DELETE FROM snapshots WHERE key = ? AND layer = ?", (key, layer))

    # --- committing and removing ----------------------------------------------------------------
    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Turn the active snapshot ``key`` into the committed snapshot ``name``, in place.

        As in containerd, the committed snapshot gets new timestamps and only
        the labels given here (the active snapshot's are not inherited).
        """
        if not name:
            raise InvalidArgument("a committed snapshot's name must not be empty")
        with self._lock:
            info = self._ready(key)
            if info.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is a {info.kind.value}, not active: "
                                         "only an active snapshot can be committed")
            if self._row(name) is not None:
                raise AlreadyExists(f"snapshot {name}: already exists")
            # The writer is done: a union this service mounted goes away first
            # (containerd's own bind of it keeps working until it unmounts).
            self._release(info.layer)
            stamp = time.time_ns()
            with self.store.transaction() as db:
                db.execute("UPDATE snapshots SET key = ?, kind = 'committed', created_ns = ?, "
                           "updated_ns = ?, labels = ? WHERE key = ? AND state = 'ready'",
                           (name, stamp, stamp, json.dumps(_clean_labels(labels), sort_keys=True),
                            key))
                self.layers.commit(info.layer)

    def remove(self, key: str) -> None:
        """Remove a snapshot of any kind; refused while another names it as parent."""
        with self._lock:
            with self.store.transaction() as db:
                info = self._ready(key)
                child = db.execute("SELECT key FROM snapshots WHERE parent = ? LIMIT 1",
                                   (key,)).fetchone()
                if child is not None:
                    raise FailedPrecondition(f"cannot remove snapshot {key}: snapshot "
                                             f"{child['key']} is its child")
                db.execute("UPDATE snapshots SET state = 'removing', owner = ? WHERE key = ?",
                           (process_token(), key))
            try:
                self._release(info.layer)
                if self.layers.exists(info.layer):
                    self.layers.remove(info.layer)
            except BaseException:
                # Nothing was destroyed (the layer store refuses before touching
                # the disk): the snapshot is whole and the caller may retry.
                if self.layers.exists(info.layer):
                    with self.store.transaction() as db:
                        db.execute("UPDATE snapshots SET state = 'ready', owner = NULL "
                                   "WHERE key = ?", (key,))
                raise
            with self.store.transaction() as db:
                db.execute("DELETE FROM snapshots WHERE key = ?", (key,))

    # --- updating -----------------------------------------------------------------------------
    def update(self, name: str, labels: Mapping[str, str],
               paths: Sequence[str] = ()) -> SnapshotInfo:
        """Change a snapshot's labels, containerd's Update: only labels are mutable.

        ``paths`` is the update mask: ``labels`` replaces them all, ``labels.KEY``
        sets (or, with an empty or absent value, drops) one; no paths replace
        them all. Anything else is InvalidArgument.
        """
        with self._lock, self.store.transaction() as db:
            info = self._ready(name)
            current = dict(info.labels)
            if not paths:
                current = dict(labels)
            for path in paths:
                if path.startswith("labels."):
                    label = path[len("labels."):]
                    current[label] = labels.get(label, "")
                elif path == "labels":
                    current = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {name}: "
                                          "only labels can change")
            stamp = time.time_ns()
            db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE key = ?",
                       (json.dumps(_clean_labels(current), sort_keys=True), stamp, name))
        return self._ready(name)

    # --- mounts ---------------------------------------------------------------------------------
    def _mounts_of(self, layer: str, *, readonly: bool) -> list[Mount]:
        mounts = self.layers.driver.mounts(layer, readonly=readonly)
        if _kernel_can_mount(mounts):
            return mounts
        target = self.layers.mnt_dir / layer
        if not self._live_mount(layer, target):
            self.layers.mount(layer, target, readonly=readonly)
        return [Mount("bind", str(target), ("rbind", "ro" if readonly else "rw"))]

    def _live_mount(self, layer: str, target: Path) -> bool:
        """Whether this service's mount of ``layer`` at ``target`` is up and answering.

        A FUSE union whose server died still shows in the mount table but fails
        every access with ENOTCONN: it is unmounted so that it can be remounted.
        """
        key = os.path.realpath(target)
        if not any(m.target == key for m in self.store.list_mounts(layer)):
            return False
        try:
            os.stat(target)
        except OSError as err:
            if err.errno != errno.ENOTCONN:
                raise
            self.layers.unmount(layer, target, force=True)
            return False
        return True

    def _release(self, layer: str) -> None:
        """Unmount what this service mounted for ``layer``."""
        for m in self.store.list_mounts(layer):
            self.layers.unmount(layer, m.target, force=True)

    # --- recovery --------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Roll back or finish the work of a dead process; returns what was done.

        Rows being created are removed with their layer; rows being removed are
        finished. Layers made for snapshots that no row names (a crash between
        removing the row and the layer) are removed too.
        """
        actions = []
        with self._lock:
            with self.store.transaction() as db:
                rows = db.execute("SELECT * FROM snapshots WHERE state != 'ready'").fetchall()
            for row in rows:
                if process_alive(row["owner"]):
                    continue
                self._discard(row["key"], row["layer"])
                verb = "rolled back" if row["state"] == "creating" else "finished removing"
                actions.append(f"{verb} snapshot {row['key']}")
            with self.store.transaction() as db:
                named = {r[0] for r in db.execute("SELECT layer FROM snapshots")}
            orphans = [rec for rec in self.layers.layers()
                       if rec.labels.get(ENGINE_LABEL) == ENGINE and rec.id not in named]
            for rec in sorted(orphans, key=lambda r: -r.depth):
                with contextlib.suppress(LayerfsError):
                    self._release(rec.id)
                self.layers.remove(rec.id)
                actions.append(f"removed layer {rec.id} of no snapshot")
        return actions

    def cleanup(self) -> list[str]:
        """containerd's Cleanup: reclaim what no snapshot uses (after a crash)."""
        return [*self.layers.recover(), *self.recover()]


def _kernel_can_mount(mounts: Sequence[Mount]) -> bool:
    """One mount that a plain mount(2) performs (no helper process, no remount steps)."""
    if len(mounts) != 1:
        return False
    m = mounts[0]
    return not m.helper and not m.type.startswith("fuse.") and "remount" not in m.options
