"""Start-to-exit latency of ``layerfs run --rm IMG true`` against runc, crun and Docker.

::

    python -m layerfs_bench.start_latency [--rounds 20] [--no-docker] [--no-crun] [--json FILE]

Every subject runs ``true`` in the same busybox image (built from busybox-static,
nothing downloaded), with no network, and is timed from spawn to exit, in
interleaved rounds (A B C ... A B C ...; the machine is noisy, MACHINE.md): only
medians and ratios *within one run* mean something.

* ``layerfs run`` — the ``layerfs`` console script, overlay2, ``--network none``:
  with Python's bytecode cache (``PYTHONDONTWRITEBYTECODE`` unset, cache under the
  scratch folder) and without it (everything compiled from source on every start,
  as with ``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__``).
* ``python -m layerfs.cli.run run`` — the runner's commands alone, without the
  rest of the CLI (no rich); the start path ``layerfs run`` could have.
* ``ContainerManager.run`` in this (warm) process — the library: layer, mount,
  engine start and wait, unmount, removal. And the engine alone on an unpacked
  rootfs directory (``runtime.start`` + ``wait``), for the storage's share; and
  once more without the seccomp filter and with the caller's descriptors handed
  over instead of relayed (docs/security.md: what the hardening costs).
* ``runc run`` of a prepared bundle (``runc spec``, args ``true``, its own network
  namespace: only ``lo``), ``crun run`` of the same bundle (crun refuses this VM's
  hybrid cgroup layout, so it runs in a private mount namespace without
  /sys/fs/cgroup/unified: a helper in that namespace times it), and
  ``docker run --rm --network none`` of the same image on a private dockerd
  (:class:`layerfs_bench.peers.DockerDaemon`).
* ``python -c pass`` — the interpreter alone, for scale.

Goals (issue 8): ``layerfs run`` ≤ 1.5× ``runc run`` and ≤ 0.2× ``docker run``.
Everything the benchmark creates (root, cgroup parent ``lfsb<hex>``, bundle,
dockerd data) is under ``/tmp/lfs-run/bench-<hex>`` or named by that tag, and
removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCRATCH = Path("/tmp/lfs-run")

_CRUN_HELPER = r"""
import os, subprocess, sys, time
subprocess.run(["umount", "/sys/fs/cgroup/unified"], check=False, capture_output=True)
null = open(os.devnull, "wb")
argv = sys.argv[1:]
for line in sys.stdin:
    t = time.perf_counter()
    rc = subprocess.run(argv, stdout=null, stderr=subprocess.STDOUT).returncode
    print(f"{time.perf_counter() - t:.9f} {rc}", flush=True)
"""


class Subject:
    """One thing to time: ``run()`` returns seconds (and raises if it failed)."""

    def __init__(self, label: str, run: Callable[[], float], group: str) -> None:
        self.label = label
        self.run = run
        self.group = group
        self.samples: list[float] = []


def _timed(argv: list[str], env: dict[str, str] | None = None) -> Callable[[], float]:
    def run() -> float:
        t = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        dt = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace')[-500:]}")
        return dt
    return run


class CrunHelper:
    """A process in a private mount namespace (no cgroup2 mount) that times ``crun run``."""

    def __init__(self, bundle: Path, cid: str) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c",
             _CRUN_HELPER, "crun", "run", "--bundle", str(bundle), cid],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[1] != "0":
            raise RuntimeError(f"crun run failed: {line}")
        return float(line[0])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("layerfs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "layerfs"]


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"n": len(ordered), "median_ms": 1000 * statistics.median(ordered),
            "min_ms": 1000 * ordered[0],
            "p90_ms": 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerfs_bench.start_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument("--no-crun", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="write the results here too")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, cgroups, mounts)")

    from layerfs.layers import LayerStore
    from layerfs.runtime import ContainerSpec, RuntimeConfig
    from layerfs.runtime import start as engine_start
    from layerfs.runtime import state as records
    from layerfs.runtime.containers import ContainerManager
    from layerfs.testing import images as timg

    from .peers import DockerDaemon

    tag = "lfsb" + os.urandom(3).hex()
    base = SCRATCH / f"bench-{tag}"
    base.mkdir(parents=True)
    root = base / "root"
    pycache = base / "pycache"
    nocache = base / "pycache-empty"
    nocache.mkdir()
    config = RuntimeConfig(cgroup_parent=tag)
    cleanups: list[Callable[[], None]] = []
    null = os.open(os.devnull, os.O_RDWR)
    sink_r, sink_w = os.pipe()
    threading.Thread(target=_drain, args=(sink_r,), daemon=True).start()
    try:
        # --- the image, a layerfs root, a runc bundle --------------------------------------------
        built = timg.busybox_image_tar(base / "busybox.tar", base)
        mgr = ContainerManager(root, "overlay2", config=config)
        cleanups.append(mgr.close)
        mgr.images.load(built.path)
        bundle = base / "bundle"
        (bundle / "rootfs").mkdir(parents=True)
        with tarfile.open(built.path) as tar:
            listing = tar.extractfile("manifest.json")
            assert listing is not None
            manifest = json.load(listing)
            layer = tar.extractfile(manifest[0]["Layers"][0])
            assert layer is not None
            with tarfile.open(fileobj=layer) as lt:
                lt.extractall(bundle / "rootfs", filter="fully_trusted")
        subprocess.run(["runc", "spec"], cwd=bundle, check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"]["args"] = ["true"]
        spec["process"]["terminal"] = False
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))

        # --- environments for the CLI: with and without a bytecode cache ------------------------
        env_cached = dict(os.environ, PYTHONPYCACHEPREFIX=str(pycache), LAYERFS_CGROUP_PARENT=tag)
        env_cached.pop("PYTHONDONTWRITEBYTECODE", None)
        env_source = dict(env_cached, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(nocache))
        for key in ("LAYERFS_ROOT", "LAYERFS_DRIVER", "LAYERFS_STORAGE_OPTS"):
            env_cached.pop(key, None)
            env_source.pop(key, None)
        cli = [*_console_script(), "--root", str(root), "run", "--rm", "--network", "none",
               "busybox", "true"]
        lean = [sys.executable, "-m", "layerfs.cli.run", "--root", str(root), "run", "--rm",
                "--network", "none", "busybox", "true"]

        def api() -> float:
            t = time.perf_counter()
            c = mgr.run("busybox", ["true"], network="none", auto_remove=True, stdin=null,
                        stdout=null, stderr=null)
            status = c.wait()
            dt = time.perf_counter() - t
            if status.code != 0:
                raise RuntimeError(f"ContainerManager.run: {status}")
            return dt

        engine_state = base / "engine-state"

        def engine_only(hardened: bool = True) -> float:
            # stdout is a pipe of ours (as for a caller whose output is piped), so the
            # relay has something to relay.
            s = ContainerSpec(rootfs=bundle / "rootfs", argv=["true"], network="none",
                              seccomp="default" if hardened else "unconfined")
            t = time.perf_counter()
            c = engine_start(s, engine_state, config, stdin=null, stdout=sink_w, stderr=sink_w,
                             passthrough=not hardened)
            status = c.wait()
            dt = time.perf_counter() - t
            records.remove(engine_state, s.id)
            if status.code != 0:
                raise RuntimeError(f"runtime.start: {status}")
            return dt

        subjects = [
            Subject("runc run (prepared bundle)",
                    _timed(["runc", "run", "--bundle", str(bundle), f"{tag}-runc"]), "peer"),
            Subject("layerfs run --rm (bytecode cache)", _timed(cli, env_cached), "cli"),
            Subject("layerfs run --rm (no bytecode cache)", _timed(cli, env_source), "cli"),
            Subject("python -m layerfs.cli.run run --rm (cache)", _timed(lean, env_cached),
                    "cli"),
            Subject("python -m layerfs.cli.run run --rm (no cache)", _timed(lean, env_source),
                    "cli"),
            Subject("ContainerManager.run + wait (in process)", api, "api"),
            Subject("runtime.start + wait, unpacked rootfs (in process)", engine_only, "api"),
            Subject("  same, seccomp=unconfined and stdio passthrough",
                    lambda: engine_only(hardened=False), "api"),
            Subject("python -c pass (cache)", _timed([sys.executable, "-c", "pass"], env_cached),
                    "scale"),
        ]
        if not args.no_crun and shutil.which("crun"):
            helper = CrunHelper(bundle, f"{tag}-crun")
            cleanups.append(helper.close)
            subjects.insert(1, Subject("crun run (same bundle)", helper, "peer"))
        docker_note = None
        if not args.no_docker:
            reason = DockerDaemon.unavailable()
            if reason:
                docker_note = f"docker skipped: {reason}"
            else:
                daemon = DockerDaemon(base / "docker")
                cleanups.append(daemon.remove_data)
                cleanups.append(daemon.stop)
                daemon.start()
                daemon.docker("load", "-i", str(built.path))
                argv_docker = [*_docker_argv(daemon), "run", "--rm", "--network", "none",
                               "busybox:latest", "true"]
                subjects.append(Subject("docker run --rm --network none", _timed(
                    argv_docker, daemon._env), "peer"))

        # --- rounds ------------------------------------------------------------------------------
        total = args.warmup + args.rounds
        for i in range(total):
            for s in subjects:
                dt = s.run()
                if i >= args.warmup:
                    s.samples.append(dt)
            sys.stderr.write(f"\rround {i + 1}/{total}")
            sys.stderr.flush()
        sys.stderr.write("\n")

        # --- report ------------------------------------------------------------------------------
        results = {s.label: _summary(s.samples) for s in subjects}
        runc = results["runc run (prepared bundle)"]["median_ms"]
        docker = results.get("docker run --rm --network none", {}).get("median_ms")
        print(f"start-to-exit of `true`, busybox, no network: medians of {args.rounds} "
              f"interleaved rounds ({args.warmup} warm-up)")
        print(f"{'':56s} {'median':>9s} {'min':>8s} {'p90':>8s} {'x runc':>7s} {'x docker':>9s}")
        for s in subjects:
            r = results[s.label]
            xd = f"{r['median_ms'] / docker:9.3f}" if docker else f"{'-':>9s}"
            print(f"{s.label:56s} {r['median_ms']:7.1f}ms {r['min_ms']:6.1f}ms "
                  f"{r['p90_ms']:6.1f}ms {r['median_ms'] / runc:7.2f} {xd}")
        if docker_note:
            print(docker_note)
        cli_ms = results["layerfs run --rm (bytecode cache)"]["median_ms"]
        print(f"\ngoal: layerfs run <= 1.5x runc: {cli_ms / runc:.2f}x "
              f"({'met' if cli_ms <= 1.5 * runc else 'NOT met'})")
        if docker:
            print(f"goal: layerfs run <= 0.2x docker run: {cli_ms / docker:.3f}x "
                  f"({'met' if cli_ms <= 0.2 * docker else 'NOT met'})")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "rounds": args.rounds, "warmup": args.warmup, "kernel": os.uname().release,
                "python": sys.version.split()[0], "results": results,
                "ratios_to_runc": {k: v["median_ms"] / runc for k, v in results.items()},
                "ratios_to_docker": {k: v["median_ms"] / docker for k, v in results.items()}
                if docker else None}, indent=2) + "\n")
        return 0
    finally:
        os.close(null)
        os.close(sink_w)
        for fn in reversed(cleanups):
            with contextlib.suppress(Exception):
                fn()
        with contextlib.suppress(Exception), LayerStore.open(root, "overlay2") as store:
            store.wipe()
        _remove_cgroup_parent(tag)
        shutil.rmtree(base, ignore_errors=True)


def _drain(fd: int) -> None:
    while os.read(fd, 65536):
        pass


def _docker_argv(daemon: Any) -> list[str]:
    from .peers import docker_client

    return [docker_client(), "-H", daemon.host]


def _remove_cgroup_parent(tag: str) -> None:
    """The cgroup parent the benchmark's containers used (their own cgroups are gone)."""
    base = Path("/sys/fs/cgroup")
    for d in [base / tag, *(base / c / tag for c in ("memory", "cpu", "pids", "devices"))]:
        with contextlib.suppress(OSError):
            d.rmdir()


if __name__ == "__main__":
    sys.exit(main())
