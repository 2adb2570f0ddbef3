"""Running bench scenarios: targets, timing, environment capture, results and their JSON.

A *target* is one storage configuration to measure: a layerfs driver with
options (``overlay2``, ``overlay2:metacopy=true,redirect_dir=true``), or a peer
(``fuse-overlayfs`` — overlay2 with ``mount_program=fuse-overlayfs`` — and
``docker``). :func:`run` prepares every target first (a scratch root; for
btrfs a loop-backed btrfs pool it creates and destroys itself), then runs the
scenarios *interleaved*: scenario 1 on A, B, C, then scenario 2 on A, B, C...
The machine is noisy (MACHINE.md), so columns compare best within one run,
as ratios.

Scenarios (:mod:`layerfs_bench.scenarios`) are plain functions
``fn(ctx, **params)``; a *joint* one (``io-throughput``, ``mount``) gets every
target's ``Ctx`` at once and times them together, repetition by repetition
(:func:`run_joint_probes`), for comparisons across targets that must not
drift. They time work through :meth:`Ctx.run_probes` (or record numbers they
computed with :meth:`Ctx.record`). A :class:`Probe` is one timed
operation with an untimed ``setup`` that hands it its argument (a fresh lower
file, a path), so each repetition can have its own input. Probes in one group
run repetition by repetition (A B C, A B C, ...), never all of A first.

Results JSON (``schema_version`` 1)::

    {
      "schema": "layerfs-bench", "schema_version": 1,
      "created": "2026-11-28T10:00:00Z", "profile": "quick", "seconds": 41.2,
      "scenarios": ["copy-up", ...],
      "host": {"kernel": "6.18.44", "cpu": "AMD EPYC", "cpus": 2, "memory_bytes": ...,
               "python": "3.11.7", "layerfs": "0.1.0", "git_commit": "7dc409e..." | null},
      "targets": [{"label": "overlay2", "driver": "overlay2", "options": [], "peer": false,
                   "supported": true, "reason": null, "backing_fs": "extfs",
                   "status": {...}, "capabilities": {...}, "seconds": 30.1,
                   "kernel": "6.18.44"}],
      "results": [{"scenario": "copy-up", "metric": "first_write", "target": "overlay2",
                   "driver": "overlay2", "options": [], "backing_fs": "extfs",
                   "kernel": "6.18.44", "cpu": "AMD EPYC",
                   "params": {"size": 1048576}, "unit": "ms", "kind": "time",
                   "n": 5, "min": 1.1, "median": 1.2, "max": 4.0, "mean": 1.8,
                   "samples": [...] | null, "note": null}],
      "skipped": [{"target": "btrfs", "scenario": "copy-up" | null, "metric": ... | null,
                   "params": {...}, "reason": "..."}],
      "errors": [{"target": ..., "scenario": ..., "error": "..."}]
    }

``kind`` is ``time`` (``unit`` ms or us, per operation), ``count`` (e.g.
counted backing lookups), ``inodes`` or ``bytes``. ``samples`` is kept when
there are at most :data:`MAX_SAMPLES`. docs/bench.md describes every metric.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from layerfs import mount as mountlib
from layerfs import plugins, pool
from layerfs.errors import DriverNotSupported, InvalidArgument, LayerfsError
from layerfs.fsinfo import backing_filesystem
from layerfs.layers import LayerStore
from layerfs.metastore import process_alive, process_token
from layerfs.options import DriverOptions

SCHEMA = "layerfs-bench"
SCHEMA_VERSION = 1
MAX_SAMPLES = 200
SCRATCH = Path(os.environ.get("LAYERFS_BENCH_SCRATCH", "/tmp/lfs-bench"))
PROFILES = ("tiny", "quick", "full")

# Size of the sparse btrfs image the bench makes for the btrfs driver, per profile.
BTRFS_POOL_SIZE = {"tiny": 2 << 30, "quick": 4 << 30, "full": 24 << 30}

PEERS = {
    # label: (driver, options) -- fuse-overlayfs runs through overlay2's mount_program.
    "fuse-overlayfs": ("overlay2", ("mount_program=fuse-overlayfs",)),
    "docker": ("docker", ()),
}


class ScenarioSkip(Exception):
    """Raised by a scenario that cannot run on a target; ``str(err)`` is the reason."""


# --- targets ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A storage configuration to measure; ``label`` is its column name."""

    label: str
    driver: str
    options: tuple[str, ...] = ()
    peer: bool = False
    vm: bool = False

    @property
    def is_docker(self) -> bool:
        return self.driver == "docker"


def parse_target(spec: str, extra_options: Sequence[str] = ()) -> Target:
    """``overlay2``, ``overlay2:metacopy=true,redirect_dir=true``, ``fuse-overlayfs``, ``docker``.

    ``extra_options`` (the CLI's global ``-s``) are added to every driver target.
    """
    name, _, opts_text = spec.partition(":")
    name = name.strip()
    if not name:
        raise InvalidArgument(f"bench target {spec!r}: no driver name")
    options = tuple(o for o in opts_text.split(",") if o)
    if name in PEERS:
        driver, peer_opts = PEERS[name]
        return Target(spec if options else name, driver, peer_opts + options, peer=True)
    DriverOptions.parse(list(options))  # KEY=VALUE syntax errors now, not mid-run
    all_opts = options + tuple(o for o in extra_options if o not in options)
    label = f"{name}:{','.join(all_opts)}" if all_opts else name
    return Target(label, name, all_opts)


# --- results ------------------------------------------------------------------------------------

@dataclass
class Result:
    """One measured metric of one scenario on one target, with its parameters."""

    scenario: str
    metric: str
    target: str
    driver: str
    options: list[str]
    backing_fs: str
    kernel: str
    cpu: str
    params: dict[str, Any]
    unit: str
    kind: str
    n: int
    min: float
    median: float
    max: float
    mean: float
    samples: list[float] | None = None
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(Result))


@dataclass
class Contender:
    """One side of a whole-command comparison: ``run`` does one timed try, returns seconds."""
    name: str
    run: Callable[[], float]
    times: list[float] = field(default_factory=list)


def interleave(contenders: Sequence[Contender], runs: int,
               say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """One uncounted warm-up round, then ``runs`` rounds A B C, A B C, ...: the host's
    speed drifts, and interleaving spreads the drift over every contender.
    Returns ``{name: {"median": s, "runs": [s, ...]}}``."""
    for c in contenders:
        say(f"warm-up: {c.name}")
        c.run()
    for i in range(runs):
        for c in contenders:
            c.times.append(c.run())
        say(f"round {i + 1}/{runs}: " + ", ".join(
            f"{c.name} {c.times[-1]:.3f}s" for c in contenders))
    return {c.name: {"median": statistics.median(c.times), "runs": c.times} for c in contenders}


def print_comparison(title: str, results: dict[str, dict[str, Any]], ratios: dict[str, float],
                     goals: dict[str, float], goal_text: str) -> None:
    """Render what :func:`interleave` measured: medians, min and max per contender, then
    the ratios, each against its goal if it has one."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("contender", "median", "min", "max"):
        table.add_column(col, justify="right" if col != "contender" else "left")
    for name, r in results.items():
        table.add_row(name, f"{r['median'] * 1000:.0f} ms", f"{min(r['runs']) * 1000:.0f} ms",
                      f"{max(r['runs']) * 1000:.0f} ms")
    Console().print(table)
    rt = Table(title=f"ratios (goal: {goal_text})", title_justify="left")
    rt.add_column("ratio")
    rt.add_column("value", justify="right")
    rt.add_column("goal", justify="right")
    for name, value in ratios.items():
        goal = goals.get(name)
        mark = "" if goal is None else ("[green]met[/]" if value <= goal else "[red]missed[/]")
        rt.add_row(name, f"{value:.2f}×", mark)
    Console().print(rt)


def remove_tree(path: Path) -> None:
    """``rm -rf`` that stays on this filesystem (a leaked mount below is left alone)."""
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """min/median/max/mean of a non-empty sequence."""
    if not values:
        raise ValueError("no samples")
    return {"n": len(values), "min": min(values), "median": statistics.median(values),
            "max": max(values), "mean": statistics.fmean(values)}


@dataclass
class Report:
    """Everything one bench run produced; :meth:`as_dict` is the JSON document."""

    profile: str
    scenarios: list[str]
    host: dict[str, Any]
    targets: list[dict[str, Any]] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC)
                         .strftime("%Y-%m-%dT%H:%M:%SZ"))
    seconds: float = 0.0
    #: Whole-command comparisons with peers (``--peers``): name -> what
    #: :func:`layerfs_bench.start_latency.compare` returns.
    comparisons: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": self.created,
                "profile": self.profile, "seconds": round(self.seconds, 3),
                "scenarios": self.scenarios, "host": self.host, "targets": self.targets,
                "results": [r.as_dict() for r in self.results], "skipped": self.skipped,
                "errors": self.errors, "comparisons": self.comparisons}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        validate(data)
        return cls(profile=data["profile"], scenarios=list(data["scenarios"]), host=data["host"],
                   targets=list(data["targets"]),
                   results=[Result.from_dict(r) for r in data["results"]],
                   skipped=list(data["skipped"]), errors=list(data["errors"]),
                   created=data["created"], seconds=float(data["seconds"]),
                   comparisons=dict(data.get("comparisons") or {}))

    def find(self, scenario: str | None = None, metric: str | None = None,
             target: str | None = None, **params: Any) -> list[Result]:
        """Results matching every given field and parameter value."""
        return [r for r in self.results
                if (scenario is None or r.scenario == scenario)
                and (metric is None or r.metric == metric)
                and (target is None or r.target == target)
                and all(r.params.get(k) == v for k, v in params.items())]

    def one(self, scenario: str, metric: str, target: str, **params: Any) -> Result:
        found = self.find(scenario, metric, target, **params)
        if len(found) != 1:
            raise LookupError(f"{len(found)} results for {scenario}/{metric} on {target} "
                              f"with {params}")
        return found[0]

    def target_labels(self) -> list[str]:
        return [t["label"] for t in self.targets]

    def merge(self, other: Report) -> None:
        """Add another run's targets and rows (e.g. devicemapper from the qemu guest)."""
        self.targets += other.targets
        self.results += other.results
        self.skipped += other.skipped
        self.errors += other.errors


def validate(data: dict[str, Any]) -> None:
    """Raise InvalidArgument unless ``data`` is a results document this code can read."""
    if data.get("schema") != SCHEMA:
        raise InvalidArgument(f"not a layerfs bench document (schema={data.get('schema')!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise InvalidArgument(f"bench schema_version {data.get('schema_version')!r}; this "
                              f"layerfs reads version {SCHEMA_VERSION}")
    for key in ("created", "profile", "seconds", "scenarios", "host", "targets", "results",
                "skipped", "errors"):
        if key not in data:
            raise InvalidArgument(f"bench document lacks {key!r}")
    for row in data["results"]:
        missing = [k for k in RESULT_FIELDS if k not in row]
        if missing:
            raise InvalidArgument(f"result row lacks {', '.join(missing)}: {row}")


def write_json(report: Report, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report.as_dict(), indent=2, sort_keys=False) + "\n")
    tmp.replace(out)
    return out


def load_json(path: str | os.PathLike[str]) -> Report:
    return Report.from_dict(json.loads(Path(path).read_text()))


# --- the machine --------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_info() -> dict[str, Any]:
    """Kernel, CPU, memory and software versions, recorded with every run."""
    from layerfs import __version__ as layerfs_version

    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open("/proc/meminfo", encoding="ascii") as f:
        mem = int(f.readline().split()[1]) * 1024
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5)
        commit = proc.stdout.strip() or None if proc.returncode == 0 else None
    return {"kernel": platform.release(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "memory_bytes": mem, "python": platform.python_version(),
            "layerfs": layerfs_version, "git_commit": commit, "machine": platform.machine(),
            "in_guest": os.environ.get("LAYERFS_IN_GUEST") == "1"}


def host_has_device_mapper() -> bool:
    try:
        with open("/proc/devices", encoding="ascii") as f:
            return any(line.split()[-1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


def drop_caches() -> None:
    """Write back, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --- scenario context ---------------------------------------------------------------------------

@dataclass
class Probe:
    """One timed operation. ``setup(rep)`` (untimed) returns the argument ``op`` gets;
    ``after(arg)`` (untimed) runs after each timing. ``batch`` calls of ``op`` make one
    sample, reported per call."""

    metric: str
    op: Callable[[Any], object]
    params: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[int], Any] | None = None
    after: Callable[[Any], None] | None = None
    unit: str = "ms"
    batch: int = 1
    primary: bool = False
    note: str | None = None


_UNIT_NS = {"s": 1e9, "ms": 1e6, "us": 1e3, "ns": 1.0}


class Reporter(Protocol):
    def plan(self, total: int) -> None: ...
    def start(self, scenario: str, target: str) -> None: ...
    def step(self, text: str) -> None: ...
    def finish(self, scenario: str, target: str, status: str) -> None: ...
    def note(self, text: str) -> None: ...


class NullReporter:
    def plan(self, total: int) -> None: ...
    def start(self, scenario: str, target: str) -> None: ...
    def step(self, text: str) -> None: ...
    def finish(self, scenario: str, target: str, status: str) -> None: ...
    def note(self, text: str) -> None: ...


class Ctx:
    """What a scenario gets: the target's store, a scratch dir, and ways to record."""

    def __init__(self, session: TargetSession, scenario: str, report: Report,
                 reporter: Reporter, benchmark: Any = None) -> None:
        self.session = session
        self.target = session.target
        self.scenario = scenario
        self.report = report
        self.reporter = reporter
        self.benchmark = benchmark  # a pytest-benchmark fixture, under pytest only
        self.profile = report.profile
        self.scratch = session.scratch / scenario
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.docker = session.docker
        self._store: LayerStore | None = None
        self._bench_used = False  # the pytest-benchmark fixture times one probe per test

    # -- the store ---------------------------------------------------------------------------
    @property
    def store(self) -> LayerStore:
        if self._store is None:
            if self.target.is_docker:
                raise ScenarioSkip("not measured for Docker: its storage is kernel overlay2, "
                                   "the overlay2 column")
            self._store = self.session.open_store()
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self.session.close_store(self._store)
            self._store = None

    @contextlib.contextmanager
    def variant(self, extra_options: Sequence[str]) -> Iterator[LayerStore]:
        """A second store of the same driver with more options, on a fresh root beside the
        main one (same backing filesystem); wiped and closed afterwards."""
        store = self.session.open_store(tuple(extra_options))
        try:
            yield store
        finally:
            self.session.close_store(store)

    # -- recording -----------------------------------------------------------------------------
    def step(self, text: str) -> None:
        self.reporter.step(text)

    def record(self, metric: str, values: Sequence[float], *, unit: str, kind: str = "time",
               params: dict[str, Any] | None = None, note: str | None = None) -> Result:
        s = summarize(values)
        info = self.session.info
        result = Result(
            scenario=self.scenario, metric=metric, target=self.target.label,
            driver=self.target.driver, options=list(self.target.options),
            backing_fs=info.get("backing_fs") or "unknown", kernel=self.report.host["kernel"],
            cpu=self.report.host["cpu"], params=dict(params or {}), unit=unit, kind=kind,
            n=int(s["n"]), min=s["min"], median=s["median"], max=s["max"], mean=s["mean"],
            samples=[float(v) for v in values] if len(values) <= MAX_SAMPLES else None,
            note=note)
        self.report.results.append(result)
        return result

    def skip(self, reason: str, metric: str | None = None,
             params: dict[str, Any] | None = None) -> None:
        """Record that one metric (or, without ``metric``, part of the scenario) was skipped."""
        self.report.skipped.append({"target": self.target.label, "scenario": self.scenario,
                                    "metric": metric, "params": dict(params or {}),
                                    "reason": reason})

    # -- timing ----------------------------------------------------------------------------------
    def run_probes(self, probes: Sequence[Probe], reps: int, *, label: str = "") -> dict[str, Any]:
        """Time every probe ``reps`` times, interleaved (rep 0 of each, rep 1 of each, ...),
        and record one result per probe. Returns ``{metric/params key: samples}``.

        Under pytest-benchmark, the first probe marked ``primary`` is timed by the
        ``benchmark`` fixture (``pedantic``, one round per rep) before the others.
        """
        samples: dict[int, list[float]] = {i: [] for i in range(len(probes))}
        rest = list(range(len(probes)))
        bench = self.benchmark
        if bench is not None and not getattr(bench, "disabled", False) and not self._bench_used:
            primary = next((i for i, p in enumerate(probes) if p.primary), None)
            if primary is not None:
                self._bench_used = True
                samples[primary] = self._pytest_benchmark(probes[primary], reps)
                rest.remove(primary)
        for rep in range(reps):
            if label:
                self.step(f"{label} {rep + 1}/{reps}")
            for i in rest:
                samples[i].append(self._time_once(probes[i], rep))
        out = {}
        for i, p in enumerate(probes):
            self.record(p.metric, samples[i], unit=p.unit, params=p.params, note=p.note)
            out[f"{p.metric}{sorted(p.params.items())}"] = samples[i]
        return out

    def _time_once(self, p: Probe, rep: int) -> float:
        arg = p.setup(rep) if p.setup else None
        op = p.op
        t0 = time.perf_counter_ns()
        for _ in range(p.batch):
            op(arg)
        dt = time.perf_counter_ns() - t0
        if p.after:
            p.after(arg)
        return dt / p.batch / _UNIT_NS[p.unit]

    def _pytest_benchmark(self, p: Probe, reps: int) -> list[float]:
        """Time ``p`` with pytest-benchmark's ``pedantic``: one round per rep with its own
        setup, or, for a batched probe, ``batch`` iterations per round on one argument."""
        bench = self.benchmark
        bench.group = self.scenario
        bench.extra_info.update({"metric": p.metric, "params": p.params, "unit": p.unit})
        if p.batch > 1:
            arg = p.setup(0) if p.setup else None
            bench.pedantic(p.op, args=(arg,), rounds=reps, iterations=p.batch)
            if p.after:
                p.after(arg)
        else:
            counter = iter(range(reps + 1))

            def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
                return ((p.setup(next(counter)) if p.setup else None),), {}

            bench.pedantic(p.op, setup=setup, teardown=p.after, rounds=reps, iterations=1)
        stats = getattr(getattr(bench, "stats", None), "stats", None)
        data = list(getattr(stats, "data", None) or [])
        return [v * 1e9 / _UNIT_NS[p.unit] for v in data]


def run_joint_probes(groups: Sequence[tuple[Ctx, Sequence[Probe]]], reps: int, *,
                     label: str = "") -> None:
    """Time several targets' probes together and record each target's results: per
    repetition, each probe on every target in turn (A B C, then the next probe), so the
    machine's drift falls on every target alike. One target: :meth:`Ctx.run_probes`."""
    if len(groups) == 1:
        ctx, probes = groups[0]
        ctx.run_probes(probes, reps, label=label)
        return
    if not groups:
        return
    samples: list[list[list[float]]] = [[[] for _ in probes] for _, probes in groups]
    longest = max(len(probes) for _, probes in groups)
    for rep in range(reps):
        if label:
            groups[0][0].step(f"{label} {rep + 1}/{reps}")
        for i in range(longest):
            for g, (ctx, probes) in enumerate(groups):
                if i < len(probes):
                    samples[g][i].append(ctx._time_once(probes[i], rep))
    for g, (ctx, probes) in enumerate(groups):
        for i, p in enumerate(probes):
            ctx.record(p.metric, samples[g][i], unit=p.unit, params=p.params, note=p.note)


# --- preparing a target -------------------------------------------------------------------------

class TargetSession:
    """One target, ready to measure: scratch dirs, btrfs pool, probe result, Docker daemon."""

    def __init__(self, target: Target, profile: str, scratch: Path, reporter: Reporter) -> None:
        self.target = target
        self.profile = profile
        self.scratch = scratch
        self.reporter = reporter
        self.pool_mount: Path | None = None
        self.docker: Any = None
        # A FUSE fork server (the aufs driver's), installed while this target's scenarios
        # run: the bench is a long-lived process, like the layerfs daemon, and mounts the
        # way it would (the mount scenario times the cold helper command too).
        self.forker: Any = None
        self.reason: str | None = None
        self.info: dict[str, Any] = {"label": target.label, "driver": target.driver,
                                     "options": list(target.options), "peer": target.peer,
                                     "supported": False, "reason": None, "backing_fs": None,
                                     "status": {}, "capabilities": {}, "seconds": 0.0,
                                     "kernel": platform.release(), "vm": target.vm}
        self._roots = 0
        self.active = 0.0  # seconds spent on this target: setup, scenarios, teardown

    # The directory that holds the store roots: inside the btrfs pool for btrfs.
    @property
    def roots_dir(self) -> Path:
        return (self.pool_mount / "roots") if self.pool_mount else self.scratch / "roots"

    def setup(self) -> None:
        started = time.perf_counter()
        self.scratch.mkdir(parents=True, exist_ok=True)
        try:
            if self.target.is_docker:
                self._setup_docker()
            else:
                self._setup_driver()
        except DriverNotSupported as err:
            self.reason = err.reason
        except (LayerfsError, OSError) as err:
            self.reason = f"setup failed: {err}"
        self.info["supported"] = self.reason is None
        self.info["reason"] = self.reason
        self.active += time.perf_counter() - started

    def _setup_driver(self) -> None:
        name = self.target.driver
        if name not in plugins.registered():
            known = ", ".join(sorted(plugins.registered()))
            raise DriverNotSupported(name, f"no such driver (registered: {known}; peers: "
                                           f"{', '.join(PEERS)})")
        if os.geteuid() != 0:
            raise DriverNotSupported(name, "the bench mounts filesystems: run it as root")
        if name == "btrfs":
            self.reporter.step("creating a loop-backed btrfs pool")
            handle = pool.create_btrfs(self.scratch / "btrfs.img", self.scratch / "btrfs",
                                       size=BTRFS_POOL_SIZE[self.profile])
            self.pool_mount = handle.mountpoint
        self.roots_dir.mkdir(parents=True, exist_ok=True)
        opts = DriverOptions.parse(list(self.target.options))
        probe = plugins.probe(name, self.roots_dir / "probe", opts)
        if not probe.supported:
            reason = probe.reason or "not supported"
            if name == "devicemapper" and not host_has_device_mapper():
                reason += " (this kernel has no device-mapper: add --vm to run it in a qemu guest)"
            raise DriverNotSupported(name, reason)
        make_forker = getattr(plugins.load(name), "make_fuse_forker", None)
        if make_forker is not None:
            self.forker = make_forker()
        store = self.open_store()
        try:
            self.info["backing_fs"] = backing_filesystem(store.driver.home)
            self.info["status"] = store.status()
            caps = store.driver.capabilities
            self.info["capabilities"] = {
                "block_level_cow": caps.block_level_cow, "native_diff": caps.native_diff,
                "max_depth": caps.max_depth, "whiteouts": caps.whiteout_format.value,
                "quotas": caps.quotas}
        finally:
            self.close_store(store)

    def _setup_docker(self) -> None:
        from layerfs.testing import images

        from . import peers

        reason = peers.DockerDaemon.unavailable()
        if reason:
            raise DriverNotSupported("docker", reason)
        if os.geteuid() != 0:
            raise DriverNotSupported("docker", "a private dockerd needs root")
        self.reporter.step("starting a private dockerd")
        daemon = peers.DockerDaemon(self.scratch / "docker")
        try:
            daemon.start()
        except (OSError, RuntimeError, TimeoutError, LayerfsError) as err:
            daemon.stop()
            raise DriverNotSupported("docker", f"dockerd did not start: {err}") from err
        self.docker = daemon
        self.reporter.step("docker load busybox")
        try:
            archive = self.scratch / "busybox-image.tar"
            images.busybox_image_tar(archive, self.scratch, name="layerfs-bench/busybox:1")
            daemon.docker("load", "-i", str(archive))
        except (images.MissingTool, LayerfsError, OSError) as err:
            raise DriverNotSupported("docker", f"could not load a busybox image: {err}") from err
        self.info["status"] = {"Docker": getattr(daemon, "version", "?"),
                               "Storage Driver": daemon.storage_driver}
        self.info["backing_fs"] = backing_filesystem(self.scratch)

    def open_store(self, extra_options: tuple[str, ...] = ()) -> LayerStore:
        """A store on a fresh root (one per scenario, so each starts clean)."""
        self._roots += 1
        root = self.roots_dir / f"r{self._roots}"
        return LayerStore.open(root, self.target.driver,
                               list(self.target.options + extra_options) or None)

    def close_store(self, store: LayerStore) -> None:
        root = store.root
        try:
            store.wipe()
        finally:
            store.close()
            for m in mountlib.mounts_under(root):
                mountlib.unmount(m.target, lazy=True)
            shutil.rmtree(root, ignore_errors=True)

    def teardown(self) -> None:
        started = time.perf_counter()
        try:
            if self.docker is not None:
                self.docker.stop()
                self.docker.remove_data()
            for m in mountlib.mounts_under(self.roots_dir):
                mountlib.unmount(m.target, lazy=True)
            if self.forker is not None:
                self.forker.close()
            if self.pool_mount is not None:
                pool.destroy_btrfs(self.pool_mount)
                with contextlib.suppress(OSError):
                    self.pool_mount.rmdir()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.active += time.perf_counter() - started
            self.info["seconds"] = round(self.active, 3)


# --- the scratch root -----------------------------------------------------------------------------

def _run_dir_owner(name: str) -> str | None:
    # run-<pid>_<starttime>-<label>: the token of the process that made it.
    parts = name.split("-", 2)
    if len(parts) < 2 or parts[0] != "run":
        return None
    return parts[1].replace("_", ":")


def cleanup_stale(scratch: Path = SCRATCH) -> list[str]:
    """Undo what a killed bench run left under ``scratch``: mounts, its btrfs pool (loop
    device found from its own mount, by exact name), files. Live runs are left alone."""
    done: list[str] = []
    if not scratch.is_dir():
        return done
    for entry in sorted(scratch.iterdir()):
        owner = _run_dir_owner(entry.name)
        if owner is None or process_alive(owner):
            continue
        for sub in sorted(entry.glob("*/btrfs")):
            if mountlib.is_mounted(sub):
                with contextlib.suppress(LayerfsError):
                    pool.destroy_btrfs(sub)
                    done.append(f"destroyed btrfs pool {sub}")
        for m in mountlib.mounts_under(entry):
            mountlib.unmount(m.target, lazy=True)
            done.append(f"unmounted {m.target}")
        shutil.rmtree(entry, ignore_errors=True)
        done.append(f"removed {entry}")
    return done


def new_run_dir(scratch: Path = SCRATCH) -> Path:
    scratch.mkdir(parents=True, exist_ok=True)
    token = process_token().replace(":", "_")
    return Path(tempfile.mkdtemp(prefix=f"run-{token}-", dir=scratch))


# --- devicemapper in the qemu guest -------------------------------------------------------------

GUEST_RESULTS = "/run/layerfs-results"  # the guest's writable share (tests/support/qemu.py)

# The qemu guest runner is test tooling, not part of the installed package: --vm works
# from a layerfs checkout (bench/layerfs_bench/ -> the checkout is two folders up).
CHECKOUT = Path(__file__).resolve().parents[2]


def run_in_vm(targets: Sequence[Target], scenario_names: Sequence[str], profile: str,
              reporter: Reporter, timeout: float = 3600) -> tuple[Report | None, str | None]:
    """Run the bench for ``targets`` inside the qemu guest (device-mapper works there).

    Returns ``(report, None)``, or ``(None, reason)`` when the guest could not run it.
    """
    if not (CHECKOUT / "tests" / "support" / "qemu.py").is_file():
        return None, ("the qemu guest runner (tests/support/qemu.py) is not available: --vm "
                      "needs a layerfs checkout")
    specs = [t.label for t in targets]
    with tempfile.TemporaryDirectory(prefix="lfs-bench-vm-") as tmp:
        guest_cmd = [sys.executable, "-m", "layerfs", "bench", *specs, "--profile", profile,
                     "--scenario", ",".join(scenario_names), "--json",
                     f"{GUEST_RESULTS}/bench.json", "--no-progress"]
        argv = [sys.executable, "-m", "tests.support.qemu", "run", "--results-dir", tmp,
                "--timeout", str(int(timeout)), "--", *guest_cmd]
        reporter.step(f"qemu guest: {' '.join(specs)} (boot ~10 s; Python is ~20x slower there)")
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=CHECKOUT,
                              timeout=timeout + 300)
        out_file = Path(tmp) / "bench.json"
        if not out_file.exists():
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
            return None, f"the guest run wrote no results (exit {proc.returncode}): {tail}"
        report = load_json(out_file)
    for t in report.targets:
        t["vm"] = True
        t["label"] = f"{t['label']} (vm)"
    for r in report.results:
        r.target = f"{r.target} (vm)"
    for row in report.skipped + report.errors:
        row["target"] = f"{row['target']} (vm)"
    return report, None
