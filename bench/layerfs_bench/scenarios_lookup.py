"""The *stat-lookup* scenario (see :mod:`.scenarios`): ``stat()`` of a path of D
components through L layers -- top, bottom and missing; right after mounting,
cold and warm -- and, on the aufs FUSE union, the backing lookups it counted
next to the L x D prediction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from layerfs.layers import LayerStore

from .harness import Ctx, Probe, ScenarioSkip, drop_caches
from .scenarios_common import (
    apply_bytes,
    max_stack,
    stat_arg,
    stat_maybe,
    tar_bytes,
    union_counters,
)

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
                    "stat", stat_arg, params, _counted_setup(mnt, position, depth, counting),
                    _counted_after(mnt, seen[(position, depth)]) if counting else None,
                    unit="us"))
        ctx.run_probes(probes, reps, label=f"stat L={n} {phase}")
        _check_stat_tree(mnt, depths)
        if counting:
            for (position, depth), deltas in seen.items():
                _record_counts(ctx, deltas, n, depth, position, phase)
        if warm_batch:
            warm = [Probe("stat", stat_maybe,
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
        stat_maybe(path)
        return path
    return setup

