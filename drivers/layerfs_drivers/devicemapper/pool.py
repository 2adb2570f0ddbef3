"""Thin pools: making, reopening and destroying one, and the thin devices in it.

Two kinds of pool, one set of thin-device operations (:class:`ThinPool`):

* :class:`LoopbackPool` -- two sparse files on the root's filesystem, attached
  to loop devices, under a ``thin-pool`` target of our own (Docker's
  ``loop-lvm``; fine for tests, slow and fragile for production)::

      ROOT/
        data        sparse, data_size bytes        -> /dev/loopN (data device)
        metadata    sparse, metadata_size bytes    -> /dev/loopM (metadata device)
        pool.json   name, sizes, block size, features: what open() needs

* :class:`DirectLvmPool` -- an LVM thin pool on a block device (Docker's
  ``direct-lvm``): PV -> VG -> ``VG/thinpool`` with its metadata LV, an lvm
  profile ``/etc/lvm/profile/VG-thinpool.profile`` for autoextend, and the
  active dm device ``/dev/mapper/VG-thinpool``.

Thin devices are numbered by the caller (24-bit ids) and driven by pool
messages: ``create_thin ID``, ``create_snap ID ORIGIN``, ``delete ID``,
``set_transaction_id OLD NEW``. An active thin device is a ``thin`` target
``0 SECTORS thin POOL ID`` named by the caller. Everything here is removed by
exact name: a pool never touches loop or dm devices it cannot prove are its own.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfs.errors import (
    AlreadyExists,
    CorruptState,
    ExternalCommandFailed,
    InUse,
    InvalidArgument,
    NotFound,
    command_error,
)

from . import dmsetup
from .dmsetup import SECTOR, TableLine

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MAX_THIN_ID = (1 << 24) - 1
LVM_PROFILE_DIR = Path("/etc/lvm/profile")


def _run(cmd: Sequence[str]) -> str:
    env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
    if not dmsetup.udev_running():
        env["DM_DISABLE_UDEV"] = "1"
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, env=env).stdout
    except subprocess.CalledProcessError as err:
        raise command_error(err) from err
    except FileNotFoundError as err:
        raise ExternalCommandFailed(f"{cmd[0]}: not installed") from err


@dataclass(frozen=True)
class PoolStatus:
    """A pool's usage in bytes, and its state."""

    data_used: int
    data_total: int
    metadata_used: int
    metadata_total: int
    block_size: int
    transaction_id: int
    mode: str  # rw, ro, out_of_data_space, fail
    needs_check: bool
    error_if_no_space: bool

    @property
    def out_of_data_space(self) -> bool:
        return self.mode == "out_of_data_space"

    @property
    def read_only(self) -> bool:
        return self.mode == "ro"

    @property
    def failed(self) -> bool:
        return self.mode == "fail"

    @property
    def data_free(self) -> int:
        return self.data_total - self.data_used

    @property
    def metadata_free(self) -> int:
        return self.metadata_total - self.metadata_used


@dataclass(frozen=True)
class ThinDevice:
    dev_id: int
    size: int


@dataclass(frozen=True)
class ThinUsage:
    """What ``thin_ls`` says about one thin device, in bytes."""

    dev_id: int
    mapped: int
    exclusive: int
    shared: int


def devnode(devno: str) -> str:
    """/dev node of block device MAJ:MIN, by its kernel name (sysfs), not by guessing."""
    try:
        uevent = Path(f"/sys/dev/block/{devno}/uevent").read_text()
    except FileNotFoundError as err:
        raise NotFound(f"no block device {devno}") from err
    for line in uevent.splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME" and value:
            return f"/dev/{value}"
    raise NotFound(f"block device {devno} has no DEVNAME in sysfs")


def _check_id(dev_id: int) -> None:
    if not 0 <= dev_id <= MAX_THIN_ID:
        raise InvalidArgument(f"thin device id {dev_id} outside 0..{MAX_THIN_ID}")


def _check_size(size: int) -> None:
    if size <= 0 or size % SECTOR:
        raise InvalidArgument(f"thin device size {size} is not a positive multiple of {SECTOR}")


class ThinPool:
    """Thin-device operations on an active thin-pool device named ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._block_size: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def device(self) -> Path:
        return dmsetup.node_path(self.name)

    def _pool_line(self) -> TableLine:
        lines = dmsetup.table(self.name)
        if len(lines) != 1 or lines[0].target != "thin-pool":
            raise CorruptState(f"{self.name} is not a thin pool (table {lines})")
        return lines[0]

    @property
    def block_size(self) -> int:
        """Data block size in bytes (the table's 3rd argument, in sectors; fixed for a pool)."""
        if self._block_size is None:
            self._block_size = int(self._pool_line().args.split()[2]) * SECTOR
        return self._block_size

    def devno(self) -> str:
        """The pool device's MAJ:MIN, which thin targets name it by."""
        return self._devno()

    def _devno(self) -> str:
        info = dmsetup.info(self.name)
        if info is None:
            raise NotFound(f"thin pool {self.name} is not active")
        return info.devno

    def _message(self, msg: str) -> None:
        dmsetup.message(self.name, msg)

    # --- thin devices -----------------------------------------------------

    def create_thin(self, dev_id: int, size: int) -> ThinDevice:
        """A new empty thin device ``dev_id`` (AlreadyExists if the id is taken).

        The pool itself records no size; ``size`` is what :meth:`activate` will
        be given, checked here so a bad one fails early.
        """
        _check_id(dev_id)
        _check_size(size)
        self._message(f"create_thin {dev_id}")
        return ThinDevice(dev_id, size)

    def create_snap(self, dev_id: int, origin_id: int,
                    suspend_origin_name: str | None = None) -> None:
        """Snapshot thin device ``origin_id`` as ``dev_id``.

        An active origin must be suspended while the snapshot is taken, or writes
        in flight could land on either side (the kernel's rule, and Docker's);
        pass its dm name and it is suspended and always resumed.
        """
        _check_id(dev_id)
        _check_id(origin_id)
        origin = dmsetup.info(suspend_origin_name) if suspend_origin_name else None
        suspend = origin is not None and not origin.suspended
        if suspend:
            assert suspend_origin_name is not None
            dmsetup.suspend(suspend_origin_name)
        try:
            self._message(f"create_snap {dev_id} {origin_id}")
        finally:
            if suspend:
                assert suspend_origin_name is not None
                dmsetup.resume(suspend_origin_name)

    def delete_thin(self, dev_id: int) -> None:
        """Delete thin device ``dev_id`` (NotFound if absent, InUse if active)."""
        _check_id(dev_id)
        self._message(f"delete {dev_id}")

    def activate(self, name: str, dev_id: int, size: int) -> Path:
        """Map thin device ``dev_id`` as /dev/mapper/NAME, ``size`` bytes long.

        Idempotent when NAME already maps exactly that device of this pool.
        """
        _check_id(dev_id)
        _check_size(size)
        line = TableLine(0, size // SECTOR, "thin", f"{self._devno()} {dev_id}")
        if dmsetup.exists(name):
            current = dmsetup.table(name)
            if current == [line]:
                return dmsetup.wait_for_node(name)
            raise AlreadyExists(f"dm device {name} exists with another table: {current}")
        return dmsetup.create(name, line)

    def deactivate(self, name: str, *, deferred: bool = False) -> None:
        """Unmap /dev/mapper/NAME; ``deferred`` removes it once its last user closes it."""
        dmsetup.remove(name, deferred=deferred)

    def active_thins(self) -> dict[str, int]:
        """Active thin devices of this pool: {dm name: thin id}."""
        devno = self._devno()
        out = {}
        for name, lines in dmsetup.all_tables().items():
            if len(lines) == 1 and lines[0].target == "thin":
                pool, dev_id, *_ = lines[0].args.split()
                if pool == devno:
                    out[name] = int(dev_id)
        return out

    # --- pool -------------------------------------------------------------

    def status(self) -> PoolStatus:
        raw = dmsetup.thin_pool_status(self.name)
        block = self.block_size
        return PoolStatus(
            data_used=raw.data_used * block,
            data_total=raw.data_total * block,
            metadata_used=raw.metadata_used * dmsetup.METADATA_BLOCK,
            metadata_total=raw.metadata_total * dmsetup.METADATA_BLOCK,
            block_size=block,
            transaction_id=raw.transaction_id,
            mode=raw.mode,
            needs_check=raw.needs_check,
            error_if_no_space=raw.error_if_no_space,
        )

    def set_transaction_id(self, old: int, new: int) -> None:
        """Move the pool's transaction id from ``old`` to ``new`` (CorruptState if not ``old``)."""
        try:
            self._message(f"set_transaction_id {old} {new}")
        except ExternalCommandFailed as err:
            current = dmsetup.thin_pool_status(self.name).transaction_id
            if current != old:
                raise CorruptState(
                    f"pool {self.name}: transaction id is {current}, not {old}") from err
            raise

    def _remove_thins(self) -> None:
        for name in self.active_thins():
            dmsetup.remove(name)

    def metadata_device(self) -> str:
        """The pool's metadata device node (the table's first argument, MAJ:MIN)."""
        return devnode(self._pool_line().args.split()[0])

    def thin_usage(self) -> dict[int, ThinUsage]:
        """Mapped/exclusive/shared bytes of every thin device, from ``thin_ls``.

        Reads a metadata snapshot of the live pool (``reserve_metadata_snap``;
        only one may exist at a time, so callers serialize), always released.
        """
        meta = self.metadata_device()
        self._message("reserve_metadata_snap")
        try:
            out = _run(["thin_ls", "--metadata-snap", "--no-headers", "-o",
                        "DEV,MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES", meta])
        finally:
            self._message("release_metadata_snap")
        usage = {}
        for line in out.splitlines():
            words = line.split()
            if len(words) == 4 and all(w.isdigit() for w in words):
                dev, mapped, exclusive, shared = (int(w) for w in words)
                usage[dev] = ThinUsage(dev, mapped, exclusive, shared)
        return usage


    def block_map(self) -> dict[int, dict[int, int]]:
        """Every thin device's mappings, ``{dev_id: {device block: pool data block}}``, from
        ``thin_dump`` of a metadata snapshot (XML; read with the standard library).

        Two devices mapping the same data block share it: that is how a snapshot shares its
        origin's blocks until one side writes.
        """
        import xml.etree.ElementTree as ET

        meta = self.metadata_device()
        self._message("reserve_metadata_snap")
        try:
            out = _run(["thin_dump", "--metadata-snap", meta])
        finally:
            self._message("release_metadata_snap")
        maps: dict[int, dict[int, int]] = {}
        try:
            root = ET.fromstring(out)
        except ET.ParseError as err:
            raise CorruptState(f"thin_dump of {self.name}: unreadable output: {err}") from err
        for dev in root.iter("device"):
            blocks: dict[int, int] = {}
            for m in dev:
                if m.tag == "single_mapping":
                    blocks[int(m.get("origin_block", 0))] = int(m.get("data_block", 0))
                elif m.tag == "range_mapping":
                    origin = int(m.get("origin_begin", 0))
                    data = int(m.get("data_begin", 0))
                    for i in range(int(m.get("length", 0))):
                        blocks[origin + i] = data + i
            maps[int(dev.get("dev_id", -1))] = blocks
        return maps


# --------------------------------------------------------------------------
# loopback
# --------------------------------------------------------------------------


def _loops_of(path: Path) -> list[str]:
    """Loop devices backed by ``path`` (``losetup -j``), by exact device name."""
    out = _run(["losetup", "-j", str(path)])
    return re.findall(r"^(/dev/loop\d+):", out, re.MULTILINE)


def _attach(path: Path) -> str:
    dev = _run(["losetup", "--find", "--show", str(path)]).strip()
    if not re.fullmatch(r"/dev/loop\d+", dev):
        raise ExternalCommandFailed(f"losetup --find --show {path} printed {dev!r}")
    return dev


def _detach(dev: str) -> None:
    _run(["losetup", "-d", dev])


def _rdev(dev: str) -> str:
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


class LoopbackPool(ThinPool):
    """A thin pool over two sparse files attached to loop devices."""

    def __init__(self, root: Path, name: str, data_loop: str, metadata_loop: str) -> None:
        super().__init__(name)
        self.root = root
        self.data_loop = data_loop
        self.metadata_loop = metadata_loop

    @staticmethod
    def _table(params: Mapping[str, Any], data_loop: str, meta_loop: str) -> TableLine:
        features = []
        if not params["block_zeroing"]:
            features.append("skip_block_zeroing")
        if params["error_if_no_space"]:
            features.append("error_if_no_space")
        block_sectors = int(params["block_size"]) // SECTOR
        args = f"{meta_loop} {data_loop} {block_sectors} {params['low_water_blocks']}"
        args += f" {len(features)} {' '.join(features)}" if features else " 0"
        return TableLine(0, int(params["data_size"]) // SECTOR, "thin-pool", args)

    @classmethod
    def create(cls, root: Path | str, name: str, data_size: int = 100 * GiB,
               metadata_size: int = 2 * GiB, block_size: int = 64 * KiB, *,
               low_water_blocks: int | None = None, block_zeroing: bool = False,
               error_if_no_space: bool = True) -> LoopbackPool:
        """Make ROOT/data and ROOT/metadata and a thin pool NAME over them.

        ``block_size`` must be a multiple of 64 KiB from 64 KiB to 1 GiB.
        ``error_if_no_space`` (default) makes writes to a full pool fail at once
        with ENOSPC instead of queueing for 60 s; ``block_zeroing`` off (the
        default, as in Docker) skips zeroing new blocks, which the filesystem on
        a thin device never reads before writing.
        """
        root = Path(root)
        if block_size % (64 * KiB) or not 64 * KiB <= block_size <= GiB:
            raise InvalidArgument(f"pool block size {block_size}: want 64 KiB..1 GiB in 64 KiB steps")
        data_size -= data_size % block_size
        if data_size < block_size:
            raise InvalidArgument(f"pool data size {data_size} is smaller than one block")
        if not 2 * MiB <= metadata_size <= 16 * GiB:
            raise InvalidArgument(f"pool metadata size {metadata_size}: want 2 MiB..16 GiB")
        if dmsetup.exists(name):
            raise AlreadyExists(f"dm device {name} already exists")
        root.mkdir(parents=True, exist_ok=True)
        data, meta, record = root / "data", root / "metadata", root / "pool.json"
        for p in (data, meta, record):
            if p.exists():
                raise AlreadyExists(f"{p} exists: open() the pool, or destroy() it first")
        blocks = data_size // block_size
        params: dict[str, object] = {
            "name": name, "data_size": data_size, "metadata_size": metadata_size,
            "block_size": block_size,
            "low_water_blocks": low_water_blocks if low_water_blocks is not None
            else max(1, min(32768, blocks // 10)),
            "block_zeroing": block_zeroing, "error_if_no_space": error_if_no_space,
        }
        attached: list[str] = []
        try:
            for path, size in ((data, data_size), (meta, metadata_size)):
                with open(path, "xb") as f:
                    f.truncate(size)
            # A zeroed superblock makes the kernel format fresh metadata.
            with open(meta, "r+b") as f:
                f.write(b"\0" * 4096)
            data_loop = _attach(data)
            attached.append(data_loop)
            meta_loop = _attach(meta)
            attached.append(meta_loop)
            dmsetup.create(name, cls._table(params, data_loop, meta_loop))
            record.write_text(json.dumps(params, indent=1) + "\n")
        except BaseException:
            for dev in attached:
                _detach(dev)
            for p in (data, meta, record):
                p.unlink(missing_ok=True)
            raise
        return cls(root, name, data_loop, meta_loop)

    @classmethod
    def open(cls, root: Path | str) -> LoopbackPool:
        """Reattach the pool kept in ROOT, e.g. after a reboot or a crash.

        Reuses loop devices already backed by the files (``losetup -j``) and an
        active pool device; refuses a pool device whose table points elsewhere.
        """
        root = Path(root)
        record = root / "pool.json"
        try:
            params = json.loads(record.read_text())
        except FileNotFoundError as err:
            raise NotFound(f"no loopback pool in {root} ({record} missing)") from err
        loops = []
        for path in (root / "data", root / "metadata"):
            if not path.exists():
                raise CorruptState(f"loopback pool {params['name']}: {path} missing")
            found = _loops_of(path)
            loops.append(found[0] if found else _attach(path))
        data_loop, meta_loop = loops
        name = params["name"]
        lines = dmsetup.table(name) if dmsetup.exists(name) else None
        if lines is None:
            dmsetup.create(name, cls._table(params, data_loop, meta_loop))
        else:
            want = {_rdev(meta_loop), _rdev(data_loop)}
            have = set(lines[0].args.split()[:2]) if lines and lines[0].target == "thin-pool" else set()
            if want != have:
                raise CorruptState(f"dm device {name} is not the pool over {root}: {lines}")
        return cls(root, name, data_loop, meta_loop)

    def detach(self) -> None:
        """Take the pool down and detach its loop devices; the files (and data) stay.

        :meth:`open` brings it back. Refused (InUse) while a thin device of the
        pool is active.
        """
        if dmsetup.exists(self.name):
            active = self.active_thins()
            if active:
                raise InUse(f"thin pool {self.name} still has active devices: "
                            f"{', '.join(sorted(active))}")
            dmsetup.remove(self.name)
        for path in (self.root / "data", self.root / "metadata"):
            if path.exists():
                for dev in _loops_of(path):
                    _detach(dev)

    def destroy(self, *, remove_files: bool = True) -> None:
        """Remove this pool's thin devices, the pool, its loop devices (and files)."""
        if dmsetup.exists(self.name):
            self._remove_thins()
            dmsetup.remove(self.name)
        for path in (self.root / "data", self.root / "metadata"):
            if path.exists():
                for dev in _loops_of(path):
                    _detach(dev)
        if remove_files:
            for p in ("data", "metadata", "pool.json"):
                (self.root / p).unlink(missing_ok=True)


# --------------------------------------------------------------------------
# direct-lvm
# --------------------------------------------------------------------------


def signatures(device: str) -> list[str]:
    """Filesystem, RAID, LVM and partition-table signatures on ``device`` (wipefs -n)."""
    out = _run(["wipefs", "--no-act", "--noheadings", "--output", "TYPE", device])
    return [line.strip() for line in out.splitlines() if line.strip()]


def _check_unused(device: str) -> None:
    try:
        mode = os.stat(device).st_mode
    except FileNotFoundError as err:
        raise NotFound(f"{device}: no such device") from err
    if not stat.S_ISBLK(mode):
        raise InvalidArgument(f"{device} is not a block device")
    try:  # O_EXCL on a block device fails if it is mounted or held (dm, md, a PV in use)
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL))
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise InUse(f"{device} is in use (mounted or held by another device)") from err
        raise


def lvm_dm_name(vg: str, lv: str) -> str:
    """LVM's dm name for VG/LV: each name's dashes doubled, joined by a dash."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


class DirectLvmPool(ThinPool):
    """An LVM thin pool ``VG/LV`` used through dm messages, as Docker's direct-lvm does."""

    def __init__(self, vg: str, lv: str = "thinpool") -> None:
        super().__init__(lvm_dm_name(vg, lv))
        self.vg = vg
        self.lv = lv

    @property
    def profile(self) -> Path:
        return LVM_PROFILE_DIR / f"{self.vg}-{self.lv}.profile"

    @classmethod
    def create(cls, device: str, vg: str, thinp_percent: int = 95, thinp_metapercent: int = 1,
               autoextend_threshold: int = 80, autoextend_percent: int = 20, *,
               force: bool = False, chunk_size: str = "512K") -> DirectLvmPool:
        """Turn block ``device`` into a PV, VG ``vg`` and thin pool ``vg/thinpool``.

        Refuses a device carrying any signature (filesystem, partition table, old
        PV...) unless ``force``, which wipes them first; always refuses a device
        that is in use.
        """
        if not re.fullmatch(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*", vg):
            raise InvalidArgument(f"bad volume group name {vg!r}")
        for pct, what in ((thinp_percent, "thinp_percent"), (thinp_metapercent, "thinp_metapercent"),
                          (autoextend_threshold, "autoextend_threshold"),
                          (autoextend_percent, "autoextend_percent")):
            if not 0 < pct <= 100:
                raise InvalidArgument(f"{what}={pct}: want 1..100")
        if thinp_percent + thinp_metapercent > 100:
            raise InvalidArgument("thinp_percent + thinp_metapercent exceeds 100")
        _check_unused(device)
        found = signatures(device)
        if found and not force:
            raise InvalidArgument(
                f"{device} carries {', '.join(found)} signature(s); refusing to use it "
                f"(pass force=True to wipe it)")
        if found:
            _run(["wipefs", "--all", device])
        pool = cls(vg)
        _run(["pvcreate", "-y", device])
        try:
            _run(["vgcreate", vg, device])
            _run(["lvcreate", "--wipesignatures", "y", "-n", pool.lv, vg,
                  "--extents", f"{thinp_percent}%VG"])
            _run(["lvcreate", "--wipesignatures", "y", "-n", f"{pool.lv}meta", vg,
                  "--extents", f"{thinp_metapercent}%VG"])
            _run(["lvconvert", "-y", "--zero", "n", "-c", chunk_size, "--thinpool",
                  f"{vg}/{pool.lv}", "--poolmetadata", f"{vg}/{pool.lv}meta"])
            pool.profile.parent.mkdir(parents=True, exist_ok=True)
            pool.profile.write_text(
                "activation {\n"
                f"  thin_pool_autoextend_threshold={autoextend_threshold}\n"
                f"  thin_pool_autoextend_percent={autoextend_percent}\n"
                "}\n")
            _run(["lvchange", "--metadataprofile", pool.profile.stem, f"{vg}/{pool.lv}"])
        except BaseException:
            pool._teardown(device)
            raise
        return pool

    @classmethod
    def open(cls, thinpooldev: str) -> DirectLvmPool:
        """Use an existing, active LVM thin pool: ``/dev/mapper/VG-LV`` or ``VG/LV``."""
        out = _run(["lvs", "--noheadings", "--separator", "|", "-o",
                    "vg_name,lv_name,lv_dm_path,lv_attr"])
        want = thinpooldev if thinpooldev.startswith("/") else None
        for line in out.splitlines():
            vg, lv, dm_path, attr = (f.strip() for f in line.split("|"))
            if want in (dm_path, f"/dev/{vg}/{lv}") or thinpooldev == f"{vg}/{lv}":
                if not attr.startswith("t"):
                    raise InvalidArgument(f"{thinpooldev} is not a thin pool LV (attr {attr})")
                pool = cls(vg, lv)
                pool._pool_line()  # it must be active as a thin-pool target
                return pool
        raise NotFound(f"no LVM logical volume {thinpooldev}")

    def ensure_active(self) -> None:
        """Activate the pool LV if it is not (after a reboot lvm may not have)."""
        if not dmsetup.exists(self.name):
            _run(["lvchange", "-ay", f"{self.vg}/{self.lv}"])
        self._pool_line()

    def _teardown(self, device: str | None) -> None:
        """Remove whatever of VG (and the PV ``device``) exists, by exact name."""
        vgs = _run(["vgs", "--noheadings", "-o", "vg_name"]).split()
        if self.vg in vgs:
            if device is None:
                pvs = _run(["pvs", "--noheadings", "-o", "pv_name", "--select",
                            f"vg_name={self.vg}"]).split()
            else:
                pvs = [device]
            _run(["vgremove", "-y", "-f", self.vg])
        else:
            pvs = [device] if device else []
        for pv in pvs:
            _run(["pvremove", "-y", pv])
            _run(["wipefs", "--all", pv])
        self.profile.unlink(missing_ok=True)

    def destroy(self) -> None:
        """Remove thin devices, the pool LV, the VG and the PV label; by exact names."""
        if dmsetup.exists(self.name):
            self._remove_thins()
            # lvm refuses to handle a pool whose transaction id is not the one it
            # recorded; thin devices made by messages moved it.
            expected = int(_run(["lvs", "--noheadings", "-o", "transaction_id",
                                 f"{self.vg}/{self.lv}"]).strip() or 0)
            current = self.status().transaction_id
            if current != expected:
                self.set_transaction_id(current, expected)
        self._teardown(None)
