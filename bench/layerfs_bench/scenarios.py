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
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerfs import mount as mountlib
from layerfs.errors import InvalidArgument, LayerfsError
from layerfs.layers import LayerStore

from . import inspect
from .engines import engines
from .harness import Ctx, Probe, ScenarioSkip, drop_caches, run_joint_probes

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
FIXED_MTIME = 1_700_000_000
_CHUNK = os.urandom(MiB)  # written over and over: incompressible, no holes


# --- helpers -------------------------------------------------------------------------------------

def human(n: int) -> str:
    """4096 -> 4K, 1048576 -> 1M (the size labels of tables and charts)."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def write_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(_CHUNK))
            f.write(_CHUNK[:n])
            left -= n


def tar_bytes(dirs: Iterable[str], files: dict[str, bytes]) -> bytes:
    """An uncompressed layer tar of ``dirs`` (created first) and ``files``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(set(dirs)):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def apply_bytes(store: LayerStore, data: bytes, parent: str | None) -> str:
    return store.apply(io.BytesIO(data), parent).id


def _append(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def _append_fsync(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
    finally:
        os.close(fd)


def _stat_maybe(path: Path) -> None:
    try:
        os.stat(path)
    except FileNotFoundError:
        pass


def _stat_arg(arg: Any) -> None:
    """A stat probe's op: its argument is a path, or (path, counters) when counting."""
    _stat_maybe(arg[0] if isinstance(arg, tuple) else arg)


def union_counters(mnt: Path) -> dict[str, int] | None:
    """The aufs FUSE filesystem's lookup counters (``user.layerfs.stats``), or None."""
    try:
        data = json.loads(os.getxattr(mnt, "user.layerfs.stats"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) \
        else None


def max_stack(store: LayerStore) -> int | None:
    return store.driver.capabilities.max_depth


# --- copy-up -------------------------------------------------------------------------------------

def copy_up(ctx: Ctx, *, sizes: Sequence[int], reps: int, fsync_sizes: Sequence[int] = (),
            chmod_sizes: Sequence[int] = (), big_reps: int | None = None,
            big_from: int = 256 * MiB) -> None:
    """First vs second 1-byte append to lower files of each size; with fsync; chmod.

    Every repetition uses its own lower file (a copy-up happens once per file).
    """
    def nreps(size: int) -> int:
        return big_reps if big_reps and size >= big_from else reps

    plan = {"write": list(sizes), "fsync": list(fsync_sizes), "chmod": list(chmod_sizes)}
    _copy_up_run(ctx, ctx.store, plan, nreps, metacopy=False)
    if not chmod_sizes:
        return
    params = {"metacopy": True}
    if ctx.target.driver != "overlay2":
        ctx.skip("metacopy is an overlay2 option", metric="first_chmod", params=params)
        return
    try:
        with ctx.variant(["metacopy=true", "redirect_dir=true"]) as store:
            _copy_up_run(ctx, store, {"chmod": list(chmod_sizes)}, nreps, metacopy=True)
    except LayerfsError as err:
        last = (str(err).strip().splitlines() or [""])[-1]  # mount helpers print a lot
        ctx.skip(f"metacopy: {last}", metric="first_chmod", params=params)


def _copy_up_run(ctx: Ctx, store: LayerStore, plan: dict[str, list[int]],
                 nreps: Callable[[int], int], *, metacopy: bool) -> None:
    total = sum(size * nreps(size) for sizes in plan.values() for size in sizes)
    ctx.step(f"writing {total / MiB:.0f} MiB of lower files"
             + (" (metacopy store)" if metacopy else ""))
    base = store.create().id
    with store.mounted(base) as mnt:
        for variant, sizes in plan.items():
            for size in sizes:
                d = mnt / "cu" / variant / str(size)
                d.mkdir(parents=True)
                for rep in range(nreps(size)):
                    write_file(d / str(rep), size)
    os.sync()
    ctx.step("creating the container layer")
    t0 = _now()
    box = store.create(base).id
    create_ms = (_now() - t0) / 1e6
    if not metacopy:
        ctx.record("layer_create", [create_ms], unit="ms",
                   params={"lower_bytes": total},
                   note="creating the container layer over the lower files (vfs copies them)")
    os.sync()
    largest = max(plan.get("write") or [0])
    with store.mounted(box) as mnt:
        def path_of(variant: str, size: int) -> Callable[[int], Path]:
            return lambda rep: mnt / "cu" / variant / str(size) / str(rep)

        groups: dict[int, list[Probe]] = {}
        for variant, sizes in plan.items():
            for size in sizes:
                p = {"size": size}
                where = path_of(variant, size)
                if variant == "write":
                    pair = [Probe("first_write", _append, p, where, primary=size == largest),
                            Probe("second_write", _append, p, where)]
                elif variant == "fsync":
                    pair = [Probe("first_write_fsync", _append_fsync, p, where),
                            Probe("second_write_fsync", _append_fsync, p, where)]
                else:
                    p = {"size": size, "metacopy": metacopy}
                    pair = [Probe("first_chmod", lambda f: os.chmod(f, 0o600), p, where),
                            Probe("second_chmod", lambda f: os.chmod(f, 0o640), p, where)]
                groups.setdefault(nreps(size), []).extend(pair)
        for n, probes in groups.items():
            ctx.run_probes(probes, n, label="copy-up" + (" (metacopy)" if metacopy else ""))
    store.remove(box)
    store.remove(base)


def _now() -> int:
    return time.perf_counter_ns()


# --- whiteout ------------------------------------------------------------------------------------

def whiteout(ctx: Ctx, *, n: int, reps: int, trees: int, tree_dirs: int, tree_files: int,
             opaque_dirs: int, opaque_files: int) -> None:
    """Deleting lower files and trees; what the whiteouts cost; reading around them."""
    store = ctx.store
    ctx.step(f"writing {n} + {n} lower files, {trees} trees, {opaque_dirs} dirs")
    base = store.create().id
    payload = b"w" * 100
    with store.mounted(base) as mnt:
        w = mnt / "wh"
        for sub in ("del", "live", "empty"):
            (w / sub).mkdir(parents=True)
        for i in range(n):
            (w / "del" / f"f{i}").write_bytes(payload)
            (w / "live" / f"f{i}").write_bytes(payload)
        for t in range(trees):
            for j in range(tree_dirs):
                d = w / f"tree{t}" / f"s{j}"
                d.mkdir(parents=True)
                for i in range(tree_files):
                    (d / f"f{i}").write_bytes(payload)
        for t in range(opaque_dirs):
            d = w / f"opq{t}"
            d.mkdir()
            for i in range(opaque_files):
                (d / f"f{i}").write_bytes(payload)
    box = store.create(base).id
    os.sync()
    before = store.usage(box)
    with store.mounted(box) as mnt:
        w = mnt / "wh"
        ctx.run_probes([
            Probe("readdir", lambda d: os.listdir(d), {"dir": "lower", "entries": n},
                  lambda _: w / "live", unit="us"),
            Probe("readdir", lambda d: os.listdir(d), {"dir": "empty", "entries": 0},
                  lambda _: w / "empty", unit="us"),
        ], reps, label="readdir")
        ctx.step(f"unlinking {n} lower files")
        ctx.run_probes([Probe("unlink", os.unlink, {"files": n},
                              lambda i: w / "del" / f"f{i}", unit="us", primary=True)], n)
        left = os.listdir(w / "del")
        if left:
            raise AssertionError(f"{len(left)} deleted files still listed, e.g. {left[0]}")
        after = store.usage(box)
        ctx.record("whiteout_inodes", [(after.inodes - before.inodes) / n], unit="inodes/file",
                   kind="inodes", params={"files": n},
                   note=f"container layer: {before.inodes} -> {after.inodes} inodes")
        ctx.record("whiteout_bytes", [(after.bytes - before.bytes) / n], unit="bytes/file",
                   kind="bytes", params={"files": n},
                   note=f"container layer: {before.bytes} -> {after.bytes} bytes")
        names = min(n, 200)
        ctx.run_probes([
            Probe("readdir", lambda d: os.listdir(d), {"dir": "whiteouts", "entries": 0,
                                                       "whiteouts": n},
                  lambda _: w / "del", unit="us"),
        ], reps, label="readdir")
        ctx.run_probes([Probe("stat_deleted", _stat_maybe, {"whiteouts": n},
                              lambda i: w / "del" / f"f{i * (n // names)}", unit="us")], names)
        ctx.run_probes([Probe("stat_dir", os.stat, {"whiteouts": n}, lambda _: w / "del",
                              unit="us", batch=100)], reps)
        # Removing lower trees (rm -rf), then replacing lower dirs by empty ones (opaque).
        u0 = store.usage(box)
        ctx.run_probes([Probe("rmtree", shutil.rmtree, {"dirs": tree_dirs,
                                                        "files": tree_dirs * tree_files},
                              lambda t: w / f"tree{t}")], trees, label="rm -rf")
        u1 = store.usage(box)
        ctx.record("rmtree_inodes", [(u1.inodes - u0.inodes) / trees], unit="inodes/tree",
                   kind="inodes", params={"dirs": tree_dirs, "files": tree_dirs * tree_files})
        ctx.run_probes([Probe("readdir", lambda d: os.listdir(d),
                              {"dir": "lower", "entries": opaque_files},
                              lambda t: w / f"opq{t}", unit="us")], opaque_dirs)

        def replace(d: Path) -> None:
            shutil.rmtree(d)
            d.mkdir()

        ctx.run_probes([Probe("opaque_replace", replace, {"files": opaque_files},
                              lambda t: w / f"opq{t}")], opaque_dirs, label="opaque dirs")
        u2 = store.usage(box)
        ctx.record("opaque_inodes", [(u2.inodes - u1.inodes) / opaque_dirs], unit="inodes/dir",
                   kind="inodes", params={"files": opaque_files})
        for t in range(opaque_dirs):
            if os.listdir(w / f"opq{t}"):
                raise AssertionError(f"opq{t} shows lower entries after rm -rf + mkdir")
        ctx.run_probes([Probe("readdir", lambda d: os.listdir(d),
                              {"dir": "opaque", "entries": 0, "hidden": opaque_files},
                              lambda t: w / f"opq{t}", unit="us")], opaque_dirs)
    store.remove(box)
    store.remove(base)


# --- stat-lookup ---------------------------------------------------------------------------------

POSITIONS = ("top", "bottom", "missing")


def stat_path(position: str, depth: int, rep: int) -> list[str]:
    """Components of the probed path: ``depth`` of them, the last one the file.

    Every (position, depth, rep) has its own top-level directory, so each probe
    of a cold stack looks up components nobody looked up before."""
    if depth == 1:
        return [f"{position}{rep}"]
    return [f"{position[0]}{depth}r{rep}", *[f"d{k}" for k in range(2, depth)], position]


def stat_layer_tar(depths: Sequence[int], reps: int, index: int) -> bytes:
    """Layer ``index`` of the stat stack: every directory of every probed path (so a
    lookup merges them through all layers), ``top`` files rewritten in every layer
    (the topmost copy wins) and ``bottom`` files only in layer 0."""
    dirs: set[str] = set()
    files: dict[str, bytes] = {}
    for position in POSITIONS:
        for depth in depths:
            for rep in range(reps):
                parts = stat_path(position, depth, rep)
                for k in range(1, len(parts)):
                    dirs.add("/".join(parts[:k]))
                if position == "top" or (position == "bottom" and index == 0):
                    files["/".join(parts)] = f"{position} {index}\n".encode()
    return tar_bytes(dirs, files)


def stat_lookup(ctx: Ctx, *, layers: Sequence[int], depths: Sequence[int], reps: int,
                warm_batch: int) -> None:
    """stat() through L layers at depth D: top / bottom / missing; first, cold, warm."""
    store = ctx.store
    limit = max_stack(store)
    usable = [n for n in layers if limit is None or n <= limit]
    for n in layers:
        if n not in usable:
            ctx.skip(f"{ctx.target.driver} stacks at most {limit} layers", metric="stat",
                     params={"layers": n})
    if not usable:
        raise ScenarioSkip("no layer count fits the driver")
    top, rest = (stat_layer_tar(depths, reps, 0), stat_layer_tar(depths, reps, 1))
    chain: list[str] = []
    for i in range(max(usable)):
        if i % 8 == 0:
            ctx.step(f"applying stat stack layer {i + 1}/{max(usable)}")
        chain.append(apply_bytes(store, top if i == 0 else rest, chain[-1] if chain else None))
    largest, deepest = max(usable), max(depths)
    # All "first" passes before any drop_caches: the backing filesystem is still warm from
    # building the stack, only the union's own caches are empty (a fresh mount).
    for n in usable:
        _stat_pass(ctx, store, chain[n - 1], n, depths, reps, "first")
    for n in usable:
        ctx.step(f"L={n}: sync + drop_caches")
        drop_caches()
        _stat_pass(ctx, store, chain[n - 1], n, depths, reps, "cold", warm_batch=warm_batch,
                   primary=(n == largest), deepest=deepest)


def _stat_pass(ctx: Ctx, store: LayerStore, view: str, n: int, depths: Sequence[int],
               reps: int, phase: str, *, warm_batch: int = 0, primary: bool = False,
               deepest: int = 0) -> None:
    """Mount the view of ``n`` layers and stat each path once (``phase`` first or cold);
    after the cold pass also time warm stats, ``warm_batch`` per sample."""
    mnt = store.mount(view, readonly=True)
    try:
        counting = union_counters(mnt) is not None
        seen: dict[tuple[str, int], list[dict[str, int]]] = {}
        probes = []
        for position in POSITIONS:
            for depth in depths:
                params = {"layers": n, "depth": depth, "position": position, "cache": phase}
                seen[(position, depth)] = []
                probes.append(Probe(
                    "stat", _stat_arg, params, _counted_setup(mnt, position, depth, counting),
                    _counted_after(mnt, seen[(position, depth)]) if counting else None,
                    unit="us"))
        ctx.run_probes(probes, reps, label=f"stat L={n} {phase}")
        _check_stat_tree(mnt, depths)
        if counting:
            for (position, depth), deltas in seen.items():
                _record_counts(ctx, deltas, n, depth, position, phase)
        if warm_batch:
            warm = [Probe("stat", _stat_maybe,
                          {"layers": n, "depth": depth, "position": position, "cache": "warm"},
                          _warmed(mnt, position, depth), unit="us", batch=warm_batch,
                          primary=primary and depth == deepest and position == "bottom")
                    for position in POSITIONS for depth in depths]
            ctx.run_probes(warm, reps, label=f"stat L={n} warm")
    finally:
        store.unmount(view)


def _check_stat_tree(mnt: Path, depths: Sequence[int]) -> None:
    deepest = max(depths)
    for position, want in (("top", True), ("bottom", True), ("missing", False)):
        path = mnt.joinpath(*stat_path(position, deepest, 0))
        if path.exists() != want:
            raise AssertionError(f"stat stack: {path} should {'' if want else 'not '}exist")


def _counted_setup(mnt: Path, position: str, depth: int,
                   counting: bool) -> Callable[[int], Any]:
    """The probe's argument: the path, with the union's counters read just before when
    counting (the op then gets ``(path, counters)``)."""
    def setup(rep: int) -> Any:
        path = mnt.joinpath(*stat_path(position, depth, rep))
        return (path, union_counters(mnt)) if counting else path
    return setup


def _counted_after(mnt: Path, into: list[dict[str, int]]) -> Callable[[Any], None]:
    def after(arg: Any) -> None:
        _path, before = arg
        now = union_counters(mnt) or {}
        into.append({k: now.get(k, 0) - v for k, v in (before or {}).items()})
    return after


def _record_counts(ctx: Ctx, deltas: list[dict[str, int]], n: int, depth: int, position: str,
                   phase: str) -> None:
    if not deltas:
        return
    predicted = n * depth
    params = {"layers": n, "depth": depth, "position": position, "cache": phase,
              "predicted": predicted}
    for key, metric in (("lookup_name_stats", "lookups"), ("backing_stats", "backing_probes")):
        values = [d[key] for d in deltas if key in d]
        if values:
            ctx.record(metric, values, unit="lookups", kind="count", params=params,
                       note=f"counted by the union filesystem ({key}); seed predicts L x D = "
                            f"{predicted}")


def _warmed(mnt: Path, position: str, depth: int) -> Callable[[int], Path]:
    def setup(rep: int) -> Path:
        path = mnt.joinpath(*stat_path(position, depth, rep))
        _stat_maybe(path)
        return path
    return setup


# --- layers --------------------------------------------------------------------------------------

def layers(ctx: Ctx, *, depths: Sequence[int], reps: int, base_dirs: int, base_files: int,
           image_layers: int, big: int) -> None:
    """Layer lifecycle costs: apply, create, mount/unmount vs depth, remove, commit;
    inodes/bytes per image layer; bytes a small write into a big lower file costs."""
    store = ctx.store
    _layers_depth(ctx, store, depths, reps)
    top = _layers_usage(ctx, store, base_dirs, base_files, image_layers, big)
    _layers_lifecycle(ctx, store, top, reps, base_dirs * base_files + 1)
    _layers_cow(ctx, store, top, big, max(3, reps // 2))


def _layers_depth(ctx: Ctx, store: LayerStore, depths: Sequence[int], reps: int) -> None:
    limit = max_stack(store)
    wanted = sorted({min(d, limit - 1) if limit else d for d in depths})
    for d in depths:
        if limit and d > limit - 1:
            ctx.skip(f"{ctx.target.driver} mounts at most {limit} layers: measured "
                     f"{limit - 1} image layers + the container's", metric="mount",
                     params={"image_layers": d})
    chain: list[str] = []
    apply_ms: list[float] = []
    for i in range(max(wanted)):
        if i % 8 == 0:
            ctx.step(f"applying layer {i + 1}/{max(wanted)}")
        data = tar_bytes(["etc"], {f"etc/layer{i}": b"x\n"})
        t0 = _now()
        chain.append(apply_bytes(store, data, chain[-1] if chain else None))
        apply_ms.append((_now() - t0) / 1e6)
    ctx.record("apply", apply_ms, unit="ms", params={"files": 1, "layers": len(chain)},
               note="applying each layer of the depth stack (a 1-file tar)")
    for depth in wanted:
        _lifecycle(ctx, store, chain[depth - 1], {"image_layers": depth}, reps,
                   mounts=True, primary=depth == max(wanted), label=f"depth {depth}")


def _lifecycle(ctx: Ctx, store: LayerStore, parent: str, params: dict[str, Any], reps: int,
               *, mounts: bool, primary: bool = False, label: str = "") -> None:
    """create, [mount, unmount,] remove of container layers on ``parent``.

    Each probe can run on its own (pytest-benchmark times the primary one apart
    from the others): remove takes a layer create left, or makes one untimed;
    mount and unmount work on a layer made beforehand."""
    made: list[str] = []
    box = store.create(parent).id

    def mounted_box(_: int) -> str:
        store.mount(box)
        return box

    probes = [Probe("create", lambda _: made.append(store.create(parent).id), params)]
    if mounts:
        probes += [Probe("mount", store.mount, params, lambda _: box, store.unmount,
                         primary=primary),
                   Probe("unmount", store.unmount, params, mounted_box)]
    probes.append(Probe("remove", store.remove, params,
                        lambda _: made.pop() if made else store.create(parent).id))
    try:
        ctx.run_probes(probes, reps, label=label)
    finally:
        for layer in [*made, box]:
            store.remove(layer)


def _layers_usage(ctx: Ctx, store: LayerStore, base_dirs: int, base_files: int,
                  image_layers: int, big: int) -> str:
    ctx.step("applying the base image and its layers")
    dirs = [f"dir{j}" for j in range(base_dirs)]
    files = {f"dir{j}/f{i}": b"b" * 1024 for j in range(base_dirs) for i in range(base_files)}
    files["big.bin"] = _CHUNK[:big] if big <= len(_CHUNK) else _CHUNK * (big // len(_CHUNK))
    base = apply_bytes(store, tar_bytes(dirs, files), None)
    ids = [base]
    apply_ms = []
    for k in range(image_layers):
        data = tar_bytes([], {"dir0/f0": f"v{k}\n".encode() * 100,
                              f"dir{k % base_dirs}/new{k}": b"n" * 1024})
        t0 = _now()
        ids.append(apply_bytes(store, data, ids[-1]))
        apply_ms.append((_now() - t0) / 1e6)
    os.sync()
    shape = {"base_dirs": base_dirs, "base_files": base_dirs * base_files, "big": big}
    ctx.record("apply", apply_ms, unit="ms", params={"files": 2, **shape},
               note="an image layer changing one file and adding one, on the base image")
    base_use = store.usage(base)
    ctx.record("base_inodes", [base_use.inodes], unit="inodes", kind="inodes", params=shape)
    ctx.record("base_bytes", [base_use.bytes], unit="bytes", kind="bytes", params=shape)
    uses = [store.usage(i) for i in ids[1:]]
    note = "each image layer changes one file and adds one"
    ctx.record("layer_inodes", [u.inodes for u in uses], unit="inodes", kind="inodes",
               params=shape, note=note)
    ctx.record("layer_bytes", [u.bytes for u in uses], unit="bytes", kind="bytes", params=shape,
               note=note)
    if uses and uses[0].exclusive_bytes is not None:
        ctx.record("layer_exclusive_bytes", [u.exclusive_bytes or 0 for u in uses], unit="bytes",
                   kind="bytes", params=shape, note=note)
        ctx.record("layer_shared_bytes", [u.shared_bytes or 0 for u in uses], unit="bytes",
                   kind="bytes", params=shape, note=note)
    return ids[-1]


def _layers_lifecycle(ctx: Ctx, store: LayerStore, image: str, reps: int, files: int) -> None:
    _lifecycle(ctx, store, image, {"parent_files": files}, reps, mounts=False,
               label="create/remove")

    def prepared(_: int) -> str:
        box = store.create(image).id
        with store.mounted(box) as mnt:
            for i in range(10):
                (mnt / "dir1" / f"c{i}").write_bytes(b"c" * 4096)
            os.unlink(mnt / "dir2" / "f0")
        return box

    boxes: list[str] = []

    def commit(box: str) -> None:
        buf = io.BytesIO()
        store.diff(box, buf)
        buf.seek(0)
        boxes.append(store.apply(buf, image).id)

    def cleanup(box: str) -> None:
        store.remove(boxes.pop())
        store.remove(box)

    changed = {"changed_files": 11}
    pending: list[str] = []

    def prepare(rep: int) -> str:
        pending.append(prepared(rep))
        return pending[-1]

    ctx.run_probes([
        Probe("changes", lambda box: store.changes(box), changed, prepare),
        Probe("commit", commit, changed, lambda _: pending.pop(), cleanup,
              note="docker commit: diff the container layer + apply it as a new image layer"),
    ], reps, label="commit")


def _layers_cow(ctx: Ctx, store: LayerStore, image: str, big: int, reps: int) -> None:
    ctx.step("4 KiB write into a big lower file")
    totals, excl, shared = [], [], []
    for _ in range(reps):
        box = store.create(image).id
        with store.mounted(box) as mnt:
            fd = os.open(mnt / "big.bin", os.O_WRONLY)
            try:
                os.pwrite(fd, b"z" * 4096, big // 2)
            finally:
                os.close(fd)
        os.sync()
        use = store.usage(box)
        totals.append(use.bytes)
        if use.exclusive_bytes is not None:
            excl.append(use.exclusive_bytes)
            shared.append(use.shared_bytes or 0)
        store.remove(box)
    p = {"file": big, "write": 4096}
    ctx.record("cow_layer_bytes", totals, unit="bytes", kind="bytes", params=p,
               note="container layer size after a 4 KiB write into the middle of a lower file")
    if excl:
        ctx.record("cow_exclusive_bytes", excl, unit="bytes", kind="bytes", params=p)
        ctx.record("cow_shared_bytes", shared, unit="bytes", kind="bytes", params=p)


# --- export -------------------------------------------------------------------------------------

def export(ctx: Ctx, *, new_files: int, base_files: int, changed: int, reps: int) -> None:
    """``diff`` of a container layer into a sink, each repetition on a fresh layer.

    Two layers on one image of ``base_files`` files: one that added ``new_files``
    files (100 per new directory), one that rewrote ``changed`` files of the image
    and deleted one. The layer is made and filled untimed, right before the diff,
    as ``docker commit`` finds a container's files; nothing is synced in between,
    so a driver that must flush first (btrfs commits its transaction) pays for it.
    """
    store = ctx.store
    ctx.step(f"applying an image of {base_files} files")
    per_dir = 100
    dirs = [f"img{j}" for j in range(max(1, base_files // per_dir))]
    image = apply_bytes(store, tar_bytes(dirs, {
        f"{dirs[i % len(dirs)]}/f{i}": b"i" * (i % 2048) for i in range(base_files)}), None)

    def with_new_files(_: int) -> str:
        box = store.create(image).id
        with store.mounted(box) as mnt:
            for i in range(new_files):
                d = mnt / f"new{i // per_dir}"
                if i % per_dir == 0:
                    d.mkdir()
                (d / f"f{i}").write_bytes(b"n" * (i % 2048))
        return box

    def with_few_changes(_: int) -> str:
        box = store.create(image).id
        with store.mounted(box) as mnt:
            for i in range(changed):
                k = i * 7919 % base_files
                (mnt / dirs[k % len(dirs)] / f"f{k}").write_bytes(b"changed")
            os.unlink(mnt / dirs[0] / "f0")
        return box

    def diff(box: str) -> None:
        with open(os.devnull, "wb") as sink:
            store.diff(box, sink)

    note = "diff of a fresh container layer to a sink (made and filled untimed just before)"
    ctx.run_probes([
        Probe("export", diff, {"new_files": new_files, "base_files": base_files},
              with_new_files, store.remove, note=note, primary=True),
        Probe("export", diff, {"changed_files": changed + 1, "base_files": base_files},
              with_few_changes, store.remove, note=note),
    ], reps, label="export")


# --- container start ----------------------------------------------------------------------------

BENCH_IMAGE = "layerfs-bench/busybox:1"


def container_start(ctx: Ctx, *, reps: int) -> None:
    """``/bin/true`` in a busybox container: start-to-exit, and the whole cycle."""
    if ctx.docker is not None:
        _docker_start(ctx, reps)
        return
    try:
        from layerfs.runtime import engine
        from layerfs.runtime.spec import ContainerSpec
    except Exception as err:  # the runner is optional: any import failure means "absent"
        raise ScenarioSkip(f"the runner is not usable (layerfs.runtime.engine: "
                           f"{type(err).__name__}: {err})") from err
    from layerfs.testing import images

    try:
        tar = images.busybox_rootfs_tar(ctx.scratch / "busybox.tar", ctx.scratch)
    except images.MissingTool as err:
        raise ScenarioSkip(str(err)) from err
    store = ctx.store
    with open(tar, "rb") as f:
        image = store.apply(f).id
    state = ctx.scratch / "runtime"
    config = engine.RuntimeConfig()
    devnull = os.open(os.devnull, os.O_RDWR)

    def run_true(rootfs: Path) -> None:
        spec = ContainerSpec(rootfs=rootfs, argv=["/bin/true"], network="none")
        c = engine.start(spec, state, config, stdin=devnull, stdout=devnull, stderr=devnull)
        status = c.wait()
        if status.code != 0:
            raise LayerfsError(f"/bin/true exited {status}")

    def prepared(_: int) -> tuple[str, Path]:
        box = store.create(image).id
        return box, store.mount(box)

    def finished(arg: tuple[str, Path]) -> None:
        store.unmount(arg[0])
        store.remove(arg[0])

    def cycle(_: Any) -> None:
        box = store.create(image).id
        try:
            with store.mounted(box) as path:
                run_true(path)
        finally:
            store.remove(box)

    try:
        ctx.step("trial start")
        cycle(None)
    except (LayerfsError, OSError, InvalidArgument) as err:
        os.close(devnull)
        raise ScenarioSkip(f"the runner does not work here: {err}") from err
    try:
        ctx.run_probes([
            Probe("start_to_exit", lambda a: run_true(a[1]), {"argv": "/bin/true"}, prepared,
                  finished, primary=True, note="layerfs runner: start() to wait() returning"),
            Probe("container_cycle", cycle, {"argv": "/bin/true"},
                  note="create + mount the container layer, run, unmount, remove"),
        ], reps, label="start")
    finally:
        os.close(devnull)
        shutil.rmtree(state, ignore_errors=True)


def _docker_start(ctx: Ctx, reps: int) -> None:
    daemon = ctx.docker

    def run(_: Any) -> None:
        daemon.docker("run", "--rm", "--network", "none", BENCH_IMAGE, "true")

    try:
        run(None)
    except LayerfsError as err:
        raise ScenarioSkip(f"docker run failed: {err}") from err
    ctx.run_probes([
        Probe("start_to_exit", run, {"argv": "/bin/true"}, primary=True,
              note="docker run --rm --network none (client to exit)"),
        Probe("container_cycle", run, {"argv": "/bin/true"},
              note="docker run --rm: the same command (it creates and removes the layer)"),
    ], reps, label="docker run")


# --- io-throughput ------------------------------------------------------------------------------

def _read_all(path: Path) -> int:
    """Read a file to its end in 1 MiB reads; returns the bytes read."""
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(MiB)
    total = 0
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return total


def _write_new(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, _CHUNK[:min(left, len(_CHUNK))])
    finally:
        os.close(fd)


class _RandomIO:
    """An open file and a fixed sequence of 4 KiB-aligned offsets, one per call."""

    def __init__(self, path: Path, size: int, ops: int, seed: int, *, write: bool) -> None:
        import random

        rng = random.Random(seed)
        self.offsets = iter([rng.randrange(0, size // 4096) * 4096 for _ in range(ops)])
        self.fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
        self.block = _CHUNK[:4096]

    def read(self) -> None:
        os.pread(self.fd, 4096, next(self.offsets))

    def write(self) -> None:
        os.pwrite(self.fd, self.block, next(self.offsets))

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def _io_target(ctx: Ctx, size: int, reps: int, rand_ops: int) -> Iterator[list[Probe]]:
    """One target's files (a base layer, a container layer on it, mounted) and its probes."""
    store = ctx.store
    ctx.step(f"writing {reps + 2} lower files of {human(size)}")
    base = store.create().id
    with store.mounted(base) as mnt:
        write_file(mnt / "lower.bin", size)
        write_file(mnt / "copied.bin", size)
        (mnt / "cu").mkdir()
        for rep in range(reps):
            write_file(mnt / "cu" / str(rep), size)
    os.sync()
    box = store.create(base).id
    try:
        with store.mounted(box) as mnt:
            _append(mnt / "copied.bin")  # copied up once, untimed: its I/O is measured
            write_file(mnt / "new.bin", size)
            os.sync()
            files = {"lower": mnt / "lower.bin", "copied-up": mnt / "copied.bin",
                     "new": mnt / "new.bin"}
            yield _io_probes(mnt, files, size, rand_ops)
    finally:
        store.remove(box)
        store.remove(base)


def _io_probes(mnt: Path, files: dict[str, Path], size: int, rand_ops: int) -> list[Probe]:
    def cold(path: Path) -> Callable[[int], Path]:
        def setup(rep: int) -> Path:
            drop_caches()
            return path
        return setup

    def warm(path: Path) -> Callable[[int], Path]:
        def setup(rep: int) -> Path:
            _read_all(path)
            return path
        return setup

    def rand(path: Path, write: bool) -> Callable[[int], _RandomIO]:
        return lambda rep: _RandomIO(path, size, rand_ops, rep, write=write)

    probes = [Probe("seq_read", _read_all, {"file": "lower", "cache": "cold", "size": size},
                    cold(files["lower"]), unit="ms",
                    note="read a whole file in 1 MiB reads, page cache dropped first")]
    for name, path in files.items():
        probes.append(Probe("seq_read", _read_all, {"file": name, "cache": "warm", "size": size},
                            warm(path), unit="ms", primary=name == "lower"))
    probes.append(Probe("seq_write", lambda p: _write_new(p, size), {"file": "new", "size": size},
                        lambda rep: mnt / f"w{rep}", lambda p: os.unlink(p), unit="ms",
                        note="write a new file in 1 MiB writes (page cache, no fsync)"))
    for name in ("lower", "copied-up"):
        probes.append(Probe("rand_read_4k", lambda r: r.read(), {"file": name},
                            rand(files[name], False), lambda r: r.close(), unit="us",
                            batch=rand_ops, note="per 4 KiB pread at a random offset"))
    for name in ("copied-up", "new"):
        probes.append(Probe("rand_write_4k", lambda r: r.write(), {"file": name},
                            rand(files[name], True), lambda r: r.close(), unit="us",
                            batch=rand_ops, note="per 4 KiB pwrite at a random offset"))
    probes.append(Probe("copy_up", _append, {"size": size},
                        lambda rep: mnt / "cu" / str(rep), unit="ms",
                        note="first 1-byte append to a lower file: copies it up"))
    return probes


def _joint(ctxs: Sequence[Ctx], reps: int, label: str,
           target: Callable[[Ctx], contextlib.AbstractContextManager[list[Probe]]]) -> None:
    """Set every target up (a target that cannot run the scenario records why), then time
    them together, repetition by repetition."""
    with contextlib.ExitStack() as stack:
        groups: list[tuple[Ctx, list[Probe]]] = []
        for ctx in ctxs:
            try:
                groups.append((ctx, stack.enter_context(target(ctx))))
            except ScenarioSkip as err:
                ctx.skip(str(err))
        run_joint_probes(groups, reps, label=label)


def io_throughput(ctxs: Sequence[Ctx], *, size: int, reps: int, rand_ops: int) -> None:
    """Reads and writes of lower, copied-up and new files; the copy-up itself. Every target
    is measured in the same repetitions (a joint scenario)."""
    _joint(ctxs, reps, "io", lambda ctx: _io_target(ctx, size, reps, rand_ops))


# --- mount ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_fuse_forker() -> Iterator[None]:
    previous = mountlib.set_fuse_forker(None)
    try:
        yield
    finally:
        mountlib.set_fuse_forker(previous)


@contextlib.contextmanager
def _mount_target(ctx: Ctx, image_layers: int) -> Iterator[list[Probe]]:
    store = ctx.store
    chain: list[str] = []
    for i in range(image_layers):
        chain.append(apply_bytes(store, tar_bytes(["etc", f"d{i}"], {f"d{i}/f": b"x\n"}),
                                 chain[-1] if chain else None))
    box = store.create(chain[-1]).id
    params = {"image_layers": image_layers}
    warm_fork = ctx.session.forker is not None

    def cold_mount(layer: str) -> None:
        with _no_fuse_forker():
            store.mount(layer)

    def mounted_box(_: int) -> str:
        store.mount(box)
        return box

    path = "warm-fork" if warm_fork else "driver"
    probes = [Probe("mount", store.mount, {**params, "path": path}, lambda _: box,
                    store.unmount, primary=True),
              Probe("unmount", store.unmount, {**params, "path": path}, mounted_box)]
    if warm_fork:
        probes.append(Probe("mount", cold_mount, {**params, "path": "cold-helper"},
                            lambda _: box, store.unmount,
                            note="the FUSE server started by its helper command"))
    try:
        yield probes
    finally:
        store.remove(box)


def mount(ctxs: Sequence[Ctx], *, image_layers: int, reps: int) -> None:
    """Mount and unmount of a container layer over an image, every target in the same
    repetitions; aufs both from its fork server and through its cold helper command."""
    _joint(ctxs, reps, "mount", lambda ctx: _mount_target(ctx, image_layers))


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
