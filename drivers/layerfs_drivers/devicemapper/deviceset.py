"""The device set of one layerfs root: its thin pool, base device and layer devices.

This is the part of Docker's ``devmapper/deviceset.go`` that decides *which*
thin device to make, snapshot, activate or delete and keeps the records
straight; the pool and dmsetup plumbing live in :mod:`.pool` and
:mod:`.dmsetup`, the records in :mod:`.metadata`, the options in :mod:`.config`.

Processes. Several processes may use one root at once (the CLI, a runner, the
tests' subprocesses). Two ``flock`` locks in the driver home keep them apart:

* ``devices.lock`` (exclusive, held for milliseconds): every change to the pool
  or the records -- id allocation, messages, activation, deletion, recovery.
* ``users.lock`` (shared, held from open to :meth:`DeviceSet.close`): at close,
  a process that can take it *exclusively* knows no other process uses the
  root, and only then deactivates idle thin devices (and, in loopback mode,
  the pool and its loop devices). A process that dies releases both.

Activation. A thin device is mapped (``dmsetup create``) when it is first
needed -- :meth:`mounts`, a snapshot's grow, a discard -- and stays mapped while
the root is open; it is unmapped by ``remove`` and by the last user's close,
unless it is open (mounted). So a layer mounted by ``layerfs layer mount``
keeps its device (and the pool) after the command exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from layerfs import extents
from layerfs import mount as mountlib
from layerfs.driver import scratch_prefix
from layerfs.errors import (
    AlreadyExists,
    CorruptState,
    ExternalCommandFailed,
    InUse,
    InvalidArgument,
    LayerfsError,
    NotFound,
    command_error,
)
from layerfs.mount import Mount

from . import dmsetup
from .config import DEFAULT_VG, LOOPBACK_WARNING, Config, Setup, reconcile
from .dmsetup import SECTOR, TableLine
from .metadata import BASE, DeviceRecord, Metadata, Transaction
from .pool import (
    MAX_THIN_ID,
    DirectLvmPool,
    LoopbackPool,
    PoolStatus,
    ThinPool,
    ThinUsage,
    lvm_dm_name,
)
from .pool import _loops_of as loops_of
from .pool import _rdev as loop_rdev

DM_NAME_MAX = 127  # DM_NAME_LEN (128) including the NUL


class PoolSpaceLow(LayerfsError):
    """The pool has less free data or metadata space than ``min_free_space``."""


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _run(cmd: list[str], *, what: str | None = None) -> str:
    env = dict(os.environ, PAGER="__none__", DEBUGFS_PAGER="__none__")
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, env=env,
                              stdin=subprocess.DEVNULL).stdout
    except subprocess.CalledProcessError as err:
        raise command_error(err) from err
    except FileNotFoundError as err:
        raise ExternalCommandFailed(f"{what or cmd[0]}: {cmd[0]} is not installed") from err


def device_mounts(devno: int) -> list[tuple[str, str, bool]]:
    """Mounts of block device ``devno`` in this namespace: (target, fs root, superblock ro)."""
    return [(info.target, info.root, "ro" in info.super_option_set)
            for info in mountlib.mountinfo() if info.devno == devno]


class DeviceSet:
    """Thin devices of one root. All public methods may be called from any process."""

    def __init__(self, home: Path, config: Config, meta: Metadata, scratch: Path) -> None:
        self.home = home
        self.config = config
        self.meta = meta
        self.scratch = scratch
        self.pool: ThinPool | None = None
        self.record: dict[str, Any] = {}
        self.setup: Setup = config.setup
        self._users_fd: int | None = None
        self._active: set[str] = set()  # thin devices known mapped (while we are a user)
        self._pool_devno: str | None = None

    # --- locks ------------------------------------------------------------------------------
    def _lockfile(self, name: str) -> int:
        return os.open(self.home / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The devices lock: one process at a time changes the pool or the records."""
        fd = self._lockfile("devices.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _join(self) -> None:
        if self._users_fd is None:
            fd = self._lockfile("users.lock")
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._users_fd = fd

    # --- opening ----------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.setup.mode

    def open(self) -> list[str]:
        """Set up the pool on first use, else reattach it; recover; make the base device."""
        self._join()
        self._pool_devno = None
        try:
            with self.locked():
                record = self.meta.pool()
                if record is None:
                    self._setup_pool()
                else:
                    self._attach_pool(record)
                actions = self._recover()
                self._ensure_base()
                actions += self._retry_deleted()
        except BaseException:
            self._leave()
            raise
        return actions

    def _ensure(self) -> ThinPool:
        """Reopen after :meth:`close` (the driver may be used again after cleanup)."""
        if self.pool is None or self._users_fd is None:
            self.open()
        assert self.pool is not None
        return self.pool

    def thin_prefix(self) -> str:
        """Docker's naming: ``<prefix>-<maj>:<min>-<inode of the driver home>``."""
        st = os.stat(self.home)
        return f"layerfs-{os.major(st.st_dev)}:{os.minor(st.st_dev)}-{st.st_ino}"

    def _setup_pool(self) -> None:
        setup = self.config.setup
        prefix = self.thin_prefix()
        record: dict[str, Any] = {"setup": setup.to_record(), "prefix": prefix,
                                  "created": time.time()}
        created: ThinPool | None = None
        if setup.mode == "loopback":
            loop_dir = self.home / "loopback"
            name = setup.pool_name or f"{prefix}-pool"
            if (loop_dir / "pool.json").exists():
                # A crash after the pool was made but before its record: it is ours.
                pool: ThinPool = LoopbackPool.open(loop_dir)
            else:
                self._discard_half_made_pool(loop_dir, name)
                pool = created = LoopbackPool.create(
                    loop_dir, name, data_size=setup.loopdatasize,
                    metadata_size=setup.loopmetadatasize, block_size=setup.blocksize)
                print(f"WARNING: {LOOPBACK_WARNING}", file=sys.stderr)
            record.update(name=pool.name, loop_dir=str(loop_dir))
        elif setup.mode == "direct-lvm":
            assert setup.directlvm_device
            vg = setup.pool_name or DEFAULT_VG
            pool = created = DirectLvmPool.create(
                setup.directlvm_device, vg, setup.thinp_percent, setup.thinp_metapercent,
                setup.thinp_autoextend_threshold, setup.thinp_autoextend_percent,
                force=setup.directlvm_device_force)
            record.update(name=pool.name, vg=vg, lv=pool.lv)
        else:
            assert setup.thinpooldev
            pool = open_existing(setup.thinpooldev)
            used = pool.status().data_used
            if used:
                raise InvalidArgument(
                    f"devicemapper: unable to take ownership of thin pool {pool.name} that "
                    f"already has used data blocks ({human(used)}); give layerfs a pool of its own")
            record.update(name=pool.name)
            if isinstance(pool, DirectLvmPool):
                record.update(vg=pool.vg, lv=pool.lv)
        try:
            with self.meta.transaction():
                self.meta.set_pool(record)
                self.meta.state.set("transaction_id", pool.status().transaction_id)
        except BaseException:
            if isinstance(created, (LoopbackPool, DirectLvmPool)):
                with contextlib.suppress(Exception):
                    created.destroy()
            raise
        self.pool, self.record, self.setup = pool, record, setup

    @staticmethod
    def _discard_half_made_pool(loop_dir: Path, name: str) -> None:
        """Files without pool.json: a crash inside LoopbackPool.create. Remove what it
        made -- the pool device only if its table names the loops of these files."""
        files = [loop_dir / f for f in ("data", "metadata") if (loop_dir / f).exists()]
        loops = [dev for f in files for dev in loops_of(f)]
        if loops and dmsetup.exists(name):
            lines = dmsetup.table(name)
            ours = {loop_rdev(dev) for dev in loops}
            if lines and lines[0].target == "thin-pool" and set(lines[0].args.split()[:2]) <= ours:
                dmsetup.remove(name)
        for dev in loops:
            _run(["losetup", "-d", dev])
        for f in files:
            f.unlink()

    def _attach_pool(self, record: dict[str, Any]) -> None:
        recorded = Setup.from_record(record["setup"])
        setup = reconcile(recorded, self.config)
        if setup.mode == "loopback":
            pool: ThinPool = LoopbackPool.open(self.home / "loopback")  # home-relative
        elif setup.mode == "direct-lvm":
            lvm = DirectLvmPool(record["vg"], record.get("lv", "thinpool"))
            lvm.ensure_active()
            pool = lvm
        else:
            assert setup.thinpooldev
            pool = open_existing(setup.thinpooldev)
        if pool.name != record["name"]:
            raise CorruptState(f"devicemapper: the pool is {pool.name}, the store recorded "
                               f"{record['name']}")
        if setup != recorded:
            record = {**record, "setup": setup.to_record()}
            self.meta.set_pool(record)
        self.pool, self.record, self.setup = pool, record, setup

    def _recover(self) -> list[str]:
        """Finish or roll back a device transaction a dead process left open."""
        txn = self.meta.txn()
        if txn is None:
            return []
        pool = self.pool
        assert pool is not None
        current = pool.status().transaction_id
        what = "the base device" if txn.layer == BASE else f"layer {txn.layer}"
        if current >= txn.id:
            self.meta.close_txn(current)
            return [f"devicemapper: completed the transaction that made {what} (thin id "
                    f"{txn.dev_id})"]
        name = self.thin_name(txn.layer)
        if dmsetup.exists(name):
            dmsetup.remove(name)
        with contextlib.suppress(NotFound):
            pool.delete_thin(txn.dev_id)
        self.meta.rollback_txn(txn)
        return [f"devicemapper: rolled back the uncommitted thin device {txn.dev_id} of {what}"]

    # --- the base device --------------------------------------------------------------------
    def _ensure_base(self) -> None:
        base = self.meta.base()
        if base is None:
            base = self._make_device(BASE, None, self.setup.basesize, initialized=False)
        if not base.initialized:
            dev = self.activate(base)
            self._mkfs(dev)
            self.deactivate(base.name)
            base = replace(base, initialized=True)
            self.meta.put_device(base)
        if base.size < self.setup.basesize:
            # Docker lets dm.basesize grow on restart: grow the base device and its fs.
            if dmsetup.exists(base.name):
                self.deactivate(base.name)
            base = replace(base, size=self.setup.basesize)
            self.meta.put_device(base)
            self._grow_fs(base)
            self.deactivate(base.name)

    def _mkfs(self, dev: Path) -> None:
        if self.setup.fs == "ext4":
            # Full inodes (256 bytes: nanosecond times) even on small devices, and no
            # lazy init: a background ext4lazyinit would write every snapshot's blocks.
            _run(["mkfs.ext4", "-q", "-F", "-T", "default", "-E",
                  "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                  *self.setup.mkfsarg, str(dev)])
            # The layer is the filesystem's root: lost+found would be a file of every
            # layer (Docker used a rootfs/ subdirectory instead; that needs a second
            # mount per layer). e2fsck recreates it if it ever needs it.
            _run(["debugfs", "-w", "-R", "rmdir lost+found", str(dev)])
            listing = _run(["debugfs", "-R", "ls -p /", str(dev)])
            if "/lost+found/" in listing:
                raise ExternalCommandFailed(f"debugfs could not remove lost+found on {dev}")
        else:
            _run(["mkfs.xfs", "-q", "-f", "-K", *self.setup.mkfsarg, str(dev)])

    def mount_options(self, readonly: bool) -> tuple[str, ...]:
        opts = list(self.config.runtime.mountopt)
        if self.setup.fs == "xfs" and "nouuid" not in opts:
            opts.append("nouuid")  # every snapshot shares the base's filesystem UUID
        if readonly:
            opts.append("ro")
        return tuple(opts)

    def _grow_fs(self, rec: DeviceRecord) -> None:
        """Grow the filesystem on ``rec`` (inactive) to the record's size."""
        dev = self.activate(rec)
        target = Path(tempfile.mkdtemp(prefix=scratch_prefix("grow", rec.layer or "base"),
                                       dir=self.scratch))
        try:
            with mountlib.mounted([Mount(self.setup.fs, str(dev), self.mount_options(False))],
                                  target):
                if self.setup.fs == "ext4":
                    _run(["resize2fs", str(dev)])
                else:
                    _run(["xfs_growfs", str(target)])
        finally:
            with contextlib.suppress(OSError):
                target.rmdir()

    # --- naming and ids ---------------------------------------------------------------------
    def thin_name(self, layer: str) -> str:
        """dm name of a layer's device: ``<prefix>-<layer id>``; the base is ``<prefix>-base``.

        Layer ids never contain ``=``, so the hashed form used for ids too long
        for a dm name (or named ``base``/``pool``) cannot collide with another id.
        """
        prefix = self.record.get("prefix") or self.thin_prefix()
        if layer == BASE:
            return f"{prefix}-base"
        name = f"{prefix}-{layer}"
        if len(name) > DM_NAME_MAX or layer in ("base", "pool"):
            import hashlib

            name = f"{prefix}-={hashlib.sha256(layer.encode()).hexdigest()[:48]}"
        return name

    def _allocate(self, start: int) -> int:
        used = self.meta.used_ids()
        candidate = start
        for _ in range(MAX_THIN_ID):
            if not 1 <= candidate <= MAX_THIN_ID:
                candidate = 1
            if candidate not in used:
                return candidate
            candidate += 1
        raise PoolSpaceLow("devicemapper: all 16M thin device ids are in use")

    def _make_device(self, layer: str, origin: DeviceRecord | None, size: int, *,
                     initialized: bool = True, status: PoolStatus | None = None) -> DeviceRecord:
        """Create (or snapshot) a thin device for ``layer`` as a pool transaction.

        Called with the devices lock held. See :mod:`.metadata` for the protocol.
        """
        pool = self.pool
        assert pool is not None
        tid = self.meta.transaction_id()
        current = (status or pool.status()).transaction_id
        if current != tid:
            raise CorruptState(
                f"devicemapper: pool {pool.name} is at transaction {current} but this root "
                f"recorded {tid}: is another program using the pool?")
        dev_id = self._allocate(self.meta.next_device_id())
        for _ in range(64):
            txn = Transaction(tid + 1, dev_id, layer)
            self.meta.open_txn(txn, next_id=dev_id + 1)
            try:
                if origin is None:
                    pool.create_thin(dev_id, size)
                else:
                    # An active origin is suspended around the message, then resumed.
                    pool.create_snap(dev_id, origin.dev_id, suspend_origin_name=origin.name)
                break
            except AlreadyExists:
                # An id in the pool this root has no record of (a pool shared with lvm's
                # own thin volumes): skip it, as Docker does.
                self.meta.rollback_txn(txn)
                dev_id = self._allocate(dev_id + 1)
            except BaseException:
                self.meta.rollback_txn(txn)
                raise
        else:
            raise CorruptState(f"devicemapper: pool {pool.name}: 64 thin ids in a row are taken")
        rec = DeviceRecord(layer, dev_id, self.thin_name(layer), size,
                           origin.dev_id if origin else None, initialized, time.time())
        try:
            self.meta.put_device(rec)
            pool.set_transaction_id(tid, tid + 1)
            self.meta.close_txn(tid + 1)
        except Exception:
            # Not a crash (that is what _recover is for): undo now if the pool allows.
            with contextlib.suppress(Exception):
                self._recover()
            raise
        return rec

    # --- layers -----------------------------------------------------------------------------
    def create(self, layer: str, parent: str | None, size: int | None) -> DeviceRecord:
        pool = self._ensure()
        with self.locked():
            if self.meta.device(layer) is not None:
                raise AlreadyExists(f"devicemapper: layer {layer} already has a device")
            origin = self.meta.base() if parent is None else self.meta.device(parent)
            if origin is None:
                raise NotFound(f"devicemapper: parent layer {parent} has no thin device")
            if size is not None:
                if size % 512:
                    size += 512 - size % 512
                if size < origin.size:
                    raise InvalidArgument(
                        f"devicemapper: size {human(size)} is smaller than "
                        f"{'the base device' if parent is None else 'the parent layer'} "
                        f"({human(origin.size)}); a thin device's filesystem cannot shrink")
            status = pool.status()
            self.check_free_space(status)
            rec = self._make_device(layer, origin, origin.size, status=status)
            if size is not None and size > origin.size:
                # Record the size first: a filesystem smaller than its device is harmless,
                # a device smaller than its (grown) filesystem is not.
                rec = replace(rec, size=size)
                self.meta.put_device(rec)
                try:
                    self._grow_fs(rec)
                except BaseException:
                    self._delete(rec)
                    raise
            return rec

    def remove(self, layer: str) -> None:
        self._ensure()
        with self.locked():
            rec = self.meta.device(layer)
            if rec is not None:
                self._delete(rec)

    def _delete(self, rec: DeviceRecord) -> None:
        """Deactivate (maybe deferred), discard (maybe), delete (maybe deferred), forget."""
        pool = self.pool
        assert pool is not None
        runtime = self.config.runtime
        info = dmsetup.info(rec.name)
        if self.config.blkdiscard and (info is None or info.open_count == 0):
            # Give the blocks back to the pool's data device (re-sparsifies a loop file).
            dev = self.activate(rec)
            try:
                _run(["blkdiscard", "-f", str(dev)])
            except ExternalCommandFailed as err:
                print(f"devicemapper: blkdiscard {dev} failed (ignored): {err}", file=sys.stderr)
            info = dmsetup.info(rec.name)
        pending = False
        if info is not None:
            try:
                dmsetup.remove(rec.name)
            except InUse as err:
                if not runtime.use_deferred_removal:
                    raise InUse(f"devicemapper: device {rec.name} of layer {rec.layer} is busy "
                                f"(mounted or open elsewhere); unmount it, or set "
                                f"use_deferred_removal=true") from err
                dmsetup.remove(rec.name, deferred=True)
                pending = dmsetup.exists(rec.name)
        self._active.discard(rec.name)
        if pending:  # the kernel removes it when its last user closes it
            if runtime.use_deferred_deletion:
                self.meta.mark_deleted(rec)
                return
            raise InUse(f"devicemapper: device {rec.name} of layer {rec.layer} is still open; "
                        f"it is removed when closed, but its blocks can only be freed then "
                        f"(set use_deferred_deletion=true to let the layer go now)")
        with contextlib.suppress(NotFound):
            pool.delete_thin(rec.dev_id)
        self.meta.delete_device(rec.layer)

    def _retry_deleted(self) -> list[str]:
        """Free the blocks of deferred-deleted devices whose last user let go."""
        pool = self.pool
        assert pool is not None
        done = []
        for dev_id, info in self.meta.deleted().items():
            if dmsetup.exists(info["name"]):
                continue
            with contextlib.suppress(LayerfsError):
                dmsetup.mknodes(info["name"])  # a node left by a deferred removal (no udev)
            try:
                pool.delete_thin(dev_id)
            except NotFound:
                pass
            except LayerfsError:
                continue
            self.meta.forget_deleted(dev_id)
            done.append(f"devicemapper: deleted deferred device {dev_id} ({info['name']})")
        return done

    # --- activation and mounts --------------------------------------------------------------
    def activate(self, rec: DeviceRecord) -> Path:
        """Map the thin device as /dev/mapper/<name> (no-op if it already is).

        One ``dmsetup create`` in the common case (what pool.activate does, minus
        its look-ups: this runs for every mount).
        """
        pool = self.pool
        assert pool is not None
        node = dmsetup.node_path(rec.name)
        if rec.name in self._active and node.exists():
            return node
        if self._pool_devno is None:
            self._pool_devno = pool.devno()
        line = TableLine(0, rec.size // SECTOR, "thin", f"{self._pool_devno} {rec.dev_id}")
        try:
            dev = dmsetup.create(rec.name, line)
        except AlreadyExists:
            current = dmsetup.table(rec.name)
            if current == [line]:
                dev = dmsetup.wait_for_node(rec.name)
            else:
                # Mapped with another table (another size, a pool reattached with another
                # device number): remap it if nothing holds it open.
                info = dmsetup.info(rec.name)
                if info is None or info.open_count:
                    raise CorruptState(f"devicemapper: {rec.name} is mapped as {current}, not "
                                       f"{line}, and is in use") from None
                dmsetup.remove(rec.name)
                dev = dmsetup.create(rec.name, line)
        self._active.add(rec.name)
        return dev

    def deactivate(self, name: str) -> None:
        self._active.discard(name)
        if dmsetup.exists(name):
            dmsetup.remove(name)

    def record_of(self, layer: str) -> DeviceRecord:
        rec = self.meta.device(layer)
        if rec is None:
            raise NotFound(f"devicemapper: layer {layer} has no thin device")
        return rec

    def mounts(self, layer: str, readonly: bool) -> list[Mount]:
        """The layer's device, activated; a read-only bind of a live read-write mount."""
        self._ensure()
        rec = self.record_of(layer)
        with self.locked():
            dev = self.activate(rec)
        existing = device_mounts(os.stat(dev).st_rdev)
        whole = [(target, sb_ro) for target, root, sb_ro in existing if root == "/"]
        if readonly and any(not sb_ro for _, sb_ro in whole):
            # The kernel will not mount a read-write filesystem again read-only (EBUSY);
            # a read-only bind of the live mount shows the same tree.
            target = next(t for t, sb_ro in whole if not sb_ro)
            return [Mount("bind", target, ("ro",))]
        if not readonly and any(sb_ro for _, _, sb_ro in existing):
            target = next(t for t, _, sb_ro in existing if sb_ro)
            raise InUse(f"devicemapper: layer {layer} is mounted read-only at {target}; "
                        f"unmount it before mounting it read-write")
        return [Mount(self.setup.fs, str(dev), self.mount_options(readonly))]

    # --- space ------------------------------------------------------------------------------
    def check_free_space(self, status: PoolStatus | None = None) -> None:
        """Refuse a new device when the pool is nearly full (Docker's dm.min_free_space)."""
        pool = self.pool
        assert pool is not None
        st = status or pool.status()
        if st.failed or st.read_only or st.needs_check:
            raise PoolSpaceLow(f"devicemapper: thin pool {pool.name} is {st.mode}"
                               f"{' and needs a check (thin_check)' if st.needs_check else ''}; "
                               f"no new devices until it is repaired")
        if st.out_of_data_space:
            raise PoolSpaceLow(f"devicemapper: thin pool {pool.name} is out of data space "
                               f"({human(st.data_used)} of {human(st.data_total)} used); no new "
                               f"devices until space is freed (remove layers, extend the pool)")
        pct = self.config.runtime.min_free_space
        if pct == 0:
            return
        for what, free, total in (("data", st.data_free, st.data_total),
                                  ("metadata", st.metadata_free, st.metadata_total)):
            minimum = max(total * pct // 100, 1)
            if free < minimum:
                raise PoolSpaceLow(
                    f"devicemapper: thin pool {pool.name} has {human(free)} of free {what} "
                    f"space, less than the minimum {human(minimum)} (min_free_space={pct}% of "
                    f"{human(total)}); free space (remove layers, extend the pool) or lower "
                    f"min_free_space")

    def thin_usage(self, rec: DeviceRecord) -> ThinUsage | None:
        pool = self._ensure()
        try:
            with self.locked():
                return pool.thin_usage().get(rec.dev_id)
        except LayerfsError:
            return None

    def file_sharing(self, rec: DeviceRecord, path: Path) -> extents.Sharing | None:
        """How the blocks of the file at ``path`` (on ``rec``'s mounted device) are held:
        its extents (FIEMAP: offsets on the thin device) mapped to pool data blocks, each
        shared if another thin device maps the same data block. None if it has no extents
        to look at (not a regular file, or no FIEMAP)."""
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                return None
            found = extents.extents(path)
        except OSError:
            return None
        pool = self._ensure()
        try:
            with self.locked():
                maps = pool.block_map()
        except LayerfsError:
            return None
        refs: dict[int, int] = {}
        for blocks in maps.values():
            for data in blocks.values():
                refs[data] = refs.get(data, 0) + 1
        mine = maps.get(rec.dev_id, {})
        bs = pool.block_size
        exclusive = shared = inline = 0
        for ext in found:
            if ext.inline:
                inline += ext.length
                continue
            start, end = ext.physical, ext.physical + ext.length
            for block in range(start // bs, (end - 1) // bs + 1):
                overlap = min(end, (block + 1) * bs) - max(start, block * bs)
                pool_block = mine.get(block)
                if pool_block is not None and refs.get(pool_block, 0) > 1:
                    shared += overlap
                else:
                    exclusive += overlap
        return extents.Sharing(exclusive, shared, inline)

    # --- reporting --------------------------------------------------------------------------
    def status(self) -> dict[str, str]:
        pool = self._ensure()
        st = pool.status()
        base = self.meta.base()
        devices = self.meta.devices()
        names = {r.name for r in devices.values()} | ({base.name} if base else set())
        active = [n for n in pool.active_thins() if n in names]
        runtime = self.config.runtime
        info = {
            "Backing Filesystem": self.setup.fs,
            "Mode": self.mode,
            "Pool Name": pool.name,
            "Pool Blocksize": human(st.block_size),
            "Base Device Size": human(base.size if base else self.setup.basesize),
            "Udev Sync Supported": str(dmsetup.udev_running()).lower(),
        }
        if isinstance(pool, LoopbackPool):
            info.update({
                "Data file": pool.data_loop, "Metadata file": pool.metadata_loop,
                "Data loop file": str(pool.root / "data"),
                "Metadata loop file": str(pool.root / "metadata"),
            })
        if isinstance(pool, DirectLvmPool):
            info["Volume Group"] = pool.vg
            if self.mode == "direct-lvm":
                info["Physical Volume"] = str(self.setup.directlvm_device)
                info["Autoextend"] = (f"at {self.setup.thinp_autoextend_threshold}% by "
                                      f"{self.setup.thinp_autoextend_percent}%")
        min_pct = runtime.min_free_space
        info.update({
            "Data Space Used": human(st.data_used),
            "Data Space Total": human(st.data_total),
            "Data Space Available": human(st.data_free),
            "Metadata Space Used": human(st.metadata_used),
            "Metadata Space Total": human(st.metadata_total),
            "Metadata Space Available": human(st.metadata_free),
            "Thin Pool Minimum Free Space": f"{human(st.data_total * min_pct // 100)} "
                                            f"({min_pct}%)",
            "Pool State": st.mode + (" (needs check)" if st.needs_check else ""),
            "Pool Transaction Id": str(st.transaction_id),
            "Thin Devices": str(len(devices) + (1 if base else 0)),
            "Active Thin Devices": str(len(active)),
            "Deferred Removal Enabled": str(runtime.use_deferred_removal).lower(),
            "Deferred Deletion Enabled": str(runtime.use_deferred_deletion).lower(),
            "Deferred Deleted Device Count": str(len(self.meta.deleted())),
            "Discard On Delete": str(self.config.blkdiscard).lower(),
            "Device-mapper Backend": dmsetup.backend(),
            "Driver Version": dmsetup.driver_version(),
        })
        if dmsetup.backend() == "dmsetup":
            info["Library Version"] = dmsetup.version()
        if self.mode == "loopback":
            info["Warning"] = LOOPBACK_WARNING
        return info

    # --- closing and destroying -------------------------------------------------------------
    def _our_names(self) -> set[str]:
        names = {r.name for r in self.meta.devices().values()}
        names |= {d["name"] for d in self.meta.deleted().values()}
        base = self.meta.base()
        if base is not None:
            names.add(base.name)
        return names

    def _leave(self) -> None:
        if self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None
        self._active.clear()
        self._pool_devno = None

    def close(self) -> None:
        """Leave the root; the last user unmaps idle devices (and a loopback pool)."""
        if self._users_fd is None:
            return
        fd = self._users_fd
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process uses the root: leave everything mapped
            pool = self.pool
            if pool is None or not dmsetup.exists(pool.name):
                return
            with self.locked():
                ours = self._our_names()
                for name in pool.active_thins():
                    info = dmsetup.info(name)
                    if name in ours and info is not None and info.open_count == 0:
                        with contextlib.suppress(LayerfsError):
                            dmsetup.remove(name)
                with contextlib.suppress(LayerfsError):  # closing is best effort
                    self._retry_deleted()
                    if isinstance(pool, LoopbackPool) and not pool.active_thins():
                        pool.detach()
        finally:
            self._leave()
            self.pool = None

    def destroy(self) -> list[str]:
        """Tear down the pool and everything in it that this root made; forget it all.

        Loopback: thin devices, the pool device, loop devices, files. direct-lvm:
        also the LV, the VG, the PV label and the lvm profile. An existing pool
        (thinpooldev) only loses this root's thin devices. Refused while one of
        this root's devices is open (mounted).
        """
        pool = self._ensure()
        done: list[str] = []
        with self.locked():
            ours = self._our_names()
            busy = [n for n in ours if (i := dmsetup.info(n)) is not None and i.open_count]
            if busy:
                raise InUse(f"devicemapper: device(s) still open (mounted?): {', '.join(sorted(busy))}")
            for name in sorted(ours):
                if dmsetup.exists(name):
                    dmsetup.remove(name)
            if isinstance(pool, LoopbackPool) and self.mode == "loopback":
                pool.destroy(remove_files=True)
                done.append(f"removed loopback pool {pool.name}, its loop devices "
                            f"{pool.data_loop} {pool.metadata_loop} and files in {pool.root}")
            elif isinstance(pool, DirectLvmPool) and self.mode == "direct-lvm":
                pool.destroy()
                done.append(f"removed thin pool {pool.vg}/{pool.lv}, volume group {pool.vg} and "
                            f"the LVM label of {self.setup.directlvm_device}")
            else:
                ids = [r.dev_id for r in self.meta.devices().values()]
                ids += list(self.meta.deleted())
                base = self.meta.base()
                if base is not None:
                    ids.append(base.dev_id)
                for dev_id in ids:
                    with contextlib.suppress(NotFound):
                        pool.delete_thin(dev_id)
                done.append(f"deleted {len(ids)} thin device(s) from {pool.name} (pool kept)")
            self.meta.forget_everything()
        self._leave()
        self.pool = None
        return done


def open_existing(thinpooldev: str) -> ThinPool:
    """An active thin pool named by ``/dev/mapper/NAME``, ``NAME``, ``VG/LV`` or ``/dev/VG/LV``."""
    name = thinpooldev.removeprefix("/dev/mapper/")
    if "/" not in name and dmsetup.exists(name):
        info = dmsetup.info(name)
        lines = dmsetup.table(name)
        if len(lines) != 1 or lines[0].target != "thin-pool":
            raise InvalidArgument(f"devicemapper: {thinpooldev} is not a thin pool ({lines})")
        if info is not None and (info.uuid or "").startswith("LVM-") and shutil.which("lvs"):
            return DirectLvmPool.open(f"/dev/mapper/{name}")
        return ThinPool(name)
    if "/" in name:
        vg_lv = name.removeprefix("/dev/")
        if vg_lv.count("/") == 1:
            pool = DirectLvmPool.open(vg_lv)
            return pool
    raise NotFound(f"devicemapper: no active thin pool {thinpooldev} "
                   f"(dm name {lvm_dm_name('VG', 'LV')!r} style, or VG/LV)")
