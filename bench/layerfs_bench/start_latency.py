"""Start-to-exit of ``layerfs run --rm IMG true`` against runc, crun and Docker, and
``layerfs import`` against GNU ``tar -x``: the CLI through ``layerfs daemon``, the CLI
in-process and the library, next to the peers, in one interleaved run.

::

    python -m layerfs_bench.start_latency [--rounds 20] [--no-docker] [--no-crun]
                                          [--no-import] [--json FILE]

``layerfs bench --peers`` runs the same comparison (:func:`compare`) after its scenarios.

Every container runs ``true`` in the same busybox image (built from busybox-static,
nothing downloaded) with no network, timed from spawn to exit, in interleaved rounds
(A B C ... A B C ...: the machine is noisy, MACHINE.md) with the shared harness
(:func:`layerfs_bench.harness.interleave`): only medians and ratios *within one run*
mean something.

* ``layerfs run, daemon`` — the ``layerfs`` console script, overlay2, ``--network
  none``, with ``layerfs daemon`` serving the root (``LAYERFS_DAEMON=1``): a thin
  client, and the command in a worker the warm daemon forks.
* ``layerfs run, in-process`` — the same command without a daemon
  (``LAYERFS_DAEMON=0``): a cold interpreter imports and runs everything. Both use
  Python's bytecode cache (kept under the scratch folder).
* ``ContainerManager.run (library)`` — in this warm process with the manager open:
  layer, mount, engine start and wait, unmount, removal. And the engine alone on an
  unpacked rootfs directory (``runtime.start`` + ``wait``), for the storage's share;
  and once more without the seccomp filter and with the caller's descriptors handed
  over instead of relayed (docs/security.md: what the hardening costs).
* ``runc run`` of a prepared bundle (``runc spec``, args ``true``, its own network
  namespace: only ``lo``); ``crun run`` of the same bundle (crun refuses this VM's
  hybrid cgroup layout, so it runs in a private mount namespace without
  /sys/fs/cgroup/unified: a helper in that namespace times it); ``docker run --rm
  --network none`` of the same image on a private dockerd
  (:class:`layerfs_bench.peers.DockerDaemon`).
* ``python -c pass`` — the interpreter alone, for scale, and the thin client next to it:
  ``layerfs --version``, ``layerfs --help`` and ``layerfs layer ls`` (through the daemon
  and in-process).

The import comparison: ``layerfs import`` of a ~100 MB rootfs tar through the daemon
and in-process, and GNU ``tar -x`` of the same tar, all into the same filesystem
(each imported image is removed between rounds, untimed).

Goals (issue 17): through the daemon ≤ 1.5× ``runc run`` and ≤ 0.15× ``docker run``;
in-process ≤ 0.5× ``docker run``; ``layerfs import`` through the daemon ≤ 1.5× ``tar
-x``; ``--version`` and ``--help`` ≤ 2× ``python -c pass``, ``layer ls`` ≤ 3×.
Everything the benchmark creates (roots, cgroup parent ``lfsb<hex>``, bundle, dockerd
data) is under ``/tmp/lfs-run/bench-<hex>`` or named by that tag, and removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import Contender, interleave, remove_tree

SCRATCH = Path("/tmp/lfs-run")

RUNC = "runc run (prepared bundle)"
CRUN = "crun run (same bundle)"
DOCKER = "docker run --rm --network none"
DAEMON = "layerfs run, daemon"
IN_PROCESS = "layerfs run, in-process"
LIBRARY = "ContainerManager.run (library)"
ENGINE = "runtime.start, unpacked rootfs"
ENGINE_UNHARDENED = "  same, unconfined + passthrough"
PYTHON = "python -c pass"
VERSION = "layerfs --version"
HELP = "layerfs --help"
LS_DAEMON = "layerfs layer ls, daemon"
LS_IN_PROCESS = "layerfs layer ls, in-process"
IMPORT_DAEMON = "layerfs import, daemon"
IMPORT_IN_PROCESS = "layerfs import, in-process"
TAR = "tar -x"

#: (row, reference, goal): the ratios issue 17 asks for.
GOALS = [(DAEMON, RUNC, 1.5), (DAEMON, DOCKER, 0.15), (IN_PROCESS, DOCKER, 0.5),
         (IMPORT_DAEMON, TAR, 1.5), (VERSION, PYTHON, 2.0), (HELP, PYTHON, 2.0),
         (LS_DAEMON, PYTHON, 3.0), (LS_IN_PROCESS, PYTHON, 3.0)]
#: Rows compared with ``python -c pass`` (the thin client's aims), not with the runtimes.
THIN = (VERSION, HELP, LS_DAEMON, LS_IN_PROCESS, PYTHON)

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


class Daemon:
    """``layerfs daemon --root ROOT`` for the comparison, stopped by :meth:`stop`."""

    def __init__(self, root: Path, env: dict[str, str], log: Path) -> None:
        from layerfs.daemon import wire

        with open(log, "wb") as f:
            self.proc = subprocess.Popen([*console_script(), "daemon", "--root", str(root)],
                                         env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        deadline = time.monotonic() + 60
        while not _answers(wire.socket_path(root)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"layerfs daemon did not start: {log.read_text()[-500:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _answers(path: str) -> bool:
    import socket

    from layerfs.daemon import wire

    address, fd = wire.short_address(path)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(address)
        return True
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("layerfs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "layerfs"]


def compare(rounds: int = 20, *, docker: bool = True, crun: bool = True, imports: bool = True,
            import_mb: int = 100, say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Measure; ``{"results": {row: {"median": s, "runs": [...]}, "ratios": {...}, "goals":
    [...], "notes": [...]}``. Needs root. Nothing is asserted."""
    from layerfs.layers import LayerStore
    from layerfs.runtime import ContainerSpec, RuntimeConfig
    from layerfs.runtime import start as engine_start
    from layerfs.runtime import state as records
    from layerfs.runtime.containers import ContainerManager
    from layerfs.testing import images as timg

    from .peers import DockerDaemon, docker_client

    tag = "lfsb" + os.urandom(3).hex()
    base = SCRATCH / f"bench-{tag}"
    base.mkdir(parents=True)
    root, import_root = base / "root", base / "import-root"
    config = RuntimeConfig(cgroup_parent=tag)
    cleanups: list[Callable[[], None]] = []
    notes: list[str] = []
    null = os.open(os.devnull, os.O_RDWR)
    sink_r, sink_w = os.pipe()
    threading.Thread(target=_drain, args=(sink_r,), daemon=True).start()
    try:
        # --- the image, a layerfs root, a runc bundle ---------------------------------------------
        say("building the busybox image and the runc bundle")
        built = timg.busybox_image_tar(base / "busybox.tar", base)
        mgr = ContainerManager(root, "overlay2", config=config)
        cleanups.append(mgr.close)
        mgr.images.load(built.path)
        bundle = base / "bundle"
        (bundle / "rootfs").mkdir(parents=True)
        with tarfile.open(built.path) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
            layer = tar.extractfile(manifest[0]["Layers"][0])
            assert layer is not None
            with tarfile.open(fileobj=layer) as lt:
                lt.extractall(bundle / "rootfs", filter="fully_trusted")
        subprocess.run(["runc", "spec"], cwd=bundle, check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"]["args"] = ["true"]
        spec["process"]["terminal"] = False
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))

        # --- the CLI's environment: bytecode cache on, this benchmark's cgroup parent ---------
        env = dict(os.environ, PYTHONPYCACHEPREFIX=str(base / "pycache"),
                   LAYERFS_CGROUP_PARENT=tag)
        for key in ("PYTHONDONTWRITEBYTECODE", "LAYERFS_ROOT", "LAYERFS_DRIVER",
                    "LAYERFS_STORAGE_OPTS", "LAYERFS_DAEMON"):
            env.pop(key, None)
        say("starting layerfs daemon")
        daemon = Daemon(root, env, base / "daemon.log")
        cleanups.append(daemon.stop)
        cli = [*console_script(), "--root", str(root), "run", "--rm", "--network", "none",
               "busybox", "true"]
        ls = [*console_script(), "--root", str(root), "layer", "ls"]

        def library() -> float:
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

        start = [
            Contender(RUNC, _timed(["runc", "run", "--bundle", str(bundle), f"{tag}-runc"])),
            Contender(DAEMON, _timed(cli, dict(env, LAYERFS_DAEMON="1"))),
            Contender(IN_PROCESS, _timed(cli, dict(env, LAYERFS_DAEMON="0"))),
            Contender(LIBRARY, library),
            Contender(ENGINE, engine_only),
            Contender(ENGINE_UNHARDENED, lambda: engine_only(hardened=False)),
            Contender(PYTHON, _timed([sys.executable, "-c", "pass"], env)),
            Contender(VERSION, _timed([*console_script(), "--version"], env)),
            Contender(HELP, _timed([*console_script(), "--help"], env)),
            Contender(LS_DAEMON, _timed(ls, dict(env, LAYERFS_DAEMON="1"))),
            Contender(LS_IN_PROCESS, _timed(ls, dict(env, LAYERFS_DAEMON="0"))),
        ]
        if crun and shutil.which("crun"):
            helper = CrunHelper(bundle, f"{tag}-crun")
            cleanups.append(helper.close)
            start.insert(1, Contender(CRUN, helper))
        elif crun:
            notes.append("crun skipped: not installed")
        if docker:
            reason = DockerDaemon.unavailable()
            if reason:
                notes.append(f"docker skipped: {reason}")
            else:
                say("starting a private dockerd")
                dockerd = DockerDaemon(base / "docker")
                cleanups.append(dockerd.remove_data)
                cleanups.append(dockerd.stop)
                dockerd.start()
                dockerd.docker("load", "-i", str(built.path))
                start.append(Contender(DOCKER, _timed(
                    [docker_client(), "-H", dockerd.host, "run", "--rm", "--network", "none",
                     "busybox:latest", "true"], dockerd._env)))
        results = interleave(start, rounds, say)

        if imports:
            results.update(_compare_import(base, import_root, env, rounds, import_mb, say,
                                           cleanups))
    finally:
        os.close(null)
        os.close(sink_w)
        for fn in reversed(cleanups):
            with contextlib.suppress(Exception):
                fn()
        for r in (root, import_root):
            with contextlib.suppress(Exception), LayerStore.open(r, "overlay2") as store:
                store.wipe()
        _remove_cgroup_parent(tag)
        shutil.rmtree(base, ignore_errors=True)
    ratios = {f"{row} / {ref}": results[row]["median"] / results[ref]["median"]
              for row, ref, _ in GOALS if row in results and ref in results}
    goals = [{"row": row, "reference": ref, "goal": goal,
              "ratio": ratios.get(f"{row} / {ref}"),
              "met": (ratios[f"{row} / {ref}"] <= goal) if f"{row} / {ref}" in ratios else None}
             for row, ref, goal in GOALS]
    return {"rounds": rounds, "kernel": os.uname().release, "python": sys.version.split()[0],
            "results": results, "ratios": ratios, "goals": goals, "notes": notes}


def _compare_import(base: Path, root: Path, env: dict[str, str], rounds: int, size_mb: int,
                    say: Callable[[str], None],
                    cleanups: list[Callable[[], None]]) -> dict[str, dict[str, Any]]:
    """``layerfs import`` (daemon, in-process) vs ``tar -x``, into one filesystem."""
    say(f"building a {size_mb} MB rootfs tar")
    tar_path = base / "rootfs.tar"
    _rootfs_tar(tar_path, base / "tree", size_mb)
    daemon = Daemon(root, env, base / "import-daemon.log")
    cleanups.append(daemon.stop)
    target = base / "tar-target"
    cli = [*console_script(), "--root", str(root), "--driver", "overlay2", "import",
           str(tar_path), "bench/imported:1"]

    def layerfs_import(mode: str) -> Callable[[], float]:
        timed = _timed(cli, dict(env, LAYERFS_DAEMON=mode))

        def run() -> float:
            os.sync()
            elapsed = timed()
            subprocess.run([*console_script(), "--root", str(root), "rmi", "bench/imported:1"],
                           env=dict(env, LAYERFS_DAEMON=mode), check=True,
                           stdout=subprocess.DEVNULL)
            return elapsed
        return run

    def tar_x() -> float:
        remove_tree(target)
        target.mkdir()
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["tar", "-xf", str(tar_path), "-C", str(target)], check=True)
        elapsed = time.perf_counter() - t0
        remove_tree(target)
        return elapsed

    return interleave([Contender(IMPORT_DAEMON, layerfs_import("1")),
                       Contender(IMPORT_IN_PROCESS, layerfs_import("0")),
                       Contender(TAR, tar_x)], max(3, rounds // 4), say)


def _drain(fd: int) -> None:
    while os.read(fd, 65536):
        pass


def _rootfs_tar(path: Path, tree: Path, size_mb: int) -> None:
    """A tar like a distribution's rootfs: busybox plus ~``size_mb`` MB in files of mixed
    sizes (4 KiB to 1 MiB) over a few hundred directories, made with GNU tar."""
    from layerfs.testing import images as timg

    rootfs = timg.busybox_rootfs(tree)
    rnd = os.urandom(1 << 20)
    total, i = 0, 0
    while total < size_mb << 20:
        size = (4 << 10) << (i % 9)          # 4 KiB .. 1 MiB
        d = rootfs / "usr" / "share" / f"d{i % 300}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rnd[:size])
        total += size
        i += 1
    subprocess.run(["tar", "-cf", str(path), "-C", str(rootfs), "."], check=True)
    remove_tree(tree)


def _remove_cgroup_parent(tag: str) -> None:
    """The cgroup parent the benchmark's containers used (their own cgroups are gone)."""
    base = Path("/sys/fs/cgroup")
    for d in [base / tag, *(base / c / tag for c in ("memory", "cpu", "pids", "devices"))]:
        with contextlib.suppress(OSError):
            d.rmdir()


def table(report: dict[str, Any]) -> str:
    """The comparison as text: median, ×runc, ×docker, ×tar for every row; the goals."""
    res = report["results"]

    def ref(name: str) -> float | None:
        return res[name]["median"] if name in res else None

    runc, docker, tar, python = ref(RUNC), ref(DOCKER), ref(TAR), ref(PYTHON)
    lines = [f"{'':34s} {'median':>10s} {'x runc':>8s} {'x docker':>9s} {'x tar -x':>9s} "
             f"{'x python':>9s}"]
    for name, r in res.items():
        m = r["median"]
        is_import = name in (IMPORT_DAEMON, IMPORT_IN_PROCESS, TAR)
        start = not is_import and name not in THIN
        cols = [f"{m / runc:8.2f}" if runc and start else f"{'':8s}",
                f"{m / docker:9.3f}" if docker and start else f"{'':9s}",
                f"{m / tar:9.2f}" if tar and is_import else f"{'':9s}",
                f"{m / python:9.2f}" if python and name in THIN else f"{'':9s}"]
        lines.append(f"{name:34s} {m * 1000:8.1f}ms {' '.join(cols)}")
    for g in report["goals"]:
        if g["ratio"] is None:
            continue
        lines.append(f"goal: {g['row']} <= {g['goal']}x {g['reference']}: {g['ratio']:.2f}x "
                     f"({'met' if g['met'] else 'NOT met'})")
    lines += report["notes"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerfs_bench.start_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument("--no-crun", action="store_true")
    parser.add_argument("--no-import", action="store_true")
    parser.add_argument("--import-mb", type=int, default=100)
    parser.add_argument("--json", metavar="FILE", help="write the results here too")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, cgroups, mounts)")

    def say(msg: str) -> None:
        sys.stderr.write(f"\r{msg[:150]:150s}")
        sys.stderr.flush()

    report = compare(args.rounds, docker=not args.no_docker, crun=not args.no_crun,
                     imports=not args.no_import, import_mb=args.import_mb, say=say)
    sys.stderr.write("\n")
    print(f"medians of {args.rounds} interleaved rounds (import: {max(3, args.rounds // 4)}), "
          f"after one warm-up round")
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
