"""A root as a whole: its disk usage, pruning what nothing uses, and resetting it.

``layerfs system df|prune|reset`` (after ``docker system`` and ``podman system``) on
top of the three stores of a root: containers (:mod:`layerfs.runtime.containers`),
images (:mod:`layerfs.images`) and layers (:mod:`layerfs.layers`). Three kinds of
layer share a root, and each is held by something different:

==============  ========================================  ==============================
kind            held by                                   unused when
==============  ========================================  ==============================
image layers    the images whose chains contain them      no image has them (untagged
                                                          images no container uses are
                                                          *dangling*)
container       their container                           the container is not running
layers
other layers    ``layer create`` / ``layer apply`` made   nothing is on top of them
                them; children and mounts hold them       (children) and they are not
                                                          mounted
==============  ========================================  ==============================

:func:`reset` is the one way to give a root back entirely: it stops and removes every
container, removes every layer through the driver, lets the driver tear down its own
state (btrfs subvolumes, read-only ones too -- ``rm -rf`` fails on those; device-mapper
thin devices and the pool), unmounts whatever is still mounted under the root, and
deletes the root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import mount as mountlib
from .errors import InUse, LayerfsError, NotFound
from .fsinfo import layer_dir_usage

if TYPE_CHECKING:
    from .layers import LayerStore
    from .runtime.containers import ContainerManager
    from .runtime.engine import RuntimeConfig

#: Container states ``prune`` removes (``docker container prune``: everything not running).
STOPPED = ("exited", "created", "dead")


@dataclass(frozen=True)
class UsageRow:
    """One line of ``system df``: how many, how many in use, their size, and how much a
    prune would give back."""

    kind: str
    total: int
    active: int
    size: int
    reclaimable: int


@dataclass(frozen=True)
class DiskUsage:
    root: str
    driver: str
    backing_filesystem: str
    #: Bytes allocated under the driver's home (hardlinks once). Block-level drivers
    #: count what their files allocate (devicemapper: the sparse pool files); btrfs
    #: snapshots share extents, which a file walk counts once per snapshot.
    driver_bytes: int
    rows: list[UsageRow]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Pruned:
    containers: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    #: Blob digests whose staged download files went (see :func:`prune`).
    downloads: list[str] = field(default_factory=list)
    reclaimed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- who holds which layer ---------------------------------------------------------------------

def _image_layers(store: LayerStore) -> dict[str, int]:
    """Layer-store id -> diff size of every image layer (none if the root has no images)."""
    with store.store._lock:
        db = store.store.db
        if not _has_table(store, "image_layers"):
            return {}
        return {r[0]: int(r[1] or 0) for r in db.execute(
            "SELECT layer, size FROM image_layers WHERE state = 'ready'")}


def _has_table(store: LayerStore, name: str) -> bool:
    return store.store.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                  "name = ?", (name,)).fetchone() is not None


def _other_layers(mgr: ContainerManager) -> tuple[list[str], set[str]]:
    """Layers that are neither image nor container layers, and those of them a prune
    removes: nothing on top of them (transitively) is held -- an image or container
    layer, a mount, or a layer another kind holds."""
    store = mgr.layers
    image_layers = set(_image_layers(store))
    container_layers = {st.layer for st in mgr.containers(all=True)}
    records = store.layers()
    others = [r.id for r in records if r.id not in image_layers and r.id not in container_layers]
    mounted = {m.layer for m in store.store.list_mounts()}
    held_roots = image_layers | container_layers | mounted
    parent = {r.id: r.parent for r in records}
    held: set[str] = set()
    for layer in held_roots:   # a held layer holds its whole chain
        current: str | None = layer
        while current is not None and current not in held:
            held.add(current)
            current = parent.get(current)
    return others, {layer for layer in others if layer not in held}


def _layer_size(store: LayerStore, layer_id: str) -> int:
    rec = store.store.get_layer(layer_id)
    if rec is not None and rec.size is not None:
        return rec.size
    try:   # a container layer's size is only known by looking
        return store.usage(layer_id).bytes
    except LayerfsError:
        return 0


# --- df ------------------------------------------------------------------------------------------

def disk_usage(mgr: ContainerManager) -> DiskUsage:
    """What the root's images, containers and other layers take, and what is reclaimable."""
    store = mgr.layers
    containers = mgr.containers(all=True)
    images = mgr.images.images()
    users = {image.id: mgr.images.users(image.id) for image in images}
    image_layer_sizes = _image_layers(store)
    used_chains = {layer.layer_id for image in images if users[image.id]
                   for layer in image.layers}
    image_size = sum(image_layer_sizes.values())
    image_free = sum(size for layer, size in image_layer_sizes.items()
                     if layer not in used_chains)
    sizes = {st.id: _layer_size(store, st.layer) for st in containers}
    container_free = sum(sizes[st.id] for st in containers if st.status in STOPPED)
    others, unused = _other_layers(mgr)
    other_sizes = {layer: _layer_size(store, layer) for layer in others}
    status = store.driver.status()
    rows = [
        UsageRow("Images", len(images), sum(1 for i in images if users[i.id]), image_size,
                 image_free),
        UsageRow("Containers", len(containers),
                 sum(1 for st in containers if st.status == "running"), sum(sizes.values()),
                 container_free),
        UsageRow("Layers", len(others), len(others) - len(unused), sum(other_sizes.values()),
                 sum(other_sizes[layer] for layer in unused)),
    ]
    from .downloads import staged_usage

    staged = staged_usage(mgr.images)
    rows.append(UsageRow("Downloads", staged.downloads, staged.in_use, staged.size,
                         staged.size - staged.in_use_size))
    return DiskUsage(str(store.root), store.driver.name,
                     status.get("Backing Filesystem", "?"),
                     layer_dir_usage(store.driver.home).bytes, rows)


# --- prune ---------------------------------------------------------------------------------------

def prune(mgr: ContainerManager, *, all_images: bool = False) -> Pruned:
    """Remove stopped containers, then dangling images (with ``all_images``: every image no
    container uses) and the image layers they alone held, then the other layers nothing
    holds, then the downloads no pull is using. Like ``docker system prune [-a]``; what is
    in use is left alone."""
    store = mgr.layers
    done = Pruned()
    for st in mgr.containers(all=True):
        if st.status not in STOPPED:
            continue
        size = _layer_size(store, st.layer)
        with contextlib.suppress(NotFound, InUse):   # removed or restarted meanwhile
            mgr.remove(st.id)
            done.containers.append(st.id)
            done.reclaimed += size
    before = _image_layers(store)
    if all_images:
        for image in mgr.images.images():
            if mgr.images.users(image.id):
                continue
            with contextlib.suppress(NotFound, InUse):
                mgr.images.remove(image.id, force=True)
                done.images.append(image.id)
    for what, ident in mgr.images.prune():
        if what == "Deleted":
            done.images.append(ident)
    after = _image_layers(store)
    done.reclaimed += sum(size for layer, size in before.items() if layer not in after)
    # Other layers: top down, until nothing more can go (a parent is free once its
    # children are gone).
    while True:
        _others, unused = _other_layers(mgr)
        removable = [layer for layer in unused if not store.children(layer)]
        if not removable:
            break
        for layer in removable:
            size = _layer_size(store, layer)
            try:
                store.remove(layer)
            except (NotFound, InUse):
                unused.discard(layer)
                continue
            done.layers.append(layer)
            done.reclaimed += size
        if not any(layer in done.layers for layer in removable):
            break
    # Downloads no pull is using: those a pull killed with -9 left, and those a stopped
    # `pull --resume` kept to continue from (otherwise removed by the next pull after a day).
    from .downloads import remove_staged_blobs

    done.downloads, freed = remove_staged_blobs(mgr.images)
    done.reclaimed += freed
    return done


# --- reset ---------------------------------------------------------------------------------------

def reset(root: str | os.PathLike[str], *, config: RuntimeConfig | None = None) -> list[str]:
    """Give a root back entirely (see the module docstring); what was done, line by line.

    Refused unless ``root`` holds a layerfs database: it never deletes a directory that
    is not a layerfs root.
    """
    from .runtime.containers import ContainerManager

    root_path = Path(root).absolute()
    if not (root_path / "layerfs.db").is_file():
        raise NotFound(f"{root_path} is not a layerfs root (no layerfs.db): nothing to reset")
    done: list[str] = []
    with ContainerManager(root_path, config=config) as mgr:
        for st in mgr.containers(all=True):
            mgr.remove(st.id, force=True)
            done.append(f"removed container {st.short_id}")
        images = mgr.images.images()
        if images:
            done.append(f"forgot {len(images)} image(s)")
        store = mgr.layers
        layers = store.store.list_layers(state=None)
        store.wipe()
        if layers:
            done.append(f"removed {len(layers)} layer(s) ({store.driver.name})")
        done += store.driver.destroy()
    done += _remove_root(root_path)
    return done


def _remove_root(root: Path) -> list[str]:
    """Unmount what is still mounted below ``root`` and delete it. A root that is itself a
    mount point (a pool's mount) is emptied and left in place."""
    done = []
    for info in mountlib.mounts_under(root):   # deepest first
        if info.target == os.path.realpath(root):
            continue
        mountlib.unmount(info.target, lazy=True)
        done.append(f"unmounted {info.target}")
    if mountlib.is_mounted(root):
        for entry in _entries(root):
            _remove(entry)
        done.append(f"emptied {root} (a mount point: left in place)")
    else:
        _remove(root)
        done.append(f"removed {root}")
    return done


def _entries(path: Path) -> Iterable[Path]:
    return [path / name for name in os.listdir(path)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


__all__ = ["STOPPED", "DiskUsage", "Pruned", "UsageRow", "disk_usage", "prune", "reset"]
