"""A typed wrapper over the ``dmsetup`` command, and parsers for what it prints.

Every call goes through :func:`run`; a non-zero exit becomes
:class:`~layerfs.errors.ExternalCommandFailed` naming the command and its stderr,
or a more precise error when the kernel's answer says what went wrong
(``File exists`` -> AlreadyExists, ``No data available``/``No such device`` ->
NotFound, ``Device or resource busy`` -> InUse).

Two backends, one API. Without udevd -- containers, the qemu test guest --
every call goes straight to the kernel through :mod:`.dmioctl` (the ioctls
dmsetup itself makes, without a process per call: ~100 ms each under TCG),
which makes and removes the ``/dev/mapper/NAME`` nodes as libdevmapper does
with ``DM_DISABLE_UDEV=1``. With udevd running, the ``dmsetup`` command is
used, with its udev cookies, and :func:`wait_for_node` waits for udev's event
through pyudev. ``LAYERFS_DM_BACKEND=dmsetup`` (or ``ioctl``) forces one;
with ``dmsetup`` and no udevd every call gets ``DM_DISABLE_UDEV=1`` and the
node-changing commands ``--noudevsync``, so nothing waits for a udev that
never answers.

Status lines (Documentation/admin-guide/device-mapper/thin-provisioning.rst)::

    thin-pool: <transaction id> <used meta>/<total meta> <used data>/<total data>
               <held metadata root> ro|rw|out_of_data_space [no_]discard_passdown
               error_if_no_space|queue_if_no_space needs_check|- <metadata low watermark>
               (or "Fail")
    thin:      <nr mapped sectors> <highest mapped sector>|-   (or "Fail")

Metadata blocks are always 4 KiB; data blocks are the pool's block size.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from layerfs.errors import AlreadyExists, ExternalCommandFailed, InUse, NotFound, command_error

from . import dmioctl

DMSETUP = "dmsetup"
MAPPER_DIR = Path("/dev/mapper")
SECTOR = 512
METADATA_BLOCK = 4096


# --------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TableLine:
    """One line of a device's table: ``START LENGTH TARGET ARGS...`` (sectors)."""

    start: int
    length: int
    target: str
    args: str

    def __str__(self) -> str:
        return f"{self.start} {self.length} {self.target} {self.args}".rstrip()


@dataclass(frozen=True)
class DeviceInfo:
    """What ``dmsetup info NAME`` says about a device."""

    name: str
    major: int
    minor: int
    state: str  # ACTIVE or SUSPENDED
    read_only: bool
    deferred_remove: bool
    live_table: bool
    inactive_table: bool
    open_count: int
    event_number: int
    target_count: int
    uuid: str | None

    @property
    def suspended(self) -> bool:
        return self.state == "SUSPENDED"

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class ThinPoolStatus:
    """A thin-pool target's status line, parsed. Sizes are in blocks."""

    transaction_id: int
    metadata_used: int
    metadata_total: int
    data_used: int
    data_total: int
    held_metadata_root: int | None
    mode: str  # "rw", "ro", "out_of_data_space", or "fail"
    discard_passdown: bool
    error_if_no_space: bool
    needs_check: bool
    metadata_low_watermark: int | None

    @property
    def failed(self) -> bool:
        return self.mode == "fail"

    @property
    def read_only(self) -> bool:
        return self.mode == "ro"

    @property
    def out_of_data_space(self) -> bool:
        return self.mode == "out_of_data_space"


@dataclass(frozen=True)
class ThinStatus:
    """A thin target's status line: sectors mapped, and the highest one (None if none)."""

    mapped_sectors: int
    highest_mapped_sector: int | None
    failed: bool = False


# --------------------------------------------------------------------------
# parsers (pure: tested against recorded output)
# --------------------------------------------------------------------------


def parse_table(text: str) -> list[TableLine]:
    """``dmsetup table NAME`` or ``dmsetup status NAME`` output -> lines."""
    lines = []
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw:
            continue
        start, length, target, *rest = raw.split(None, 3)
        lines.append(TableLine(int(start), int(length), target, rest[0].strip() if rest else ""))
    return lines


def parse_table_all(text: str) -> dict[str, list[TableLine]]:
    """``dmsetup table`` / ``dmsetup status`` without a name: ``NAME: START LEN TARGET ARGS``."""
    out: dict[str, list[TableLine]] = {}
    for raw in text.splitlines():
        name, sep, rest = raw.partition(": ")
        if not sep or not rest.strip():
            continue
        out.setdefault(name.strip(), []).extend(parse_table(rest))
    return out


def parse_thin_pool_status(args: str) -> ThinPoolStatus:
    """The part of a thin-pool status line after ``START LEN thin-pool``."""
    words = args.split()
    if not words:
        raise ValueError("empty thin-pool status")
    if words[0] in ("Fail", "Error"):
        return ThinPoolStatus(0, 0, 0, 0, 0, None, "fail", False, False, False, None)
    if len(words) < 5:
        raise ValueError(f"short thin-pool status: {args!r}")
    meta_used, meta_total = (int(x) for x in words[1].split("/"))
    data_used, data_total = (int(x) for x in words[2].split("/"))
    held = None if words[3] == "-" else int(words[3])
    mode = words[4]
    flags = set(words[5:])
    low_water = None
    # The last field (kernel 4.19+) is the metadata low watermark, a number.
    if len(words) >= 9 and words[-1].isdigit():
        low_water = int(words[-1])
    return ThinPoolStatus(
        transaction_id=int(words[0]),
        metadata_used=meta_used,
        metadata_total=meta_total,
        data_used=data_used,
        data_total=data_total,
        held_metadata_root=held,
        mode=mode,
        discard_passdown="discard_passdown" in flags,
        error_if_no_space="error_if_no_space" in flags,
        needs_check="needs_check" in flags,
        metadata_low_watermark=low_water,
    )


def parse_thin_status(args: str) -> ThinStatus:
    """The part of a thin status line after ``START LEN thin``."""
    words = args.split()
    if not words or words[0] in ("Fail", "Error"):
        return ThinStatus(0, None, failed=True)
    return ThinStatus(int(words[0]), None if words[1] == "-" else int(words[1]))


_INFO_KEYS = {
    "Name": "name", "State": "state", "Tables present": "tables", "Open count": "open",
    "Event number": "events", "Major, minor": "devno", "Number of targets": "targets",
    "UUID": "uuid",
}


def parse_info(text: str) -> DeviceInfo:
    """``dmsetup info NAME`` (the long format) -> DeviceInfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in _INFO_KEYS:
            fields[_INFO_KEYS[key.strip()]] = value.strip()
    if "name" not in fields:
        raise ValueError(f"not dmsetup info output: {text!r}")
    state = fields.get("state", "")
    major, minor = (int(x) for x in fields["devno"].split(","))
    tables = fields.get("tables", "")
    return DeviceInfo(
        name=fields["name"],
        major=major,
        minor=minor,
        state="SUSPENDED" if state.startswith("SUSPENDED") else "ACTIVE",
        read_only="READ-ONLY" in state,
        deferred_remove="DEFERRED REMOVE" in state,
        live_table="LIVE" in tables,
        inactive_table="INACTIVE" in tables,
        open_count=int(fields.get("open", 0)),
        event_number=int(fields.get("events", 0)),
        target_count=int(fields.get("targets", 0)),
        uuid=fields.get("uuid") or None,
    )


def parse_ls(text: str) -> dict[str, tuple[int, int]]:
    """``dmsetup ls`` -> {name: (major, minor)}; "No devices found" -> {}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+\((\d+)[:,]\s*(\d+)\)\s*$", line)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def parse_targets(text: str) -> dict[str, str]:
    """``dmsetup targets`` -> {target: version}."""
    out = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2:
            out[words[0]] = words[1].lstrip("v")
    return out


# --------------------------------------------------------------------------
# running dmsetup
# --------------------------------------------------------------------------


def udev_running() -> bool:
    """Whether a udevd answers on this host (its control socket exists)."""
    return Path("/run/udev/control").exists()


def use_ioctl() -> bool:
    """Whether calls go to the kernel directly (no udevd) rather than through dmsetup."""
    choice = os.environ.get("LAYERFS_DM_BACKEND", "auto")
    if choice in ("dmsetup", "ioctl"):
        return choice == "ioctl"
    return not udev_running() and os.access(dmioctl.CONTROL, os.W_OK)


def backend() -> str:
    return "ioctl" if use_ioctl() else "dmsetup"


def _lines(table: str | TableLine | Sequence[TableLine]) -> list[tuple[int, int, str, str]]:
    if isinstance(table, str):
        parsed = parse_table(table)
    elif isinstance(table, TableLine):
        parsed = [table]
    else:
        parsed = list(table)
    return [(t.start, t.length, t.target, t.args) for t in parsed]


def _to_lines(raw: list[tuple[int, int, str, str]]) -> list[TableLine]:
    return [TableLine(*t) for t in raw]


def _info_of(reply: dmioctl.Reply) -> DeviceInfo:
    return DeviceInfo(
        name=reply.name, major=reply.major, minor=reply.minor,
        state="SUSPENDED" if reply.flags & dmioctl.DM_SUSPEND_FLAG else "ACTIVE",
        read_only=bool(reply.flags & dmioctl.DM_READONLY_FLAG),
        deferred_remove=bool(reply.flags & dmioctl.DM_DEFERRED_REMOVE),
        live_table=bool(reply.flags & dmioctl.DM_ACTIVE_PRESENT_FLAG),
        inactive_table=bool(reply.flags & dmioctl.DM_INACTIVE_PRESENT_FLAG),
        open_count=reply.open_count, event_number=reply.event_nr,
        target_count=reply.target_count, uuid=reply.uuid or None)


def _env() -> Mapping[str, str]:
    env = dict(os.environ)
    if not udev_running():
        env["DM_DISABLE_UDEV"] = "1"
    return env


def _udev_flags() -> list[str]:
    return [] if udev_running() else ["--noudevsync"]


def _classify(err: subprocess.CalledProcessError, what: str) -> Exception:
    stderr = err.stderr if isinstance(err.stderr, str) else (err.stderr or b"").decode()
    # dmsetup ends every failure with "Command failed."; the line before says why.
    useful = [ln for ln in stderr.splitlines() if ln.strip() and ln.strip() != "Command failed."]
    plain = command_error(subprocess.CalledProcessError(
        err.returncode, err.cmd, err.output, " / ".join(ln.strip() for ln in useful)))
    if "File exists" in stderr:
        return AlreadyExists(f"{what}: {plain}")
    if ("Device does not exist" in stderr or "No data available" in stderr
            or "No such device or address" in stderr):
        return NotFound(f"{what}: {plain}")
    if "Device or resource busy" in stderr:
        return InUse(f"{what}: {plain}")
    return plain


def run(args: Sequence[str], *, what: str | None = None,
        input: str | None = None) -> str:
    """Run ``dmsetup ARGS``; return stdout, raise a LayerfsError on failure."""
    cmd = [DMSETUP, *args]
    try:
        proc = subprocess.run(cmd, input=input, text=True, capture_output=True, check=True,
                              env=_env())
    except subprocess.CalledProcessError as err:
        raise _classify(err, what or " ".join(args[:2])) from err
    except FileNotFoundError as err:
        raise ExternalCommandFailed(f"{DMSETUP}: not installed") from err
    return proc.stdout


def _table_text(table: str | TableLine | Sequence[TableLine]) -> str:
    if isinstance(table, str):
        return table
    if isinstance(table, TableLine):
        return str(table)
    return "\n".join(str(t) for t in table)


def node_path(name: str) -> Path:
    return MAPPER_DIR / name


def create(name: str, table: str | TableLine | Sequence[TableLine], *, uuid: str | None = None,
           readonly: bool = False, wait: bool = True) -> Path:
    """``dmsetup create NAME`` with ``table``; returns /dev/mapper/NAME once it exists."""
    if use_ioctl():
        dmioctl.create(name, _lines(table), uuid=uuid, readonly=readonly)
        return node_path(name)
    args = ["create", name, *_udev_flags()]
    if uuid:
        args += ["--uuid", uuid]
    if readonly:
        args.append("--readonly")
    try:
        run(args, what=f"create {name}", input=_table_text(table) + "\n")
    except InUse as err:  # the kernel says EBUSY when the name is taken
        if exists(name):
            raise AlreadyExists(f"device-mapper device {name} already exists") from err
        raise
    if wait:
        wait_for_node(name)
    return node_path(name)


def reload(name: str, table: str | TableLine | Sequence[TableLine]) -> None:
    """Load ``table`` as the inactive table of NAME (``resume`` swaps it in)."""
    if use_ioctl():
        dmioctl.load(name, _lines(table))
        return
    run(["reload", name], what=f"reload {name}", input=_table_text(table) + "\n")


def remove(name: str, *, force: bool = False, deferred: bool = False,
           retries: int = 5, retry_delay: float = 0.1) -> None:
    """``dmsetup remove NAME``, retried while the device is briefly busy.

    Something (blkid, a udev rule, a just-closed mount) may hold a device for a
    moment after its last user let go; Docker retries too. ``deferred`` asks
    the kernel to remove it when its last opener closes it.
    """
    args = ["remove", *_udev_flags()]
    if force:
        args.append("--force")
    if deferred:
        args.append("--deferred")
    args.append(name)
    for attempt in range(retries + 1):
        try:
            if use_ioctl():
                if force:  # what dmsetup --force does first: an error table, so I/O fails
                    with contextlib.suppress(InUse):
                        dmioctl.load(name, [(0, _length(name), "error", "")])
                        dmioctl.resume(name)
                dmioctl.remove(name, deferred=deferred)
            else:
                run(args, what=f"remove {name}")
            return
        except InUse:
            if deferred or attempt == retries:
                raise
            time.sleep(retry_delay * (2 ** attempt))


def _length(name: str) -> int:
    return sum(t.length for t in table(name))


def suspend(name: str, *, nolockfs: bool = False, noflush: bool = False) -> None:
    if use_ioctl():
        dmioctl.suspend(name, nolockfs=nolockfs, noflush=noflush)
        return
    args = ["suspend", *_udev_flags()]
    if nolockfs:
        args.append("--nolockfs")
    if noflush:
        args.append("--noflush")
    run([*args, name], what=f"suspend {name}")


def resume(name: str) -> None:
    if use_ioctl():
        dmioctl.resume(name)
        return
    run(["resume", *_udev_flags(), name], what=f"resume {name}")


def message(name: str, msg: str, *, sector: int = 0) -> str:
    """Send a target message (``create_thin 3``, ``delete 3`` ...) to NAME."""
    if use_ioctl():
        return dmioctl.message(name, msg, sector)
    return run(["message", name, str(sector), msg], what=f"message {name} {msg!r}")


def status(name: str) -> list[TableLine]:
    if use_ioctl():
        return _to_lines(dmioctl.status(name))
    return parse_table(run(["status", name], what=f"status {name}"))


def table(name: str) -> list[TableLine]:
    if use_ioctl():
        return _to_lines(dmioctl.table(name))
    return parse_table(run(["table", name], what=f"table {name}"))


def all_tables() -> dict[str, list[TableLine]]:
    """Every device's table, by name."""
    if use_ioctl():
        out = {}
        for name in dmioctl.list_devices():
            with contextlib.suppress(NotFound):  # removed meanwhile
                out[name] = _to_lines(dmioctl.table(name))
        return out
    return parse_table_all(run(["table"]))


def info(name: str) -> DeviceInfo | None:
    """The device's info, or None when there is no device of that name."""
    if use_ioctl():
        reply = dmioctl.info(name)
        return None if reply is None else _info_of(reply)
    try:
        return parse_info(run(["info", name], what=f"info {name}"))
    except NotFound:
        return None


def exists(name: str) -> bool:
    return info(name) is not None


def ls(target_type: str | None = None) -> dict[str, tuple[int, int]]:
    if use_ioctl():
        out = {}
        for name, dev in dmioctl.list_devices().items():
            if target_type:
                try:
                    if not any(t[2] == target_type for t in dmioctl.table(name)):
                        continue
                except NotFound:
                    continue
            out[name] = (os.major(dev), os.minor(dev))
        return out
    args = ["ls"]
    if target_type:
        args += ["--target", target_type]
    return parse_ls(run(args))


def targets() -> dict[str, str]:
    if use_ioctl():
        return dmioctl.targets()
    return parse_targets(run(["targets"]))


def version() -> str:
    """libdevmapper's version, as ``dmsetup --version`` prints it (``1.02.185 (2022-05-18)``)."""
    for line in run(["--version"]).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Library version":
            return value.strip()
    return "unknown"


def driver_version() -> str:
    """The kernel's device-mapper interface version (``4.47.0``)."""
    if use_ioctl():
        return dmioctl.driver_version()
    for line in run(["version"]).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Driver version":
            return value.strip()
    return "unknown"


def mknodes(name: str | None = None) -> None:
    if use_ioctl():
        dmioctl.mknodes(name)
        return
    run(["mknodes", *([name] if name else [])])


def udevcomplete(cookie: str) -> None:
    """Release a udev cookie a crashed dmsetup left waiting (``dmsetup udevcookies``)."""
    run(["udevcomplete", cookie])


def thin_pool_status(name: str) -> ThinPoolStatus:
    lines = status(name)
    if len(lines) != 1 or lines[0].target != "thin-pool":
        raise ExternalCommandFailed(f"{name} is not a thin pool: {lines}")
    return parse_thin_pool_status(lines[0].args)


def thin_status(name: str) -> ThinStatus:
    lines = status(name)
    if len(lines) != 1 or lines[0].target != "thin":
        raise ExternalCommandFailed(f"{name} is not a thin device: {lines}")
    return parse_thin_status(lines[0].args)


def wait_for_node(name: str, timeout: float = 10.0) -> Path:
    """Return /dev/mapper/NAME once it exists.

    Without udevd, ``dmsetup mknodes NAME`` makes it (DM_DISABLE_UDEV=1 normally
    already did). With udevd, wait for udev's "add"/"change" event for the dm
    device via pyudev, since udev may still be creating the node.
    """
    path = node_path(name)
    if path.exists():
        return path
    if not udev_running():
        mknodes(name)
        if path.exists():
            return path
        raise ExternalCommandFailed(f"dmsetup mknodes {name}: {path} still missing")
    import pyudev  # only needed on hosts with udev

    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by("block")
    monitor.start()
    deadline = time.monotonic() + timeout
    while not path.exists():
        left = deadline - time.monotonic()
        if left <= 0:
            raise ExternalCommandFailed(f"udev made no {path} within {timeout:.0f} s")
        device = monitor.poll(timeout=min(left, 0.5))
        if device is not None and device.get("DM_NAME") == name and path.exists():
            break
    return path
