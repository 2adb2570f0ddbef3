"""Benchmarks of the FUSE union filesystem (aufs driver) against its peers.

Run ``.venv/bin/python -m layerfs_bench.aufs_fuse [--quick] [--only NAME]``
as root. Everything lives under ``/tmp/lfs-aufs/bench`` and is unmounted and
removed at the end. The machine is noisy, so compared commands are
interleaved (A B A B ...) and medians and their ratio are reported; nothing
here asserts a time.

Scenarios (plain functions, each returns rows of a table):

``warm_stat``
    10 000 lstat() of existing paths in a 3-lower + 1-upper tree after a
    warm-up pass: ours vs fuse-overlayfs (and kernel overlay for scale).
``timeouts``
    The same warm stats and a make + git workload, with the kernel cache
    timeouts at 0, 1 s and the default: the measurement behind the default.
``workload``
    make + git in a fresh upper over 3 lowers: ours vs fuse-overlayfs vs
    kernel overlay.
``cold_lookup``
    A stat of a/b/c/d/e that exists only in the bottom of 1, 5 and 20
    branches, right after mounting (nothing cached) and, for ours, repeated
    with entry/attr timeouts of 0 (every stat looks every component up).
``seq_read``
    Sequential read of a 200 MB lower file: ours (first read, then again
    from the kept page cache) vs kernel overlay.
``io``
    Sequential reads (page cache cold and warm) and writes of 200 MB, random
    4 KiB reads and writes: ours in FUSE passthrough, ours served by the
    process (``--no-passthrough``), fuse-overlayfs and kernel overlay.
``copy_up``
    The first 1-byte append to a 100 MB lower file (a full copy-up): ours,
    ours with ``--copyup-fsync``, fuse-overlayfs and kernel overlay.
``copy_up_btrfs``
    The same on a loop-mounted btrfs, for 16 MiB, 256 MiB and 1 GiB files:
    a reflink copy-up costs the same whatever the size.
``mount``
    Mount + first stat of a union of 6 branches: ours forked from a warm fork
    server (as under ``layerfs daemon``), ours through the helper command
    (cold), fuse-overlayfs and kernel overlay.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from layerfs import mount as mountlib

SCRATCH = Path("/tmp/lfs-aufs/bench")
MODULE = "layerfs_drivers.aufs.unionfs"
PR_SET_CHILD_SUBREAPER = 36
MB = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

Row = tuple[str, ...]


# --- mounting the contenders ------------------------------------------------------------------

def _pids_naming(target: Path) -> list[int]:
    want = os.fsencode(os.path.realpath(target))
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(want in a for a in argv) and int(entry) != os.getpid():
                found.append(int(entry))
    return found


def _spawn_daemon(argv: list[str], target: Path) -> list[int]:
    """Run a daemonizing mount helper; its server becomes our child (subreaper)."""
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=60)
    finally:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    return _pids_naming(target)


@contextlib.contextmanager
def mounted(kind: str, branches: list[Path], mnt: Path, *options: str) -> Iterator[Path]:
    """Mount ``branches`` (top first; the top is the upper dir) as ``kind``.

    ``kind`` is ``union`` (ours), ``fuse-overlayfs`` or ``overlay`` (kernel).
    """
    mnt.mkdir(parents=True, exist_ok=True)
    top, lowers = branches[0], branches[1:]
    work = mnt.parent / (mnt.name + ".work")
    pids: list[int] = []
    if kind == "union":
        argv = [sys.executable, "-m", MODULE, *options, f"{top}:rw",
                *[f"{b}:ro" for b in lowers], str(mnt)]
        pids = _spawn_daemon(argv, mnt)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        opts = f"lowerdir={':'.join(map(str, lowers))},upperdir={top},workdir={work}"
        if options:
            opts += "," + ",".join(options)
        if kind == "fuse-overlayfs":
            pids = _spawn_daemon(["fuse-overlayfs", "-o", opts, str(mnt)], mnt)
        else:
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
                           check=True)
    try:
        yield mnt
    finally:
        if mountlib.is_mounted(mnt):
            subprocess.run(["umount", str(mnt)], check=False)
        if mountlib.is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        shutil.rmtree(work, ignore_errors=True)


def union_stats(mnt: Path) -> dict[str, int]:
    stats: dict[str, int] = json.loads(os.getxattr(mnt, "user.layerfs.stats"))
    return stats


# --- helpers -------------------------------------------------------------------------------------

def _fresh(path: Path) -> Path:
    if mountlib.is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleave(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run each contender once per round, in turn; median seconds of each."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run())
    return {name: statistics.median(v) for name, v in samples.items()}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _print_table(title: str, header: Row, rows: list[Row]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate([header, *rows]):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _stat_tree(base: Path, lowers: int = 3, dirs: int = 20, files: int = 50) -> list[str]:
    """3 lowers + upper, files spread over all of them; returns relative paths."""
    _fresh(base)
    branches = [base / "upper", *[base / f"l{i}" for i in range(lowers)]]
    rels = []
    for bi, branch in enumerate(branches):
        for d in range(dirs):
            sub = branch / "usr" / f"d{d}"
            sub.mkdir(parents=True, exist_ok=True)
            for f in range(files // len(branches) + 1):
                name = f"b{bi}f{f}"
                (sub / name).write_bytes(b"x")
                rels.append(f"usr/d{d}/{name}")
    return rels


def _lstat_all(mnt: Path, rels: list[str], n: int) -> float:
    paths = [os.path.join(mnt, r) for r in rels]
    reps = (n + len(paths) - 1) // len(paths)
    todo = (paths * reps)[:n]
    lstat = os.lstat
    t0 = time.perf_counter()
    for p in todo:
        lstat(p)
    return time.perf_counter() - t0


# --- scenarios -------------------------------------------------------------------------------------

def warm_stat(rounds: int = 7, n: int = 10_000) -> list[Row]:
    base = SCRATCH / "warm"
    rels = _stat_tree(base)
    branches = [base / "upper", base / "l0", base / "l1", base / "l2"]
    rows: list[Row] = []
    with (mounted("union", branches, base / "m_union") as a,
          mounted("fuse-overlayfs", branches, base / "m_fo") as b,
          mounted("overlay", branches, base / "m_ovl") as c):
        for m in (a, b, c):
            _lstat_all(m, rels, len(rels))  # warm up: every entry looked up once
        res = _interleave({"union": lambda: _lstat_all(a, rels, n),
                           "fuse-overlayfs": lambda: _lstat_all(b, rels, n),
                           "kernel overlay": lambda: _lstat_all(c, rels, n)}, rounds)
    for name, t in res.items():
        rows.append((name, _ms(t), f"{t / n * 1e6:.2f} us", _ratio(t, res["fuse-overlayfs"])))
    _print_table(f"warm lstat: {n} existing paths, 3 lowers + upper (median of {rounds})",
                 ("fs", "total", "per stat", "vs fuse-overlayfs"), rows)
    return rows


def _workload(mnt: Path) -> float:
    """make + git over a small project in the union (a write/lookup-heavy mix)."""
    src = mnt / "proj"
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(mnt.parent)}
    git = ["git", "-C", str(src), "-c", "user.name=b", "-c", "user.email=b@example.com",
           "-c", "safe.directory=*"]
    t0 = time.perf_counter()
    subprocess.run(["make", "-s", "-j2", "-C", str(src)], check=True, capture_output=True)
    subprocess.run([*git, "init", "-q"], check=True, capture_output=True, env=env)
    subprocess.run([*git, "add", "-A"], check=True, capture_output=True, env=env)
    subprocess.run([*git, "commit", "-qm", "x"], check=True, capture_output=True, env=env)
    subprocess.run([*git, "status", "--porcelain"], check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def _project(lower: Path, files: int = 40) -> None:
    src = lower / "proj"
    src.mkdir(parents=True)
    objs = []
    for i in range(files):
        (src / f"m{i}.h").write_text(f"#define V{i} {i}\n")
        (src / f"m{i}.c").write_text(f'#include <stdio.h>\n#include "m{i}.h"\n'
                                     f"int f{i}(void) {{ return V{i}; }}\n")
        objs.append(f"m{i}.o")
    (src / "main.c").write_text("int main(void) { return 0; }\n")
    (src / "Makefile").write_text(f"app: main.o {' '.join(objs)}\n\t$(CC) -o $@ $^\n")


def timeouts(rounds: int = 5, n: int = 10_000) -> list[Row]:
    base = SCRATCH / "timeouts"
    rels = _stat_tree(base)
    branches = [base / "upper", base / "l0", base / "l1", base / "l2"]
    _project(branches[1])
    settings = {"0": ("--entry-timeout", "0", "--attr-timeout", "0"),
                "1 s": ("--entry-timeout", "1", "--attr-timeout", "1"),
                "default": ()}
    slug = {"0": "t0", "1 s": "t1", "default": "tdef"}
    stat_runs: dict[str, Callable[[], float]] = {}
    with contextlib.ExitStack() as stack:
        for name, opts in settings.items():
            mnt = stack.enter_context(mounted("union", branches, base / slug[name], *opts))
            _lstat_all(mnt, rels, len(rels))
            stat_runs[name] = (lambda m=mnt: _lstat_all(m, rels, n))  # type: ignore[misc]
        stat_res = _interleave(stat_runs, rounds)
    counts: dict[str, dict[str, int]] = {}

    def work(name: str) -> float:
        scratch = base / "work"
        _fresh(scratch)
        with mounted("union", [scratch, *branches[1:]], base / "mw", *settings[name]) as mnt:
            t = _workload(mnt)
            counts[name] = union_stats(mnt)
        return t

    work_res = _interleave({k: (lambda k=k: work(k)) for k in settings},  # type: ignore[misc]
                           rounds)
    rows: list[Row] = []
    for name in settings:
        c = counts[name]
        rows.append((name, _ms(stat_res[name]), _ratio(stat_res[name], stat_res["default"]),
                     _ms(work_res[name]), str(c["lookups"]), str(c["getattr_stats"]),
                     str(c["backing_stats"])))
    _print_table(f"kernel cache timeouts (ours): warm lstat x{n}, and make+git with the "
                 f"requests it caused (median of {rounds})",
                 ("entry/attr timeout", "lstat", "vs default", "make+git", "lookups",
                  "getattrs", "backing stats"), rows)
    return rows


def workload(rounds: int = 5) -> list[Row]:
    base = SCRATCH / "workload"
    _fresh(base)
    lowers = [base / f"l{i}" for i in range(3)]
    for lower in lowers:
        lower.mkdir()
    _project(lowers[1])

    def run(kind: str) -> float:
        upper = _fresh(base / "upper")
        with mounted(kind, [upper, *lowers], base / f"m_{kind}") as mnt:
            return _workload(mnt)

    res = _interleave({k: (lambda k=k: run(k))  # type: ignore[misc]
                       for k in ("union", "fuse-overlayfs", "overlay")}, rounds)
    rows: list[Row] = [(name, _ms(t), _ratio(t, res["overlay"])) for name, t in res.items()]
    _print_table(f"make -j2 (41 C files) + git init/add/commit/status, fresh upper "
                 f"(median of {rounds})", ("fs", "time", "vs kernel overlay"), rows)
    return rows


def _deep_tree(base: Path, layers: int) -> list[Path]:
    _fresh(base)
    branches = [base / f"b{i}" for i in range(layers + 1)]  # + an empty upper
    for b in branches:
        (b / "a/b/c/d").mkdir(parents=True)
    (branches[-1] / "a/b/c/d/e").write_bytes(b"e")
    return branches


def _stat_loop(path: Path, repeat: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        os.stat(path)
    return time.perf_counter() - t0


def cold_lookup(rounds: int = 7, depths: tuple[int, ...] = (1, 5, 20),
                repeat: int = 2000) -> list[Row]:
    rows: list[Row] = []
    for layers in depths:
        base = SCRATCH / f"cold{layers}"
        branches = _deep_tree(base, layers)
        probes: dict[str, int] = {}

        def once(kind: str, base: Path = base, branches: list[Path] = branches,
                 probes: dict[str, int] = probes) -> float:
            with mounted(kind, branches, base / f"m_{kind}") as mnt:
                t = _time(lambda: os.stat(mnt / "a/b/c/d/e"))
                if kind == "union":
                    probes.update(union_stats(mnt))
            return t

        res = _interleave({k: (lambda k=k: once(k))  # type: ignore[misc]
                           for k in ("union", "fuse-overlayfs", "overlay")}, rounds)
        opts = ("--entry-timeout", "0", "--attr-timeout", "0")
        with mounted("union", branches, base / "m_t0", *opts) as mnt:
            os.stat(mnt / "a/b/c/d/e")
            os.setxattr(mnt, "user.layerfs.stats.reset", b"1")
            t = _stat_loop(mnt / "a/b/c/d/e", repeat)
            again = union_stats(mnt)
        with mounted("fuse-overlayfs", branches, base / "m_fo0", "timeout=0") as mnt:
            os.stat(mnt / "a/b/c/d/e")
            t_fo = _stat_loop(mnt / "a/b/c/d/e", repeat)
        total = layers + 1
        rows.append((str(total), _ms(res["union"]), _ms(res["fuse-overlayfs"]),
                     _ms(res["overlay"]),
                     f"{probes['lookup_name_stats']}+{probes['lookup_whiteout_probes']}"
                     f"+{probes['lookup_opaque_probes']}",
                     f"{t / repeat * 1e6:.0f} us", f"{t_fo / repeat * 1e6:.0f} us",
                     f"{again['backing_stats'] / repeat:.0f}"))
    _print_table(f"stat a/b/c/d/e, file in the bottom branch only (median of {rounds}; "
                 "branches include an empty top)",
                 ("branches", "first stat: union", "fuse-overlayfs", "kernel overlay",
                  "union probes name+wh+opq", "timeout 0: union", "fuse-overlayfs t=0",
                  "union stats/stat"), rows)
    return rows


def _read_all(path: Path, bufsize: int = MB) -> float:
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(bufsize)
    t0 = time.perf_counter()
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def seq_read(rounds: int = 5, size: int = 200 * MB) -> list[Row]:
    base = _fresh(SCRATCH / "read")
    branches = [base / "upper", base / "lower"]
    for b in branches:
        b.mkdir()
    with open(branches[1] / "big", "wb") as f:
        for _ in range(size // MB):
            f.write(os.urandom(MB))
    _read_all(branches[1] / "big")  # the backing file is in the page cache for everyone
    second: list[float] = []

    def union_read() -> float:
        with mounted("union", branches, base / "m_union") as mnt:
            t = _read_all(mnt / "big")
            second.append(_read_all(mnt / "big"))
        return t

    def overlay_read() -> float:
        with mounted("overlay", branches, base / "m_ovl") as mnt:
            return _read_all(mnt / "big")

    def direct_read() -> float:
        return _read_all(branches[1] / "big")

    res = _interleave({"union": union_read, "kernel overlay": overlay_read,
                       "backing ext4": direct_read}, rounds)
    res["union, page cache kept"] = statistics.median(second)
    rows: list[Row] = [(name, _ms(t), f"{size / MB / t:.0f} MB/s",
                        _ratio(t, res["kernel overlay"])) for name, t in res.items()]
    _print_table(f"sequential read of a {size // MB} MB lower file, 1 MiB reads "
                 f"(median of {rounds})", ("fs", "time", "throughput", "vs kernel overlay"),
                 rows)
    return rows


def _first_append(kind: str, base: Path, lower: Path, size: int, *options: str) -> float:
    """Time of the first 1-byte append to ``lower/big`` (a full copy-up) on a fresh upper."""
    upper = _fresh(base / "upper")
    with mounted(kind, [upper, lower], base / f"m_{kind}", *options) as mnt:
        def go() -> None:
            with open(mnt / "big", "ab") as f:
                f.write(b"!")
        t = _time(go)
        assert os.stat(upper / "big").st_size == size + 1
    return t


def copy_up(rounds: int = 7, size: int = 100 * MB) -> list[Row]:
    base = _fresh(SCRATCH / "copyup")
    lower = base / "lower"
    lower.mkdir()
    with open(lower / "big", "wb") as f:
        for _ in range(size // MB):
            f.write(os.urandom(MB))
    _read_all(lower / "big")

    def append(kind: str, *options: str) -> float:
        return _first_append(kind, base, lower, size, *options)

    res = _interleave({"union": lambda: append("union"),
                       "union --copyup-fsync": lambda: append("union", "--copyup-fsync"),
                       "fuse-overlayfs": lambda: append("fuse-overlayfs"),
                       "kernel overlay": lambda: append("overlay")}, rounds)
    rows: list[Row] = [(name, _ms(t), _ratio(t, res["kernel overlay"]))
                       for name, t in res.items()]
    _print_table(f"first 1-byte append to a {size // MB} MB lower file (median of {rounds})",
                 ("fs", "time", "vs kernel overlay"), rows)
    return rows


def _write_file(path: Path, size: int) -> None:
    chunk = os.urandom(MB)
    with open(path, "wb") as f:
        for _ in range(size // MB):
            f.write(chunk)


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _read_all_cold(mnt: Path, _round: int) -> float:
    _drop_caches()
    return _read_all(mnt / "big")


def _write_all(path: Path, size: int) -> float:
    chunk = os.urandom(MB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    try:
        for _ in range(size // MB):
            os.write(fd, chunk)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _random_io(path: Path, size: int, ops: int, *, write: bool, seed: int = 1) -> float:
    import random

    rng = random.Random(seed)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(ops)]
    block = os.urandom(4096)
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        if write:
            for off in offsets:
                os.pwrite(fd, block, off)
        else:
            for off in offsets:
                os.pread(fd, 4096, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


IO_KINDS = {"union": ("union", ()), "union --no-passthrough": ("union", ("--no-passthrough",)),
            "fuse-overlayfs": ("fuse-overlayfs", ()), "kernel overlay": ("overlay", ())}


def io(rounds: int = 5, size: int = 200 * MB, ops: int = 20_000) -> list[Row]:
    """Reads and writes through each contender; every contender gets its own upper with a
    copied-up file, mounted once, and the measurements interleave round by round."""
    base = _fresh(SCRATCH / "io")
    lower = base / "lower"
    lower.mkdir()
    _write_file(lower / "big", size)
    _write_file(lower / "copied", size)
    results: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        mnts: dict[str, Path] = {}
        for i, (name, (kind, opts)) in enumerate(IO_KINDS.items()):
            upper = _fresh(base / f"upper{i}")
            mnt = stack.enter_context(mounted(kind, [upper, lower], base / f"m{i}", *opts))
            with open(mnt / "copied", "ab") as f:  # copied up once, before timing
                f.write(b"!")
            mnts[name] = mnt
        tests: dict[str, Callable[[Path, int], float]] = {
            "seq read, cold": _read_all_cold,
            "seq read, warm": lambda m, r: (_read_all(m / "big"), _read_all(m / "big"))[1],
            "seq write, new file": lambda m, r: _write_all(m / f"new{r}", size),
            "rand 4K read, lower": lambda m, r: _random_io(m / "big", size, ops, write=False,
                                                           seed=r),
            "rand 4K read, copied-up": lambda m, r: _random_io(m / "copied", size, ops,
                                                               write=False, seed=r),
            "rand 4K write, copied-up": lambda m, r: _random_io(m / "copied", size, ops,
                                                                write=True, seed=r),
        }
        for test in tests:
            results[test] = {name: [] for name in mnts}
        for r in range(rounds):
            for test, fn in tests.items():
                for name, mnt in mnts.items():
                    results[test][name].append(fn(mnt, r))
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(mnt / f"new{r}")
    rows: list[Row] = []
    for test, per in results.items():
        ref = statistics.median(per["kernel overlay"])
        unit = ops if "rand" in test else None
        for name, samples in per.items():
            t = statistics.median(samples)
            value = f"{t / unit * 1e6:.2f} us/op" if unit else f"{size / MB / t:.0f} MB/s"
            rows.append((test, name, _ms(t), value, _ratio(t, ref)))
    _print_table(f"I/O on a {size // MB} MB file, {ops} random ops (median of {rounds}, "
                 "interleaved)", ("test", "fs", "time", "rate", "vs kernel overlay"), rows)
    return rows


class _BtrfsPool:
    """A loop-mounted btrfs under SCRATCH (layerfs.pool makes and destroys it)."""

    def __init__(self) -> None:
        self.mnt = SCRATCH / "btrfs"

    def is_mounted(self) -> bool:
        return mountlib.is_mounted(self.mnt)

    def create(self, size: int = 8 << 30) -> Path:
        from layerfs import pool

        pool.create_btrfs(SCRATCH / "btrfs.img", self.mnt, size=size)
        return self.mnt

    def destroy(self) -> None:
        from layerfs import pool

        pool.destroy_btrfs(self.mnt)


BTRFS = _BtrfsPool()


def copy_up_btrfs(rounds: int = 5, sizes: tuple[int, ...] = (16 * MB, 256 * MB, 1024 * MB)
                  ) -> list[Row]:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    root = BTRFS.create()
    rows: list[Row] = []
    try:
        for size in sizes:
            base = _fresh(root / f"cu{size}")
            lower = base / "lower"
            lower.mkdir()
            _write_file(lower / "big", size)
            os.sync()

            res = _interleave({k: (lambda k=k, b=base, lw=lower, sz=size:  # type: ignore[misc]
                                   _first_append(k, b, lw, sz))
                               for k in ("union", "fuse-overlayfs", "overlay")}, rounds)
            for name, t in res.items():
                rows.append((f"{size // MB} MiB", name, _ms(t),
                             _ratio(t, res["fuse-overlayfs"])))
            shutil.rmtree(base, ignore_errors=True)
    finally:
        BTRFS.destroy()
    _print_table(f"first 1-byte append to a lower file on btrfs (reflink copy-up; median of "
                 f"{rounds})", ("size", "fs", "time", "vs fuse-overlayfs"), rows)
    return rows


def mount(rounds: int = 30, lowers: int = 5) -> list[Row]:
    """Mount + stat of the root + unmount, per contender, interleaved; the mount alone is
    the time until the mount command (or fork server) returns."""
    from layerfs_drivers.aufs.forkserver import ForkServer, reap_children

    base = _fresh(SCRATCH / "mount")
    branches = [base / "upper", *[base / f"l{i}" for i in range(lowers)]]
    for i, b in enumerate(branches):
        (b / "etc").mkdir(parents=True)
        (b / "etc" / f"f{i}").write_bytes(b"x")
    work = base / "work"
    helper = [sys.executable, "-m", MODULE, f"{branches[0]}:rw",
              *[f"{b}:ro" for b in branches[1:]]]
    forker = ForkServer()
    mnt = base / "mnt"
    mnt.mkdir()

    def one(kind: str) -> float:
        if kind == "union, warm fork":
            t0 = time.perf_counter()
            assert forker.mount(helper, str(mnt))
        elif kind == "union, cold helper":
            t0 = time.perf_counter()
            subprocess.run([*helper, str(mnt)], check=True, stdin=subprocess.DEVNULL)
        else:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            opts = (f"lowerdir={':'.join(map(str, branches[1:]))},upperdir={branches[0]},"
                    f"workdir={work}")
            argv = (["fuse-overlayfs", "-o", opts, str(mnt)] if kind == "fuse-overlayfs"
                    else ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)])
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        t = time.perf_counter() - t0
        os.stat(mnt / "etc/f3")
        mountlib.unmount(mnt)
        return t

    # Daemonized servers (ours from the helper, fuse-overlayfs) become our children, reaped
    # at the end; the fork server reaps its own.
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        kinds = ("union, warm fork", "union, cold helper", "fuse-overlayfs", "kernel overlay")
        for k in kinds:
            one(k)  # warm-up (the fork server's first mount imports nothing more)
        res = _interleave({k: (lambda k=k: one(k)) for k in kinds},  # type: ignore[misc]
                          rounds)
    finally:
        forker.close()
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        reap_children()
    rows: list[Row] = [(name, _ms(t), _ratio(t, res["fuse-overlayfs"]))
                       for name, t in res.items()]
    _print_table(f"mount of {lowers} lowers + upper until the mount is live (median of "
                 f"{rounds}, interleaved)", ("how", "time", "vs fuse-overlayfs"), rows)
    return rows


SCENARIOS: dict[str, Callable[..., list[Row]]] = {
    "warm_stat": warm_stat, "timeouts": timeouts, "workload": workload,
    "cold_lookup": cold_lookup,
    "seq_read": seq_read, "io": io, "copy_up": copy_up, "copy_up_btrfs": copy_up_btrfs,
    "mount": mount,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerfs_bench.aufs_fuse")
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS),
                   help="run only this scenario (repeatable)")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("aufs_fuse bench: run as root (it mounts)", file=sys.stderr)
        return 2
    print(f"kernel {os.uname().release}; scratch {SCRATCH}")
    try:
        for name in args.only or list(SCENARIOS):
            fn = SCENARIOS[name]
            fn(rounds=3) if args.quick else fn()
    finally:
        for m in mountlib.mounts_under(SCRATCH):
            mountlib.unmount(m.target, lazy=True)
        if BTRFS.is_mounted():
            BTRFS.destroy()
        shutil.rmtree(SCRATCH, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
