"""What only the devicemapper driver has: a thin pool (loopback, direct-lvm or an
existing one), a base device, thin snapshots, transactions that survive a crash,
free-space limits, deferred removal, and ``layerfs pool create|destroy``.

The first tests (options, names, the ioctl layout, the backend choice, the
host check) run anywhere. The rest need device-mapper: on the development
host they skip with the reason, and tests/vm/test_devicemapper_in_guest.py
runs this file in the qemu guest (with the conformance suite) and fails if
anything skipped there. direct-lvm wipes ``$LAYERFS_TEST_BLOCKDEV`` (the guest's
scratch /dev/vda). Every pool, VG and device made here is torn down by the
exact name recorded at set-up, even when a test fails.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from layerfs_drivers.devicemapper import DevicemapperDriver, PoolSpaceLow, dm_missing, dmioctl, dmsetup
from layerfs_drivers.devicemapper import config as dmconfig
from layerfs_drivers.devicemapper.cli import destroy_root_pool
from layerfs_drivers.devicemapper.deviceset import DeviceSet
from layerfs_drivers.devicemapper.pool import LoopbackPool, signatures

from layerfs import cli as lfscli
from layerfs import plugins
from layerfs.changes import ChangeKind
from layerfs.errors import DriverNotSupported, InUse, InvalidArgument
from layerfs.layers import LayerStore
from layerfs.metastore import DriverState, MetaStore
from layerfs.options import DriverOptions
from layerfs.testing.conformance.suite import BASE_ENTRIES, tar_of
from layerfs.testing.trees import tree_manifest

from .. import test_crash as crash_suite

MiB, GiB = 1 << 20, 1 << 30
SMALL = {"loopdatasize": "1G", "loopmetadatasize": "64M", "basesize": "256M", "fs": "ext4"}


def parse(**opts: str) -> dmconfig.Config:
    return dmconfig.parse(DriverOptions(dict(opts)))


# --------------------------------------------------------------------------
# anywhere: options, names, ioctl layout, backend choice, host check
# --------------------------------------------------------------------------


def test_defaults_are_dockers_and_the_mode_follows_the_device_options() -> None:
    c = parse()
    s = c.setup
    assert (s.mode, s.loopdatasize, s.loopmetadatasize, s.blocksize) == (
        "loopback", 100 * GiB, 2 * GiB, 64 << 10)
    assert (s.basesize, s.fs, s.thinp_percent, s.thinp_metapercent) == (10 * GiB, "xfs", 95, 1)
    assert (s.thinp_autoextend_threshold, s.thinp_autoextend_percent) == (80, 20)
    r = c.runtime
    assert (r.min_free_space, r.use_deferred_removal, r.use_deferred_deletion) == (10, False, False)
    assert c.blkdiscard  # loopback: re-sparsify the data file
    lvm = parse(directlvm_device="/dev/sdz")
    assert lvm.setup.mode == "direct-lvm" and not lvm.blkdiscard
    assert parse(thinpooldev="/dev/mapper/p").setup.mode == "existing"
    assert parse(min_free_space="5%").runtime.min_free_space == 5
    assert parse(mountopt="noatime, nodiratime").runtime.mountopt == ("noatime", "nodiratime")
    assert parse(mkfsarg="-m 'crc=1'").setup.mkfsarg == ("-m", "crc=1")
    assert parse(blkdiscard="false").blkdiscard is False


@pytest.mark.parametrize(("opts", "reason"), [
    ({"directlvm_device": "/dev/sdz", "thinpooldev": "p"}, "exclude each other"),
    ({"mode": "direct-lvm"}, "needs directlvm_device"),
    ({"mode": "loopback", "thinpooldev": "/dev/mapper/p"}, "needs neither"),
    ({"fs": "btrfs"}, "want xfs or ext4"),
    ({"basesize": "256M"}, "too small for xfs"),
    ({"use_deferred_deletion": "true"}, "needs use_deferred_removal"),
    ({"min_free_space": "100%"}, "min_free_space"),
    ({"thinp_percent": "95", "thinp_metapercent": "10"}, "exceed 100"),
    ({"nosuch": "1"}, "unknown option"),
    ({"basesize": "lots"}, "not a size"),
])
def test_bad_options_are_refused_with_the_reason(opts: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        dmconfig.parse(DriverOptions(opts))


def test_setup_options_are_fixed_but_basesize_may_grow() -> None:
    recorded = parse(fs="ext4", basesize="256M", mkfsarg="-b 4096").setup
    assert dmconfig.Setup.from_record(json.loads(json.dumps(recorded.to_record()))) == recorded
    assert dmconfig.reconcile(recorded, parse()) == recorded  # nothing given: the record
    # runtime options may change on any open
    assert dmconfig.reconcile(recorded, parse(min_free_space="0", mountopt="noatime")) == recorded
    with pytest.raises(InvalidArgument, match=r"fs=xfs \(set up with ext4\)"):
        dmconfig.reconcile(recorded, parse(fs="xfs", basesize="1G"))
    grown = dmconfig.reconcile(recorded, parse(fs="ext4", basesize="512M"))
    assert grown.basesize == 512 * MiB and grown.fs == "ext4"
    with pytest.raises(InvalidArgument, match="basesize=134217728"):
        dmconfig.reconcile(recorded, parse(fs="ext4", basesize="128M"))


def test_thin_names_fit_device_mapper_and_never_collide(tmp_path: Path) -> None:
    ds = DeviceSet(tmp_path, parse(), None, tmp_path)  # type: ignore[arg-type]
    prefix = ds.thin_prefix()
    st = os.stat(tmp_path)
    assert prefix == f"layerfs-{os.major(st.st_dev)}:{os.minor(st.st_dev)}-{st.st_ino}"
    assert ds.thin_name("abc") == f"{prefix}-abc"
    assert ds.thin_name("") == f"{prefix}-base"
    ids = ["", "base", "pool", "a" * 127, "a" * 128, "abc", "x" * 100]
    names = {ds.thin_name(i) for i in ids}
    assert len(names) == len(ids) and all(len(n) <= 127 for n in names)
    assert f"{prefix}-pool" not in names  # a layer called "pool" is not the pool


def test_dm_ioctl_layout() -> None:
    assert dmioctl.HEADER_SIZE == 312
    assert dmioctl.DM_DEV_CREATE == 0xC138FD03 and dmioctl.DM_TARGET_MSG == 0xC138FD0E
    blob = dmioctl._specs([(0, 2048, "thin", "253:0 7"), (2048, 8, "error", "")])
    start, length, _, nxt, target = dmioctl._SPEC.unpack_from(blob, 0)
    assert (start, length, nxt, target.rstrip(b"\0")) == (0, 2048, 48, b"thin")
    assert blob[40:48] == b"253:0 7\0"
    start, length, _, nxt, target = dmioctl._SPEC.unpack_from(blob, 48)
    assert (start, length, nxt, target.rstrip(b"\0")) == (2048, 8, 0, b"error")
    assert len(blob) % 8 == 0


def test_backend_follows_udev_and_never_waits_for_a_missing_udevd(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DM_DISABLE_UDEV", raising=False)
    monkeypatch.setenv("LAYERFS_DM_BACKEND", "dmsetup")
    assert dmsetup.backend() == "dmsetup"
    monkeypatch.setenv("LAYERFS_DM_BACKEND", "ioctl")
    assert dmsetup.backend() == "ioctl"
    monkeypatch.delenv("LAYERFS_DM_BACKEND")
    monkeypatch.setattr(dmsetup, "udev_running", lambda: True)
    assert dmsetup.backend() == "dmsetup"  # udev sync through dmsetup's cookies
    assert dmsetup._udev_flags() == [] and "DM_DISABLE_UDEV" not in dmsetup._env()
    monkeypatch.setattr(dmsetup, "udev_running", lambda: False)
    assert dmsetup._udev_flags() == ["--noudevsync"] and dmsetup._env()["DM_DISABLE_UDEV"] == "1"
    assert dmsetup.backend() == ("ioctl" if os.access(dmioctl.CONTROL, os.W_OK) else "dmsetup")


def test_driver_check_says_why_and_where_it_runs(tmp_path: Path) -> None:
    probe = plugins.probe("devicemapper", tmp_path)
    if dm_missing() is not None or os.geteuid() != 0:
        assert not probe.supported
        assert "qemu" in str(probe.reason) or "root" in str(probe.reason)
    else:
        assert probe.supported, probe.reason
    # Bad options never break `layerfs info`'s probe; they are reported by open.
    assert plugins.probe("devicemapper", tmp_path, DriverOptions({"fs": "zfs"})).name


# --------------------------------------------------------------------------
# with device-mapper (the qemu guest)
# --------------------------------------------------------------------------


def dm_unsupported() -> str | None:
    try:
        DevicemapperDriver.check(Path("/tmp"), DriverOptions({"fs": "ext4"}))
        DevicemapperDriver.check(Path("/tmp"), DriverOptions({}))  # xfs tools too
    except DriverNotSupported as err:
        return err.reason
    return None


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout


def recorded_pool(root: Path) -> dict | None:
    if not (root / "layerfs.db").exists():
        return None
    store = MetaStore(root / "layerfs.db")
    try:
        return DriverState(store, "devicemapper").get("pool")
    finally:
        store.close()


def loops_of(path: Path) -> list[str]:
    return [line.split(":", 1)[0] for line in sh("losetup", "-j", str(path)).splitlines()]


class Roots:
    """Roots a test opens; each pool is destroyed by its recorded names at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.roots: list[Path] = []
        self.stores: list[LayerStore] = []

    def track(self, root: Path) -> Path:
        if root not in self.roots:
            self.roots.append(root)
        return root

    def open(self, name: str = "root", **opts: str) -> LayerStore:
        """A fresh root (or the same one again) with the small loopback pool plus ``opts``."""
        store = LayerStore.open(self.track(self.tmp / name), "devicemapper", {**SMALL, **opts})
        self.stores.append(store)
        return store

    def reopen(self, name: str = "root", *, recover: bool = True, **opts: str) -> LayerStore:
        """The root again with only ``opts``: the pool comes from its record."""
        store = LayerStore.open(self.track(self.tmp / name), "devicemapper", opts or None,
                                recover=recover)
        self.stores.append(store)
        return store

    def teardown(self) -> list[str]:
        errors = []
        for store in self.stores:
            try:
                store.close()
            except Exception as err:
                errors.append(f"close {store.root}: {err}")
        for root in self.roots:
            record = recorded_pool(root)
            if record is None:
                continue
            try:
                destroy_root_pool(root)
            except Exception as err:
                errors.append(f"destroy {root}: {err}")
                continue
            names = {n for n in (record.get("name"),) if n and record.get("vg") is None
                     and record["setup"]["mode"] == "loopback"}
            leftovers = [n for n in dmsetup.ls() if n.startswith(record["prefix"] + "-")
                         or n in names]
            if leftovers:
                errors.append(f"{root}: dm devices left: {leftovers}")
        return errors


@pytest.fixture
def dm(tmp_path: Path) -> Iterator[Roots]:
    reason = dm_unsupported()
    if reason:
        pytest.skip(reason)
    roots = Roots(tmp_path)
    yield roots
    errors = roots.teardown()
    assert not errors, errors


def fill(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def pool_name(store: LayerStore) -> str:
    return store.driver.devices.record["name"]  # type: ignore[attr-defined]


@pytest.mark.vm
def test_loopback_pool_layout_status_and_metadata(dm: Roots,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    store = dm.open()
    drv = store.driver
    home = store.root / "devicemapper"
    data, meta = home / "loopback" / "data", home / "loopback" / "metadata"
    assert data.stat().st_size == GiB and data.stat().st_blocks * 512 < 64 * MiB  # sparse
    assert meta.stat().st_size == 64 * MiB
    base = store.apply(tar_of(BASE_ENTRIES)).id
    child = store.create(base).id
    info = store.status()
    prefix = drv.devices.record["prefix"]  # type: ignore[attr-defined]
    assert info["Storage Driver"] == "devicemapper" and info["Mode"] == "loopback"
    assert info["Pool Name"] == f"{prefix}-pool"
    assert dmsetup.table(info["Pool Name"])[0].target == "thin-pool"
    assert (info["Data Space Total"], info["Metadata Space Total"]) == ("1.0 GiB", "64.0 MiB")
    assert (info["Pool Blocksize"], info["Base Device Size"]) == ("64.0 KiB", "256.0 MiB")
    assert info["Backing Filesystem"] == "ext4" and info["Thin Devices"] == "3"  # base + 2
    assert info["Data loop file"] == str(data) and info["Data file"] in loops_of(data)
    assert info["Metadata loop file"] == str(meta) and info["Pool State"] == "rw"
    assert info["Thin Pool Minimum Free Space"] == "102.4 MiB (10%)"
    assert "testing only" in info["Warning"] and info["Udev Sync Supported"] in ("true", "false")
    used = info["Data Space Used"]
    assert used.endswith("MiB") and 0 < float(used.split()[0]) < 200

    md = store.metadata(child)
    assert md["DeviceName"] == f"{prefix}-{child}" and md["Device"] == f"/dev/mapper/{prefix}-{child}"
    assert md["Origin"] == store.metadata(base)["DeviceId"] and md["DeviceSize"] == str(256 * MiB)
    assert md["Pool"] == info["Pool Name"] and md["Filesystem"] == "ext4"
    with store.mounted(child) as path:
        # The layer is the device's filesystem root, and nothing else is in it.
        assert sorted(os.listdir(path)) == sorted({e[0].split("/")[0] for e in BASE_ENTRIES})
        assert os.stat(path).st_dev == os.stat(md["Device"]).st_rdev
    usage = store.usage(child)
    assert usage.inodes >= len(BASE_ENTRIES) and usage.shared_bytes and usage.shared_bytes > 0
    assert usage.exclusive_bytes is not None

    store.close()  # the last user: the thin devices, the pool and its loops go away
    assert not dmsetup.exists(info["Pool Name"]) and not dmsetup.exists(md["DeviceName"])
    assert loops_of(data) == [] and loops_of(meta) == []
    assert lfscli.main(["--root", str(store.root), "info", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["driver"] == "devicemapper" and shown["status"]["Pool Name"] == info["Pool Name"]
    assert shown["status"]["Thin Devices"] == "3" and loops_of(data) == []


@pytest.mark.vm
def test_reopen_uses_the_recorded_pool_refuses_changes_and_grows_basesize(dm: Roots) -> None:
    store = dm.open()
    base = store.apply(tar_of(BASE_ENTRIES)).id
    before = tree_manifest_of(store, base)
    store.close()
    store = dm.reopen()  # no options: the recorded pool, reattached
    assert tree_manifest_of(store, base) == before
    assert store.status()["Data Space Total"] == "1.0 GiB"
    store.close()
    with pytest.raises(InvalidArgument, match=r"fs=xfs \(set up with ext4\)"):
        LayerStore.open(store.root, "devicemapper", {"fs": "xfs", "basesize": "1G"})
    with pytest.raises(InvalidArgument, match="basesize"):
        LayerStore.open(store.root, "devicemapper", {"basesize": "128M"})
    store = dm.reopen(basesize="384M")  # Docker lets dm.basesize grow on restart
    assert store.status()["Base Device Size"] == "384.0 MiB"
    fresh = store.create().id
    assert store.metadata(fresh)["DeviceSize"] == str(384 * MiB)
    assert store.metadata(base)["DeviceSize"] == str(256 * MiB)  # existing layers keep theirs
    with store.mounted(fresh) as path:
        st = os.statvfs(path)
        assert st.f_blocks * st.f_frsize > 340 * MiB
        assert os.listdir(path) == []


def tree_manifest_of(store: LayerStore, layer: str) -> dict:
    with store.mounted(layer, readonly=True) as path:
        return tree_manifest(path)


@pytest.mark.vm
def test_snapshot_of_a_mounted_layer_and_views_of_a_live_mount(dm: Roots, tmp_path: Path) -> None:
    store = dm.open()
    base = store.apply(tar_of(BASE_ENTRIES)).id
    box = store.create(base).id
    with store.mounted(box) as path:
        (path / "live").write_text("written while mounted\n")
        snap = store.create(box).id  # the origin is suspended around the message
        (path / "after").write_text("only in box\n")
        # A read-only view of a layer mounted read-write: a bind of the live mount.
        changes = {(c.kind, c.path) for c in store.changes(box)}
        assert {(ChangeKind.ADD, "/live"), (ChangeKind.ADD, "/after")} <= changes
        with store.mounted(box, tmp_path / "ro", readonly=True) as ro:
            assert (ro / "after").read_text() == "only in box\n"
            with pytest.raises(OSError) as exc:
                (ro / "nope").write_text("x")
            assert exc.value.errno == errno.EROFS
    with store.mounted(snap, readonly=True) as path:
        assert (path / "live").read_text() == "written while mounted\n"
        assert not (path / "after").exists()
        with pytest.raises(InUse, match="mounted read-only"):
            store.mount(snap, tmp_path / "rw")
    # The parent moved on after the snapshot: against it, the snapshot lacks /after.
    assert [(c.kind, c.path) for c in store.changes(snap)] == [(ChangeKind.DELETE, "/after")]


@pytest.mark.vm
@pytest.mark.parametrize(("fs", "basesize"), [("ext4", "256M"), ("xfs", "320M")])
def test_layer_size_grows_the_device_and_its_filesystem(dm: Roots, fs: str, basesize: str) -> None:
    store = dm.open(fs=fs, basesize=basesize)
    assert store.status()["Backing Filesystem"] == fs
    base = store.apply(tar_of(BASE_ENTRIES)).id
    big = store.create(base, size="640M").id
    assert store.metadata(big)["DeviceSize"] == str(640 * MiB)

    def fs_size(layer: str) -> int:
        with store.mounted(layer, readonly=True) as path:
            st = os.statvfs(path)
            return st.f_blocks * st.f_frsize

    assert fs_size(big) > 560 * MiB and fs_size(base) < 330 * MiB
    child = store.create(big).id  # a snapshot inherits its origin's size
    assert store.metadata(child)["DeviceSize"] == str(640 * MiB)
    with store.mounted(child) as path:
        (path / "etc" / "hostname").write_text("grown\n")
    assert [(c.kind, c.path) for c in store.changes(child)] == [
        (ChangeKind.MODIFY, "/etc"), (ChangeKind.MODIFY, "/etc/hostname")]
    with pytest.raises(InvalidArgument, match="cannot shrink"):
        store.create(base, size="128M", layer_id="small")
    assert not store.exists("small") and not store.driver.exists("small")


@pytest.mark.vm
def test_min_free_space_refuses_new_layers_with_a_clear_error(dm: Roots) -> None:
    store = dm.open(loopdatasize="160M", min_free_space="20%")
    base = store.apply(tar_of(BASE_ENTRIES)).id
    big = store.create(base).id
    free = store.driver.devices.pool.status().data_free  # type: ignore[attr-defined]
    with store.mounted(big) as path:
        fill(path / "big", free - 32 * MiB + 8 * MiB)  # leaves ~24M: under 20% of 160M
    before = store.status()
    with pytest.raises(PoolSpaceLow, match=r"min_free_space=20%") as exc:
        store.create(base, layer_id="refused")
    assert "free data space, less than the minimum 32.0 MiB" in str(exc.value)
    assert store.store.get_layer("refused") is None and not store.driver.exists("refused")
    after = store.status()
    assert after["Pool Transaction Id"] == before["Pool Transaction Id"]
    assert after["Thin Devices"] == before["Thin Devices"]
    store.remove(big)  # its blocks go back to the pool
    again = store.create(base, layer_id="refused").id
    with store.mounted(again) as path:
        (path / "ok").write_text("ok\n")


@pytest.mark.vm
def test_a_full_pool_fails_writes_cleanly_and_recovers(dm: Roots) -> None:
    store = dm.open(loopdatasize="64M", min_free_space="0")
    base = store.apply(tar_of(BASE_ENTRIES)).id
    box = store.create(base).id
    failure: OSError | None = None
    t0 = time.monotonic()
    with store.mounted(box) as path:
        fd = os.open(path / "fill", os.O_WRONLY | os.O_CREAT, 0o644)
        chunk = b"\xa5" * MiB
        try:
            for i in range(128):
                os.write(fd, chunk)
                if i % 4 == 3:
                    os.fsync(fd)
            os.fsync(fd)
        except OSError as err:
            failure = err
        finally:
            with contextlib.suppress(OSError):  # close may report the write error again
                os.close(fd)
        assert failure is not None and failure.errno in (errno.ENOSPC, errno.EIO), failure
        assert time.monotonic() - t0 < 60, "writes to a full pool must fail, not queue"
        status = store.status()
        assert status["Pool State"] == "out_of_data_space"
        assert status["Data Space Available"] == "0 B"
        with pytest.raises(PoolSpaceLow, match="out of data space"):
            store.create(base, layer_id="nospace")
        assert not store.exists("nospace")
        # Other layers are untouched and readable.
        with store.mounted(base, readonly=True) as lower:
            assert (lower / "etc" / "passwd").read_text().startswith("root:")
    store.remove(box)  # unmounted above; deleting it frees the pool
    assert store.status()["Pool State"] == "rw"
    again = store.create(base).id
    with store.mounted(again) as path:
        (path / "after").write_text("the pool works again\n")
    assert tree_manifest_of(store, again)["after"].size == len("the pool works again\n")


CRASH = """
import os, signal, sys
from layerfs_drivers.devicemapper.metadata import Metadata
real = Metadata.{method}
def crash(self, *args, **kwargs):
    txn = self.txn()
    if txn is not None and txn.layer == "crashed":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
Metadata.{method} = crash
from layerfs.layers import LayerStore
store = LayerStore.open(sys.argv[1], "devicemapper")
store.create(sys.argv[2], layer_id="crashed")
"""


@pytest.mark.vm
@pytest.mark.parametrize(("method", "outcome"), [
    ("put_device", "rolled back"),  # killed after the dm message, before the record
    ("close_txn", "completed"),     # killed after the pool committed, before the store did
])
def test_a_crash_between_the_dm_message_and_the_store_write_is_recovered(
        dm: Roots, method: str, outcome: str) -> None:
    store = dm.open()
    base = store.apply(tar_of(BASE_ENTRIES)).id
    store.close()
    proc = subprocess.run([sys.executable, "-c", CRASH.format(method=method),
                           str(store.root), base])
    assert proc.returncode == -signal.SIGKILL

    # The driver recovers its transaction when the root opens; the store's own
    # recovery (the 'creating' layer row) is looked at separately below.
    store = dm.reopen(recover=False)
    drv = store.driver
    meta = drv.devices.meta  # type: ignore[attr-defined]
    pool = drv.devices.pool  # type: ignore[attr-defined]
    assert any(outcome in a for a in drv.recovered), drv.recovered  # type: ignore[attr-defined]
    assert meta.txn() is None
    assert int(store.status()["Pool Transaction Id"]) == meta.transaction_id()
    in_pool = set(pool.thin_usage())
    recorded = {r.dev_id for r in meta.devices().values()} | {meta.base().dev_id}
    assert in_pool == recorded, "a thin device the records do not know (or the reverse)"
    assert drv.exists("crashed") == (outcome == "completed")
    crashed = meta.device("crashed")
    # The store's half: the layer row was 'creating'; its owner is dead.
    assert store.store.get_layer("crashed").state == "creating"
    store.recover()
    assert store.store.get_layer("crashed") is None and not drv.exists("crashed")
    assert set(pool.thin_usage()) == recorded - {crashed.dev_id if crashed else None}
    again = store.create(base, layer_id="crashed").id
    assert tree_manifest_of(store, again) == tree_manifest_of(store, base)


@pytest.mark.vm
@pytest.mark.parametrize("case", ["test_kill_during_apply", "test_kill_during_remove",
                                  "test_kill_during_mount", "test_sixteen_parallel_creates"])
def test_the_generic_crash_suite_on_devicemapper(dm: Roots, case: str, tmp_path: Path,
                                                 request: pytest.FixtureRequest) -> None:
    """tests/test_crash.py is parametrized over the host's drivers; the same tests,
    run here on devicemapper (the root gets the conformance pool options)."""
    dm.track(tmp_path / "root")  # where conftest.root_for puts it; destroyed afterwards
    getattr(crash_suite, case)("devicemapper", tmp_path, request)


PARALLEL = """
import sys
from layerfs.layers import LayerStore
with LayerStore.open(sys.argv[1], "devicemapper") as store:
    layer = store.create(sys.argv[2], layer_id=f"p{sys.argv[3]}")
    with store.mounted(layer.id) as path:
        (path / "who").write_text(sys.argv[3])
"""


@pytest.mark.vm
def test_processes_in_parallel_get_distinct_devices(dm: Roots) -> None:
    store = dm.open()
    base = store.create(readonly=True).id
    store.close()
    procs = [subprocess.Popen([sys.executable, "-c", PARALLEL, str(store.root), base, str(i)])
             for i in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    store = dm.reopen()
    ids = {store.metadata(f"p{i}")["DeviceId"] for i in range(4)}
    assert len(ids) == 4
    for i in range(4):
        with store.mounted(f"p{i}", readonly=True) as path:
            assert (path / "who").read_text() == str(i)
    meta = store.driver.devices.meta  # type: ignore[attr-defined]
    assert int(store.status()["Pool Transaction Id"]) == meta.transaction_id() == 6  # base + 5


@pytest.mark.vm
def test_remove_discards_blocks_and_defers_a_busy_device(dm: Roots) -> None:
    store = dm.open()
    data = store.root / "devicemapper" / "loopback" / "data"
    base = store.apply(tar_of(BASE_ENTRIES)).id
    box = store.create(base).id
    with store.mounted(box) as path:
        fill(path / "big", 48 * MiB)
    before = data.stat().st_blocks * 512
    store.remove(box)  # blkdiscard (default in loopback mode) punches the blocks out
    assert data.stat().st_blocks * 512 < before - 40 * MiB

    busy = store.create(base).id
    name = store.metadata(busy)["DeviceName"]
    with store.mounted(busy):
        pass  # mapped now
    hold = os.open(f"/dev/mapper/{name}", os.O_RDONLY)  # an opener the store does not know
    try:
        with pytest.raises(InUse, match="use_deferred_removal"):
            store.remove(busy)
        # Refused before anything was destroyed: still a ready layer, still readable.
        assert store.get(busy).state == "ready"
        with store.mounted(busy, readonly=True) as path:
            assert (path / "etc/hostname").read_text() == "base\n"
        store.close()  # the device stays mapped: it is open
        store = dm.reopen(use_deferred_removal="true", use_deferred_deletion="true")
        store.remove(busy)
        assert not store.exists(busy) and not store.driver.exists(busy)
        info = dmsetup.info(name)
        assert info is not None and info.deferred_remove
        assert store.status()["Deferred Deleted Device Count"] == "1"
    finally:
        os.close(hold)
    deadline = time.monotonic() + 10
    while dmsetup.exists(name) and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel removes it from a workqueue after the last close
    assert not dmsetup.exists(name)
    store.close()
    store = dm.reopen()  # frees the deferred device's blocks
    assert store.status()["Deferred Deleted Device Count"] == "0"
    meta = store.driver.devices.meta  # type: ignore[attr-defined]
    assert set(store.driver.devices.pool.thin_usage()) == (  # type: ignore[attr-defined]
        {r.dev_id for r in meta.devices().values()} | {meta.base().dev_id})
    assert not Path(f"/dev/mapper/{name}").exists()


@pytest.mark.vm
def test_the_dmsetup_backend_runs_the_driver_too(dm: Roots, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERFS_DM_BACKEND", "dmsetup")  # the path used when udevd runs
    store = dm.open()
    assert store.status()["Device-mapper Backend"] == "dmsetup"
    base = store.apply(tar_of(BASE_ENTRIES)).id
    box = store.create(base).id
    with store.mounted(box) as path:
        (path / "etc" / "motd").write_text("hi\n")
        snap = store.create(box).id
    assert [(c.kind, c.path) for c in store.changes(box)] == [
        (ChangeKind.MODIFY, "/etc"), (ChangeKind.ADD, "/etc/motd")]
    store.remove(snap)
    store.remove(box)
    pool = pool_name(store)
    store.close()
    assert not dmsetup.exists(pool)


@pytest.mark.vm
def test_an_existing_thin_pool_is_used_but_not_destroyed(dm: Roots, tmp_path: Path) -> None:
    pool = LoopbackPool.create(tmp_path / "theirs", f"lfs-test-{secrets.token_hex(4)}",
                               data_size=512 * MiB, metadata_size=16 * MiB)
    try:
        store = dm.open(thinpooldev=f"/dev/mapper/{pool.name}")
        info = store.status()
        assert (info["Mode"], info["Pool Name"]) == ("existing", pool.name)
        base = store.apply(tar_of(BASE_ENTRIES)).id
        store.create(base)
        store.close()
        assert dmsetup.exists(pool.name)  # not ours to take down
        with pytest.raises(InvalidArgument, match="already has used data blocks"):
            LayerStore.open(tmp_path / "other", "devicemapper",
                            {**SMALL, "thinpooldev": pool.name})
        done = destroy_root_pool(store.root)
        assert "pool kept" in done[-1]
        assert pool.thin_usage() == {} and dmsetup.exists(pool.name)
    finally:
        pool.destroy()


@pytest.mark.vm
def test_cli_pool_create_and_destroy_loopback(dm: Roots, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = dm.track(tmp_path / "cli")
    name = f"lfs-test-{secrets.token_hex(4)}"
    argv = ["--root", str(root), "-s", "basesize=256M", "-s", "fs=ext4", "pool", "create",
            "devicemapper", "--mode", "loopback", "--name", name, "--size", "512M"]
    assert lfscli.main(argv) == 0
    out = capsys.readouterr()
    assert f"devicemapper pool {name} (loopback)" in out.out and "testing only" in out.out
    assert lfscli.main(argv) == 1  # the root has a pool already
    assert "already has a devicemapper pool" in capsys.readouterr().err
    assert lfscli.main(["--root", str(root), "layer", "create"]) == 0
    capsys.readouterr()
    assert lfscli.main(["--root", str(root), "info", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)["status"]
    assert (status["Pool Name"], status["Data Space Total"]) == (name, "512.0 MiB")
    assert status["Thin Devices"] == "2"
    assert lfscli.main(["--root", str(root), "pool", "destroy", "devicemapper", "nosuch"]) == 1
    assert "refusing to guess" in capsys.readouterr().err
    data = root / "devicemapper" / "loopback" / "data"
    assert lfscli.main(["--root", str(root), "pool", "destroy", "devicemapper", name]) == 0
    out = capsys.readouterr().out
    assert "removed 1 layer(s)" in out and name in out
    assert not dmsetup.exists(name) and not data.exists() and recorded_pool(root) is None
    assert not [n for n in dmsetup.ls() if n.startswith("layerfs-") and name in n]


# --- direct-lvm on the scratch disk ------------------------------------------------------------


@pytest.fixture
def blockdev(dm: Roots) -> str:
    dev = os.environ.get("LAYERFS_TEST_BLOCKDEV")
    if not dev:
        pytest.skip("LAYERFS_TEST_BLOCKDEV is not set (direct-lvm wipes that device: the "
                    "qemu guest sets it to its scratch /dev/vda)")
    if shutil.which("lvcreate") is None:
        pytest.skip("lvm2 not installed")
    return dev


def vgs() -> list[str]:
    return sh("vgs", "--noheadings", "-o", "vg_name").split()


@pytest.mark.vm
def test_direct_lvm_create_snapshot_remove_destroy(dm: Roots, blockdev: str) -> None:
    vg = f"lfstest{secrets.token_hex(4)}"
    sh("wipefs", "--all", blockdev)
    store = dm.open("lvm", directlvm_device=blockdev, pool_name=vg, thinp_percent="90",
                    thinp_metapercent="2", thinp_autoextend_threshold="70",
                    thinp_autoextend_percent="25")
    info = store.status()
    assert (info["Mode"], info["Pool Name"], info["Volume Group"]) == (
        "direct-lvm", f"{vg}-thinpool", vg)
    assert info["Physical Volume"] == blockdev and info["Autoextend"] == "at 70% by 25%"
    assert info["Pool Blocksize"] == "512.0 KiB" and "Warning" not in info
    profile = Path(f"/etc/lvm/profile/{vg}-thinpool.profile")
    assert "thin_pool_autoextend_threshold=70" in profile.read_text()
    assert sh("lvs", "--noheadings", "-o", "lv_attr", f"{vg}/thinpool").strip().startswith("t")
    assert signatures(blockdev) == ["LVM2_member"]

    base = store.apply(tar_of(BASE_ENTRIES)).id
    box = store.create(base).id
    with store.mounted(box) as path:
        (path / "etc" / "hostname").write_text("lvm\n")
        os.unlink(path / "etc" / "shadow")
    buf = io.BytesIO()
    store.diff(box, buf)
    buf.seek(0)
    copy = store.apply(buf, base).id
    assert tree_manifest_of(store, copy) == tree_manifest_of(store, box)
    store.remove(copy)
    prefix = store.driver.devices.record["prefix"]  # type: ignore[attr-defined]
    store.close()  # our thin devices are unmapped; the LVM pool stays active
    assert dmsetup.exists(f"{vg}-thinpool")
    assert not [n for n in dmsetup.ls() if n.startswith(prefix)]

    store = dm.reopen("lvm")  # the recorded pool: no options needed
    assert (tree_manifest_of(store, box)["etc/hostname"].size, store.exists(copy)) == (4, False)
    store.close()
    assert lfscli.main(["--root", str(store.root), "pool", "destroy", "devicemapper", vg]) == 0
    assert vg not in vgs() and signatures(blockdev) == [] and not profile.exists()
    assert not [n for n in dmsetup.ls() if n.startswith((prefix, vg))]


@pytest.mark.vm
def test_direct_lvm_refuses_a_device_with_a_filesystem_unless_forced(dm: Roots,
                                                                     blockdev: str) -> None:
    vg = f"lfstest{secrets.token_hex(4)}"
    sh("mkfs.ext4", "-q", "-F", blockdev)
    root = dm.track(dm.tmp / "lvm")
    with pytest.raises(InvalidArgument, match="ext4"):
        LayerStore.open(root, "devicemapper", {**SMALL, "directlvm_device": blockdev,
                                               "pool_name": vg})
    assert vg not in vgs() and "ext4" in signatures(blockdev) and recorded_pool(root) is None
    store = dm.open("lvm", directlvm_device=blockdev, pool_name=vg,
                    directlvm_device_force="true")
    assert store.status()["Mode"] == "direct-lvm" and signatures(blockdev) == ["LVM2_member"]
    store.close()
    destroy_root_pool(root)
    assert vg not in vgs() and signatures(blockdev) == []

