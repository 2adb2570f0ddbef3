"""The bench scenarios: plain functions over the public layer API, with profiles.

Each scenario is ``fn(ctx, **params)``: it builds layers through ``ctx.store``
(a :class:`~layerfs.layers.LayerStore` on a fresh root), times work through
mounts with :meth:`~layerfs_bench.harness.Ctx.run_probes` and records what it
measured. :data:`SCENARIOS` maps names to the function, a description and one
parameter set per profile: ``tiny`` (CI, seconds), ``quick`` (the default: every
scenario on one driver in well under a minute) and ``full`` (the sweeps the
issue asks for: files up to 1 GiB, stacks up to 500 layers).

What each one shows (docs/bench.md has the charts and the numbers):

copy-up
    The first 1-byte append to a file that lives in a lower layer, swept over
    file sizes, against the second append to the same file; the same with
    fsync; and a chmod of a lower file, with and without overlay2's
    ``metacopy``. File-level copy-on-write (overlay, overlay2, aufs) copies the
    whole file on the first write: time grows with size. Block-level drivers
    (btrfs, devicemapper) copy one extent at most, and vfs nothing (every layer
    is already a full copy, paid when the layer is created).
whiteout
    Deleting N lower files (time per unlink, inodes and bytes each deletion
    costs in the container layer), then readdir and stat of a directory holding
    N whiteouts; removing a lower directory tree; replacing a lower directory
    with an empty one (an opaque directory).
stat-lookup
    ``stat()`` of a path of D components through a stack of L layers, for a
    file in the top layer, in the bottom layer, and missing (a negative
    lookup); right after mounting (the union's caches empty, the backing
    filesystem's warm), after ``drop_caches`` (both cold) and warm. On the aufs
    FUSE filesystem also the backing lookups it counted, next to the seed's
    prediction L x D.
layers
    Applying image layers, creating, mounting, unmounting and removing
    container layers against stack depth; committing a container (diff +
    apply); inodes and bytes each image layer uses (overlay's hardlinked full
    trees vs overlay2's diffs); bytes a 4 KiB write into a big lower file
    costs, exclusive vs shared on block-level drivers.
inspect
    How long ``layerfs image explore`` and ``explain`` take to open an image once it is
    indexed, against ``docker save | tar -t`` (what dive reads on every start)
    (:mod:`layerfs_bench.inspect`).
export
    ``layer diff`` of a container layer (the tar ``commit``, ``push`` and ``save``
    start from), written to a sink: a layer of N new files in new directories,
    and a layer that changed a few files of a big image. Union drivers tar their
    diff directory, btrfs finds the changes in its own trees, vfs, overlay and
    devicemapper walk both trees.
container-start
    Start-to-exit latency of ``/bin/true`` in a busybox container with the
    layerfs runner (``layerfs.runtime``), on each driver; ``docker run`` as a
    peer row.
io-throughput
    Sequential and random (4 KiB) reads and writes of a lower file, a copied-up
    file and a new file in a container layer, and the copy-up itself: the cost
    of the data path (kernel overlay and btrfs: none; the aufs FUSE union: none
    where the kernel offers FUSE passthrough; fuse-overlayfs: every byte
    crosses into its process).
mount
    Mounting and unmounting a container layer over a 5-layer image; the aufs
    FUSE union both ways it can start its server: forked from the bench's warm
    fork server (as under ``layerfs daemon``) and through its cold helper
    command (a one-off CLI run).

The code: this module holds the registry (:class:`Scenario`, :data:`SCENARIOS`,
:func:`resolve`); each family of scenarios has its own module --
:mod:`.scenarios_cow` (copy-up, whiteout), :mod:`.scenarios_lookup`
(stat-lookup), :mod:`.scenarios_layers` (layers, export),
:mod:`.scenarios_runtime` (container-start, io-throughput, mount),
:mod:`.inspect` and :mod:`.engines` -- on the building blocks in
:mod:`.scenarios_common` (files, layer tars, the union's counters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from layerfs.errors import InvalidArgument

from . import inspect
from .engines import engines
from .scenarios_common import (
    FIXED_MTIME,
    GiB,
    KiB,
    MiB,
    apply_bytes,
    human,
    max_stack,
    tar_bytes,
    union_counters,
    write_file,
)
from .scenarios_cow import copy_up, whiteout
from .scenarios_layers import export, layers
from .scenarios_lookup import POSITIONS, stat_layer_tar, stat_lookup, stat_path
from .scenarios_runtime import BENCH_IMAGE, container_start, io_throughput, mount

# The scenarios and their helpers, importable from here as before the split.
__all__ = [
    "BENCH_IMAGE", "FIXED_MTIME", "POSITIONS", "SCENARIOS", "GiB", "KiB", "MiB", "Scenario",
    "apply_bytes", "container_start", "copy_up", "export", "human", "io_throughput", "layers",
    "max_stack", "mount", "resolve", "stat_layer_tar", "stat_lookup", "stat_path", "tar_bytes",
    "union_counters", "whiteout", "write_file",
]


# --- the registry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """``joint``: ``fn`` takes every target's context at once and times them together,
    repetition by repetition (for comparisons that must not drift); else one at a time."""

    name: str
    fn: Callable[..., None]
    title: str
    shows: str
    profiles: dict[str, dict[str, Any]]
    joint: bool = False
    default: bool = True
    """Part of ``all``; the others run only when named (they start whole engines)."""


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("copy-up", copy_up, "first write to a lower file vs file size",
             "time grows with file size on file-level drivers (overlay, overlay2, aufs), "
             "stays flat on block-level ones (btrfs, devicemapper) and on vfs; chmod with "
             "overlay2 metacopy copies no data",
             {"tiny": dict(sizes=(4 * KiB, MiB, 8 * MiB), reps=5, fsync_sizes=(4 * KiB, 8 * MiB),
                           chmod_sizes=(4 * KiB, 8 * MiB)),
              "quick": dict(sizes=(4 * KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB), reps=5,
                            fsync_sizes=(4 * KiB, 16 * MiB), chmod_sizes=(4 * KiB, 16 * MiB)),
              "full": dict(sizes=(4 * KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB, 256 * MiB, GiB),
                           reps=5, big_reps=3, fsync_sizes=(4 * KiB, MiB, 64 * MiB, 256 * MiB),
                           chmod_sizes=(4 * KiB, MiB, 64 * MiB, 256 * MiB))}),
    Scenario("whiteout", whiteout, "deleting lower files and directories",
             "what a deletion costs in the container layer (one inode per whiteout, or none), "
             "and whether readdir/stat slow down around whiteouts and opaque directories",
             {"tiny": dict(n=200, reps=5, trees=3, tree_dirs=4, tree_files=20, opaque_dirs=3,
                           opaque_files=50),
              "quick": dict(n=1000, reps=5, trees=3, tree_dirs=10, tree_files=50, opaque_dirs=3,
                            opaque_files=200),
              "full": dict(n=10000, reps=7, trees=5, tree_dirs=20, tree_files=100,
                           opaque_dirs=5, opaque_files=1000)}),
    Scenario("stat-lookup", stat_lookup, "stat() through L layers at depth D",
             "union drivers pay per layer and per path component on a cold lookup (the seed's "
             "L x D), flat drivers (vfs, btrfs, overlay's image layers) do not; warm lookups "
             "are answered from the dentry cache on every driver",
             {"tiny": dict(layers=(1, 4, 16), depths=(1, 4), reps=3, warm_batch=100),
              "quick": dict(layers=(1, 8, 32, 128), depths=(1, 4, 8), reps=5, warm_batch=200),
              "full": dict(layers=(1, 2, 4, 8, 16, 32, 64, 128, 256, 500), depths=(1, 2, 4, 8, 16),
                           reps=7, warm_batch=1000)}),
    Scenario("layers", layers, "layer lifecycle, mount time vs depth, space per layer",
             "mount time vs stack depth; overlay's hardlinked trees cost inodes per directory "
             "per layer where overlay2 stores only the diff; btrfs shares unchanged extents",
             {"tiny": dict(depths=(1, 4, 16), reps=3, base_dirs=20, base_files=5,
                           image_layers=3, big=MiB),
              "quick": dict(depths=(1, 8, 32, 128), reps=5, base_dirs=50, base_files=10,
                            image_layers=5, big=8 * MiB),
              "full": dict(depths=(1, 2, 4, 8, 16, 32, 64, 128, 256, 500), reps=10,
                           base_dirs=200, base_files=20, image_layers=20, big=64 * MiB)}),
    Scenario("inspect", inspect.inspect, "opening an image in explore and explain",
             "once indexed, layerfs opens an image from its store (no layer is read); dive "
             "reads the whole image on every start: docker save | tar -t is the floor under "
             "it; goal: ≤ 2 s for 1 GB, 20 layers, 60,000 files",
             {"tiny": dict(layers=3, files=300, size=2 * MiB, reps=2),
              "quick": dict(layers=10, files=6000, size=100 * MiB, reps=3),
              "full": dict(layers=20, files=60000, size=GiB, reps=5)}),
    Scenario("export", export, "layer diff: many new files, few changes in a big image",
             "what `layer diff` (commit, push, save) costs: union drivers tar their diff "
             "directory, btrfs reads its changes from its own trees, vfs, overlay and "
             "devicemapper walk both trees (the few-changes row shows the walk)",
             {"tiny": dict(new_files=500, base_files=500, changed=10, reps=3),
              "quick": dict(new_files=10_000, base_files=2_000, changed=10, reps=5),
              "full": dict(new_files=100_000, base_files=100_000, changed=10, reps=5)}),
    Scenario("container-start", container_start, "start-to-exit of /bin/true",
             "what the storage driver adds to starting a container (layer create + mount), "
             "next to the runner's own cost; docker run as a peer",
             {"tiny": dict(reps=3), "quick": dict(reps=5), "full": dict(reps=20)}),
    Scenario("io-throughput", io_throughput, "reads and writes: lower, copied-up, new files",
             "the data path: kernel overlay and block-level drivers add nothing; a FUSE union "
             "adds a round trip per request unless the kernel passes I/O through",
             {"tiny": dict(size=8 * MiB, reps=3, rand_ops=500),
              "quick": dict(size=64 * MiB, reps=5, rand_ops=2000),
              "full": dict(size=256 * MiB, reps=7, rand_ops=10000)}, joint=True),
    Scenario("mount", mount, "mount/unmount of a container layer over 5 image layers",
             "a kernel mount is a syscall; a FUSE mount starts a server: from a warm fork "
             "server (aufs under the daemon) or a cold command",
             {"tiny": dict(image_layers=5, reps=5), "quick": dict(image_layers=5, reps=15),
              "full": dict(image_layers=5, reps=40)}, joint=True),
    Scenario("engines", engines, "containerd and Docker: own storage vs the layerfs plugin",
             "what serving a driver to a real engine costs: ctr run, ctr image import, "
             "docker run and docker load on the engine's own storage and on layerfs's "
             "snapshotter / graphdriver plugin, with the layerfs/native ratio",
             {"tiny": dict(reps=2, image_mb=8, image_files=200),
              "quick": dict(reps=5, image_mb=50, image_files=2000),
              "full": dict(reps=15, image_mb=100, image_files=4000)}, default=False),
)}


def resolve(names: Sequence[str] | None) -> list[str]:
    """Scenario names from ``--scenario`` values (comma lists, ``all``), in canonical order."""
    wanted: set[str] = set()
    for item in names or ["all"]:
        for name in item.split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                wanted.update(n for n, s in SCENARIOS.items() if s.default)
            elif name in SCENARIOS:
                wanted.add(name)
            else:
                raise InvalidArgument(f"unknown scenario {name!r} (known: "
                                      f"{', '.join(SCENARIOS)})")
    return [n for n in SCENARIOS if n in wanted]
