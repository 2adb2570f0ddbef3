"""The layer scenarios (see :mod:`.scenarios`): *layers* (applying image layers,
the container layer's lifecycle against stack depth, commit, space per layer,
copy-on-write bytes) and *export* (``layer diff`` of a container layer to a
sink). What the driver costs outside of any running container."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

from layerfs.layers import LayerStore

from .harness import Ctx, Probe
from .scenarios_common import CHUNK, apply_bytes, max_stack, now_ns, tar_bytes

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
        t0 = now_ns()
        chain.append(apply_bytes(store, data, chain[-1] if chain else None))
        apply_ms.append((now_ns() - t0) / 1e6)
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
    files["big.bin"] = CHUNK[:big] if big <= len(CHUNK) else CHUNK * (big // len(CHUNK))
    base = apply_bytes(store, tar_bytes(dirs, files), None)
    ids = [base]
    apply_ms = []
    for k in range(image_layers):
        data = tar_bytes([], {"dir0/f0": f"v{k}\n".encode() * 100,
                              f"dir{k % base_dirs}/new{k}": b"n" * 1024})
        t0 = now_ns()
        ids.append(apply_bytes(store, data, ids[-1]))
        apply_ms.append((now_ns() - t0) / 1e6)
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

