"""The metadata store: one sqlite3 database per root, in WAL mode.

It owns everything that is not file contents: layer ids, parentage, which
driver made them, their state, sizes, labels, the mounts layerfs made, and a
small key/value space per driver (device ids, probed features). Every change
goes through :meth:`MetaStore.transaction`, which takes sqlite's write lock up
front (``BEGIN IMMEDIATE``) so that concurrent processes on one root
serialize instead of failing with "database is locked" half-way.

Crash safety follows one rule: write the intent before touching the disk and
the result after. A layer row is inserted as ``creating`` (with the pid of
its owner) before the driver creates anything, and only becomes ``ready``
when complete; removal marks it ``removing`` first. Readers only ever see
``ready`` layers. :meth:`MetaStore.stale_work` finds rows whose owner process has
died, which :class:`~layerfs.layers.LayerStore` then finishes or rolls back.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorruptState, DiskFull

SCHEMA_VERSION = 2

#: Version 1: what a fresh database starts with; :data:`_MIGRATIONS` take it further.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    id        TEXT PRIMARY KEY,
    parent    TEXT REFERENCES layers(id),
    driver    TEXT NOT NULL,
    readonly  INTEGER NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    owner     TEXT,              -- "pid:starttime" of the process doing creating/removing
    depth     INTEGER NOT NULL,  -- 1 for a layer without parent
    created   REAL NOT NULL,
    size      INTEGER,           -- diff size, known once applied/committed
    labels    TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE TABLE IF NOT EXISTS mounts (
    target    TEXT PRIMARY KEY,
    layer     TEXT NOT NULL REFERENCES layers(id),
    state     TEXT NOT NULL CHECK (state IN ('mounting', 'mounted')),
    owner     TEXT,
    users     INTEGER NOT NULL DEFAULT 1,
    readonly  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS driver_state (
    driver    TEXT NOT NULL,
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (driver, key)
);
CREATE TABLE IF NOT EXISTS settings (
    key       TEXT PRIMARY KEY,
    value     TEXT NOT NULL
);
"""

#: What each schema version adds to the one before. They run in order inside the
#: transaction that opens the store, so a database is wholly at one version or the other,
#: whichever process opens it first.
_MIGRATIONS: dict[int, str] = {
    # 2: the per-layer file index (layerfs.inspect). A layer's index is its diff as a list
    # of entries, read once and kept: explain/explore/diff then never read a layer tar
    # again. Rows go with their layer (ON DELETE CASCADE), in the same transaction.
    2: """
CREATE TABLE layer_index (
    layer     TEXT PRIMARY KEY REFERENCES layers(id) ON DELETE CASCADE,
    format    INTEGER NOT NULL,  -- layerfs.inspect.index.INDEX_FORMAT of the rows
    source    TEXT NOT NULL,     -- where the entries were read: 'tar-split' or 'diff'
    entries   INTEGER NOT NULL,
    bytes     INTEGER NOT NULL,  -- regular-file bytes: the size of the layer's tar data
    built     REAL NOT NULL
);
CREATE TABLE layer_files (
    layer     TEXT NOT NULL REFERENCES layer_index(layer) ON DELETE CASCADE,
    path      BLOB NOT NULL,     -- relative, '/'-separated, no leading slash: "usr/bin/env"
    kind      TEXT NOT NULL,     -- f file, d dir, l symlink, h hardlink, c/b device, p fifo,
                                 -- w whiteout (the path is deleted below this layer)
    mode      INTEGER NOT NULL,
    uid       INTEGER NOT NULL,
    gid       INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    mtime     INTEGER NOT NULL,  -- nanoseconds
    link      BLOB,              -- symlink or hardlink target
    flags     INTEGER NOT NULL DEFAULT 0,  -- 1 opaque directory (hides all below it),
                                           -- 2 implicit directory (no entry of its own)
    PRIMARY KEY (layer, path)
) WITHOUT ROWID
""",
}


def process_token(pid: int | None = None) -> str:
    """``pid:starttime`` — identifies a process even after its pid is reused."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return f"{pid}:{int(fields[19])}"
    except (FileNotFoundError, IndexError, ValueError):
        return f"{pid}:0"


#: How long :func:`process_alive` waits for a process that is already dying to be gone.
DYING_WAIT = 10.0
_PF_EXITING = 0x4                       # task flags (linux/sched.h): in do_exit()
_SIGKILL_BIT = 1 << (9 - 1)             # SIGKILL in /proc/PID/status's pending masks


def process_alive(token: str | None) -> bool:
    """Whether the process ``token`` names can still do work on the root.

    A pid whose start time differs is another process, and a zombie's work is over
    (where nobody reaps, like this VM's PID 1, it would otherwise look alive for
    ever). A process that was sent SIGKILL, or is already exiting, is still listed
    for a moment -- ``kill -9 PID; layerfs ...`` used to find it "alive" and leave its
    half-made layer to a later command. It will never return to user space, but a
    write it has in flight may still land: wait (at most :data:`DYING_WAIT` s) until it
    is gone, then say dead. So the answer after ``kill -9`` returns is always "dead".
    """
    if not token:
        return False
    pid_text, _, start = token.partition(":")
    try:
        pid = int(pid_text)
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if int(fields[19]) != int(start) or fields[0] in (b"Z", b"X", b"x"):
            return False
        dying = int(fields[6]) & _PF_EXITING or _sigkill_pending(pid)
    except (OSError, ValueError, IndexError):
        return False
    if dying:
        _wait_gone(pid)
        return process_token(pid) == token and not _is_zombie(pid)
    return True


def _sigkill_pending(pid: int) -> bool:
    # A fatal signal stays in the shared pending set until the process is reaped.
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith((b"ShdPnd:", b"SigPnd:")) and \
                    int(line.split()[1], 16) & _SIGKILL_BIT:
                return True
    return False


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X", b"x")
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int) -> None:
    """Until ``pid`` has exited (a pidfd turns readable once it is a zombie or gone)."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return   # already reaped
    try:
        select.select([fd], [], [], DYING_WAIT)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LayerRecord:
    """One layer as the store knows it."""

    id: str
    parent: str | None
    driver: str
    readonly: bool
    state: str
    depth: int
    created: float
    size: int | None
    labels: dict[str, str] = field(default_factory=dict)
    owner: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "parent": self.parent, "driver": self.driver,
                "readonly": self.readonly, "state": self.state, "depth": self.depth,
                "created": self.created, "size": self.size, "labels": self.labels}


@dataclass(frozen=True)
class MountRecord:
    target: str
    layer: str
    state: str
    owner: str | None
    users: int
    readonly: bool


#: Below this much free space a filesystem counts as full (sqlite needs a few pages).
_FULL_BELOW = 1 << 20


def disk_full(path: Path) -> bool:
    """Whether the filesystem holding ``path`` has (almost) no space left for us."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return free * st.f_frsize < _FULL_BELOW


class MetaStore:
    """Thin typed layer over the sqlite database. Thread-safe within a process.

    On a full filesystem the database cannot even be opened for writing (WAL mode
    creates its shared-memory file): it is then opened read-only, from the main file
    alone, so listings still work, and :attr:`full` says why every write fails with
    :class:`~layerfs.errors.DiskFull`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._depth = 0
        self.full: str | None = None
        try:
            self._db = self._connect()
        except sqlite3.OperationalError:
            if not (self.path.exists() and disk_full(self.path.parent)):
                raise
            # immutable: no lock, no -shm; what the last writer left unchecked-pointed
            # in the -wal is not seen (every layerfs process checkpoints on close).
            uri = f"file:{urllib.parse.quote(str(self.path))}?immutable=1"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self.full = f"{self.path.parent}: no space left on its filesystem"

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                             check_same_thread=False)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 60000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            self._db = db
            with self.transaction():
                self._run_ddl(_SCHEMA)
                db.execute("INSERT OR IGNORE INTO settings VALUES ('schema', '1')")
                self._migrate()
        except BaseException:
            db.close()
            raise
        return db

    def _run_ddl(self, ddl: str) -> None:
        for statement in ddl.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def _migrate(self) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` (inside the opening transaction)."""
        row = self._db.execute("SELECT value FROM settings WHERE key = 'schema'").fetchone()
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            raise CorruptState(f"{self.path}: schema version {row and row[0]!r} is not a "
                               f"number") from None
        if version > SCHEMA_VERSION:
            raise CorruptState(f"{self.path} was written by a newer layerfs (schema "
                               f"{version}; this one knows {SCHEMA_VERSION}): upgrade layerfs")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._run_ddl(_MIGRATIONS[target])
            self._db.execute("UPDATE settings SET value = ? WHERE key = 'schema'",
                             (str(target),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: all or nothing, serialized across processes.

        Nested calls join the outer transaction.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            if self.full is not None:
                raise DiskFull(f"{self.full}: nothing can be recorded until space is freed")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._depth = 1
                try:
                    yield self._db
                except BaseException:
                    self._depth = 0
                    with contextlib.suppress(sqlite3.OperationalError):
                        self._db.execute("ROLLBACK")
                    raise
                self._depth = 0
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as err:
                self._depth = 0
                if disk_full(self.path.parent) or "disk is full" in str(err):
                    with contextlib.suppress(sqlite3.OperationalError):
                        self._db.execute("ROLLBACK")
                    raise DiskFull(f"{self.path.parent}: no space left on its filesystem: "
                                   f"nothing was recorded ({err})") from err
                raise

    def extend_schema(self, ddl: str) -> None:
        """Let a higher level (images, containers) add its own tables to this database
        (not on a full disk, read-only: the tables are there or the root is empty)."""
        if self.full is not None:
            return
        with self.transaction() as db:
            for statement in ddl.split(";"):
                if statement.strip():
                    db.execute(statement)

    @property
    def db(self) -> sqlite3.Connection:
        return self._db

    # --- settings -------------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    # --- layers ---------------------------------------------------------------------------
    @staticmethod
    def _layer(row: sqlite3.Row) -> LayerRecord:
        return LayerRecord(row["id"], row["parent"], row["driver"], bool(row["readonly"]),
                           row["state"], row["depth"], row["created"], row["size"],
                           json.loads(row["labels"]), row["owner"])

    def get_layer(self, layer_id: str) -> LayerRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM layers WHERE id = ?", (layer_id,)).fetchone()
        return None if row is None else self._layer(row)

    def list_layers(self, *, state: str | None = "ready") -> list[LayerRecord]:
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM layers ORDER BY created, id").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM layers WHERE state = ? ORDER BY created, id",
                                        (state,)).fetchall()
        return [self._layer(r) for r in rows]

    def children(self, layer_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM layers WHERE parent = ?", (layer_id,))
            return [r[0] for r in rows]

    def insert_layer(self, db: sqlite3.Connection, rec: LayerRecord) -> None:
        db.execute("INSERT INTO layers (id, parent, driver, readonly, state, owner, depth, created,"
                   " size, labels) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (rec.id, rec.parent, rec.driver, int(rec.readonly), rec.state, rec.owner,
                    rec.depth, rec.created, rec.size, json.dumps(rec.labels, sort_keys=True)))

    def chain(self, layer_id: str) -> list[str]:
        """The layer and its ancestors, top first."""
        result = []
        current: str | None = layer_id
        with self._lock:
            while current is not None:
                result.append(current)
                row = self._db.execute("SELECT parent FROM layers WHERE id = ?",
                                       (current,)).fetchone()
                current = None if row is None else row[0]
        return result

    # --- mounts ---------------------------------------------------------------------------
    @staticmethod
    def _mount(row: sqlite3.Row) -> MountRecord:
        return MountRecord(row["target"], row["layer"], row["state"], row["owner"],
                           row["users"], bool(row["readonly"]))

    def list_mounts(self, layer_id: str | None = None) -> list[MountRecord]:
        with self._lock:
            if layer_id is None:
                rows = self._db.execute("SELECT * FROM mounts").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM mounts WHERE layer = ?",
                                        (layer_id,)).fetchall()
        return [self._mount(r) for r in rows]


    # --- layer file index (layerfs.inspect) -----------------------------------------------
    #: Columns of one index entry, in the order the methods below take and return them.
    INDEX_COLUMNS = ("path", "kind", "mode", "uid", "gid", "size", "mtime", "link", "flags")

    def index_info(self, layer_id: str) -> IndexInfo | None:
        """What is known about a layer's cached file index, or None if it has none."""
        with self._lock:
            row = self._db.execute("SELECT * FROM layer_index WHERE layer = ?",
                                   (layer_id,)).fetchone()
        return None if row is None else IndexInfo(row["layer"], row["format"], row["source"],
                                                  row["entries"], row["bytes"], row["built"])

    def save_index(self, layer_id: str, *, format: int, source: str,
                   rows: list[tuple[Any, ...]], total_bytes: int) -> bool:
        """Replace a layer's index with ``rows`` (:data:`INDEX_COLUMNS`), all or nothing.

        Returns False (and stores nothing) when the layer is not a ready layer any more: a
        removal that raced the indexing must not leave rows behind.
        """
        with self.transaction() as db:
            state = db.execute("SELECT state FROM layers WHERE id = ?", (layer_id,)).fetchone()
            if state is None or state[0] != "ready":
                return False
            db.execute("DELETE FROM layer_index WHERE layer = ?", (layer_id,))
            db.execute("INSERT INTO layer_index (layer, format, source, entries, bytes, built) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (layer_id, format, source, len(rows), total_bytes, now()))
            db.executemany("INSERT INTO layer_files (layer, path, kind, mode, uid, gid, size, "
                           "mtime, link, flags) VALUES (?,?,?,?,?,?,?,?,?,?)",
                           [(layer_id, *row) for row in rows])
        return True

    def drop_index(self, layer_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM layer_index WHERE layer = ?", (layer_id,))

    def index_rows(self, layer_id: str) -> list[tuple[Any, ...]]:
        """Every entry of a layer's index (:data:`INDEX_COLUMNS`), in path order."""
        with self._lock:
            cur = self._db.cursor()
            cur.row_factory = None   # plain tuples: tens of thousands of rows, no Row objects
            return cur.execute(
                "SELECT path, kind, mode, uid, gid, size, mtime, link, flags FROM layer_files "
                "WHERE layer = ? ORDER BY path", (layer_id,)).fetchall()

    def index_lookup(self, layer_id: str, paths: list[bytes]) -> list[tuple[Any, ...]]:
        """The entries of ``paths`` (where the layer has one) in a layer's index."""
        if not paths:
            return []
        with self._lock:
            marks = ",".join("?" * len(paths))
            return [tuple(r) for r in self._db.execute(
                f"SELECT path, kind, mode, uid, gid, size, mtime, link, flags FROM layer_files "
                f"WHERE layer = ? AND path IN ({marks})", (layer_id, *paths))]


@dataclass(frozen=True)
class IndexInfo:
    """The summary row of a layer's cached file index."""

    layer: str
    format: int
    source: str
    entries: int
    bytes: int
    built: float


class DriverState:
    """A driver's own key/value metadata inside the store (JSON values)."""

    def __init__(self, store: MetaStore, driver: str) -> None:
        self._store = store
        self._driver = driver

    def get(self, key: str, default: Any = None) -> Any:
        with self._store._lock:
            row = self._store.db.execute(
                "SELECT value FROM driver_state WHERE driver = ? AND key = ?",
                (self._driver, key)).fetchone()
        return default if row is None else json.loads(row[0])

    def set(self, key: str, value: Any) -> None:
        with self._store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO driver_state VALUES (?, ?, ?)",
                       (self._driver, key, json.dumps(value, sort_keys=True)))

    def delete(self, key: str) -> None:
        with self._store.transaction() as db:
            db.execute("DELETE FROM driver_state WHERE driver = ? AND key = ?",
                       (self._driver, key))

    def items(self, prefix: str = "") -> dict[str, Any]:
        with self._store._lock:
            # Not LIKE: it folds ASCII case and treats "_" and "%" in the prefix as wildcards.
            rows = self._store.db.execute(
                "SELECT key, value FROM driver_state WHERE driver = ? "
                "AND substr(key, 1, length(?)) = ?",
                (self._driver, prefix, prefix)).fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._store.transaction()


def now() -> float:
    return time.time()
