"""``layerfs bench``: run the benchmark scenarios on drivers and compare them.

The scenarios, the harness and the charts live in ``bench/`` (installed as
``layerfs_bench``); this module only parses, shows progress and renders tables.
"""

from __future__ import annotations

import argparse
import time

from ..errors import InvalidArgument
from .common import SubParsers

TYPE_CHECKING = False       # typing, rich and the library load when a command runs
if TYPE_CHECKING:
    from typing import Any

    from rich.progress import Progress

DESCRIPTION = """\
Measure what each storage driver costs, side by side. Every scenario runs on
every DRIVER in turn (interleaved: the machine is noisy, so compare within one
run); the first DRIVER is the reference for the ratio shown in each cell.
Tables show medians; --json keeps min/median/max, parameters and the machine.

scenarios (--scenario NAME, default all):
  copy-up          first 1-byte append to a lower file vs its size, against the
                   second append; the same with fsync; chmod, with and without
                   overlay2 metacopy. File-level drivers (overlay, overlay2,
                   aufs) copy the whole file: time grows with size. btrfs copies
                   at most an extent, vfs nothing (it paid at layer creation).
  whiteout         deleting N lower files: time per unlink, inodes and bytes
                   each whiteout costs; readdir/stat around N whiteouts; rm -rf
                   of a lower tree; replacing a lower dir (opaque directory).
  stat-lookup      stat() of a path of D components through L layers (file in
                   the top layer, the bottom one, or missing): right after the
                   mount, after drop_caches (cold), and warm. aufs also shows
                   the backing lookups it counted next to the seed's L x D.
  layers           apply/create/mount/unmount/remove vs stack depth; commit
                   (diff + apply); inodes and bytes per image layer (overlay's
                   hardlinked trees vs overlay2's diffs); the bytes a 4 KiB
                   write into a big lower file costs (exclusive vs shared on
                   btrfs).
  export           layer diff of a container layer into a sink: N new files in
                   new directories, and a few changed files of a big image.
                   Union drivers tar their diff directory, btrfs reads the
                   changes from its own trees, the others walk both trees.
  container-start  start-to-exit of /bin/true in busybox with the layerfs
                   runner, and the whole create/mount/run/remove cycle.
  io-throughput    sequential and random 4 KiB reads and writes of a lower, a
                   copied-up and a new file, and the copy-up itself: what the
                   data path costs (a FUSE union: nothing where the kernel
                   passes I/O through, a round trip per request elsewhere).
  mount            mount/unmount of a container layer over 5 image layers; aufs
                   both from the bench's warm fork server (as under the daemon)
                   and through its cold helper command.
  engines          (only when named) containerd and Docker on their own storage
                   vs on this driver through layerfs's snapshotter and graphdriver
                   plugin: ctr run, ctr image import, docker run, docker load, and
                   the layerfs/native ratio of each.

profiles: quick (default; every scenario on one driver in well under a minute),
--full (files up to 1 GiB, stacks up to 500 layers: many minutes per driver),
--profile tiny (CI smoke). btrfs gets a loop-backed btrfs pool made and
destroyed by the bench; everything lives under /tmp/lfs-bench."""

EPILOG = """\
examples:
  layerfs bench overlay2                            quick profile, one driver
  layerfs bench overlay2 aufs btrfs vfs             side by side, ratios vs overlay2
  layerfs bench overlay2 overlay2:metacopy=true,redirect_dir=true --scenario copy-up
  layerfs bench overlay2 --peers                    + fuse-overlayfs and Docker rows
  layerfs bench overlay2 --json out.json --plot charts/
  layerfs bench devicemapper --vm                   device-mapper inside the qemu guest
  layerfs bench --from-json out.json --plot charts/  # redraw from a saved run

docs/bench.md explains every metric and chart, with results from this machine."""

_BYTES_PARAMS = {"size", "file", "big", "lower_bytes", "write"}
_PARAM_NAMES = {"layers": "L", "depth": "D", "image_layers": "image layers"}


def register(sub: SubParsers) -> None:
    p = sub.add_parser("bench", help="benchmark drivers: copy-up, whiteouts, lookups, layers, "
                       "export, container start", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("drivers", nargs="*", metavar="DRIVER",
                   help="driver to measure, optionally with options: overlay2, aufs, btrfs, "
                        "vfs, overlay, devicemapper, overlay2:metacopy=true; 'all' for every "
                        "registered driver; peers: fuse-overlayfs, docker")
    p.add_argument("--scenario", action="append", metavar="NAME[,NAME]",
                   help="copy-up, whiteout, stat-lookup, layers, export, container-start, "
                        "io-throughput, mount, engines (repeatable; default: all but engines)")
    p.add_argument("--full", dest="profile", action="store_const", const="full",
                   help="the full sweeps (slow), instead of the quick profile")
    p.add_argument("--profile", dest="profile", choices=("tiny", "quick", "full"),
                   help="tiny (CI smoke), quick (default) or full")
    p.add_argument("--json", metavar="FILE", help="write every result (schema in docs/bench.md)")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts: copy-up time vs size, stat "
                   "time vs layers, inodes per layer, mount time vs depth")
    p.add_argument("--peers", action="store_true",
                   help="add reference rows: fuse-overlayfs (overlay2 with mount_program) and, "
                        "where installed, Docker (container start)")
    p.add_argument("--vm", action="store_true",
                   help="run devicemapper inside the qemu guest (this kernel has no "
                        "device-mapper); adds devicemapper if not listed")
    p.add_argument("--all-rows", action="store_true",
                   help="show every row (stat-lookup shows a summary by default)")
    p.add_argument("--from-json", metavar="FILE",
                   help="measure nothing: render tables (and --plot) from a saved --json")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_bench, profile="quick")


# --- running ---------------------------------------------------------------------------------------

class RichReporter:
    """Progress of a bench run on the CLI's stderr console."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.task: Any = None
        self.current = ""

    def plan(self, total: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task("bench", total=total)

    def start(self, scenario: str, target: str) -> None:
        self.current = f"{scenario} on {target}"
        self._show(self.current)

    def step(self, text: str) -> None:
        self._show(f"{self.current}: {text}")

    def finish(self, scenario: str, target: str, status: str) -> None:
        from .console import err

        if scenario == "setup":
            if status != "ok":
                err.print(f"  [yellow]{target}: not measured[/] (see skipped)")
            return
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)
        color = "green" if status.startswith("ok") else "yellow" if "skip" in status else "red"
        err.print(f"  [{color}]{status:>12}[/]  {scenario} on {target}", highlight=False)

    def note(self, text: str) -> None:
        from .console import err

        err.print(text)

    def _show(self, text: str) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=text)


def _targets(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """(native targets, targets for the qemu guest)."""
    from layerfs_bench import harness

    from .. import plugins

    names: list[str] = []
    for spec in args.drivers:
        if spec == "all":
            names += [n for n in sorted(plugins.registered(), key=_priority)
                      if n != "devicemapper" or args.vm]
        else:
            names.append(spec)
    if args.peers:
        names += [p for p in harness.PEERS if p not in names]
    if args.vm and not any(n.partition(":")[0] == "devicemapper" for n in names):
        names.append("devicemapper")
    if not names:
        raise InvalidArgument("name at least one DRIVER (e.g. layerfs bench overlay2)")
    extra = list(args.storage_opt or [])
    targets = [harness.parse_target(n, () if n.partition(":")[0] in harness.PEERS else extra)
               for n in names]
    labels = [t.label for t in targets]
    dupes = {x for x in labels if labels.count(x) > 1}
    if dupes:
        raise InvalidArgument(f"DRIVER given twice: {', '.join(sorted(dupes))}")
    vm = [t for t in targets if args.vm and t.driver == "devicemapper"]
    return [t for t in targets if t not in vm], vm


def _priority(name: str) -> int:
    from ..plugins import PRIORITY

    return PRIORITY.index(name) if name in PRIORITY else len(PRIORITY)


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from layerfs_bench import harness, runner, scenarios
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .console import err, out

    if args.from_json:
        report = harness.load_json(args.from_json)
        if args.drivers:
            raise InvalidArgument("--from-json renders a saved run: give no DRIVER")
    else:
        native, vm = _targets(args)
        names = scenarios.resolve(args.scenario)
        started = time.perf_counter()
        progress = None if args.no_progress or not err.is_terminal else Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
            console=err, transient=True)
        reporter = RichReporter(progress)
        err.print(f"[bold]layerfs bench[/] {args.profile} profile: {', '.join(names)} on "
                  f"{', '.join(t.label for t in native + vm)}", highlight=False)
        if progress is not None:
            progress.start()
        try:
            report = runner.run(native, names, args.profile, reporter=reporter)
        finally:
            if progress is not None:
                progress.stop()
        if vm:
            err.print(f"[bold]qemu guest:[/] {', '.join(t.label for t in vm)}")
            guest, reason = harness.run_in_vm(vm, names, args.profile, reporter)
            if guest is not None:
                report.merge(guest)
            else:
                for t in vm:
                    report.targets.append({"label": f"{t.label} (vm)", "driver": t.driver,
                                           "options": list(t.options), "peer": False,
                                           "supported": False, "reason": reason, "vm": True,
                                           "backing_fs": None, "status": {}, "capabilities": {},
                                           "seconds": 0.0, "kernel": None})
                    report.skipped.append({"target": f"{t.label} (vm)", "scenario": None,
                                           "metric": None, "params": {}, "reason": reason})
        if args.peers and "container-start" in names:
            report.comparisons["start-latency"] = _start_latency(args.profile, err)
        report.seconds = time.perf_counter() - started
    render(report, all_rows=args.all_rows)
    if "start-latency" in report.comparisons:
        from layerfs_bench import start_latency

        out.print("[bold]container start and import, whole commands, interleaved[/]",
                  highlight=False)
        out.print(start_latency.table(report.comparisons["start-latency"]), highlight=False,
                  markup=False)
    if args.json:
        path = harness.write_json(report, args.json)
        out.print(f"results: {path}")
    if args.plot:
        from layerfs_bench import plots

        for path in plots.plot_all(report, Path(args.plot)):
            out.print(f"chart: {path}")
    return 1 if report.errors else 0


#: Rounds of the whole-command comparison (--peers), per profile.
START_LATENCY_ROUNDS = {"tiny": 3, "quick": 10, "full": 20}


def _start_latency(profile: str, err: Any) -> dict[str, Any]:
    """``layerfs run`` through the daemon, in-process and as a library, runc, crun and
    docker run; ``layerfs import`` vs tar -x (bench/layerfs_bench/start_latency.py)."""
    from layerfs_bench import start_latency

    err.print("[bold]whole commands:[/] layerfs run (daemon, in-process, library) vs runc, crun, "
              "docker run; layerfs import vs tar -x", highlight=False)
    return start_latency.compare(START_LATENCY_ROUNDS[profile],
                                 import_mb=20 if profile == "tiny" else 100)


# --- rendering -----------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    sign = "-" if n < 0 else ""
    value = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    return f"{n}"


def fmt_value(value: float, unit: str, kind: str) -> str:
    """A median for a table cell: times in s/ms/µs, bytes in KiB/MiB, counts as numbers;
    a per-something unit (``inodes/file``) keeps its ``/file``."""
    per = f"/{unit.partition('/')[2]}" if "/" in unit else ""
    if kind == "time":
        ms = value if unit == "ms" else value / 1000 if unit == "us" else value * 1000
        if ms >= 1000:
            return f"{ms / 1000:.2f} s"
        if ms >= 1:
            return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"
        return f"{ms * 1000:.3g} µs"
    if kind == "bytes":
        return fmt_bytes(value) + per
    if kind == "count":
        return f"{value:.0f}"
    if kind == "ratio":
        return f"{value:.2f}×"
    return (f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}") + per


def fmt_params(params: dict[str, Any]) -> str:
    parts = []
    for key, value in params.items():
        if key == "predicted":
            continue
        if key in _BYTES_PARAMS and isinstance(value, int):
            value = _short_bytes(value)
        if isinstance(value, bool):
            parts.append(key if value else f"no {key}")
        elif key in ("position", "cache"):
            parts.append(str(value))
        elif key == "dir":
            parts.append(f"{value} dir")
        else:
            parts.append(f"{_PARAM_NAMES.get(key, key)}={value}")
    return " ".join(parts)


def _ratio(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.2g}" if x >= 0.01 else f"{x:.1g}"


def _short_bytes(n: int) -> str:
    """4K, 64M: sizes the scenarios chose; anything else as 565.4 MiB."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n >> shift}{unit}" if n % (1 << shift) == 0 else fmt_bytes(n)
    return fmt_bytes(n)


def headline(report: Any, result: Any) -> bool:
    """Rows shown without --all-rows: everything except the long stat-lookup sweep, of
    which only the bottom file at the deepest D (all L), and top/missing at the largest L."""
    if result.scenario != "stat-lookup":
        return True
    if result.metric == "backing_probes":
        return False
    rows = [r for r in report.results if r.scenario == "stat-lookup"]
    deepest = max(r.params.get("depth", 0) for r in rows)
    largest = max(r.params.get("layers", 0) for r in rows)
    p = result.params
    if p.get("depth") != deepest:
        return False
    return bool(p.get("position") == "bottom" or p.get("layers") == largest)


def render(report: Any, *, all_rows: bool = False) -> None:
    from rich.text import Text

    from .console import out, print_table

    labels = report.target_labels()
    measured = [t["label"] for t in report.targets if t.get("supported")]
    out.print(f"[bold]kernel[/] {report.host['kernel']}  [bold]cpu[/] {report.host['cpu']} "
              f"x{report.host['cpus']}  [bold]profile[/] {report.profile}", highlight=False,
              soft_wrap=True)
    from layerfs_bench.scenarios import SCENARIOS

    for name in report.scenarios:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for r in report.results:
            if r.scenario != name or not (all_rows or headline(report, r)):
                continue
            key = (r.metric, fmt_params(r.params))
            rows.setdefault(key, {})[r.target] = r
        cols = [label for label in labels if label in measured
                and any(label in cells for cells in rows.values())]
        if not rows:
            continue
        title = SCENARIOS[name].title if name in SCENARIOS else name
        table_rows = []
        for (metric, params), cells in rows.items():
            ref = cells.get(cols[0])
            row: list[str | Text] = [metric, params]
            for label in cols:
                r = cells.get(label)
                if r is None:
                    row.append(Text("-", style="dim"))
                    continue
                text = Text(fmt_value(r.median, r.unit, r.kind))
                if ref is not None and label != cols[0] and r.kind in ("time", "count") \
                        and ref.median > 0 and r.median > 0:
                    text.append(f" ×{_ratio(r.median / ref.median)}", style="dim")
                row.append(text)
            table_rows.append(row)
        print_table(["metric", "parameters", *cols], table_rows, title=f"{name}: {title}",
                    caption=f"median of n repetitions; ×: ratio to {cols[0]}" if len(cols) > 1
                    else "median of n repetitions", titled_when_piped=True, right=cols)
    if report.skipped:
        skipped = []
        for s in report.skipped:
            what = s.get("metric") or ""
            if s.get("params"):
                what += f" {fmt_params(s['params'])}"
            skipped.append([s["target"], s.get("scenario") or "(all)", what.strip(), s["reason"]])
        print_table(["target", "scenario", "what", "reason"], skipped, title="skipped",
                    titled_when_piped=True)
    for e in report.errors:
        out.print(Text("error", style="red") + Text(f" {e['target']} {e['scenario']}: "
                                                     f"{e['error']}"), soft_wrap=True)
    times = ", ".join(f"{t['label']} {t['seconds']:.1f} s" for t in report.targets
                      if t.get("supported"))
    out.print(f"time per target (setup, scenarios, cleanup): {times or '-'}; "
              f"run {report.seconds:.1f} s", highlight=False, soft_wrap=True)
