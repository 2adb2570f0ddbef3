"""Driver plugins: the entry-point registry of storage drivers, and auto-selection.

Drivers register through the ``layerfs.drivers`` entry-point group (see
pyproject.toml), so a third-party package adds a driver without touching
layerfs. Classes are loaded lazily: a driver whose module fails to import
(a missing optional dependency) is reported as unsupported with the reason,
never as a crash of the whole tool. A program can also :func:`register` a driver
class for its own process (tests, embedding, a driver that is not installed), or
pass the class itself to :func:`layerfs.open_root`.

Selection, like Docker's graphdriver.New:
1. the driver named explicitly (``--driver``, ``LAYERFS_DRIVER``);
2. the driver that already owns state under the root;
3. the first supported driver of :data:`PRIORITY`;
4. any other registered driver that is supported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from .driver import Driver
from .errors import AlreadyExists, DriverNotSupported, InvalidArgument, NotFound
from .options import DriverOptions

ENTRY_POINT_GROUP = "layerfs.drivers"

# Docker's order (btrfs,zfs,overlay2,fuse-overlayfs,aufs,overlay,devicemapper,vfs),
# minus what layerfs does not implement. btrfs only passes its check when the
# root is on btrfs, so on most hosts overlay2 wins; vfs is the last resort.
PRIORITY = ("btrfs", "overlay2", "aufs", "overlay", "devicemapper", "vfs")


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    # Reading package metadata costs several ms; the set is fixed for a process.
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


#: Drivers registered in this process with :func:`register`, by name.
_registered: dict[str, type[Driver]] = {}


def register(name: str, cls: type[Driver], *, replace: bool = False) -> None:
    """Make driver class ``cls`` available as ``name`` in this process, next to the entry
    points. A name already taken is refused unless ``replace``."""
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise InvalidArgument(f"register({name!r}, ...): {cls!r} is not a layerfs Driver class")
    if not replace and (name in _registered or name in _entry_points()):
        raise AlreadyExists(f"a storage driver named {name!r} is already registered")
    _registered[name] = cls


def registered() -> dict[str, str]:
    """Names of registered drivers mapped to their ``module:Class`` import path."""
    names = {name: ep.value for name, ep in _entry_points().items()}
    names.update({name: f"{cls.__module__}:{cls.__qualname__}"
                  for name, cls in _registered.items()})
    return names


def load(name: str) -> type[Driver]:
    """The driver class called ``name``; NotFound lists the known names."""
    if name in _registered:
        return _registered[name]
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(sorted(registered())) or "none"
        raise NotFound(f"no storage driver named {name!r} (registered: {known})")
    try:
        cls = eps[name].load()
    except (ImportError, AttributeError) as err:
        # A missing optional dependency or a half-installed plugin must not take
        # `layerfs info` down with it: report the driver as unsupported.
        raise DriverNotSupported(name, f"cannot load {eps[name].value}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise InvalidArgument(f"entry point {name} = {eps[name].value} is not a layerfs Driver")
    return cls


def home_of(root: Path, name: str) -> Path:
    """Where driver ``name`` keeps its files under a layerfs root."""
    return Path(root) / name


@dataclass(frozen=True)
class Probe:
    """Result of checking one driver on this host."""

    name: str
    supported: bool
    reason: str | None
    priority: int | None


#: (driver, root, options) found supported by this process: a host does not lose a
#: kernel feature while a command runs, and ``layerfs daemon`` probes its root once, at
#: start, for every command it serves (a probe writes and removes a file: ms each).
_SUPPORTED: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()


def probe(name: str, root: Path, options: DriverOptions | None = None) -> Probe:
    prio = PRIORITY.index(name) if name in PRIORITY else None
    opts = options or DriverOptions()
    key = (name, str(Path(root).absolute()), tuple(sorted(opts.values.items())))
    if key in _SUPPORTED:
        return Probe(name, True, None, prio)
    try:
        cls = load(name)
        cls.check(home_of(root, name), opts)
    except DriverNotSupported as err:
        return Probe(name, False, err.reason, prio)
    except OSError as err:   # a probe that cannot write next to the root (read-only, ...)
        where = f" {err.filename}" if err.filename else ""
        return Probe(name, False, f"cannot check{where}: {err.strerror or err}", prio)
    _SUPPORTED.add(key)
    return Probe(name, True, None, prio)


def probe_all(root: Path, options: DriverOptions | None = None) -> list[Probe]:
    """Every registered driver, in priority order, with supported/reason."""
    names = sorted(registered(), key=lambda n: (PRIORITY.index(n) if n in PRIORITY
                                                 else len(PRIORITY), n))
    return [probe(n, root, options) for n in names]


def prior_driver(root: Path) -> str | None:
    """The driver that already owns state under ``root`` (its home dir is non-empty)."""
    found = [n for n in registered()
             if home_of(root, n).is_dir() and any(home_of(root, n).iterdir())]
    if len(found) > 1:
        raise InvalidArgument(
            f"{root} holds state of several drivers ({', '.join(sorted(found))}); "
            "choose one with --driver")
    return found[0] if found else None


def select(root: Path, explicit: str | None = None,
           options: DriverOptions | None = None) -> tuple[str, list[Probe]]:
    """Pick the driver for ``root``; returns its name and the probes of those skipped."""
    if explicit:
        result = probe(explicit, root, options)
        if not result.supported:
            raise DriverNotSupported(explicit, result.reason or "not supported")
        return explicit, []
    prior = prior_driver(root)
    if prior:
        return prior, []
    skipped: list[Probe] = []
    names = list(PRIORITY) + sorted(set(registered()) - set(PRIORITY))
    for name in names:
        if name not in registered():
            continue
        result = probe(name, root)
        if result.supported:
            return name, skipped
        skipped.append(result)
    reasons = "; ".join(f"{p.name}: {p.reason}" for p in skipped)
    raise DriverNotSupported("auto", f"no storage driver works here ({reasons})")


def driver_info(cls: type[Driver]) -> dict[str, Any]:
    """Static facts about a driver class (for ``layerfs drivers``): what it can do at best;
    an instance may do less on a given host (:attr:`Driver.capabilities`)."""
    caps = cls.CAPABILITIES
    return {"name": cls.name, "native_diff": caps.native_diff,
            "native_changes": caps.native_changes, "block_level_cow": caps.block_level_cow,
            "quotas": caps.quotas, "max_depth": caps.max_depth,
            "whiteouts": caps.whiteout_format.value, "options": sorted(cls.known_options)}
