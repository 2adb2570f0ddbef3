"""The qemu guest harness (tests.support.qemu), tested from the host.

Two guest boots here (~5 s each once the kernel is cached): one checks
everything the device-mapper and cgroup v2 tests rely on and exits 3, one
hangs and must be killed by the timeout. tests/vm/test_dm_in_guest.py boots a
third time to run the dm tests (exit 0). The rest fake qemu and boot nothing.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import time
from pathlib import Path

import pytest

from tests.support import qemu

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LAYERFS_IN_GUEST") == "1",
                       reason="already inside the qemu guest: no nested guests"),
]

needs_qemu = pytest.mark.skipif(shutil.which(qemu.QEMU) is None,
                                reason=f"{qemu.QEMU} not installed (scripts/setup installs it)")


@pytest.fixture(scope="module")
def prepared() -> qemu.Prepared:
    # No skip on failure: a kernel that cannot be fetched is a broken harness.
    return qemu.prepare()


# --------------------------------------------------------------------------
# no boot
# --------------------------------------------------------------------------


def _mod(name: str, depends: tuple[str, ...] = (), pre: tuple[str, ...] = (),
         aliases: tuple[str, ...] = ()) -> qemu.ModInfo:
    return qemu.ModInfo(name, depends, pre, aliases)


def test_load_order_puts_dependencies_and_soft_dependencies_first() -> None:
    mods = {m.name: m for m in [
        _mod("dm_thin_pool", ("dm_bio_prison", "dm_persistent_data", "dm_mod")),
        _mod("dm_persistent_data", ("dm_bufio", "libcrc32c")),
        _mod("dm_bufio", ("dm_mod",)),
        _mod("dm_mod"), _mod("dm_bio_prison"),
        _mod("libcrc32c", pre=("crc32c",)),
        _mod("crc32c_intel", aliases=("crc32c", "crypto-crc32c")),
        _mod("crc32c_generic", aliases=("crc32c", "crypto-crc32c")),
        _mod("virtio_blk", ("virtio", "virtio_ring")),
        _mod("virtio", ("virtio_ring",)), _mod("virtio_ring"),
    ]}
    order = qemu.load_order(mods, ["dm_thin_pool", "virtio_blk"])
    assert len(order) == len(set(order))
    assert order.index("crc32c_generic") < order.index("libcrc32c")  # the generic provider
    assert "crc32c_intel" not in order
    for mod in order:
        for dep in mods[mod].depends:
            assert order.index(dep) < order.index(mod), (dep, mod)
    assert order[-1] == "virtio_blk"
    with pytest.raises(qemu.GuestError, match="nosuch"):
        qemu.load_order(mods, ["nosuch"])


def test_prepared_kernel_and_modules(prepared: qemu.Prepared) -> None:
    assert prepared.vmlinux.read_bytes()[:4] == b"\x7fELF"
    modules = list(prepared.modules)
    for needed in ("virtio_blk", "9p", "overlay", "loop", "dm_thin_pool", "dm_snapshot", "ext4"):
        assert needed in modules
    assert modules.index("crc32c_generic") < modules.index("libcrc32c")
    ko = prepared.vmlinux.parent / "modules" / "dm_thin_pool.ko"
    info = qemu.read_modinfo(ko.read_bytes())
    assert info["name"] == ["dm_thin_pool"]
    assert set(info["depends"][0].split(",")) == {"dm-bio-prison", "dm-persistent-data", "dm-mod"}
    t0 = time.monotonic()
    again = qemu.prepare()
    assert again == prepared and time.monotonic() - t0 < 2, "a cached prepare must be fast"


def test_sizes_and_junit_summary() -> None:
    assert qemu.parse_size("4G") == 4 << 30 and qemu.parse_size("512M") == 512 << 20
    assert qemu.parse_size("0") == 0 and qemu.parse_size(None) == 0 and qemu.parse_size(4096) == 4096
    with pytest.raises(ValueError):
        qemu.parse_size("4 gallons")
    xml = """<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4"
    time="2.5"><testcase classname="a" name="t1"/><testcase classname="a" name="t2">
    <failure message="boom"/></testcase><testcase classname="a" name="t3"><skipped
    message="no dm"/></testcase><testcase classname="a" name="t4"/></testsuite></testsuites>"""
    s = qemu.junit_summary(xml)
    assert (s.tests, s.passed, s.failures, s.skipped) == (4, 2, 1, 1)
    assert s.failed == ["a::t2"] and s.skipped_reasons == ["a::t3: no dm"]
    assert str(s) == "2 passed, 1 failed, 0 errors, 1 skipped in 2.5 s"


def _fake_qemu(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def _fake_prepared(tmp_path: Path) -> qemu.Prepared:
    return qemu.Prepared("fake", tmp_path / "vmlinux", tmp_path / "initramfs", ())


def test_a_guest_that_reports_nothing_fails_loudly(tmp_path: Path) -> None:
    fake = _fake_qemu(tmp_path, "echo 'Kernel panic - not syncing: fake'; exit 0")
    with pytest.raises(qemu.GuestError, match="guest did not report a result: qemu exited 0") as e:
        qemu.run_in_guest(["true"], qemu=fake, prepared=_fake_prepared(tmp_path), echo=False)
    assert "Kernel panic - not syncing: fake" in str(e.value)  # the console tail is shown


def test_a_guest_that_never_answers_is_killed(tmp_path: Path) -> None:
    fake = _fake_qemu(tmp_path, "exec sleep 600")
    t0 = time.monotonic()
    with pytest.raises(qemu.GuestError, match="no answer within 2 s; qemu killed"):
        qemu.run_in_guest(["true"], qemu=fake, prepared=_fake_prepared(tmp_path), timeout=1,
                          boot_allowance=1, echo=False)
    assert time.monotonic() - t0 < 15


def test_cli_exits_non_zero_when_the_guest_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LAYERFS_QEMU", _fake_qemu(tmp_path, "exit 1"))
    monkeypatch.setattr(qemu, "prepare", lambda **_: _fake_prepared(tmp_path))
    assert qemu._main(["run", "--disk-size", "0", "--", "true"]) != 0
    assert "guest did not report a result: qemu exited 1" in capsys.readouterr().err


# --------------------------------------------------------------------------
# real boots
# --------------------------------------------------------------------------

CHECKS = {
    "root": '[ "$(id -u)" = 0 ]',
    "cwd": '[ "$(pwd)" = "$EXPECT_CWD" ]',
    "argv": '''[ "$ARG1" = "two words 'and quotes'" ]''',
    "env": '[ "$LAYERFS_IN_GUEST" = 1 ] && [ "$DM_DISABLE_UDEV" = 1 ] && [ "$EXTRA" = "x y" ]',
    "vda": '[ "$LAYERFS_TEST_BLOCKDEV" = /dev/vda ] && [ -b /dev/vda ]'
           ' && [ "$(blockdev --getsize64 /dev/vda)" = 1073741824 ]',
    "thin-pool": 'dmsetup targets | grep -q "^thin-pool "',
    "dm-node": 'dmsetup create lfs-harness --table "0 2048 linear /dev/vda 0"'
               ' && [ -b /dev/mapper/lfs-harness ] && dmsetup remove lfs-harness',
    "loop": 'f=$(mktemp) && truncate -s 8M $f && dev=$(losetup --find --show $f) && losetup -d $dev'
            ' && rm $f',
    "xfs-on-demand": 'd=$(mktemp -d) && truncate -s 300M $d/x && mkfs.xfs -q $d/x'
                     ' && mkdir $d/m && mount -o loop $d/x $d/m && umount $d/m && rm -r $d',
    "cgroup2-root": '[ "$LAYERFS_CGROUP2" = /sys/fs/cgroup ]'
                    ' && [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]',
    "cgroup2-mount": 'd=$(mktemp -d) && mount -t cgroup2 none $d'
                     ' && [ -f $d/cgroup.controllers ] && umount $d && rmdir $d',
    "cgroup2-child": 'echo +pids +memory > /sys/fs/cgroup/cgroup.subtree_control'
                     ' && mkdir /sys/fs/cgroup/lfs && echo $$ > /sys/fs/cgroup/lfs/cgroup.procs'
                     ' && grep -qx "0::/lfs" /proc/self/cgroup',
    "results": '[ -d "$LAYERFS_RESULTS" ] && echo hi > "$LAYERFS_RESULTS/probe"',
    # The checkout's own venv, wherever this clone lives (never a path of one machine).
    "venv-python": f'{shlex.quote(str(qemu.REPO_ROOT / ".venv" / "bin" / "python"))} -c "import pytest"',
}
GUEST_SCRIPT = (
    'ARG1=$1\n'
    'check() { if eval "$2" >/tmp/check.out 2>&1; then echo "CHECK $1 ok";'
    ' else echo "CHECK $1 FAILED"; cat /tmp/check.out; fi; }\n'
    + "".join(f"check {name} {shlex.quote(cmd)}\n" for name, cmd in CHECKS.items())
    + "exit 3\n"
)


@needs_qemu
def test_guest_boots_with_dm_disk_and_cgroup2_and_returns_the_exit_code(
        prepared: qemu.Prepared, tmp_path: Path) -> None:
    out = io.StringIO()
    result = qemu.run_in_guest(
        ["sh", "-c", GUEST_SCRIPT, "checks", "two words 'and quotes'"],
        timeout=240, disk_size="1G", env={"EXTRA": "x y", "EXPECT_CWD": str(qemu.REPO_ROOT)},
        results_dir=tmp_path / "results", stream=out, prepared=prepared)
    print(out.getvalue())
    assert result.returncode == 3 and not result.timed_out
    for name in CHECKS:
        assert f"CHECK {name} ok" in result.output, f"guest check {name} failed:\n{result.output}"
    assert (tmp_path / "results" / "probe").read_text() == "hi\n"
    assert result.boot_seconds is not None and result.boot_seconds < 30
    assert out.getvalue().startswith("guest| ")


@needs_qemu
def test_a_hanging_command_is_killed_by_the_timeout(prepared: qemu.Prepared) -> None:
    t0 = time.monotonic()
    result = qemu.run_in_guest(["sleep", "1000"], timeout=5, disk_size=0, prepared=prepared,
                               echo=False)
    assert result.timed_out and result.returncode == qemu.TIMEOUT_RC
    assert not result.ok
    assert "timed out after 5 s" in result.console
    assert time.monotonic() - t0 < 60
