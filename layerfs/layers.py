"""LayerStore: the public face of a layerfs root.

A root is a directory laid out as::

    ROOT/
      layerfs.db      metadata store (sqlite, WAL): layers, mounts, driver state
      <driver>/       the driver's own files (its "home"), e.g. ROOT/overlay2/
      mnt/<id>/       default mount points
      tmp/            scratch space (views for naive diffs, staging)

Open one with :func:`layerfs.open_root`. Every operation checks what is
allowed (parents exist, no children on remove, not mounted) inside a store
transaction, records its intent, calls the driver, then records the result —
so a process killed at any point leaves work that the next :meth:`open`
finishes or rolls back. Processes opening one root at once -- a new one too --
are ordered by :mod:`layerfs.rootlock` (flocks on the root and its parent, no files).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import mount as mountlib
from . import plugins
from .changes import Change
from .driver import Driver, Usage, scratch_owner
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InUse,
    InvalidArgument,
    LayerfsError,
    NotFound,
)
from .metastore import DriverState, LayerRecord, MetaStore, now, process_alive, process_token
from .options import DriverOptions
from .rootlock import RootHold, making_roots_in
from .units import parse_size

if TYPE_CHECKING:
    from .tar import Readable  # the tar codec loads when a layer is applied or exported

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def new_layer_id() -> str:
    """A random 64-hex id, the shape Docker uses for cache ids."""
    return secrets.token_hex(32)


class LayerStore:
    """Layers of one root, managed through one driver."""

    def __init__(self, root: Path, driver: Driver, store: MetaStore) -> None:
        self.root = root
        self.driver = driver
        self.store = store
        self.mnt_dir = root / "mnt"
        self.mnt_dir.mkdir(exist_ok=True)
        #: This open made the root directory (see :meth:`discard`).
        self.created_root = False
        #: This process's shared lock on the root while open (:mod:`layerfs.rootlock`).
        self._hold = RootHold(None)

    # --- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike[str], driver: str | type[Driver] | None = None,
             options: dict[str, str] | list[str] | None = None, *,
             recover: bool = True) -> LayerStore:
        """Open a root, creating it (one directory: its parent must exist) on first use.

        ``driver`` is a registered driver's name, a driver class (used as is, whether
        registered or not), or None: the root's own driver, else the first supported one
        (:func:`layerfs.plugins.select`). A root belongs to one driver;
        while it holds no layer it may switch to another (the old driver's state is
        torn down first). Nothing is left behind when opening fails: a root this call
        would have created is not there afterwards. Processes opening one new root at
        once all succeed: the first makes it, the others wait and adopt it
        (:mod:`layerfs.rootlock`).
        """
        if not os.fspath(root).strip():
            raise InvalidArgument("the root path is empty: give a directory, e.g. "
                                  "/var/lib/layerfs")
        root_path = Path(root).absolute()
        if isinstance(driver, str) and driver:
            plugins.load(driver)   # an unknown name fails here, before anything is made
        hold = RootHold.existing(root_path)
        if hold is None:
            with making_roots_in(root_path.parent):
                hold = RootHold.existing(root_path)   # made while we waited: adopt it
                if hold is None:
                    return cls._create(root_path, driver, options)
        return cls._open_existing(root_path, hold, driver, options, recover)

    @staticmethod
    def check_new_root(root_path: Path) -> bool:
        """Raise unless a root can be made at ``root_path`` (a directory there, or one
        that can be made in its existing parent); True if the directory must be made."""
        made_root = not root_path.exists()
        if made_root:
            parent = root_path.parent
            if not parent.exists():
                raise NotFound(f"cannot make root {root_path}: {parent} does not exist (the "
                               "root's parent directory must)")
            if not parent.is_dir():
                raise InvalidArgument(f"cannot make root {root_path}: {parent} is not a "
                                      "directory")
        elif not root_path.is_dir():
            raise InvalidArgument(f"root {root_path} is not a directory")
        where = root_path if not made_root else root_path.parent
        if not os.access(where, os.W_OK):
            why = "is on a read-only file system" if \
                os.statvfs(where).f_flag & os.ST_RDONLY else "cannot be written"
            raise LayerfsError(f"cannot make root {root_path}: {where} {why}")
        return made_root

    @classmethod
    def _create(cls, root_path: Path, driver: str | type[Driver] | None,
                options: dict[str, str] | list[str] | None) -> LayerStore:
        opts = DriverOptions.parse(options)
        made_root = cls.check_new_root(root_path)
        # Choose (and check) the driver before anything is written, so that a driver
        # that cannot work here leaves no root, database or directory behind.
        name, driver_cls = _driver_class(root_path, driver, opts)
        before = set() if made_root else set(os.listdir(root_path))
        hold: RootHold | None = None
        store: MetaStore | None = None
        drv: Driver | None = None
        try:
            if made_root:
                root_path.mkdir()
            hold = RootHold.make(root_path)
            store = MetaStore(root_path / "layerfs.db")
            drv = driver_cls(plugins.home_of(root_path, name), opts, DriverState(store, name))
            with store.transaction():
                store.set_setting("driver", name)
                if options:
                    store.set_setting("driver_options", json.dumps(opts.values, sort_keys=True))
            self = cls(root_path, drv, store)
            self.created_root = made_root
            hold.share()
            self._hold = hold
            return self
        except BaseException:
            if drv is not None:   # a pool the driver made must not outlive its files
                with contextlib.suppress(Exception):
                    drv.destroy()
            if store is not None:
                store.close()
            _remove_new_entries(root_path, None if made_root else before)
            if hold is not None:   # after the removal: waiting openers find no root
                hold.release()
            raise

    @classmethod
    def _open_existing(cls, root_path: Path, hold: RootHold,
                       driver: str | type[Driver] | None,
                       options: dict[str, str] | list[str] | None,
                       recover: bool) -> LayerStore:
        try:
            store = MetaStore(root_path / "layerfs.db")
        except BaseException:
            hold.release()
            raise
        try:
            # Driver options are part of the root: given once (first open, or
            # again to change them), they apply to every later open without -s.
            if options:
                opts = DriverOptions.parse(options)
            else:
                saved = store.get_setting("driver_options")
                opts = DriverOptions(json.loads(saved) if saved else {})
            owner = store.get_setting("driver")
            wanted = driver.name if isinstance(driver, type) else driver
            if driver and owner and wanted != owner:
                cls._switch_driver(root_path, store, owner, driver)
                owner = None
                if not options:
                    opts = DriverOptions({})   # the old driver's options are not the new one's
            name, cls_ = _driver_class(root_path, driver or owner, opts)
            drv = cls_(plugins.home_of(root_path, name), opts, DriverState(store, name))
            if owner is None:
                store.set_setting("driver", name)
            if options:
                store.set_setting("driver_options", json.dumps(opts.values, sort_keys=True))
        except BaseException:
            store.close()
            hold.release()
            raise
        self = cls(root_path, drv, store)
        self._hold = hold
        if recover and store.full is None:   # a full disk: read-only, nothing to redo
            try:
                self.recover()
            except BaseException:
                self.close()
                raise
        return self

    @staticmethod
    def _switch_driver(root_path: Path, store: MetaStore, owner: str,
                       driver: str | type[Driver]) -> None:
        """Give a root without layers to another driver: tear the old driver's state down."""
        wanted = driver.name if isinstance(driver, type) else driver
        refusal = (f"root {root_path} holds layers of driver {owner!r}, not {wanted!r}; "
                   f"use --driver {owner}, another --root, or empty it first "
                   f"(`layerfs --root {root_path} system reset`)")
        if store.list_layers(state=None):
            raise InvalidArgument(refusal)
        # The new driver must work here before the old one's state goes.
        _driver_class(root_path, driver, DriverOptions({}))
        saved = store.get_setting("driver_options")
        try:
            old = plugins.load(owner)(plugins.home_of(root_path, owner),
                                      DriverOptions(json.loads(saved) if saved else {}),
                                      DriverState(store, owner))
            old.destroy()
        except LayerfsError as err:
            raise InvalidArgument(f"{refusal} ({owner} cannot be torn down here: {err})") \
                from err
        with store.transaction() as db:
            if db.execute("SELECT COUNT(*) FROM layers").fetchone()[0]:
                raise InvalidArgument(refusal)   # another process made one meanwhile
            db.execute("DELETE FROM driver_state WHERE driver = ?", (owner,))
            db.execute("DELETE FROM settings WHERE key IN ('driver', 'driver_options')")

    def close(self) -> None:
        try:
            self.driver.cleanup()
            self.store.close()
        finally:
            self._hold.release()

    def discard(self) -> bool:
        """Close; and if this open made the root and it still holds nothing -- no layer,
        no scratch file kept for a later command (a pull's partial download), and no
        other process has it open -- remove it again, the driver's state too. For a
        first command that failed: it leaves nothing behind. True if the root was
        removed."""
        if not self.created_root:
            self.close()
            return False
        with making_roots_in(self.root.parent):   # no one adopts it while it goes
            scratch = self.driver.scratch
            kept = scratch.is_dir() and any(scratch.iterdir())
            if kept or self.store.list_layers(state=None) or not self._hold.take_exclusive():
                self.close()
                return False
            try:
                try:
                    self.driver.destroy()
                finally:
                    self.store.close()
                _remove_new_entries(self.root, None)
            finally:
                self._hold.release()
            return True

    def __enter__(self) -> LayerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- crash recovery -----------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish or roll back work whose process died; unmount leftovers. Returns actions.

        Safe while other processes work on the same root: only rows whose owner
        is dead are touched, and mounts are listed *before* the store is read —
        a live process inserts its mount row before calling mount(2), so any
        mount seen first has its row visible afterwards.
        """
        actions: list[str] = []
        seen_mounts = [info.target for base in (self.mnt_dir, self.driver.scratch)
                       for info in mountlib.mounts_under(base)]
        known_targets = set()
        for m in self.store.list_mounts():
            known_targets.add(os.path.realpath(m.target))
            if m.state == "mounting" and not process_alive(m.owner):
                if mountlib.is_mounted(m.target):
                    mountlib.unmount(m.target, lazy=True)
                with self.store.transaction() as db:
                    db.execute("DELETE FROM mounts WHERE target = ? AND state = 'mounting' "
                               "AND owner = ?", (m.target, m.owner))
                actions.append(f"rolled back half-done mount {m.target}")
            elif m.state == "mounted" and not mountlib.is_mounted(m.target):
                with self.store.transaction() as db:
                    db.execute("DELETE FROM mounts WHERE target = ? AND state = 'mounted'",
                               (m.target,))
                actions.append(f"forgot vanished mount {m.target}")
        # Mounts under mnt/ and tmp/ that the store does not know: a crash between
        # mount(2) and the store write, or a dead process's naive-diff view.
        for target in seen_mounts:
            if target not in known_targets and self._orphan(target):
                mountlib.unmount(target, lazy=True)
                actions.append(f"unmounted leftover {target}")
        for rec in self.store.list_layers(state=None):
            if rec.state == "ready" or process_alive(rec.owner):
                continue
            if self.store.children(rec.id):
                # Cannot happen through this API (children need a ready parent).
                continue
            self.driver.remove(rec.id)
            with self.store.transaction() as db:
                db.execute("DELETE FROM mounts WHERE layer = ?", (rec.id,))
                db.execute("DELETE FROM layers WHERE id = ? AND state = ?", (rec.id, rec.state))
            verb = "rolled back creation of" if rec.state == "creating" else "finished removing"
            actions.append(f"{verb} layer {rec.id}")
        return actions

    def _orphan(self, target: str) -> bool:
        """Mount points under mnt/ that the store does not know are orphans; a scratch
        view under tmp/ is one only when the process named in its name is dead."""
        scratch = os.path.realpath(self.driver.scratch)
        if target.startswith(scratch + "/"):
            top = target[len(scratch) + 1:].split("/")[0]
            return not process_alive(scratch_owner(top))
        return True

    # --- queries --------------------------------------------------------------------------------
    def get(self, layer_id: str) -> LayerRecord:
        rec = self.store.get_layer(layer_id)
        if rec is None or rec.state != "ready":
            raise NotFound(f"layer {layer_id} not found in {self.root}")
        return rec

    def resolve(self, ref: str) -> str:
        """The id of the layer ``ref`` names: its whole id or a unique prefix of it (the
        12 characters ``layerfs layer ls`` prints, say)."""
        text = ref.strip()
        if not text:
            raise InvalidArgument("empty layer id")
        if self.exists(text):
            return text
        with self.store._lock:
            rows = self.store.db.execute(
                "SELECT id FROM layers WHERE state = 'ready' AND substr(id, 1, length(?)) = ?",
                (text, text)).fetchall()
        if len(rows) == 1:
            return str(rows[0][0])
        if rows:
            raise InvalidArgument(f"layer id prefix {text!r} is ambiguous ({len(rows)} layers); "
                                  "give more characters")
        raise NotFound(f"layer {ref} not found in {self.root}")

    def exists(self, layer_id: str) -> bool:
        rec = self.store.get_layer(layer_id)
        return rec is not None and rec.state == "ready"

    def layers(self) -> list[LayerRecord]:
        return self.store.list_layers()

    def chain(self, layer_id: str) -> list[str]:
        self.get(layer_id)
        return self.store.chain(layer_id)

    def children(self, layer_id: str) -> list[str]:
        return self.store.children(layer_id)

    def status(self) -> dict[str, str]:
        info = {"Storage Driver": self.driver.name, "Root": str(self.root)}
        info.update(self.driver.status())
        info["Layers"] = str(len(self.layers()))
        return info

    def usage(self, layer_id: str) -> Usage:
        self.get(layer_id)
        return self.driver.usage(layer_id)

    def metadata(self, layer_id: str) -> dict[str, str]:
        self.get(layer_id)
        return self.driver.metadata(layer_id)

    # --- creating ---------------------------------------------------------------------------------
    def _begin_create(self, layer_id: str | None, parent: str | None, readonly: bool,
                      labels: dict[str, str] | None) -> LayerRecord:
        layer_id = layer_id or new_layer_id()
        if not _ID_RE.match(layer_id):
            raise InvalidArgument(f"invalid layer id {layer_id!r}: use letters, digits, '_.-' "
                                  "(at most 128, not starting with punctuation)")
        with self.store.transaction() as db:
            if self.store.get_layer(layer_id) is not None:
                raise AlreadyExists(f"layer {layer_id} already exists")
            depth = 1
            if parent is not None:
                prec = self.store.get_layer(parent)
                if prec is None or prec.state != "ready":
                    raise NotFound(f"parent layer {parent} not found")
                depth = prec.depth + 1
                limit = self.driver.capabilities.max_depth
                if limit is not None and depth > limit:
                    raise InvalidArgument(
                        f"{self.driver.name} mounts at most {limit} layers; parent {parent} "
                        f"is already {prec.depth} deep")
            rec = LayerRecord(layer_id, parent, self.driver.name, readonly, "creating", depth,
                              now(), None, dict(labels or {}), process_token())
            self.store.insert_layer(db, rec)
        return rec

    def _finish_create(self, layer_id: str, size: int | None) -> LayerRecord:
        rec = self.store.get_layer(layer_id)
        if rec is not None and rec.readonly:
            self.driver.seal(layer_id)
        with self.store.transaction() as db:
            db.execute("UPDATE layers SET state = 'ready', owner = NULL, size = ? WHERE id = ?",
                       (size, layer_id))
        return self.get(layer_id)

    def _abort_create(self, layer_id: str) -> None:
        with contextlib.suppress(Exception):
            self.driver.remove(layer_id)
        with self.store.transaction() as db:
            db.execute("DELETE FROM layers WHERE id = ?", (layer_id,))

    def create(self, parent: str | None = None, *, layer_id: str | None = None,
               readonly: bool = False, labels: dict[str, str] | None = None,
               size: int | str | None = None) -> LayerRecord:
        """Create a layer on ``parent``: read-write (a container layer) by default,
        read-only for an image layer. ``size`` sets a quota where the driver has them."""
        quota = parse_size(size) if isinstance(size, str) else size
        if quota is not None and not self.driver.capabilities.quotas:
            from .errors import DriverNotSupported
            raise DriverNotSupported(self.driver.name, "per-layer size quotas are not supported")
        rec = self._begin_create(layer_id, parent, readonly, labels)
        try:
            self.driver.create(rec.id, parent, readonly=readonly, size=quota)
        except BaseException:
            self._abort_create(rec.id)
            raise
        return self._finish_create(rec.id, 0 if parent is None else None)

    def apply(self, stream: Readable, parent: str | None = None, *,
              layer_id: str | None = None, labels: dict[str, str] | None = None) -> LayerRecord:
        """Create a read-only layer on ``parent`` from an OCI layer tar (any compression).

        The layer becomes visible only once the whole tar applied; on any error
        (hostile or corrupt tar, full disk) it is removed again.
        """
        rec = self._begin_create(layer_id, parent, True, labels)
        try:
            self.driver.create(rec.id, parent, readonly=True)
            size = self.driver.apply_diff(rec.id, parent, stream)
        except BaseException:
            self._abort_create(rec.id)
            raise
        return self._finish_create(rec.id, size)

    def commit(self, layer_id: str) -> LayerRecord:
        """Make a read-write layer read-only in place, without copying it (containerd's Commit).

        The layer keeps its id and files; from now on it mounts read-only and is
        sealed where the driver can (a btrfs subvolume becomes read-only).
        Refused while this store has it mounted: the writer must be done.
        Committing a read-only layer again changes nothing.
        """
        with self.store.transaction() as db:
            rec = self.get(layer_id)
            if rec.readonly:
                return rec
            mounts = self.store.list_mounts(layer_id)
            if mounts:
                raise InUse(f"layer {layer_id} is mounted at {mounts[0].target}; "
                            "unmount it before committing")
            db.execute("UPDATE layers SET readonly = 1 WHERE id = ?", (layer_id,))
            # Inside the transaction: if the driver cannot seal, the layer stays read-write.
            self.driver.seal(layer_id)
        return self.get(layer_id)

    def apply_diff(self, layer_id: str, stream: IO[bytes]) -> int:
        """Apply an OCI layer tar onto an existing, empty read-write layer; return its size.

        This is Docker's way to make an image layer (``Create`` then ``ApplyDiff``);
        :meth:`apply` is the one-step form. The layer must have no children and not
        be mounted. While the tar applies the layer is ``creating`` again, owned by
        this process: if the process is killed, recovery removes the half-applied
        layer, as it would a half-made one. If the apply fails with an error, the
        layer is left (ready, holding part of the tar) for the caller to remove, as
        Docker does.
        """
        with self.store.transaction() as db:
            rec = self.get(layer_id)
            if rec.readonly:
                raise FailedPrecondition(f"layer {layer_id} is read-only: a diff is applied "
                                         "to a new read-write layer")
            self._refuse_if_in_use(layer_id)
            db.execute("UPDATE layers SET state = 'creating', owner = ? WHERE id = ?",
                       (process_token(), layer_id))
        size = None
        try:
            size = self.driver.apply_diff(layer_id, rec.parent, stream)
        finally:
            with self.store.transaction() as db:
                db.execute("UPDATE layers SET state = 'ready', owner = NULL, "
                           "size = coalesce(?, size) WHERE id = ?", (size, layer_id))
        return size

    # --- removing -----------------------------------------------------------------------------------
    def _refuse_if_in_use(self, layer_id: str) -> None:
        """InUse while the layer has children or is mounted (inside a transaction)."""
        kids = self.store.children(layer_id)
        if kids:
            raise InUse(f"layer {layer_id} has {len(kids)} child layer(s), e.g. {kids[0]}")
        mounts = self.store.list_mounts(layer_id)
        if mounts:
            raise InUse(f"layer {layer_id} is mounted at {mounts[0].target}")

    def remove(self, layer_id: str) -> None:
        """Remove a layer; refused while it has children or is mounted."""
        with self.store.transaction() as db:
            rec = self.store.get_layer(layer_id)
            if rec is None or rec.state != "ready":
                raise NotFound(f"layer {layer_id} not found")
            self._refuse_if_in_use(layer_id)
            db.execute("UPDATE layers SET state = 'removing', owner = ? WHERE id = ?",
                       (process_token(), layer_id))
        try:
            self.driver.remove(layer_id)
        except InUse:
            # The driver refused before destroying anything (a device someone else holds
            # open): the layer is whole, so it is back to ready and the caller can retry.
            # Any other failure leaves 'removing' for recover() to finish.
            with self.store.transaction() as db:
                db.execute("UPDATE layers SET state = 'ready', owner = NULL "
                           "WHERE id = ? AND state = 'removing'", (layer_id,))
            raise
        with self.store.transaction() as db:
            db.execute("DELETE FROM layers WHERE id = ?", (layer_id,))
        with contextlib.suppress(OSError):
            (self.mnt_dir / layer_id).rmdir()

    # --- mounting ------------------------------------------------------------------------------------
    def mount(self, layer_id: str, target: str | os.PathLike[str] | None = None, *,
              readonly: bool = False) -> Path:
        """Mount the layer's merged view (at ``ROOT/mnt/<id>`` unless ``target`` is given).

        Mounting an already-mounted target again counts one more user; each
        :meth:`unmount` drops one, and the last one really unmounts.
        """
        rec = self.get(layer_id)
        if rec.readonly and not readonly:
            readonly = True
        tgt = Path(target) if target is not None else self.mnt_dir / layer_id
        tgt.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(tgt)
        with self.store.transaction() as db:
            row = db.execute("SELECT layer, users FROM mounts WHERE target = ?", (key,)).fetchone()
            if row is not None:
                if row["layer"] != layer_id:
                    raise InUse(f"{key} is already a mount of layer {row['layer']}")
                db.execute("UPDATE mounts SET users = users + 1 WHERE target = ?", (key,))
                return tgt
            db.execute("INSERT INTO mounts (target, layer, state, owner, users, readonly) "
                       "VALUES (?, ?, 'mounting', ?, 1, ?)",
                       (key, layer_id, process_token(), int(readonly)))
        try:
            mountlib.mount_all(self.driver.mounts(layer_id, readonly=readonly), tgt)
        except BaseException:
            with self.store.transaction() as db:
                db.execute("DELETE FROM mounts WHERE target = ?", (key,))
            raise
        with self.store.transaction() as db:
            db.execute("UPDATE mounts SET state = 'mounted', owner = NULL WHERE target = ?",
                       (key,))
        return tgt

    def unmount(self, layer_id: str, target: str | os.PathLike[str] | None = None, *,
                force: bool = False) -> None:
        """Drop one user of a mount; unmount when none is left (or at once with ``force``)."""
        if target is None:
            mounts = self.store.list_mounts(layer_id)
            if not mounts:
                raise NotFound(f"layer {layer_id} is not mounted")
            key = mounts[0].target
        else:
            key = os.path.realpath(target)
        with self.store.transaction() as db:
            row = db.execute("SELECT layer, users FROM mounts WHERE target = ?", (key,)).fetchone()
            if row is None or row["layer"] != layer_id:
                raise NotFound(f"layer {layer_id} is not mounted at {key}")
            if row["users"] > 1 and not force:
                db.execute("UPDATE mounts SET users = users - 1 WHERE target = ?", (key,))
                return
            mountlib.unmount(key)
            db.execute("DELETE FROM mounts WHERE target = ?", (key,))

    @contextlib.contextmanager
    def mounted(self, layer_id: str, target: str | os.PathLike[str] | None = None, *,
                readonly: bool = False) -> Iterator[Path]:
        """``with store.mounted(id) as path:`` — always unmounts, even on error."""
        path = self.mount(layer_id, target, readonly=readonly)
        try:
            yield path
        finally:
            self.unmount(layer_id, path)

    def unmount_all(self) -> list[str]:
        """Unmount everything this root mounted (``layerfs layer umount --all``)."""
        done = []
        for m in self.store.list_mounts():
            self.unmount(m.layer, m.target, force=True)
            done.append(m.target)
        return done

    # --- diffs ----------------------------------------------------------------------------------------
    def diff(self, layer_id: str, out: IO[bytes]) -> int:
        """Write the layer's changes against its parent as an OCI layer tar to ``out``.

        Returns the layer's size as Docker counts it: the bytes of regular-file data
        the tar carries (each hardlinked file once), the number :meth:`apply` returns
        for the same tar -- not the tar's length, which adds headers and padding.
        """
        rec = self.get(layer_id)
        return self.driver.diff(layer_id, rec.parent, out)

    def changes(self, layer_id: str) -> list[Change]:
        rec = self.get(layer_id)
        return self.driver.changes(layer_id, rec.parent)

    def diff_size(self, layer_id: str) -> int:
        rec = self.get(layer_id)
        return self.driver.diff_size(layer_id, rec.parent)

    # --- maintenance ----------------------------------------------------------------------------------
    def wipe(self) -> None:
        """Remove every layer, unmounting what the root mounted; the driver's state and
        the root itself stay (tests; ``layerfs system reset`` goes on from here, see
        :func:`layerfs.system.reset`)."""
        self.unmount_all()
        for rec in sorted(self.store.list_layers(state=None), key=lambda r: -r.depth):
            with contextlib.suppress(LayerfsError):
                self.driver.remove(rec.id)
            with self.store.transaction() as db:
                db.execute("DELETE FROM layers WHERE id = ?", (rec.id,))
        self.driver.cleanup()
        shutil.rmtree(self.mnt_dir, ignore_errors=True)


def _driver_class(root_path: Path, driver: str | type[Driver] | None,
                  opts: DriverOptions) -> tuple[str, type[Driver]]:
    """The driver to open ``root_path`` with, checked to work there: a class as given, a
    name, or (None) the first supported one."""
    if isinstance(driver, type):
        driver.check(plugins.home_of(root_path, driver.name), opts)
        return driver.name, driver
    name, _ = plugins.select(root_path, driver, opts)
    return name, plugins.load(name)


def _remove_new_entries(root: Path, before: set[str] | None) -> None:
    """Undo a root's creation: the whole root (``before`` is None: it did not exist), or
    the entries that were not in it before. Mounts below go first (a driver may have
    mounted a probe); nothing that was there before is touched."""
    targets = [root] if before is None else \
        [root / n for n in os.listdir(root) if n not in before] if root.is_dir() else []
    for target in targets:
        for info in mountlib.mounts_under(target):   # deepest first
            with contextlib.suppress(LayerfsError):
                mountlib.unmount(info.target, lazy=True)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()


def open_root(root: str | os.PathLike[str], driver: str | type[Driver] | None = None,
              options: dict[str, str] | list[str] | None = None) -> LayerStore:
    """Open (creating if needed) a layerfs root with ``driver`` (a name or a driver class)
    or auto-selection."""
    return LayerStore.open(root, driver, options)


def describe(store: LayerStore) -> dict[str, Any]:
    return {"root": str(store.root), "driver": store.driver.name, **store.status()}
