"""The copy-on-write scenarios (see :mod:`.scenarios`): *copy-up* (the first
write, fsync and chmod of a lower file, against file size) and *whiteout*
(deleting lower files and directories, readdir and stat around whiteouts,
opaque directories). Both measure what a change to a lower file costs in the
container layer."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from layerfs.errors import LayerfsError
from layerfs.layers import LayerStore

from .harness import Ctx, Probe
from .scenarios_common import MiB, append_byte, append_byte_fsync, now_ns, stat_maybe, write_file

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
    t0 = now_ns()
    box = store.create(base).id
    create_ms = (now_ns() - t0) / 1e6
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
                    pair = [Probe("first_write", append_byte, p, where, primary=size == largest),
                            Probe("second_write", append_byte, p, where)]
                elif variant == "fsync":
                    pair = [Probe("first_write_fsync", append_byte_fsync, p, where),
                            Probe("second_write_fsync", append_byte_fsync, p, where)]
                else:
                    p = {"size": size, "metacopy": metacopy}
                    pair = [Probe("first_chmod", lambda f: os.chmod(f, 0o600), p, where),
                            Probe("second_chmod", lambda f: os.chmod(f, 0o640), p, where)]
                groups.setdefault(nreps(size), []).extend(pair)
        for n, probes in groups.items():
            ctx.run_probes(probes, n, label="copy-up" + (" (metacopy)" if metacopy else ""))
    store.remove(box)
    store.remove(base)


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
        ctx.run_probes([Probe("stat_deleted", stat_maybe, {"whiteouts": n},
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

