"""The driver contract: what every storage driver implements.

A *layer* is a directory tree identified by an id. It has at most one parent,
and its contents are the parent's contents plus its own changes. Image layers
are created read-only and filled once by :meth:`Driver.apply_diff`; container
layers are created read-write and changed through a mount.

A driver only maps layer ids to things on disk (directories, subvolumes, thin
devices). It never decides *whether* an operation is allowed: the
:class:`~layerfs.layers.LayerStore` owns names, parentage, state and mount
bookkeeping, and calls the driver only for operations that are valid. A driver
never mounts anything either: :meth:`Driver.mounts` returns
:class:`~layerfs.mount.Mount` values and :mod:`layerfs.mount` performs them.

The diff family (``diff``, ``changes``, ``apply_diff``, ``diff_size``) has one
naive implementation here that works for every driver by mounting the layer
and its parent and walking both trees. A driver that can do better (overlay2's
upper dir *is* the diff; btrfs can compare snapshots) overrides the methods
and says so in its :class:`Capabilities`.

Lifecycle of a layer, as the store drives it::

    check(home)                 # once per root: DriverNotSupported if the host can't
    create(id, parent, ...)     # state "creating" in the store until it returns
    apply_diff(id, parent, tar) # image layers only; still "creating"
    mounts(id) -> [Mount]       # the store mounts them, counts users, unmounts
    diff(id, parent, out)       # OCI tar of what the layer changed
    remove(id)                  # state "removing" until it returns
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from . import mount as mountlib
from .changes import Change, naive_changes
from .errors import InvalidArgument
from .tar import WhiteoutFormat, apply_layer, export_changes
from .units import parse_size

if TYPE_CHECKING:
    from .metastore import DriverState


@dataclass(frozen=True)
class Capabilities:
    """What a driver does natively; everything else uses the naive fallback."""

    native_diff: bool = False
    """``diff``/``apply_diff`` read and write the layer's own files, without a tree walk."""
    native_changes: bool = False
    """``changes`` is computed without walking both trees."""
    block_level_cow: bool = False
    """Copy-on-write happens per block/extent, not per file."""
    quotas: bool = False
    """The ``size`` option limits a layer's size."""
    max_depth: int | None = None
    """Deepest parent chain the driver can mount (None: no limit known)."""
    whiteout_format: WhiteoutFormat = WhiteoutFormat.IN_PLACE
    """How a layer stores deletions on disk."""
    needs_root: bool = True


@dataclass(frozen=True)
class Usage:
    """Space a layer uses by itself (not counting its parents)."""

    bytes: int
    inodes: int
    exclusive_bytes: int | None = None
    """Block-level drivers: bytes only this layer references."""
    shared_bytes: int | None = None
    """Block-level drivers: bytes shared with other layers."""

    def as_dict(self) -> dict[str, int | None]:
        return {"bytes": self.bytes, "inodes": self.inodes,
                "exclusive_bytes": self.exclusive_bytes, "shared_bytes": self.shared_bytes}


@dataclass
class DriverOptions:
    """Parsed ``key=value`` driver options with typed accessors and unknown-key checks."""

    values: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, items: Mapping[str, str] | list[str] | None) -> DriverOptions:
        if items is None:
            return cls({})
        if isinstance(items, Mapping):
            return cls(dict(items))
        values = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidArgument(f"driver option {item!r} is not KEY=VALUE")
            values[key.strip()] = value.strip()
        return cls(values)

    def check_known(self, driver: str, known: set[str]) -> None:
        unknown = sorted(set(self.values) - known)
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(f"{driver}: unknown option(s) {', '.join(unknown)} "
                                  f"(known: {allowed})")

    def get_bool(self, key: str, default: bool) -> bool:
        raw = self.values.get(key)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidArgument(f"option {key}={raw!r} is not a boolean (use true/false)")

    def get_size(self, key: str, default: int | None) -> int | None:
        raw = self.values.get(key)
        if raw is None:
            return default
        return parse_size(raw, what=f"option {key}")

    def get_str(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)


class Driver(ABC):
    """Base class of every storage driver. See the module docstring for the lifecycle."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    known_options: ClassVar[set[str]] = set()

    def __init__(self, home: Path, options: DriverOptions | None = None,
                 state: DriverState | None = None) -> None:
        self.home = Path(home)
        self.options = options or DriverOptions()
        self.options.check_known(self.name, self.known_options)
        # Per-driver key/value metadata kept in the layer store, inside its
        # transactions (device ids, probed features). Set by the store.
        self.state = state
        self.home.mkdir(parents=True, exist_ok=True)
        self.scratch = self.home.parent / "tmp"
        self.scratch.mkdir(parents=True, exist_ok=True)

    # --- host check ---------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        """Raise :class:`~layerfs.errors.DriverNotSupported` if this host can't run the driver."""

    # --- primitives every driver implements ---------------------------------------------
    @abstractmethod
    def create(self, layer_id: str, parent: str | None, *, readonly: bool,
               size: int | None = None) -> None:
        """Make the on-disk form of a new layer whose contents start as ``parent``'s."""

    def seal(self, layer_id: str) -> None:
        """Called once a read-only layer is complete (created and applied).

        Drivers that can make a layer immutable do it here (btrfs marks the
        subvolume read-only); the default does nothing.
        """

    @abstractmethod
    def remove(self, layer_id: str) -> None:
        """Delete everything on disk for the layer; must tolerate a half-created layer."""

    @abstractmethod
    def mounts(self, layer_id: str, *, readonly: bool = False) -> list[mountlib.Mount]:
        """What to mount to see the layer's full contents (its chain merged)."""

    @abstractmethod
    def exists(self, layer_id: str) -> bool:
        """Whether the driver has on-disk state for the layer."""

    def status(self) -> dict[str, str]:
        """Driver-wide facts for ``layerfs info`` (backing fs, features, pool usage)."""
        return {"Backing Filesystem": backing_filesystem(self.home)}

    @abstractmethod
    def usage(self, layer_id: str) -> Usage:
        """Bytes and inodes the layer itself uses on disk."""

    def metadata(self, layer_id: str) -> dict[str, str]:
        """Driver-specific facts about a layer (paths, device names), like Docker's GraphDriver.Data."""
        return {}

    def path_facts(self, layer_id: str, path: str) -> dict[str, Any]:
        """What only this driver can tell about ``path`` (relative: ``etc/passwd``) as the
        layer itself stores it, for ``layerfs explain``: overlay2 whether its copy is
        metacopy, redirected or copied up; btrfs and devicemapper how many of its bytes the
        layer holds alone and how many it shares. Empty where the driver knows nothing
        more than the layer's diff says."""
        return {}

    def counters(self, target: Path, *, reset: bool = False) -> dict[str, int] | None:
        """The lookup and copy-up counters of the union mounted at ``target``, then set to
        zero if ``reset``; None for a driver (or mode) that keeps none. aufs's FUSE union
        counts every probe it makes into its branches."""
        return None

    def cleanup(self) -> None:
        """Release driver-wide resources (a pool, a daemon); layers stay on disk."""

    # --- reading a layer's merged view ----------------------------------------------------
    @contextlib.contextmanager
    def view(self, layer_id: str | None) -> Iterator[Path | None]:
        """Yield a read-only path showing the layer's merged contents (None for no layer).

        The default mounts the layer's mounts on a scratch directory; drivers
        whose layers are plain full trees yield them directly.
        """
        if layer_id is None:
            yield None
            return
        target = Path(tempfile.mkdtemp(prefix=scratch_prefix("view", layer_id), dir=self.scratch))
        try:
            with mountlib.mounted(self.mounts(layer_id, readonly=True), target):
                yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)

    @contextlib.contextmanager
    def writable_view(self, layer_id: str) -> Iterator[Path]:
        """Yield a writable path of the layer, for the naive ``apply_diff``."""
        target = Path(tempfile.mkdtemp(prefix=scratch_prefix("apply", layer_id), dir=self.scratch))
        try:
            with mountlib.mounted(self.mounts(layer_id, readonly=False), target):
                yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)

    # --- the diff family: naive fallbacks -------------------------------------------------
    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        """What the layer changed relative to its parent (``docker diff``)."""
        with self.view(parent) as lower, self.view(layer_id) as upper:
            assert upper is not None
            return naive_changes(lower, upper)

    def diff(self, layer_id: str, parent: str | None, out: IO[bytes]) -> int:
        """Write the layer's changes as an uncompressed OCI layer tar; return its size."""
        with self.view(parent) as lower, self.view(layer_id) as upper:
            assert upper is not None
            return export_changes(upper, naive_changes(lower, upper), out)

    def apply_diff(self, layer_id: str, parent: str | None, stream: IO[bytes]) -> int:
        """Apply an OCI layer tar (any compression) onto the layer; return its size."""
        with self.writable_view(layer_id) as target:
            return apply_layer(target, stream, WhiteoutFormat.IN_PLACE)

    def diff_size(self, layer_id: str, parent: str | None) -> int:
        """Size :meth:`diff` would report, without writing the tar."""
        with self.view(parent) as lower, self.view(layer_id) as upper:
            assert upper is not None
            return changes_size(upper, naive_changes(lower, upper))


def scratch_prefix(kind: str, layer_id: str) -> str:
    """Scratch names start with the owner's process token, so crash recovery can tell
    a dead process's leftover from a live one's work: ``<pid>_<starttime>_<kind>_<id>_``."""
    from .metastore import process_token

    return f"{process_token().replace(':', '_')}_{kind}_{layer_id[:12]}_"


def scratch_owner(name: str) -> str | None:
    """The process token encoded in a scratch name, if any."""
    parts = name.split("_")
    return f"{parts[0]}:{parts[1]}" if len(parts) > 2 and parts[0].isdigit() else None


def changes_size(tree: Path, changes: list[Change]) -> int:
    """Sum of regular-file sizes that a diff of ``changes`` would carry (hardlinks once).

    A directory added as a whole is listed with all its children by the change
    model, so only the listed paths are counted.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for change in changes:
        if change.kind.value == "D":
            continue
        try:
            st = os.lstat(tree / change.path.lstrip("/"))
        except FileNotFoundError:
            continue
        if (st.st_mode & 0o170000) == 0o100000 and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


_FS_MAGIC = {
    0xEF53: "extfs", 0x9123683E: "btrfs", 0x58465342: "xfs", 0x01021994: "tmpfs",
    0x794C7630: "overlayfs", 0x65735546: "fuse", 0x2FC12FC1: "zfs", 0x6A656A63: "fakeowner",
}


def backing_filesystem(path: Path) -> str:
    """Name of the filesystem ``path`` lives on (as ``docker info`` shows it)."""
    import ctypes

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    buf = _Statfs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return "unknown"
    magic = buf.f_type & 0xFFFFFFFF
    return _FS_MAGIC.get(magic, hex(magic))


def layer_dir_usage(path: Path) -> Usage:
    """Bytes (allocated) and inodes of a directory tree, hardlinks counted once."""
    seen: set[tuple[int, int]] = set()
    total_bytes = 0
    inodes = 0
    stack = [str(path)]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Usage(0, 0)
    seen.add((st.st_dev, st.st_ino))
    total_bytes += st.st_blocks * 512
    inodes += 1
    while stack:
        current = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                est = entry.stat(follow_symlinks=False)
                key = (est.st_dev, est.st_ino)
                if key not in seen:
                    seen.add(key)
                    inodes += 1
                    total_bytes += est.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Usage(total_bytes, inodes)


def driver_info(cls: type[Driver]) -> dict[str, Any]:
    """Static facts about a driver class (for ``layerfs drivers``)."""
    caps = cls.capabilities
    return {"name": cls.name, "native_diff": caps.native_diff,
            "native_changes": caps.native_changes, "block_level_cow": caps.block_level_cow,
            "quotas": caps.quotas, "max_depth": caps.max_depth,
            "whiteouts": caps.whiteout_format.value, "options": sorted(cls.known_options)}
