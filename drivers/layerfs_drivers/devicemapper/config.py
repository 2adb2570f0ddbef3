"""The devicemapper driver's options: parsing, defaults, and what is fixed at set-up.

Options are Docker's ``dm.*`` storage options without the prefix, plus ``mode``
and ``pool_name``. Some describe the pool and the base device and only take
effect when a root's pool is set up (the *set-up* options: they are recorded in
the layer store and a later open that asks for something else is refused, as
Docker refuses a changed ``dm.fs``); the others apply to each open (the
*runtime* options). ``basesize`` is the exception: it may grow on a later open
(Docker allows that too), never shrink.

=============================  =========  ===========================================
option                         default    meaning
=============================  =========  ===========================================
mode                           (derived)  ``loopback``, ``direct-lvm`` or ``existing``;
                                          derived from directlvm_device / thinpooldev
pool_name                      (derived)  loopback: the pool's dm name; direct-lvm: the VG
loopdatasize                   100G       sparse data file (loopback)
loopmetadatasize               2G         sparse metadata file (loopback)
blocksize                      64K        pool data block size (loopback)
basesize                       10G        virtual size of the base device and so of
                                          every layer that does not ask for more
fs                             xfs        filesystem of the base device: xfs or ext4
mkfsarg                        ""         extra mkfs arguments (shell-split)
mountopt                       ""         extra mount options (comma-separated)
directlvm_device               -          block device for direct-lvm (wiped!)
directlvm_device_force         false      wipe a device that carries a signature
thinpooldev                    -          an existing thin pool: /dev/mapper/NAME or VG/LV
thinp_percent                  95         direct-lvm: data LV, % of the VG
thinp_metapercent              1          direct-lvm: metadata LV, % of the VG
thinp_autoextend_threshold     80         direct-lvm: lvm autoextend threshold, %
thinp_autoextend_percent       20         direct-lvm: lvm autoextend step, %
min_free_space                 10%        refuse new devices below this free data or
                                          metadata space (0 disables the check)
use_deferred_removal           false      ``dmsetup remove --deferred`` a busy device
use_deferred_deletion          false      delete a busy device's blocks later
blkdiscard                     loopback   discard a device's blocks before deleting it
                                          (true in loopback mode: re-sparsifies the file)
=============================  =========  ===========================================
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, fields
from typing import Any

from layerfs.errors import InvalidArgument
from layerfs.options import DriverOptions

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

MODES = ("loopback", "direct-lvm", "existing")
FILESYSTEMS = ("xfs", "ext4")
XFS_MIN_SIZE = 300 * MiB  # mkfs.xfs (xfsprogs >= 5.19) refuses smaller data sections
DEFAULT_VG = "layerfs"

SETUP_OPTIONS = {
    "mode", "pool_name", "loopdatasize", "loopmetadatasize", "blocksize", "basesize", "fs",
    "mkfsarg", "directlvm_device", "directlvm_device_force", "thinpooldev", "thinp_percent",
    "thinp_metapercent", "thinp_autoextend_threshold", "thinp_autoextend_percent",
}
RUNTIME_OPTIONS = {
    "mountopt", "min_free_space", "use_deferred_removal", "use_deferred_deletion", "blkdiscard",
}
KNOWN_OPTIONS = SETUP_OPTIONS | RUNTIME_OPTIONS

LOOPBACK_WARNING = (
    "devicemapper: usage of loopback devices is strongly discouraged for production use "
    "(it is for testing only); use `-s directlvm_device=/dev/DEV` or "
    "`-s thinpooldev=/dev/mapper/POOL` for a real block device")


def _percent(opts: DriverOptions, key: str, default: int, *, allow_zero: bool = False) -> int:
    raw = opts.values.get(key)
    if raw is None:
        return default
    text = raw.strip().removesuffix("%")
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(f"devicemapper: {key}={raw!r} is not a percentage") from None
    low = 0 if allow_zero else 1
    if not low <= value <= (99 if allow_zero else 100):
        raise InvalidArgument(f"devicemapper: {key}={raw!r}: want {low}..{99 if allow_zero else 100}")
    return value


@dataclass(frozen=True)
class Setup:
    """What a pool and its base device were made with (recorded at set-up)."""

    mode: str
    pool_name: str | None = None
    loopdatasize: int = 100 * GiB
    loopmetadatasize: int = 2 * GiB
    blocksize: int = 64 * KiB
    basesize: int = 10 * GiB
    fs: str = "xfs"
    mkfsarg: tuple[str, ...] = ()
    directlvm_device: str | None = None
    directlvm_device_force: bool = False
    thinpooldev: str | None = None
    thinp_percent: int = 95
    thinp_metapercent: int = 1
    thinp_autoextend_threshold: int = 80
    thinp_autoextend_percent: int = 20

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["mkfsarg"] = list(self.mkfsarg)
        return data

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Setup:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["mkfsarg"] = tuple(values.get("mkfsarg", ()))
        return cls(**values)


@dataclass(frozen=True)
class Runtime:
    """Options that apply to one open of the root."""

    mountopt: tuple[str, ...] = ()
    min_free_space: int = 10  # percent
    use_deferred_removal: bool = False
    use_deferred_deletion: bool = False
    blkdiscard: bool | None = None  # None: true in loopback mode


@dataclass(frozen=True)
class Config:
    setup: Setup
    runtime: Runtime
    given: frozenset[str]
    """Set-up options the caller named explicitly (checked against the record)."""

    @property
    def blkdiscard(self) -> bool:
        if self.runtime.blkdiscard is not None:
            return self.runtime.blkdiscard
        return self.setup.mode == "loopback"


def parse(opts: DriverOptions) -> Config:
    """Typed, validated options; InvalidArgument names the bad one."""
    opts.check_known("devicemapper", KNOWN_OPTIONS)
    v = opts.values
    device = v.get("directlvm_device") or None
    thinpooldev = v.get("thinpooldev") or None
    if device and thinpooldev:
        raise InvalidArgument("devicemapper: directlvm_device and thinpooldev exclude each other")
    derived = "direct-lvm" if device else "existing" if thinpooldev else "loopback"
    mode = v.get("mode", derived)
    if mode not in MODES:
        raise InvalidArgument(f"devicemapper: mode={mode!r}: want one of {', '.join(MODES)}")
    if mode != derived:
        need = {"direct-lvm": "directlvm_device=DEV", "existing": "thinpooldev=POOL",
                "loopback": "neither directlvm_device nor thinpooldev"}[mode]
        raise InvalidArgument(f"devicemapper: mode={mode} needs {need}")
    fs = v.get("fs", "xfs")
    if fs not in FILESYSTEMS:
        raise InvalidArgument(f"devicemapper: fs={fs!r}: want xfs or ext4")
    basesize = opts.get_size("basesize", 10 * GiB) or 0
    if basesize <= 0 or basesize % 512:
        raise InvalidArgument(f"devicemapper: basesize={v.get('basesize')!r}: want a positive "
                              "multiple of 512 bytes")
    if fs == "xfs" and basesize < XFS_MIN_SIZE:
        raise InvalidArgument(f"devicemapper: basesize={v.get('basesize')} is too small for xfs "
                              f"(at least {XFS_MIN_SIZE >> 20}M); use fs=ext4 for small devices")
    pool_name = v.get("pool_name") or None
    if pool_name is not None and ("/" in pool_name or len(pool_name) > 100
                                  or not pool_name.isprintable() or " " in pool_name):
        raise InvalidArgument(f"devicemapper: pool_name={pool_name!r}: no '/', spaces, at most 100")
    try:
        mkfsarg = tuple(shlex.split(v.get("mkfsarg", "")))
    except ValueError as err:
        raise InvalidArgument(f"devicemapper: mkfsarg: {err}") from None
    setup = Setup(
        mode=mode,
        pool_name=pool_name,
        loopdatasize=opts.get_size("loopdatasize", 100 * GiB) or 0,
        loopmetadatasize=opts.get_size("loopmetadatasize", 2 * GiB) or 0,
        blocksize=opts.get_size("blocksize", 64 * KiB) or 0,
        basesize=basesize,
        fs=fs,
        mkfsarg=mkfsarg,
        directlvm_device=device,
        directlvm_device_force=opts.get_bool("directlvm_device_force", False),
        thinpooldev=thinpooldev,
        thinp_percent=_percent(opts, "thinp_percent", 95),
        thinp_metapercent=_percent(opts, "thinp_metapercent", 1),
        thinp_autoextend_threshold=_percent(opts, "thinp_autoextend_threshold", 80),
        thinp_autoextend_percent=_percent(opts, "thinp_autoextend_percent", 20),
    )
    if setup.thinp_percent + setup.thinp_metapercent > 100:
        raise InvalidArgument("devicemapper: thinp_percent + thinp_metapercent exceed 100")
    mountopt = tuple(o.strip() for o in v.get("mountopt", "").split(",") if o.strip())
    blkdiscard = opts.get_bool("blkdiscard", False) if "blkdiscard" in v else None
    runtime = Runtime(
        mountopt=mountopt,
        min_free_space=_percent(opts, "min_free_space", 10, allow_zero=True),
        use_deferred_removal=opts.get_bool("use_deferred_removal", False),
        use_deferred_deletion=opts.get_bool("use_deferred_deletion", False),
        blkdiscard=blkdiscard,
    )
    if runtime.use_deferred_deletion and not runtime.use_deferred_removal:
        raise InvalidArgument("devicemapper: use_deferred_deletion needs use_deferred_removal=true "
                              "(as in Docker)")
    given = frozenset(k for k in v if k in SETUP_OPTIONS)
    return Config(setup, runtime, given)


def reconcile(recorded: Setup, config: Config) -> Setup:
    """The set-up to use for a root that already has one.

    Options not given take the recorded values; a given option that differs is
    refused, except a larger ``basesize`` (the caller grows the base device).
    """
    conflicts = []
    for name in sorted(config.given):
        want, have = getattr(config.setup, name), getattr(recorded, name)
        if name == "basesize" and want >= have:
            continue
        if want != have:
            conflicts.append(f"{name}={_show(want)} (set up with {_show(have)})")
    if conflicts:
        raise InvalidArgument(
            "devicemapper: this root's pool was set up differently: " + "; ".join(conflicts)
            + ". Open it without those options, or destroy the pool first "
            "(layerfs pool destroy devicemapper ROOT)")
    if "basesize" in config.given and config.setup.basesize > recorded.basesize:
        return Setup(**{**recorded.__dict__, "basesize": config.setup.basesize})
    return recorded


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return shlex.join(value) or '""'
    return str(value)
