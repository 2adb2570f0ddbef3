"""Pull speed: ``layerfs pull`` (overlay2) vs ``docker pull`` of the same ~100 MB image
from the same local registry, in one run.

Run as root: ``.venv/bin/python -m layerfs_bench.pull_speed [--size-mb 100] [--files 4000]
[--runs 5] [--json]``. Everything lives under ``/tmp/lfs-reg/bench`` (one filesystem
for all contenders) and is removed at the end; the registry and the private dockerd
are stopped by pid, and the host's ip_forward / FORWARD policy restored.

Setup (not timed): the image of :mod:`layerfs_bench.image_load` (busybox plus ~4000
files of mixed sizes, random bytes, one layer) is loaded into a private dockerd and
``docker push``ed to Debian's ``docker-registry`` (Distribution 2.8, plain HTTP on
127.0.0.1), so both contenders pull the very same manifest and gzip blob as Docker
wrote them.

What is timed, each into an empty store, caches warm, untimed ``sync`` between:

``layerfs pull (lib)``
    :func:`layerfs.distribution.pull` in-process (opening the root not timed):
    download (parallel, staged), verify blob and diff id, record the tar-split,
    apply into overlay2 while the blob is still arriving.
``layerfs pull (cli)``
    ``layerfs pull -q --insecure`` as a process: the same plus Python start-up.
``docker pull``
    ``docker pull -q`` (Docker 20.10, overlay2), after ``docker rmi`` + prune.

The contenders are interleaved (A B C, A B C, ...) because the host's speed drifts;
the table reports medians and the ratios within this one run. The goal for layerfs
is ≤ 1.0× ``docker pull``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .harness import Contender, interleave, print_comparison, remove_tree

SCRATCH = Path("/tmp/lfs-reg/bench")
REPO = "bench/pull"


def contenders(ref: str, scratch: Path, daemon: object) -> list[Contender]:
    from layerfs.distribution import RegistryOptions, pull
    from layerfs.images import ImageStore

    from .peers import DockerDaemon

    assert isinstance(daemon, DockerDaemon)
    options = RegistryOptions(insecure=True)

    def layerfs_lib() -> float:
        root = scratch / "lfs-root"
        remove_tree(root)
        with ImageStore.open(root, "overlay2") as images:
            os.sync()
            t0 = time.perf_counter()
            pull(images, ref, options=options)
            elapsed = time.perf_counter() - t0
            images.layers.wipe()
        remove_tree(root)
        return elapsed

    def layerfs_cli() -> float:
        root = scratch / "lfs-root-cli"
        remove_tree(root)
        os.sync()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "layerfs", "--root", str(root), "--driver",
                        "overlay2", "pull", "-q", "--insecure", ref], check=True,
                       stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - t0
        with ImageStore.open(root, "overlay2") as images:
            images.layers.wipe()
        remove_tree(root)
        return elapsed

    def docker_pull() -> float:
        os.sync()
        t0 = time.perf_counter()
        daemon.docker("pull", "-q", ref)
        elapsed = time.perf_counter() - t0
        daemon.docker("rmi", "-f", ref)
        daemon.docker("image", "prune", "-f")
        return elapsed

    return [Contender("layerfs pull (lib)", layerfs_lib),
            Contender("layerfs pull (cli)", layerfs_cli),
            Contender("docker pull", docker_pull)]


def run(size_mb: int = 100, files: int = 4000, runs: int = 5, *, scratch: Path = SCRATCH,
        progress: Callable[[str], None] | None = None) -> dict[str, object]:
    """Measure and return ``{"params", "results": {name: {"median", "runs"}}, "ratios"}``.
    Nothing is asserted."""
    # The registry under test is test tooling (run this from a layerfs checkout).
    from tests.support.registry import Distribution, unavailable

    from .image_load import prepare
    from .peers import DockerDaemon

    say = progress or (lambda _msg: None)
    reason = unavailable() or DockerDaemon.unavailable()
    if reason:
        raise SystemExit(f"pull_speed: {reason}")
    remove_tree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    registry = Distribution(scratch / "registry")
    daemon: DockerDaemon | None = None
    try:
        say(f"building a {size_mb} MB image of {files} files")
        inputs = prepare(scratch / "inputs", size_mb, files)
        registry.start()
        ref = f"{registry.host}/{REPO}:1"
        daemon = DockerDaemon(scratch / "docker",
                              extra_args=("--insecure-registry", registry.host))
        daemon.start()
        say(f"docker load + docker push to {ref}")
        daemon.docker("load", "-q", "-i", str(inputs.image_tar))
        daemon.docker("tag", "bench/image:1", ref)
        daemon.docker("push", ref)
        daemon.docker("rmi", "-f", "bench/image:1", ref)
        daemon.docker("image", "prune", "-f")
        remove_tree(scratch / "inputs")
        blobs = registry.storage / "docker/registry/v2/blobs"
        blob_bytes = sum(p.stat().st_size for p in blobs.rglob("data"))
        results = interleave(contenders(ref, scratch, daemon), runs, say)
    finally:
        if daemon is not None:
            daemon.stop()
            daemon.remove_data()
        registry.stop()
        remove_tree(scratch)
    docker = results["docker pull"]["median"]
    ratios = {f"{name} / docker pull": r["median"] / docker
              for name, r in results.items() if name != "docker pull"}
    return {
        "params": {"size_bytes": inputs.size, "blob_bytes": blob_bytes, "files": files,
                   "runs": runs, "kernel": platform.release(), "cpus": os.cpu_count(),
                   "docker": getattr(daemon, "version", "?"),
                   "registry": "docker-registry (Distribution 2.8), plain HTTP, 127.0.0.1"},
        "results": results, "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerfs_bench.pull_speed",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console(stderr=True)
    data = run(args.size_mb, args.files, args.runs,
               progress=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    params, results, ratios = data["params"], data["results"], data["ratios"]
    assert isinstance(params, dict) and isinstance(results, dict) and isinstance(ratios, dict)
    print_comparison(f"pulling a {params['size_bytes'] / 1e6:.0f} MB single-layer image "
                     f"({params['files']} files, {params['blob_bytes'] / 1e6:.0f} MB of "
                     f"blobs) from a local registry, medians of {params['runs']} "
                     f"interleaved runs", results, ratios, dict.fromkeys(ratios, 1.0),
                     "≤ 1.0× docker pull")
    return 0


if __name__ == "__main__":
    sys.exit(main())
