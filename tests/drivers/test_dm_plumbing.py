"""Device-mapper plumbing: dmsetup parsing (anywhere) and real pools (in the qemu guest).

The parser tests use output recorded from Debian 12's dmsetup 1.02.185 on the
6.1 kernel. The ``vm`` tests need a kernel with device-mapper and skip with the
reason on hosts without one; tests/vm/test_dm_in_guest.py runs this file inside
the guest (``python -m tests.support.qemu pytest -- tests/drivers/test_dm_plumbing.py``)
and fails if anything here skipped there. Every pool, VG and dm device made here
carries a random suffix and is removed by that exact name.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from layerfs_drivers.devicemapper import dmsetup
from layerfs_drivers.devicemapper.pool import DirectLvmPool, LoopbackPool, ThinPool, lvm_dm_name, signatures

from layerfs.errors import (
    AlreadyExists,
    CorruptState,
    ExternalCommandFailed,
    InUse,
    InvalidArgument,
    NotFound,
)

MiB = 1 << 20

# --------------------------------------------------------------------------
# recorded output
# --------------------------------------------------------------------------

POOL_STATUS_FRESH = ("0 2097152 thin-pool 0 1649/16384 0/16384 - rw discard_passdown "
                     "error_if_no_space - 1024 \n")
POOL_STATUS_USED = ("0 2097152 thin-pool 1 1650/16384 20/16384 - rw discard_passdown "
                    "error_if_no_space - 1024 \n")
POOL_STATUS_LVM = ("0 7954432 thin-pool 0 1033/10240 0/7768 - rw discard_passdown "
                   "queue_if_no_space - 1024 \n")
POOL_STATUS_FULL = ("0 32768 thin-pool 0 114/1024 256/256 - out_of_data_space "
                    "discard_passdown error_if_no_space - 256 \n")
POOL_STATUS_RO_CHECK = ("0 32768 thin-pool 7 1040/4096 12/256 34 ro no_discard_passdown "
                        "queue_if_no_space needs_check 1024\n")
THIN_STATUS_EMPTY = "0 204800 thin 0 -\n"
THIN_STATUS_USED = "0 204800 thin 2560 2559\n"
POOL_TABLE = "0 2097152 thin-pool 7:1 7:0 128 3276 2 skip_block_zeroing error_if_no_space \n"
INFO_ACTIVE = """\
Name:              lfs-pool
State:             ACTIVE
Read Ahead:        256
Tables present:    LIVE
Open count:        0
Event number:      0
Major, minor:      253, 0
Number of targets: 1

"""
INFO_SUSPENDED = INFO_ACTIVE.replace("lfs-pool", "lfs-thin1").replace(
    "ACTIVE", "SUSPENDED").replace("253, 0", "253, 1")
INFO_DEFERRED = """\
Name:              lfs-thin1
State:             ACTIVE (DEFERRED REMOVE)
Read Ahead:        256
Tables present:    LIVE
Open count:        1
Event number:      0
Major, minor:      253, 1
Number of targets: 1
UUID: LVM-abc

"""
LS = "lfs-pool\t(253:0)\nlfs-thin1\t(253:1)\n"
LS_TARGET = "lfs-thin1\t(253, 1)\n"
TARGETS = """\
snapshot-merge   v1.5.0
snapshot-origin  v1.9.0
snapshot         v1.16.0
thin-pool        v1.22.0
thin             v1.22.0
striped          v1.6.0
linear           v1.4.0
error            v1.5.0
"""
TABLE_ALL = (
    "lfsvg-thinpool: 0 7954432 thin-pool 253:0 253:1 1024 0 1 skip_block_zeroing \n"
    "lfsvg-thinpool_tdata: 0 7954432 linear 254:0 2048\n"
    "lfsvg-thinpool_tmeta: 0 81920 linear 254:0 7956480\n"
    "lfs-t1: 0 204800 thin 253:2 1\n"
)

# --------------------------------------------------------------------------
# parsers: no device-mapper needed
# --------------------------------------------------------------------------


def _pool(text: str) -> dmsetup.ThinPoolStatus:
    (line,) = dmsetup.parse_table(text)
    assert line.target == "thin-pool"
    return dmsetup.parse_thin_pool_status(line.args)


def test_parse_pool_status_fresh_and_used() -> None:
    fresh, used = _pool(POOL_STATUS_FRESH), _pool(POOL_STATUS_USED)
    assert (fresh.transaction_id, fresh.metadata_used, fresh.metadata_total) == (0, 1649, 16384)
    assert (fresh.data_used, fresh.data_total) == (0, 16384)
    assert fresh.mode == "rw" and not fresh.read_only and not fresh.out_of_data_space
    assert fresh.error_if_no_space and fresh.discard_passdown and not fresh.needs_check
    assert fresh.held_metadata_root is None and fresh.metadata_low_watermark == 1024
    assert (used.transaction_id, used.data_used, used.metadata_used) == (1, 20, 1650)


def test_parse_pool_status_lvm_full_ro_failed() -> None:
    lvm = _pool(POOL_STATUS_LVM)
    assert (lvm.data_total, lvm.metadata_total, lvm.error_if_no_space) == (7768, 10240, False)
    full = _pool(POOL_STATUS_FULL)
    assert full.out_of_data_space and full.data_used == full.data_total == 256
    ro = _pool(POOL_STATUS_RO_CHECK)
    assert ro.read_only and ro.needs_check and ro.held_metadata_root == 34
    assert not ro.discard_passdown and ro.transaction_id == 7
    failed = dmsetup.parse_thin_pool_status("Fail")
    assert failed.failed and failed.mode == "fail"
    with pytest.raises(ValueError):
        dmsetup.parse_thin_pool_status("0 1/2")


def test_parse_thin_status_and_tables() -> None:
    (empty,), (used,) = dmsetup.parse_table(THIN_STATUS_EMPTY), dmsetup.parse_table(THIN_STATUS_USED)
    assert dmsetup.parse_thin_status(empty.args) == dmsetup.ThinStatus(0, None)
    assert dmsetup.parse_thin_status(used.args) == dmsetup.ThinStatus(2560, 2559)
    assert dmsetup.parse_thin_status("Fail").failed
    (line,) = dmsetup.parse_table(POOL_TABLE)
    assert (line.start, line.length, line.target) == (0, 2097152, "thin-pool")
    assert line.args == "7:1 7:0 128 3276 2 skip_block_zeroing error_if_no_space"
    assert str(line) == POOL_TABLE.strip()
    tables = dmsetup.parse_table_all(TABLE_ALL)
    assert list(tables) == ["lfsvg-thinpool", "lfsvg-thinpool_tdata", "lfsvg-thinpool_tmeta",
                            "lfs-t1"]
    assert tables["lfs-t1"] == [dmsetup.TableLine(0, 204800, "thin", "253:2 1")]
    assert dmsetup.parse_table_all("No devices found\n") == {}


def test_parse_info_ls_targets() -> None:
    active = dmsetup.parse_info(INFO_ACTIVE)
    assert (active.name, active.major, active.minor, active.devno) == ("lfs-pool", 253, 0, "253:0")
    assert active.live_table and not active.inactive_table and not active.suspended
    assert active.uuid is None and active.target_count == 1
    assert dmsetup.parse_info(INFO_SUSPENDED).suspended
    deferred = dmsetup.parse_info(INFO_DEFERRED)
    assert deferred.deferred_remove and deferred.open_count == 1 and deferred.uuid == "LVM-abc"
    with pytest.raises(ValueError):
        dmsetup.parse_info("Device does not exist.\n")
    assert dmsetup.parse_ls(LS) == {"lfs-pool": (253, 0), "lfs-thin1": (253, 1)}
    assert dmsetup.parse_ls(LS_TARGET) == {"lfs-thin1": (253, 1)}
    assert dmsetup.parse_ls("No devices found\n") == {}
    targets = dmsetup.parse_targets(TARGETS)
    assert targets["thin-pool"] == "1.22.0" and "snapshot" in targets


@pytest.mark.parametrize(("stderr", "kind"), [
    ("device-mapper: message ioctl on lfs-pool  failed: File exists\nCommand failed.\n",
     AlreadyExists),
    ("device-mapper: message ioctl on lfs-pool  failed: No data available\nCommand failed.\n",
     NotFound),
    ("Device does not exist.\nCommand failed.\n", NotFound),
    ("device-mapper: remove ioctl on lfs-thin1  failed: Device or resource busy\n"
     "Command failed.\n", InUse),
    ("device-mapper: message ioctl on lfs-pool  failed: Invalid argument\nCommand failed.\n",
     ExternalCommandFailed),
])
def test_errors_name_the_command_and_the_reason(stderr: str, kind: type) -> None:
    err = subprocess.CalledProcessError(1, ["dmsetup", "message", "lfs-pool", "0", "delete 7"],
                                        "", stderr)
    got = dmsetup._classify(err, "message lfs-pool")
    assert isinstance(got, kind) and isinstance(got, Exception)
    text = str(got)
    assert "dmsetup message lfs-pool 0 delete 7" in text
    assert stderr.splitlines()[0].split("failed: ")[-1] in text
    assert "Command failed." not in text


def test_lvm_dm_names() -> None:
    assert lvm_dm_name("lfsvg", "thinpool") == "lfsvg-thinpool"
    assert lvm_dm_name("my-vg", "thin-pool") == "my--vg-thin--pool"


# --------------------------------------------------------------------------
# real device-mapper
# --------------------------------------------------------------------------


def _dm_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    misc = Path("/proc/misc").read_text() if Path("/proc/misc").exists() else ""
    if "device-mapper" not in misc or not Path("/dev/mapper/control").exists():
        return ("no device-mapper in this kernel (not in /proc/misc, or no /dev/mapper/control):"
                " these run in the qemu guest, see tests/vm/test_dm_in_guest.py")
    if shutil.which("dmsetup") is None:
        return "dmsetup not installed"
    try:
        if "thin-pool" not in dmsetup.targets():
            subprocess.run(["modprobe", "dm_thin_pool"], capture_output=True)
            if "thin-pool" not in dmsetup.targets():
                return "the kernel has no thin-pool target"
    except ExternalCommandFailed as err:
        return f"dmsetup targets failed: {err}"
    return None


def _need_dm() -> None:
    reason = _dm_missing()
    if reason:
        pytest.skip(reason)


def _suffix() -> str:
    return secrets.token_hex(4)


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout


class Cleanup:
    """Exact names this test made, undone in reverse even if the test failed midway."""

    def __init__(self) -> None:
        self.actions: list[Callable[[], object]] = []

    def add(self, fn: Callable[[], object]) -> None:
        self.actions.append(fn)

    def run(self) -> list[str]:
        errors = []
        for fn in reversed(self.actions):
            try:
                fn()
            except Exception as err:  # keep going: undo as much as possible
                errors.append(f"{fn}: {err}")
        return errors


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    yield c
    errors = c.run()
    assert not errors, f"cleanup failed: {errors}"


def _umount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], check=True)


def _remove_if_active(name: str) -> None:
    if dmsetup.exists(name):
        dmsetup.remove(name)


def _mkfs_mount(dev: Path, mnt: Path, cleanup: Cleanup) -> None:
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(dev))
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", str(dev), str(mnt))
    cleanup.add(lambda: _umount(mnt))


def _thin_lifecycle(pool: ThinPool, tag: str, work: Path, cleanup: Cleanup) -> None:
    """create / activate / mkfs / mount / write / snapshot / read / deactivate / delete."""
    origin, snap = f"lfs-test-{tag}-t1", f"lfs-test-{tag}-t2"
    size = 64 * MiB
    tid = pool.status().transaction_id
    assert pool.create_thin(1, size).dev_id == 1
    pool.set_transaction_id(tid, tid + 1)
    with pytest.raises(AlreadyExists):
        pool.create_thin(1, size)
    cleanup.add(lambda: _remove_if_active(origin))
    dev = pool.activate(origin, 1, size)
    assert dev == Path("/dev/mapper") / origin and dev.is_block_device()
    assert pool.activate(origin, 1, size) == dev  # idempotent
    with pytest.raises(AlreadyExists):
        pool.activate(origin, 1, size * 2)
    assert pool.active_thins() == {origin: 1}
    _mkfs_mount(dev, work / "origin", cleanup)
    (work / "origin" / "hello").write_text("from the origin\n")
    used_before = pool.status().data_used
    assert used_before > 0

    # Snapshot of an active, mounted origin: suspended around the message, resumed after.
    pool.create_snap(2, 1, suspend_origin_name=origin)
    info = dmsetup.info(origin)
    assert info is not None and not info.suspended
    (work / "origin" / "after-snap").write_text("only in the origin\n")
    with pytest.raises(InUse):
        pool.delete_thin(1)  # active
    cleanup.add(lambda: _remove_if_active(snap))
    snap_dev = pool.activate(snap, 2, size)
    _mkfs_done = work / "snap"
    _mkfs_done.mkdir()
    sh("mount", str(snap_dev), str(_mkfs_done))
    cleanup.add(lambda: _umount(_mkfs_done))
    assert (_mkfs_done / "hello").read_text() == "from the origin\n"
    assert not (_mkfs_done / "after-snap").exists()
    (_mkfs_done / "in-snap").write_text("snap\n")
    st = dmsetup.thin_status(snap)
    assert st.mapped_sectors > 0 and not st.failed

    _umount(_mkfs_done)
    _umount(work / "origin")
    pool.deactivate(snap)
    pool.deactivate(origin, deferred=True)
    assert not dmsetup.exists(snap) and not dmsetup.exists(origin)
    pool.delete_thin(2)
    pool.delete_thin(1)
    with pytest.raises(NotFound):
        pool.delete_thin(1)
    with pytest.raises(CorruptState):
        pool.set_transaction_id(tid, tid + 5)  # it is tid + 1 now
    pool.set_transaction_id(tid + 1, tid + 2)
    assert pool.status().transaction_id == tid + 2
    assert pool.active_thins() == {}


@pytest.mark.vm
def test_loopback_pool_lifecycle(tmp_path: Path, cleanup: Cleanup) -> None:
    _need_dm()
    tag = _suffix()
    name = f"lfs-test-{tag}-pool"
    pool = LoopbackPool.create(tmp_path / "pool", name, data_size=512 * MiB,
                               metadata_size=16 * MiB, block_size=64 * 1024)
    cleanup.add(pool.destroy)
    loops = (pool.data_loop, pool.metadata_loop)
    with pytest.raises(AlreadyExists):
        LoopbackPool.create(tmp_path / "other", name, data_size=64 * MiB, metadata_size=4 * MiB)
    with pytest.raises(AlreadyExists):
        LoopbackPool.create(tmp_path / "pool", f"{name}x", data_size=64 * MiB)

    # Status from the live pool agrees with what was asked for and with dmsetup.
    status = pool.status()
    assert status.data_total == 512 * MiB and status.block_size == 64 * 1024
    assert status.metadata_total == 16 * MiB and status.data_used == 0
    assert status.transaction_id == 0 and status.mode == "rw" and status.error_if_no_space
    assert 0 < status.metadata_used < status.metadata_total
    raw = sh("dmsetup", "status", name).split()
    assert raw[2] == "thin-pool" and raw[5] == f"0/{512 * MiB // (64 * 1024)}"

    _thin_lifecycle(pool, tag, tmp_path, cleanup)

    # "Reboot": the pool device and loops go away; open() puts them back, data intact.
    pool.create_thin(7, 8 * MiB)
    dmsetup.remove(name)
    for dev in loops:
        sh("losetup", "-d", dev)
    reopened = LoopbackPool.open(tmp_path / "pool")
    assert reopened.name == name and reopened.status().transaction_id == 2
    with pytest.raises(AlreadyExists):
        reopened.create_thin(7, 8 * MiB)
    again = LoopbackPool.open(tmp_path / "pool")  # already active: reused, not duplicated
    assert (again.data_loop, again.metadata_loop) == (reopened.data_loop, reopened.metadata_loop)

    reopened.destroy()
    assert not dmsetup.exists(name)
    assert not (tmp_path / "pool" / "data").exists()
    attached = sh("losetup", "-a")
    assert str(tmp_path / "pool") not in attached
    with pytest.raises(NotFound):
        LoopbackPool.open(tmp_path / "pool")


@pytest.mark.vm
def test_pool_full_fails_cleanly_and_still_destroys(tmp_path: Path, cleanup: Cleanup) -> None:
    _need_dm()
    tag = _suffix()
    name, thin = f"lfs-test-{tag}-full", f"lfs-test-{tag}-fill"
    pool = LoopbackPool.create(tmp_path / "pool", name, data_size=16 * MiB,
                               metadata_size=4 * MiB, block_size=64 * 1024)
    cleanup.add(pool.destroy)
    pool.create_thin(1, 64 * MiB)
    cleanup.add(lambda: _remove_if_active(thin))
    dev = pool.activate(thin, 1, 64 * MiB)

    chunk = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
    chunk.write(b"\xa5" * MiB)
    written, failure = 0, None
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        while written < 64 * MiB:
            try:
                written += os.write(fd, chunk)
            except OSError as err:
                failure = err
                break
    finally:
        os.close(fd)
    assert failure is not None, f"wrote {written} bytes into a 16 MiB pool without an error"
    assert failure.errno in (errno.ENOSPC, errno.EIO), failure
    assert written <= 16 * MiB
    status = pool.status()
    assert status.out_of_data_space and status.data_used == status.data_total == 16 * MiB

    pool.deactivate(thin)
    pool.delete_thin(1)
    status = pool.status()
    assert status.data_used == 0 and status.mode == "rw"  # space freed: writable again
    pool.destroy()
    assert not dmsetup.exists(name) and not dmsetup.exists(thin)


@pytest.fixture
def blockdev() -> str:
    _need_dm()
    dev = os.environ.get("LAYERFS_TEST_BLOCKDEV")
    if not dev:
        pytest.skip("LAYERFS_TEST_BLOCKDEV is not set (direct-lvm wipes that device: the "
                    "qemu guest sets it to its scratch /dev/vda)")
    if shutil.which("lvcreate") is None:
        pytest.skip("lvm2 not installed")
    return dev


@pytest.mark.vm
def test_direct_lvm_refuses_a_used_device_unless_forced(blockdev: str, tmp_path: Path,
                                                        cleanup: Cleanup) -> None:
    vg = f"lfstest{_suffix()}"
    sh("mkfs.ext4", "-q", "-F", blockdev)
    assert "ext4" in signatures(blockdev)
    with pytest.raises(InvalidArgument, match="ext4"):
        DirectLvmPool.create(blockdev, vg)
    assert vg not in sh("vgs", "--noheadings", "-o", "vg_name").split()
    assert "ext4" in signatures(blockdev)  # untouched

    # Mounted: refused even with force.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", blockdev, str(mnt))
    try:
        with pytest.raises(InUse):
            DirectLvmPool.create(blockdev, vg, force=True)
    finally:
        sh("umount", str(mnt))

    pool = DirectLvmPool.create(blockdev, vg, force=True)
    cleanup.add(pool.destroy)
    assert signatures(blockdev) == ["LVM2_member"]
    assert pool.status().mode == "rw"
    pool.destroy()
    assert vg not in sh("vgs", "--noheadings", "-o", "vg_name").split()
    assert signatures(blockdev) == []
    assert not pool.profile.exists()


@pytest.mark.vm
def test_direct_lvm_pool_lifecycle(blockdev: str, tmp_path: Path, cleanup: Cleanup) -> None:
    tag = _suffix()
    vg = f"lfstest{tag}"
    sh("wipefs", "--all", blockdev)
    pool = DirectLvmPool.create(blockdev, vg, thinp_percent=90, thinp_metapercent=2,
                                autoextend_threshold=70, autoextend_percent=25)
    cleanup.add(pool.destroy)
    assert pool.name == f"{vg}-thinpool" and pool.device.is_block_device()
    profile = pool.profile.read_text()
    assert "thin_pool_autoextend_threshold=70" in profile
    assert "thin_pool_autoextend_percent=25" in profile
    assert sh("lvs", "--noheadings", "-o", "lv_profile", f"{vg}/thinpool").strip() == pool.profile.stem
    status = pool.status()
    assert status.block_size == 512 * 1024 and status.data_used == 0 and status.data_total > 0

    opened = DirectLvmPool.open(f"/dev/mapper/{vg}-thinpool")
    assert (opened.vg, opened.lv, opened.name) == (vg, "thinpool", pool.name)
    assert DirectLvmPool.open(f"{vg}/thinpool").name == pool.name
    with pytest.raises(NotFound):
        DirectLvmPool.open(f"{vg}/nothere")

    _thin_lifecycle(pool, tag, tmp_path, cleanup)

    # Leave a thin device active and the transaction id moved: destroy copes.
    pool.create_thin(5, 16 * MiB)
    pool.set_transaction_id(pool.status().transaction_id, 9)
    leftover = f"lfs-test-{tag}-left"
    cleanup.add(lambda: _remove_if_active(leftover))
    pool.activate(leftover, 5, 16 * MiB)
    pool.destroy()
    assert not dmsetup.exists(leftover) and not dmsetup.exists(pool.name)
    assert vg not in sh("vgs", "--noheadings", "-o", "vg_name").split()
    assert signatures(blockdev) == []
