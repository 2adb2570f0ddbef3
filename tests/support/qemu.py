"""Run a command inside a throw-away qemu guest that has device-mapper and cgroup v2.

The development and CI machines run a kernel without device-mapper (see
docs/vm.md and MACHINE.md), so the devicemapper tests run inside Debian's
stock kernel under ``qemu-system-x86_64 -accel tcg``. The guest has no disk
image of its own:

* a busybox initramfs (``/init`` below) loads the kernel modules, mounts the
  host's ``/`` read-only over 9p, puts a tmpfs overlay on top and chroots into
  it, so the guest runs the host's own dmsetup, lvm, thin_check and Python;
* a second, writable 9p share per run carries the command in (``cmd.sh``) and
  the exit code (``rc``) and any junit XML out; no ``rc`` file means the guest
  crashed or hung, and that is always a failure, never a pass;
* a sparse raw file is attached as ``/dev/vda`` for direct-lvm tests.

Usage::

    python -m tests.support.qemu prepare             # download + cache the kernel
    python -m tests.support.qemu run -- dmsetup targets
    python -m tests.support.qemu pytest -- tests/drivers/test_dm_plumbing.py

or from Python: ``run_in_guest(["dmsetup", "targets"], timeout=120)``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from layerfs import units
from layerfs.errors import ExternalCommandFailed, LayerfsError, command_error

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "qemu"
QEMU = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

# Where the guest sees the results share, and the markers /init prints.
GUEST_RESULTS = "/run/layerfs-results"
BEGIN_MARKER = "LAYERFS-GUEST-BEGIN"
EXIT_MARKER = "LAYERFS-GUEST-EXIT"
TIMEOUT_RC = 124  # what coreutils timeout returns; the guest uses the same

# Modules the guest needs; their dependencies are found from each .ko's
# .modinfo. virtio/9p/overlay make the root, dm + loop + ext4/xfs are what the
# tests exercise (lvm also checks for the dm_snapshot target). cgroup v2 is
# built in.
ROOT_MODULES = (
    "virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "overlay", "loop",
    "dm_thin_pool", "dm_snapshot", "ext4",
)
# In the initramfs but loaded only on demand (by the kernel's request_module, which
# runs busybox modprobe in the initramfs root): xfs alone costs ~1 s of boot.
ON_DEMAND_MODULES = ("xfs",)
# libcrc32c's "softdep=pre: crc32c" names an alias that both crc32c_generic and
# crc32c_intel provide; the generic one loads on any (emulated) CPU.
PREFERRED_PROVIDERS = {"crc32c": "crc32c_generic"}

CACHE_LAYOUT = 2  # bump when the cached kernel dir changes shape (forces a re-fetch)

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class GuestError(LayerfsError):
    """The guest could not run the command: no kernel, no boot, crash, hang."""


# --------------------------------------------------------------------------
# kernel modules: .modinfo parsing and load order
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModInfo:
    name: str
    depends: tuple[str, ...]
    softdep_pre: tuple[str, ...]
    aliases: tuple[str, ...]


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """The key=value pairs of an ELF64 little-endian .ko's ``.modinfo`` section."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 little-endian object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, stroff, strsize = section(shstrndx)
    strtab = data[stroff:stroff + strsize]
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        name = strtab[name_off:strtab.index(b"\0", name_off)]
        if name != b".modinfo":
            continue
        for entry in data[offset:offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def modinfo(path: Path) -> ModInfo:
    info = read_modinfo(path.read_bytes())
    name = info.get("name", [path.name.removesuffix(".ko").replace("-", "_")])[0]
    depends = tuple(d for v in info.get("depends", []) for d in v.split(",") if d)
    pre: list[str] = []
    for soft in info.get("softdep", []):
        # "pre: a b post: c"
        words = soft.split()
        current = None
        for w in words:
            if w.endswith(":"):
                current = w[:-1]
            elif current == "pre":
                pre.append(w)
    return ModInfo(name, depends, tuple(pre), tuple(info.get("alias", [])))


def load_order(modules: Mapping[str, ModInfo], roots: Iterable[str]) -> list[str]:
    """Modules to insmod, dependencies first (hard ``depends=`` and ``softdep pre:``).

    A soft dependency may name an alias; it resolves through PREFERRED_PROVIDERS
    or any module declaring that alias, and is dropped if nothing provides it.
    """
    providers: dict[str, list[str]] = {}
    for mod in modules.values():
        for alias in mod.aliases:
            providers.setdefault(alias, []).append(mod.name)

    def resolve(name: str, soft: bool) -> str | None:
        name = name.replace("-", "_")
        if name in modules:
            return name
        preferred = PREFERRED_PROVIDERS.get(name)
        if preferred in modules:
            return preferred
        if name in providers:
            return sorted(providers[name])[0]
        if soft:
            return None
        raise GuestError(f"kernel module {name!r} not found in the kernel package")

    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise GuestError(f"kernel module dependency cycle through {name}")
        visiting.add(name)
        mod = modules[name]
        for dep in mod.softdep_pre:
            resolved = resolve(dep, soft=True)
            if resolved and resolved != name:
                visit(resolved)
        for dep in mod.depends:
            visit(resolve(dep, soft=False) or dep)
        visiting.discard(name)
        order.append(name)

    for root in roots:
        visit(resolve(root, soft=False) or root)
    return order


# --------------------------------------------------------------------------
# prepare: kernel + modules + initramfs, cached under .cache/qemu
# --------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/busybox sh
# layerfs qemu guest /init (generated by tests/support/qemu.py)
/bin/busybox mkdir -p /proc /sys /dev /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
KVER=$(uname -r)
say() { echo "layerfs-guest: $*"; }
echo  # SeaBIOS leaves its last line open
fail() {
    say "FATAL: $*"
    [ -d /results/. ] && echo "$*" >> /results/error
    sync
    poweroff -f
    sleep 5
}
for m in $(cat /lib/modules/$KVER/load-order); do
    insmod /lib/modules/$KVER/$m.ko 2>/tmp/insmod.err || {
        grep -q "File exists" /tmp/insmod.err || say "insmod $m failed: $(cat /tmp/insmod.err)"
    }
done
say "modules loaded at $(cut -d' ' -f1 /proc/uptime) s"
mkdir -p /host /results /ovl /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results \
    || fail "cannot mount the results share (9p)"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \
    || fail "cannot mount the host root (9p)"
[ -x /host/bin/sh ] || fail "host root share has no /bin/sh"
. /results/guest.env
mount -t tmpfs -o mode=0755 tmpfs /ovl || fail "tmpfs"
mkdir -p /ovl/upper /ovl/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work /newroot \
    || fail "cannot mount the overlay root"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mkdir -p $R/run/lock $R/run/lvm $R/sys/fs/cgroup
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || say "cannot mount cgroup2"
[ "$GUEST_TMPFS_TMP" = 1 ] && mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mkdir -p $R$GUEST_RESULTS
mount --bind /results $R$GUEST_RESULTS
# lvm runs /sbin/modprobe; the host has none. Give it busybox's, with our modules.
mkdir -p $R/lib/modules/$KVER
cp -a /lib/modules/$KVER/. $R/lib/modules/$KVER/
[ -e $R/sbin/modprobe ] || cp /bin/busybox $R/sbin/modprobe
ln -sf /proc/self/mounts $R/etc/mtab 2>/dev/null
hostname layerfs-guest
# Loopback, as any booted machine has it (a local registry server listens on it).
ip link set lo up 2>/dev/null || say "cannot bring up lo"
say "root ready at $(cut -d' ' -f1 /proc/uptime) s"
echo; echo "$BEGIN_MARKER"
chroot $R /bin/sh $GUEST_RESULTS/cmd.sh </dev/console >/dev/console 2>&1 &
pid=$!
(
    sleep "$GUEST_TIMEOUT"
    echo "$GUEST_TIMEOUT" > /results/timed-out
    say "command timed out after $GUEST_TIMEOUT s: killing it"
    kill -TERM $pid 2>/dev/null
    sleep 5
    kill -KILL $pid 2>/dev/null
) &
watchdog=$!
wait $pid
rc=$?
kill $watchdog 2>/dev/null
echo $rc > /results/rc.tmp && mv /results/rc.tmp /results/rc
sync
echo "$EXIT_MARKER rc=$rc"
poweroff -f
sleep 10
"""


def _init_script() -> str:
    return (INIT_SCRIPT
            .replace("$BEGIN_MARKER", BEGIN_MARKER)
            .replace("$EXIT_MARKER", EXIT_MARKER)
            .replace("$GUEST_RESULTS", GUEST_RESULTS))


@dataclass(frozen=True)
class Prepared:
    """What a guest boots: the kernel release, its vmlinux and the initramfs."""

    kernel_release: str
    vmlinux: Path
    initramfs: Path
    modules: tuple[str, ...]


def _log_default(msg: str) -> None:
    print(f"qemu: {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]
    except subprocess.CalledProcessError as err:
        raise command_error(err) from err
    except FileNotFoundError as err:
        raise GuestError(f"{cmd[0]}: not installed (run scripts/setup)") from err


def kernel_package() -> str:
    """The versioned kernel package that ``linux-image-amd64`` depends on."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise GuestError(f"`apt-cache depends linux-image-amd64` names no kernel:\n{out}")


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The uncompressed ELF kernel inside an xz-compressed bzImage.

    Same method as the kernel's scripts/extract-vmlinux: find the xz magic and
    decompress from there; the first candidate that yields an ELF wins.
    """
    magic = b"\xfd7zXZ\x00"
    start = vmlinuz.find(magic)
    while start != -1:
        with contextlib.suppress(lzma.LZMAError, EOFError):
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(vmlinuz[start:])
            if out[:4] == b"\x7fELF":
                return out
        start = vmlinuz.find(magic, start + 1)
    raise GuestError("no xz-compressed ELF kernel found in vmlinuz")


class _Cpio:
    """A newc-format cpio archive writer (what the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        namez = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        blob = header + namez
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self.parts.append(blob)

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def _busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        p = Path(candidate)
        if p.is_file() and b"ld-linux" not in p.read_bytes()[:4096]:
            return p
    raise GuestError("busybox (static) not found: install busybox-static (scripts/setup)")


def _build_initramfs(kdir: Path, kver: str, order: Sequence[str], dest: Path) -> None:
    cpio = _Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "lib", "lib/modules",
              f"lib/modules/{kver}"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", _busybox().read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", _init_script().encode(), 0o755)
    for ko in sorted((kdir / "modules").glob("*.ko")):
        cpio.file(f"lib/modules/{kver}/{ko.name}", ko.read_bytes())
    cpio.file(f"lib/modules/{kver}/load-order", ("\n".join(order) + "\n").encode())
    for index in ("modules.dep", "modules.alias"):
        cpio.file(f"lib/modules/{kver}/{index}", (kdir / "modules" / index).read_bytes())
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(cpio.bytes())
    tmp.replace(dest)


def _initramfs_key(kver: str, order: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(_init_script().encode())
    h.update(kver.encode())
    h.update("\n".join(order).encode())
    st = _busybox().stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _fetch_kernel(cache: Path, package: str, log: Callable[[str], None]) -> str:
    """Download ``package``, keep boot/ and the needed modules under cache/kernel/KVER."""
    kver = package.removeprefix("linux-image-")
    kdir = cache / "kernel" / kver
    with tempfile.TemporaryDirectory(prefix="download-", dir=cache) as tmp_s:
        tmp = Path(tmp_s)
        debs = sorted(Path("/var/cache/apt/archives").glob(f"{package}_*_amd64.deb"))
        if debs:
            deb = debs[-1]
            log(f"using {deb}")
        else:
            t0 = time.monotonic()
            log(f"apt-get download {package}")
            _run(["apt-get", "download", "-q", package], cwd=tmp)
            deb = next(tmp.glob(f"{package}_*.deb"))
            log(f"downloaded {deb.name} ({deb.stat().st_size >> 20} MiB) in "
                f"{time.monotonic() - t0:.1f} s")
        tree = tmp / "tree"
        tree.mkdir()
        # Only boot/ and the .ko files; the rest of the package is firmware lists etc.
        deb_tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                   stdout=subprocess.PIPE)
        try:
            _run(["tar", "-x", "-C", str(tree), "--wildcards", "./boot/*", "*.ko"],
                 stdin=deb_tar.stdout)
        finally:
            assert deb_tar.stdout is not None
            deb_tar.stdout.close()
            if deb_tar.wait() != 0:
                raise GuestError(f"dpkg-deb --fsys-tarfile {deb} failed")
        moddir = tree / "lib" / "modules" / kver
        if not moddir.is_dir():
            found = [p.name for p in (tree / "lib" / "modules").iterdir()]
            raise GuestError(f"{deb.name} has no lib/modules/{kver} (has {found})")
        log("reading .modinfo of every module")
        paths = {}
        infos = {}
        for ko in moddir.rglob("*.ko"):
            info = modinfo(ko)
            infos[info.name] = info
            paths[info.name] = ko
        order = load_order(infos, ROOT_MODULES)
        extra = [m for m in load_order(infos, ON_DEMAND_MODULES) if m not in order]
        work = cache / "kernel" / f".{kver}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        (work / "modules").mkdir(parents=True)
        for name in order + extra:
            shutil.copyfile(paths[name], work / "modules" / f"{name}.ko")
        # modules.dep for busybox modprobe (in the guest, for lvm)
        (work / "modules" / "modules.dep").write_text("".join(
            f"{name}.ko: "
            + " ".join(f"{d.replace('-', '_')}.ko" for d in infos[name].depends) + "\n"
            for name in order + extra))
        (work / "modules" / "modules.alias").write_text("".join(
            f"alias {alias} {name}\n" for name in order + extra for alias in infos[name].aliases))
        (work / "load-order").write_text("\n".join(order) + "\n")
        log("extracting the uncompressed vmlinux")
        vmlinuz = tree / "boot" / f"vmlinuz-{kver}"
        (work / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        shutil.copyfile(tree / "boot" / f"config-{kver}", work / "config")
        shutil.rmtree(kdir, ignore_errors=True)
        work.replace(kdir)
    return kver


def prepare(cache: Path | None = None, *, refresh: bool = False,
            log: Callable[[str], None] = _log_default) -> Prepared:
    """Make sure a bootable kernel + initramfs exist in the cache; fast when they do.

    ``refresh`` asks apt which kernel ``linux-image-amd64`` currently names and
    fetches it if it is not the cached one; otherwise the cached kernel is used
    without asking apt anything.
    """
    cache = cache or Path(os.environ.get("LAYERFS_QEMU_CACHE", DEFAULT_CACHE))
    cache.mkdir(parents=True, exist_ok=True)
    state_file = cache / "state.json"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        kver = state.get("kernel_release")
        kdir = cache / "kernel" / str(kver)
        if (refresh or not kver or not (kdir / "vmlinux").exists()
                or state.get("layout") != CACHE_LAYOUT):
            package = kernel_package()
            wanted = package.removeprefix("linux-image-")
            if (wanted != kver or not (cache / "kernel" / wanted / "vmlinux").exists()
                    or state.get("layout") != CACHE_LAYOUT):
                t0 = time.monotonic()
                kver = _fetch_kernel(cache, package, log)
                log(f"kernel {kver} cached in {time.monotonic() - t0:.1f} s")
            kver = wanted
            kdir = cache / "kernel" / kver
            state = {"kernel_release": kver, "package": package, "layout": CACHE_LAYOUT}
        order = (kdir / "load-order").read_text().split()
        initramfs = cache / f"initramfs-{kver}.cpio"
        key = _initramfs_key(kver, order)
        if state.get("initramfs_key") != key or not initramfs.exists():
            _build_initramfs(kdir, kver, order, initramfs)
            state["initramfs_key"] = key
            log(f"built {initramfs.name} ({initramfs.stat().st_size >> 10} KiB)")
        tmp_state = state_file.with_suffix(".tmp")
        tmp_state.write_text(json.dumps(state, indent=1) + "\n")
        tmp_state.replace(state_file)
    return Prepared(kver, kdir / "vmlinux", initramfs, tuple(order))


# --------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------


@dataclass
class GuestResult:
    """How the command ended in the guest.

    ``output`` is the console text the command printed (between the begin and
    exit markers), ``console`` everything the guest printed. ``junit_path`` is
    set when a results directory was kept and the command wrote junit.xml;
    ``junit_xml`` holds its text either way.
    """

    returncode: int
    output: str
    console: str = ""
    timed_out: bool = False
    junit_path: Path | None = None
    junit_xml: str | None = None
    boot_seconds: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def parse_size(text: str | int | None) -> int:
    """``4G``, ``512M``, ``1073741824`` -> bytes (binary units); None/"0" -> 0."""
    if text is None:
        return 0
    if isinstance(text, int):
        return text
    return units.parse_size(text, what="disk size")


_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|c)")


class _Console:
    """Reads qemu's serial console, echoing each line as it arrives."""

    def __init__(self, stream: TextIO | None, prefix: str) -> None:
        self.stream = stream
        self.prefix = prefix
        self.lines: list[str] = []
        self.begin_at: float | None = None
        self.reported_rc: int | None = None
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        self._partial += chunk
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            self._line(raw)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""

    def _line(self, raw: bytes) -> None:
        # The serial line ends lines with \r\n; a bare \r (progress output) rewrites
        # the line on a terminal, so keep what a terminal would show.
        segments = [seg for seg in raw.decode(errors="replace").split("\r") if seg]
        line = _ANSI.sub("", segments[-1] if segments else "")
        if BEGIN_MARKER in line and line != BEGIN_MARKER:
            # SeaBIOS leaves its last line unterminated.
            before, _, after = line.partition(BEGIN_MARKER)
            for part in (before, BEGIN_MARKER, after):
                if part:
                    self._line(part.encode())
            return
        self.lines.append(line)
        if line == BEGIN_MARKER and self.begin_at is None:
            self.begin_at = time.monotonic()
        m = re.match(rf"{EXIT_MARKER} rc=(\d+)", line.strip())
        if m:
            self.reported_rc = int(m.group(1))
        if self.stream is not None:
            self.stream.write(f"{self.prefix}{line}\n")
            self.stream.flush()

    def command_output(self) -> str:
        try:
            start = self.lines.index(BEGIN_MARKER) + 1
        except ValueError:
            return ""
        end = len(self.lines)
        for i in range(start, len(self.lines)):
            if self.lines[i].startswith(EXIT_MARKER):
                end = i
                break
        return "\n".join(self.lines[start:end]) + "\n"


def _guest_env(env: Mapping[str, str] | None, disk: bool) -> dict[str, str]:
    out = {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONUNBUFFERED": "1",
        "DM_DISABLE_UDEV": "1",
        "LVM_SUPPRESS_FD_WARNINGS": "1",
        "LAYERFS_IN_GUEST": "1",
        "LAYERFS_CGROUP2": "/sys/fs/cgroup",
        "LAYERFS_RESULTS": GUEST_RESULTS,
    }
    if disk:
        out["LAYERFS_TEST_BLOCKDEV"] = "/dev/vda"
    out.update(env or {})
    return out


def _write_command(results: Path, argv: Sequence[str], env: Mapping[str, str], cwd: Path,
                   timeout: float) -> None:
    lines = ["# generated by tests.support.qemu"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 125")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    (results / "cmd.sh").write_text("\n".join(lines) + "\n")
    tmpfs_tmp = 0 if cwd.resolve().is_relative_to("/tmp") else 1
    (results / "guest.env").write_text(
        f"GUEST_TIMEOUT={max(1, int(timeout))}\nGUEST_TMPFS_TMP={tmpfs_tmp}\n")


def qemu_command(prepared: Prepared, results: Path, disk: Path | None, *, mem: int = 2048,
                 smp: int = 1, verbose_kernel: bool = False, qemu: str = QEMU) -> list[str]:
    append = ["console=ttyS0", "panic=-1", "rdinit=/init", "cgroup_no_v1=all",
              "mitigations=off", "nokaslr", "tsc=reliable", "no_timer_check",
              "8250.nr_uarts=1"]
    append.append("loglevel=7" if verbose_kernel else "quiet")
    cmd = [
        qemu, "-accel", "tcg", "-machine", "pc", "-cpu", "max", "-smp", str(smp),
        "-m", str(mem), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(prepared.vmlinux), "-initrd", str(prepared.initramfs),
        "-append", " ".join(append),
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none,"
                   "multidevs=remap",
    ]
    if disk is not None:
        cmd += ["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"]
    return cmd


BOOT_ALLOWANCE = 90.0  # seconds on top of the command's timeout before qemu is killed


def run_in_guest(
    argv: Sequence[str],
    *,
    timeout: float = 900,
    disk_size: str | int | None = "4G",
    env: Mapping[str, str] | None = None,
    mem: int = 2048,
    smp: int = 1,
    cwd: Path | str | None = None,
    results_dir: Path | str | None = None,
    echo: bool = True,
    stream: TextIO | None = None,
    prefix: str = "guest| ",
    verbose_kernel: bool = False,
    prepared: Prepared | None = None,
    boot_allowance: float = BOOT_ALLOWANCE,
    qemu: str | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> GuestResult:
    """Boot the guest, run ``argv`` as root in ``cwd`` (default: the repo), power off.

    Returns the command's exit status (``TIMEOUT_RC`` with ``timed_out`` set if
    it outlived ``timeout`` seconds). Raises :class:`GuestError` when the guest
    itself fails: qemu missing, no boot, a crash, or no answer within
    ``timeout`` + BOOT_ALLOWANCE -- anything that leaves no result file.
    ``results_dir`` (kept) is where junit.xml and the rc land; by default a
    temporary one is used and removed. ``qemu`` (or env ``LAYERFS_QEMU``)
    replaces the qemu binary, which the harness's own tests use to fake a crash.
    ``on_start`` gets the qemu process as soon as it runs (to kill it from elsewhere).
    The console is echoed line by line to ``stream`` (default sys.stdout) with
    ``prefix`` unless ``echo`` is false; it is kept in the result either way.
    """
    if not argv:
        raise ValueError("run_in_guest: empty command")
    qemu = qemu or os.environ.get("LAYERFS_QEMU", QEMU)
    if shutil.which(qemu) is None:
        raise GuestError(f"{qemu} not installed (run scripts/setup)")
    prepared = prepared or prepare()
    cwd_path = Path(cwd) if cwd else REPO_ROOT
    disk_bytes = parse_size(disk_size)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="layerfs-vm-") as tmp_s:
        tmp = Path(tmp_s)
        results = Path(results_dir) if results_dir else tmp / "results"
        results.mkdir(parents=True, exist_ok=True)
        for stale in ("rc", "rc.tmp", "error", "timed-out", "junit.xml"):
            (results / stale).unlink(missing_ok=True)
        disk = None
        if disk_bytes:
            disk = tmp / "disk.raw"
            with open(disk, "wb") as f:
                f.truncate(disk_bytes)
        _write_command(results, argv, _guest_env(env, disk is not None), cwd_path, timeout)
        cmd = qemu_command(prepared, results, disk, mem=mem, smp=smp,
                           verbose_kernel=verbose_kernel, qemu=qemu)
        console = _Console(stream or (sys.stdout if echo else None), prefix)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        if on_start is not None:
            on_start(proc)

        def pump() -> None:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 65536):
                console.feed(chunk)
            console.close()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = timeout + boot_allowance
        killed = False
        try:
            proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            killed = True
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            reader.join(timeout=10)
        seconds = time.monotonic() - t_start
        rc_file = results / "rc"
        if not rc_file.exists():
            why = []
            if killed:
                why.append(f"no answer within {deadline:.0f} s; qemu killed")
            else:
                why.append(f"qemu exited {proc.returncode}")
            err_file = results / "error"
            if err_file.exists():
                why.append(err_file.read_text().strip())
            tail = "\n".join(console.lines[-25:])
            raise GuestError(
                f"guest did not report a result: {'; '.join(why)}\n"
                f"--- last console lines ---\n{tail}")
        junit = results / "junit.xml"
        junit_xml = junit.read_text() if junit.exists() else None
        return GuestResult(
            returncode=int(rc_file.read_text().strip() or 255)
            if not (results / "timed-out").exists() else TIMEOUT_RC,
            output=console.command_output(),
            console="\n".join(console.lines),
            timed_out=(results / "timed-out").exists(),
            junit_path=junit if results_dir and junit.exists() else None,
            junit_xml=junit_xml,
            boot_seconds=(console.begin_at - t_start) if console.begin_at else None,
            seconds=seconds,
        )


# --------------------------------------------------------------------------
# junit summary
# --------------------------------------------------------------------------


@dataclass
class JunitSummary:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)
    skipped_reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped

    def __str__(self) -> str:
        return (f"{self.passed} passed, {self.failures} failed, {self.errors} errors, "
                f"{self.skipped} skipped in {self.seconds:.1f} s")


def junit_summary(xml_text: str) -> JunitSummary:
    root = ET.fromstring(xml_text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    s = JunitSummary()
    for suite in suites:
        s.tests += int(suite.get("tests", 0))
        s.failures += int(suite.get("failures", 0))
        s.errors += int(suite.get("errors", 0))
        s.skipped += int(suite.get("skipped", 0))
        s.seconds += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                s.failed.append(name)
            skip = case.find("skipped")
            if skip is not None:
                s.skipped_reasons.append(f"{name}: {skip.get('message', '')}")
    return s


def pytest_in_guest(args: Sequence[str], **kw: object) -> GuestResult:
    """Run ``python -m pytest ARGS`` from the repo's venv in the guest, with junit XML."""
    python = REPO_ROOT / ".venv" / "bin" / "python"
    argv = [str(python), "-m", "pytest", *args, f"--junitxml={GUEST_RESULTS}/junit.xml"]
    return run_in_guest(argv, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.qemu",
        description="Run commands in a qemu guest with device-mapper and cgroup v2.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_prep = sub.add_parser("prepare", help="download and cache the kernel, build the initramfs")
    p_prep.add_argument("--refresh", action="store_true",
                        help="ask apt for the current kernel and fetch it if it changed")
    for name, help_text in (("run", "run CMD in the guest: run [opts] -- CMD..."),
                            ("pytest", "run the venv's pytest in the guest")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--disk-size", default="4G",
                       help="scratch /dev/vda size (0 = no disk), default 4G")
        p.add_argument("--mem", type=int, default=2048, help="guest RAM in MiB")
        p.add_argument("--smp", type=int, default=1,
                       help="guest CPUs (1: as fast under TCG, and no stalls when the host is busy)")
        p.add_argument("--timeout", type=float, default=900,
                       help="seconds the command may run (boot not included)")
        p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
        p.add_argument("--results-dir", help="keep rc/junit.xml here")
        p.add_argument("--raw", action="store_true", help="console lines without prefix")
        p.add_argument("--verbose-kernel", action="store_true", help="show kernel messages")
        p.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    try:
        if opts.command == "prepare":
            t0 = time.monotonic()
            prepared = prepare(refresh=opts.refresh)
            print(f"kernel {prepared.kernel_release}: {prepared.vmlinux}\n"
                  f"initramfs: {prepared.initramfs}\n"
                  f"modules: {' '.join(prepared.modules)}\n"
                  f"ready in {time.monotonic() - t0:.2f} s")
            return 0
        args = list(opts.args)
        if args and args[0] == "--":
            args = args[1:]
        env = {}
        for item in opts.env:
            k, sep, v = item.partition("=")
            if not sep:
                parser.error(f"--env wants K=V, got {item!r}")
            env[k] = v
        kw = dict(timeout=opts.timeout, disk_size=opts.disk_size, env=env, mem=opts.mem,
                  smp=opts.smp, results_dir=opts.results_dir, verbose_kernel=opts.verbose_kernel,
                  prefix="" if opts.raw else "guest| ")
        if opts.command == "run":
            if not args:
                parser.error("run: give a command after --")
            result = run_in_guest(args, **kw)
        else:
            result = pytest_in_guest(args, **kw)
        boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "?"
        print(f"qemu: guest exited {result.returncode} (boot {boot}, total {result.seconds:.1f} s)",
              file=sys.stderr)
        if result.timed_out:
            print(f"qemu: FAILED: the command timed out after {opts.timeout:.0f} s",
                  file=sys.stderr)
        if opts.command == "pytest":
            if result.junit_xml:
                summary = junit_summary(result.junit_xml)
                print(f"guest pytest: {summary}")
                for name in summary.failed:
                    print(f"  FAILED {name}")
                for reason in summary.skipped_reasons:
                    print(f"  SKIPPED {reason}")
            else:
                print("guest pytest: no junit.xml written", file=sys.stderr)
                return result.returncode or 1
        return result.returncode
    except (GuestError, ExternalCommandFailed) as err:
        print(f"qemu: ERROR: {err}", file=sys.stderr)
        return 2 if not isinstance(err, GuestError) else 3


def main() -> None:
    sys.exit(_main())


if __name__ == "__main__":
    main()
