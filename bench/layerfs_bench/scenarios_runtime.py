"""The scenarios that run things (see :mod:`.scenarios`): *container-start*
(start-to-exit of ``/bin/true`` with the layerfs runner, ``docker run`` as a
peer), *io-throughput* (the data path of lower, copied-up and new files) and
*mount* (a container layer's mount and unmount; the aufs FUSE union from a warm
fork server and from its cold command). The last two are joint: every target
is timed in the same repetitions."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from layerfs import mount as mountlib
from layerfs.errors import InvalidArgument, LayerfsError

from .harness import Ctx, Probe, ScenarioSkip, drop_caches, run_joint_probes
from .scenarios_common import CHUNK, MiB, append_byte, apply_bytes, human, tar_bytes, write_file

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
            left -= os.write(fd, CHUNK[:min(left, len(CHUNK))])
    finally:
        os.close(fd)


class _RandomIO:
    """An open file and a fixed sequence of 4 KiB-aligned offsets, one per call."""

    def __init__(self, path: Path, size: int, ops: int, seed: int, *, write: bool) -> None:
        import random

        rng = random.Random(seed)
        self.offsets = iter([rng.randrange(0, size // 4096) * 4096 for _ in range(ops)])
        self.fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
        self.block = CHUNK[:4096]

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
            append_byte(mnt / "copied.bin")  # copied up once, untimed: its I/O is measured
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
    probes.append(Probe("copy_up", append_byte, {"size": size},
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

