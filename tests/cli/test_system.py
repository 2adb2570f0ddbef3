"""``layerfs system df|prune|reset`` on every driver (devicemapper in the qemu guest, through
tests/vm/test_devicemapper_in_guest.py's one boot).

One test per driver walks a root through its life: an image, a stopped container, a
container's commit (a dangling image), a layer nothing uses; ``df`` counts them, ``prune``
removes what nothing uses and leaves the rest, ``prune -a`` the unused images too; then a
running container, a mounted layer, read-only image layers (btrfs: read-only subvolumes,
which ``rm -rf`` cannot delete) and ``reset`` gives it all back: no root, no mount, no
container cgroup, no device-mapper device, no loop device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs import mount as mountlib
from layerfs.runtime.containers import ContainerManager, RunOptions
from layerfs.runtime.engine import RuntimeConfig
from layerfs.testing import images as timg

from ..conftest import NATIVE_DRIVERS, open_store_or_skip, root_for
from ..host_resources import cgroup_dirs


class Cli:
    def __init__(self, root: Path, cgroup_parent: str) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERFS_")}
        self.env.update(LAYERFS_CGROUP_PARENT=cgroup_parent, COLUMNS="80")

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "layerfs", "--root", str(self.root), *args],
                              capture_output=True, text=True, env=self.env, timeout=300,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"layerfs {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def df(self) -> dict[str, dict[str, int]]:
        usage = json.loads(self("system", "df", "--json").stdout)
        return {row["kind"]: row for row in usage["rows"]}


def dm_devices(prefix: str) -> list[str]:
    proc = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.startswith(prefix)]


def loop_devices_under(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


@pytest.mark.parametrize("driver_name", NATIVE_DRIVERS)
def test_system_df_prune_reset(driver_name: str, tmp_path: Path, request: pytest.FixtureRequest,
                               cgroup_parent: str) -> None:
    root = root_for(driver_name, tmp_path, request)
    open_store_or_skip(driver_name, root).close()
    cli = Cli(root, cgroup_parent)
    archive = tmp_path / "busybox.tar"
    timg.busybox_image_tar(archive, tmp_path / "scratch")
    # The state is made through the library, in this process (the guest runs Python ~20x
    # slower: one interpreter start per command would not fit its budget); the system
    # commands themselves run as `layerfs`.
    config = RuntimeConfig(cgroup_parent=cgroup_parent)
    try:
        with ContainerManager(root, config=config) as mgr:
            mgr.images.load(archive)
            null = os.open(os.devnull, os.O_RDWR)
            try:
                status = mgr.run("busybox", ["sh", "-c", "echo hi > /made-here"],
                                 options=RunOptions(name="stopped", network="none"),
                                 stdin=null, stdout=null, stderr=null).wait()
            finally:
                os.close(null)
            assert status.code == 0
            dangling = mgr.commit("stopped").id                    # an untagged image
            loose = mgr.layers.create().id                          # a layer nothing uses

        df = cli.df()
        assert (df["Images"]["total"], df["Images"]["active"]) == (2, 1)
        assert (df["Containers"]["total"], df["Containers"]["active"]) == (1, 0)
        assert df["Containers"]["reclaimable"] == df["Containers"]["size"]
        assert (df["Layers"]["total"], df["Layers"]["active"]) == (1, 0)
        assert df["Layers"]["reclaimable"] == df["Layers"]["size"]
        table = cli("system", "df").stdout.splitlines()            # piped: plain rows
        assert table[1].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]

        pruned = cli("system", "prune", "-f").stdout
        stopped_gone = "Deleted Containers:" in pruned
        assert stopped_gone and dangling in pruned and loose in pruned, pruned
        assert "Total reclaimed space:" in pruned
        df = cli.df()
        assert (df["Images"]["total"], df["Containers"]["total"], df["Layers"]["total"]) == \
            (1, 0, 0)
        cli("system", "prune", "-af")
        df = cli.df()
        assert (df["Images"]["total"], df["Images"]["size"], df["Layers"]["total"]) == (0, 0, 0)

        # reset: a running container, a mounted layer, read-only image layers
        with ContainerManager(root, config=config) as mgr:
            mgr.images.load(archive)
            mgr.run_detached("busybox", ["sleep", "600"],
                             options=RunOptions(name="up", network="none"))
            mounted = mgr.layers.mount(mgr.layers.create().id)
        assert mountlib.is_mounted(mounted)
        if driver_name == "btrfs":   # a read-only subvolume the store does not know (a crash's)
            stray = root / "btrfs" / "subvolumes" / "stray"
            subprocess.run(["btrfs", "subvolume", "create", str(stray)], check=True,
                           capture_output=True)
            (stray / "file").write_text("kept by a read-only subvolume\n")
            subprocess.run(["btrfs", "property", "set", str(stray), "ro", "true"], check=True)
            assert subprocess.run(["rm", "-rf", str(stray)], capture_output=True).returncode != 0
            assert stray.exists()
        refused = cli("system", "reset", check=False)
        assert refused.returncode == 1 and "add -f" in refused.stderr
        done = cli("system", "reset", "-f").stdout
        assert "removed container" in done and f"removed {root}" in done, done
        assert not root.exists()
        assert not [m.target for m in mountlib.mountinfo() if m.target.startswith(str(root))]
        left = [str(c) for d in cgroup_dirs(cgroup_parent) if d.is_dir()
                for c in d.iterdir() if c.is_dir()]
        assert not left, f"container cgroups left: {left}"
        assert loop_devices_under(root) == []
        if driver_name == "btrfs":
            subvolumes = subprocess.run(["btrfs", "subvolume", "list", str(root.parent)],
                                        capture_output=True, text=True).stdout
            assert root.name not in subvolumes, subvolumes
    finally:
        if root.exists() and (root / "layerfs.db").exists():
            cli("system", "reset", "-f", check=False)


def test_system_df_prune_reset_on_devicemapper(tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    """The same walk on devicemapper, trimmed to what is the driver's own (in the qemu guest
    Python runs ~20x slower, and that boot has a time budget): df of thin devices, prune
    removing them, reset removing the mounted device, every thin device, the pool, its loop
    devices and files. No container: the runner is the same on every driver. The state is
    made and pruned through the library; reset runs as ``layerfs system reset -f``."""
    from layerfs import system
    from layerfs.images import ImageStore
    from layerfs.layers import LayerStore

    root = root_for("devicemapper", tmp_path, request)
    open_store_or_skip("devicemapper", root).close()   # a small loopback pool
    named, untagged = tmp_path / "busybox.tar", tmp_path / "untagged.tar"
    timg.busybox_image_tar(named, tmp_path / "scratch")
    layer = timg.LayerTar().dir("etc").file("etc/untagged", "no name\n").bytes()
    timg.build_image(untagged, [layer], name=None, cmd=["sh"])
    try:
        with LayerStore.open(root) as store:
            prefix = store.driver.devices.thin_prefix()  # type: ignore[attr-defined]
            images = ImageStore(store)
            images.load(named)
            images.load(untagged)                       # dangling: no name, no container
            loose = store.create().id
        with ContainerManager(root) as mgr:
            df = {r.kind: r for r in system.disk_usage(mgr).rows}
            assert (df["Images"].total, df["Images"].active, df["Layers"].total) == (2, 0, 1)
            assert df["Layers"].reclaimable == df["Layers"].size
            pruned = system.prune(mgr)
            assert len(pruned.images) == 1 and pruned.layers == [loose], pruned
            assert [r.total for r in system.disk_usage(mgr).rows] == [1, 0, 0, 0]
            mounted = mgr.layers.mount(mgr.layers.create(
                parent=mgr.images.get("busybox").top_layer).id)
        assert dm_devices(prefix), "no thin device before the reset"
        done = Cli(root, "unused")("system", "reset", "-f").stdout
        assert f"removed {root}" in done and "removed loopback pool" in done, done
        assert not root.exists() and not mountlib.is_mounted(mounted)
        assert dm_devices(prefix) == [], "device-mapper devices left"
        assert loop_devices_under(root) == []
    finally:
        if (root / "layerfs.db").exists():
            Cli(root, "unused")("system", "reset", "-f", check=False)
