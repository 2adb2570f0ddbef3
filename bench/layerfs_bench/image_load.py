"""Image load speed: ``layerfs load`` (overlay2) vs ``docker load`` / ``docker import`` vs
GNU ``tar -x``, all of the same ~100 MB single-layer image.

Run as root: ``.venv/bin/python -m layerfs_bench.image_load [--size-mb 100] [--files 4000]
[--runs 5] [--json]``. Everything lives under ``/tmp/lfs-images/bench`` (one
filesystem for all contenders) and is removed at the end; the private dockerd
is stopped and the host's ip_forward / FORWARD policy restored.

What is timed, each on a fresh target, caches warm, untimed ``sync`` between:

``layerfs load (lib)``
    :meth:`ImageStore.load` of the ``docker save``-format archive in-process
    (open of the root not timed): verify both digests, record the tar-split,
    apply into overlay2.
``layerfs load (cli)``
    ``layerfs load -q -i`` as a process: the same plus Python start-up.
``docker load``
    ``docker load -i`` of the same archive (Docker 20.10, overlay2).
``docker import``
    ``docker import`` of the layer tar itself.
``tar -x``
    GNU tar extracting the layer tar into an empty directory (the floor).

The contenders are interleaved (A B C D E, A B C D E, ...) because the host's
speed drifts; the table reports medians and ratios within this one run. The
goals for layerfs are ≤ 1.0× ``docker load`` and ≤ 1.3× ``tar -x``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .harness import Contender, interleave, print_comparison, remove_tree

SCRATCH = Path("/tmp/lfs-images/bench")
# One path for every contender that writes into the scratch filesystem: ext4 puts a new
# directory in a block group of its choosing, and on an aged filesystem the same 100 MB
# extract measured 0.2 s in one directory and 2.9 s in its sibling (allocator time, all
# sys). Reusing one path keeps that out of the ratios; absolute times still vary.
TARGET = "target"


@dataclass
class Inputs:
    layer_tar: Path
    image_tar: Path
    size: int
    files: int


def make_tree(dest: Path, size_mb: int, files: int, seed: int = 7) -> int:
    """A rootfs-like tree: busybox plus ``files`` files of mixed sizes (a few big ones,
    many small, like /usr) totalling about ``size_mb`` MB. Deterministic. Returns bytes."""
    from layerfs.testing.images import FIXED_MTIME, busybox_rootfs

    busybox_rootfs(dest)
    rng = random.Random(seed)
    budget = size_mb << 20
    big = [budget // 8, budget // 10, budget // 16, budget // 20]
    rest = budget - sum(big)
    weights = [rng.paretovariate(1.2) for _ in range(files - len(big))]
    scale = rest / sum(weights)
    sizes = big + [max(0, int(w * scale)) for w in weights]
    total = 0
    blob = rng.randbytes(max(sizes) + 4096)
    for i, size in enumerate(sizes):
        d = dest / "usr" / f"lib{i // 500}" / f"pkg{i // 25}"  # ~25 files a directory
        d.mkdir(parents=True, exist_ok=True)
        off = rng.randrange(0, 4096)
        path = d / f"file{i}.so"
        path.write_bytes(blob[off:off + size])
        total += size
    for p in [dest, *dest.rglob("*")]:
        os.utime(p, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    return total


def prepare(scratch: Path, size_mb: int, files: int) -> Inputs:
    from layerfs.testing.images import build_image, tar_tree

    scratch.mkdir(parents=True, exist_ok=True)
    tree = scratch / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    make_tree(tree, size_mb, files)
    layer = scratch / "layer.tar"
    tar_tree(tree, layer)
    shutil.rmtree(tree)
    image = scratch / "image.tar"
    # The layer tar is not read into memory twice: build_image takes bytes, fine at 100 MB.
    build_image(image, [layer.read_bytes()], name="bench/image:1", cmd=["/bin/sh"])
    return Inputs(layer, image, layer.stat().st_size, files)


def _sync() -> None:
    os.sync()


def contenders(inputs: Inputs, scratch: Path, daemon: object | None) -> list[Contender]:
    from layerfs.images import ImageStore

    def layerfs_lib() -> float:
        root = scratch / TARGET
        remove_tree(root)
        with ImageStore.open(root, "overlay2") as images:
            _sync()
            t0 = time.perf_counter()
            images.load(inputs.image_tar)
            elapsed = time.perf_counter() - t0
            images.layers.wipe()
        remove_tree(root)
        return elapsed

    def layerfs_cli() -> float:
        root = scratch / TARGET
        remove_tree(root)
        _sync()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                        "overlay2", "load", "-q", "-i", str(inputs.image_tar)], check=True,
                       stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t0
        with ImageStore.open(root, "overlay2") as images:
            images.layers.wipe()
        remove_tree(root)
        return elapsed

    def tar_x() -> float:
        target = scratch / TARGET
        remove_tree(target)
        target.mkdir()
        _sync()
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", str(inputs.layer_tar), "-C", str(target)], check=True)
        elapsed = time.perf_counter() - t0
        remove_tree(target)
        return elapsed

    out = [Contender("layerfs load (lib)", layerfs_lib),
           Contender("layerfs load (cli)", layerfs_cli)]
    if daemon is not None:
        from .peers import DockerDaemon

        assert isinstance(daemon, DockerDaemon)

        def docker_load() -> float:
            _sync()
            t0 = time.perf_counter()
            daemon.docker("load", "-q", "-i", str(inputs.image_tar))
            elapsed = time.perf_counter() - t0
            daemon.docker("rmi", "-f", "bench/image:1")
            daemon.docker("image", "prune", "-f")
            return elapsed

        def docker_import() -> float:
            _sync()
            t0 = time.perf_counter()
            daemon.docker("import", str(inputs.layer_tar), "bench/imported:1")
            elapsed = time.perf_counter() - t0
            daemon.docker("rmi", "-f", "bench/imported:1")
            return elapsed

        out += [Contender("docker load", docker_load), Contender("docker import", docker_import)]
    out.append(Contender("tar -x", tar_x))
    return out


def run(size_mb: int = 100, files: int = 4000, runs: int = 5, *, docker: bool = True,
        scratch: Path = SCRATCH, progress: Callable[[str], None] | None = None,
        ) -> dict[str, object]:
    """Measure and return ``{"params": ..., "results": {name: {"median": s, "runs": [...]}},
    "ratios": {...}}``. Nothing is asserted."""
    from .peers import DockerDaemon

    say = progress or (lambda _msg: None)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        say(f"building a {size_mb} MB image of {files} files")
        inputs = prepare(scratch / "inputs", size_mb, files)
        daemon = None
        reason = DockerDaemon.unavailable() if docker else "disabled (--no-docker)"
        if reason is None:
            daemon = DockerDaemon(scratch / "docker")
            daemon.start()
        try:
            results = interleave(contenders(inputs, scratch, daemon), runs, say)
        finally:
            if daemon is not None:
                daemon.stop()
                daemon.remove_data()
        lib = results["layerfs load (lib)"]["median"]
        cli = results["layerfs load (cli)"]["median"]
        ratios: dict[str, float] = {}
        for peer in ("docker load", "docker import", "tar -x"):
            if peer in results:
                ratios[f"lib / {peer}"] = lib / results[peer]["median"]
                ratios[f"cli / {peer}"] = cli / results[peer]["median"]
        return {
            "params": {"size_bytes": inputs.size, "files": files, "runs": runs,
                       "kernel": platform.release(), "docker": reason or "20.10 overlay2"},
            "results": results, "ratios": ratios,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerfs_bench.image_load",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-docker", action="store_true", help="skip the Docker rows")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console(stderr=True)
    data = run(args.size_mb, args.files, args.runs, docker=not args.no_docker,
               progress=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    params, results, ratios = data["params"], data["results"], data["ratios"]
    assert isinstance(params, dict) and isinstance(results, dict) and isinstance(ratios, dict)
    print_comparison(f"loading a {params['size_bytes'] / 1e6:.0f} MB single-layer image "
                     f"({params['files']} files), medians of {params['runs']} interleaved runs",
                     results, ratios, {"lib / docker load": 1.0, "lib / tar -x": 1.3},
                     "≤ 1.0× docker load, ≤ 1.3× tar -x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
