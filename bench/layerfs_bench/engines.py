"""The ``engines`` scenario: containerd and Docker on their own storage vs on layerfs.

For the target driver X, one layerfs server (the same code ``layerfs daemon``
runs as its engine services) serves X as containerd's proxy snapshotter
``layerfs-X`` and as Docker's graphdriver plugin; beside it run one containerd
(its own ``overlayfs`` snapshotter is the native side) and two private dockerds
(one on its own overlay2, one with ``--storage-driver`` the plugin). Then,
interleaved rep by rep (the machine is noisy: compare within one run):

``ctr run``
    ``ctr run --rm --snapshotter S IMG ID true`` of a busybox image, client to exit.
``ctr image import``
    ``ctr image import --snapshotter S`` of a docker-archive (a rootfs-like
    layer of ``image_mb`` MB in ``image_files`` files); removed again, untimed,
    until containerd's garbage collector has removed its snapshots.
``docker run``
    ``docker run --rm --network none IMG true``.
``docker load``
    ``docker load -i`` of the same archive; ``docker rmi`` untimed.

Each pair gets a third row, ``storage=layerfs÷native``: the ratio of the
medians (issue 18's target: at most 1.2).
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerfs.errors import LayerfsError

from .harness import Ctx, Probe, ScenarioSkip

BUSYBOX = "docker.io/layerfs-bench/busybox:1"
IMAGE = "docker.io/bench/image:1"


def engines(ctx: Ctx, *, reps: int, image_mb: int, image_files: int) -> None:
    if ctx.docker is not None:
        raise ScenarioSkip("measured per layerfs driver (the Docker column has no plugin)")
    from layerfs.testing import images

    from .engine_peers import ContainerdDaemon, EngineServer
    from .image_load import prepare
    from .peers import DockerDaemon

    reason = ContainerdDaemon.unavailable() or DockerDaemon.unavailable()
    if reason:
        raise ScenarioSkip(reason)
    driver = ctx.target.driver
    tag = secrets.token_hex(3)
    # Short: sockets (the server's, dockerd's containerd's) must fit in 108 bytes.
    short = Path("/tmp") / f"lfs-be-{tag}"
    short.mkdir()
    stack: list[Callable[[], None]] = []
    try:
        ctx.step("images")
        try:
            images.busybox_image_tar(ctx.scratch / "busybox.tar", ctx.scratch, name=BUSYBOX)
        except images.MissingTool as err:
            raise ScenarioSkip(str(err)) from err
        archive = prepare(ctx.scratch / "import", image_mb, image_files).image_tar

        ctx.step(f"layerfs server for {driver}")
        server = EngineServer(ctx.session.roots_dir / f"engines-{tag}", driver,
                              options=list(ctx.target.options), log_path=ctx.scratch / "server.log",
                              snapshotter_socket=short / "snapshots.sock",
                              docker_plugin=f"layerfs-{driver}-{tag}").start()
        stack.append(server.stop)
        ctx.step("containerd")
        plugin = f"layerfs-{driver}"
        assert server.snapshotter_socket is not None and server.docker_plugin is not None
        containerd = ContainerdDaemon(short / "containerd",
                                      proxy_snapshotters={plugin: server.snapshotter_socket})
        stack.append(containerd.remove_data)
        stack.append(containerd.start().stop)
        ctx.step("dockerd on overlay2 and on the plugin")
        native = DockerDaemon(short / "dn")
        stack.append(native.remove_data)
        stack.append(native.start().stop)
        on_layerfs = DockerDaemon(short / "dl", storage_driver=server.docker_plugin,
                                  extra_args=("--experimental",))
        stack.append(on_layerfs.remove_data)
        stack.append(on_layerfs.start().stop)

        for snapshotter in ("overlayfs", plugin):
            containerd.ctr("image", "import", "--snapshotter", snapshotter,
                           str(ctx.scratch / "busybox.tar"))
        for daemon in (native, on_layerfs):
            daemon.docker("load", "-i", str(ctx.scratch / "busybox.tar"))

        runs = iter(range(1 << 30))

        def ctr_run(snapshotter: str) -> Callable[[Any], None]:
            def op(_: Any) -> None:
                containerd.ctr("run", "--rm", "--snapshotter", snapshotter, BUSYBOX,
                               f"bench-{tag}-{next(runs)}", "true")
            return op

        def ctr_import(snapshotter: str) -> Callable[[Any], None]:
            def op(_: Any) -> None:
                containerd.ctr("image", "import", "--snapshotter", snapshotter, str(archive))
            return op

        def ctr_forget(snapshotter: str) -> Callable[[Any], None]:
            def after(_: Any) -> None:
                containerd.ctr("image", "rm", "--sync", IMAGE)
                wait_for_gc(containerd, snapshotter)
            return after

        def docker_run(daemon: DockerDaemon) -> Callable[[Any], object]:
            return lambda _: daemon.docker("run", "--rm", "--network", "none", BUSYBOX, "true")

        def docker_load(daemon: DockerDaemon) -> Callable[[Any], object]:
            return lambda _: daemon.docker("load", "-q", "-i", str(archive))

        def docker_forget(daemon: DockerDaemon) -> Callable[[Any], None]:
            def after(_: Any) -> None:
                daemon.docker("rmi", IMAGE.removeprefix("docker.io/"))
            return after

        sides = {"native": ("overlayfs", native), "layerfs": (plugin, on_layerfs)}
        probes = []
        for side, (snapshotter, daemon) in sides.items():
            probes += [
                Probe("ctr run", ctr_run(snapshotter), {"storage": side},
                      note=f"ctr run --rm --snapshotter {snapshotter} busybox true"),
                Probe("ctr image import", ctr_import(snapshotter), {"storage": side},
                      after=ctr_forget(snapshotter),
                      note=f"ctr image import --snapshotter {snapshotter}, {image_mb} MB"),
                Probe("docker run", docker_run(daemon), {"storage": side},
                      note=f"docker run --rm --network none busybox true "
                           f"({daemon.storage_driver})"),
                Probe("docker load", docker_load(daemon), {"storage": side},
                      after=docker_forget(daemon),
                      note=f"docker load -i, {image_mb} MB ({daemon.storage_driver})"),
            ]
        ctx.step("trial round")
        for p in probes:  # one untimed round: warm caches, and fail early
            p.op(None)
            if p.after is not None:
                p.after(None)
        samples = ctx.run_probes(probes, reps, label="engines")
        for metric in ("ctr run", "ctr image import", "docker run", "docker load"):
            medians = {side: _median(samples[f"{metric}{[('storage', side)]}"]) for side in sides}
            ctx.record(metric, [medians["layerfs"] / medians["native"]], unit="x",
                       kind="ratio", params={"storage": "layerfs÷native"},
                       note="median on layerfs over median on the engine's own storage")
    except LayerfsError as err:
        raise ScenarioSkip(f"an engine failed: {err}") from err
    finally:
        for undo in reversed(stack):
            try:
                undo()
            except Exception as err:  # keep tearing down; report the first failure
                ctx.step(f"teardown: {err}")
        shutil.rmtree(short, ignore_errors=True)


def wait_for_gc(containerd: Any, snapshotter: str, timeout: float = 60) -> None:
    """Wait until containerd's garbage collector removed the imported image's snapshots
    (only busybox's one layer stays)."""
    deadline = time.monotonic() + timeout
    while True:
        listing = containerd.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout
        if len(listing.splitlines()) <= 2:  # header + busybox
            return
        if time.monotonic() > deadline:
            raise LayerfsError(f"{snapshotter}: snapshots not collected after {timeout:.0f} s")
        time.sleep(0.05)


def _median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values))
