"""The driver contract: what a storage driver is, and what every driver implements.

A *layer* is a directory tree with an id. It has at most one parent, and its contents
are the parent's contents plus its own changes: a stack of layers is an image, and a
read-write layer on top of an image is a container's root filesystem. A driver maps
layer ids to things on disk (directories, subvolumes, thin devices) and says how to
*mount* a layer so that its whole stack shows at one path.

What a driver does not do
-------------------------

* It does not decide whether an operation is allowed. The
  :class:`~layerfs.layers.LayerStore` owns ids, parentage, state (``creating`` →
  ``ready`` → ``removing``) and mount bookkeeping in the metadata store, and calls the
  driver only for valid operations: ``create`` never sees an id that exists, ``remove``
  never sees a layer with children or mounts.
* It does not mount. :meth:`Driver.mounts` returns :class:`~layerfs.mount.Mount`
  values (``overlay`` with its lower directories, a ``bind`` of a directory, a device
  and its filesystem) and :mod:`layerfs.mount` performs them, counts users and unmounts.
* It does not parse tars or walk trees for diffs unless it can do better than the
  :class:`~layerfs.naivediff.NaiveDiffer` every driver holds (``self.naive``).

The lifecycle of a layer, as the store drives it
------------------------------------------------

::

    check(home, options)        # once per root: DriverNotSupported if the host can't
    create(id, parent, ...)     # the store's row says "creating" until this returns
    apply_diff(id, parent, tar) # image layers: fill it from an OCI layer tar
    seal(id)                    # image layers: complete, make it immutable if you can
    mounts(id) -> [Mount]       # the store mounts them, counts users, unmounts
    changes / diff / diff_size  # what the layer changed, for `docker diff` and commits
    remove(id)                  # the row says "removing" until this returns

Importing a layer, worked through: ``LayerStore.apply(tar, parent)`` inserts a
``creating`` row, calls ``create(id, parent, readonly=True)``, then ``apply_diff(id,
parent, stream)`` — for overlay2 that extracts the tar straight into the layer's upper
directory, converting whiteouts to overlay's; for vfs the naive differ extracts it into
a writable view — then ``seal(id)``, and only then marks the row ``ready``. A crash
anywhere leaves a ``creating`` row whose owner is dead: the next open removes the
half-made layer through ``remove(id)``, which therefore must tolerate one.

Capabilities
------------

:attr:`Driver.CAPABILITIES` says what the driver class does natively at best (``layerfs
drivers`` lists it); :attr:`Driver.capabilities` what this instance does after probing
the host and its options (overlay2 with ``redirect_dir`` or ``metacopy`` has no native
diff). The store and the bench read the instance's.

Writing one: docs/writing-a-driver.md, around ``layerfs_drivers.vfs``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from . import mount as mountlib
from .changes import Change, WhiteoutFormat
from .fsinfo import Usage, backing_filesystem
from .naivediff import NaiveDiffer
from .options import DriverOptions

if TYPE_CHECKING:
    from .metastore import DriverState
    from .tar import Readable  # the tar codec loads when a layer is applied or exported

__all__ = ["Capabilities", "Driver", "DriverOptions", "Usage", "scratch_owner",
           "scratch_prefix"]


@dataclass(frozen=True)
class Capabilities:
    """What a driver does natively; everything else uses the naive differ."""

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


class Driver(ABC):
    """Base class of every storage driver: the contract, and its defaults.

    A subclass sets :attr:`name`, :attr:`CAPABILITIES` and :attr:`known_options`, and
    implements the abstract methods; the diff family defaults to :attr:`naive`.
    """

    name: ClassVar[str]
    """The driver's name: its entry point, its home directory under a root."""
    CAPABILITIES: ClassVar[Capabilities] = Capabilities()
    """What the driver class does natively, at best."""
    known_options: ClassVar[set[str]] = set()
    """The ``-s KEY=VALUE`` keys it takes; others are refused."""

    def __init__(self, home: Path, options: DriverOptions | None = None,
                 state: DriverState | None = None) -> None:
        """``home`` is the driver's directory under the root (``ROOT/<name>``), created
        if missing; ``state`` its key/value corner of the metadata store, kept inside
        the store's transactions (device ids, probed features)."""
        self.home = Path(home)
        self.options = options or DriverOptions()
        self.options.check_known(self.name, self.known_options)
        self.state = state
        self.home.mkdir(parents=True, exist_ok=True)
        self.scratch = self.home.parent / "tmp"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.capabilities: Capabilities = self.CAPABILITIES
        """What this instance does natively; a driver lowers it after probing."""
        self.naive = NaiveDiffer(self)
        """The tree-walking diff family, for what the driver cannot do natively."""

    # --- host check ---------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def check(cls, home: Path, options: DriverOptions) -> None:
        """Raise :class:`~layerfs.errors.DriverNotSupported` (with the reason) if this host
        cannot run the driver at ``home``: a kernel feature, a filesystem type, a tool.
        Auto-selection skips the driver then, and the tests skip with the reason."""

    # --- primitives every driver implements ---------------------------------------------
    @abstractmethod
    def create(self, layer_id: str, parent: str | None, *, readonly: bool,
               size: int | None = None) -> None:
        """Make the on-disk form of a new layer whose contents start as ``parent``'s
        (empty without a parent). ``readonly``: an image layer, filled once by
        :meth:`apply_diff`; else a container layer, changed through a mount. ``size``: a
        quota, for drivers whose capabilities include ``quotas``."""

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
        """What to mount, in order, to see the layer's full contents (its chain merged)."""

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

    def destroy(self) -> list[str]:
        """Remove everything the driver keeps for its root once no layer is left: its
        home, and what it made elsewhere (a pool, devices). Used by ``layerfs system
        reset`` and when a root without layers switches driver. Returns what was done,
        one line each. The default unmounts what is left under the home and deletes it.
        """
        self.cleanup()
        for info in mountlib.mounts_under(self.home):   # deepest first
            mountlib.unmount(info.target, lazy=True)
        if not self.home.exists():
            return []
        shutil.rmtree(self.home)
        return [f"removed {self.home}"]

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
        with self._scratch_mount(layer_id, "view", readonly=True) as target:
            yield target

    @contextlib.contextmanager
    def writable_view(self, layer_id: str) -> Iterator[Path]:
        """Yield a writable path of the layer, for the naive ``apply_diff``."""
        with self._scratch_mount(layer_id, "apply", readonly=False) as target:
            yield target

    @contextlib.contextmanager
    def _scratch_mount(self, layer_id: str, kind: str, *, readonly: bool) -> Iterator[Path]:
        target = Path(tempfile.mkdtemp(prefix=scratch_prefix(kind, layer_id), dir=self.scratch))
        try:
            with mountlib.mounted(self.mounts(layer_id, readonly=readonly), target):
                yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)

    # --- the diff family (defaults: the naive differ) -------------------------------------
    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        """What the layer changed relative to its parent (``docker diff``)."""
        return self.naive.changes(layer_id, parent)

    def diff(self, layer_id: str, parent: str | None, out: IO[bytes]) -> int:
        """Write the layer's changes as an uncompressed OCI layer tar; return its size (the
        bytes of regular-file data in it, each hardlinked file once -- not the tar's length)."""
        return self.naive.diff(layer_id, parent, out)

    def apply_diff(self, layer_id: str, parent: str | None, stream: Readable) -> int:
        """Apply an OCI layer tar (any compression) onto the layer; return its size: the
        sum of its regular files' sizes, hardlinks once (what :meth:`diff` returns)."""
        return self.naive.apply_diff(layer_id, parent, stream)

    def diff_size(self, layer_id: str, parent: str | None) -> int:
        """Size :meth:`diff` would report, without writing the tar."""
        return self.naive.diff_size(layer_id, parent)


def scratch_prefix(kind: str, layer_id: str) -> str:
    """Scratch names start with the owner's process token, so crash recovery can tell
    a dead process's leftover from a live one's work: ``<pid>_<starttime>_<kind>_<id>_``."""
    from .metastore import process_token

    return f"{process_token().replace(':', '_')}_{kind}_{layer_id[:12]}_"


def scratch_owner(name: str) -> str | None:
    """The process token encoded in a scratch name, if any."""
    parts = name.split("_")
    return f"{parts[0]}:{parts[1]}" if len(parts) > 2 and parts[0].isdigit() else None


