"""The bench in CI: every scenario in the tiny profile on overlay2, vfs, btrfs and aufs,
then sanity checks where physics says which way a number must go.

One run (module fixture, ~20-40 s) feeds every check. Timings are compared only
within that run and with wide margins: the machine is noisy (MACHINE.md), and
the checks are about orders of magnitude (a copy-up of 8 MiB is ~10x a 4 KiB
one on overlay2, ~1x on btrfs), not percents.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
from pathlib import Path

import pytest
from layerfs_bench import harness, plots, runner, scenarios

from layerfs import cli

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the bench mounts filesystems: root"),
              pytest.mark.slow]

DRIVERS = ("overlay2", "vfs", "btrfs", "aufs")
REQUIRED = [d for d in os.environ.get("LAYERFS_REQUIRE_DRIVERS", "").split(",") if d]
MiB = 1 << 20


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> harness.Report:
    targets = [harness.parse_target(d) for d in DRIVERS]
    return runner.run(targets, ["all"], "tiny", scratch=tmp_path_factory.mktemp("bench"))


def measured(report: harness.Report, driver: str) -> None:
    """Skip (or, for a driver CI requires, fail) when ``driver`` could not be measured."""
    info = next(t for t in report.targets if t["label"] == driver)
    if not info["supported"]:
        if driver in REQUIRED:
            pytest.fail(f"{driver} is required here but was not measured: {info['reason']}")
        pytest.skip(f"{driver} not supported here: {info['reason']}")


def median(report: harness.Report, scenario: str, metric: str, driver: str, **params: object
           ) -> float:
    return report.one(scenario, metric, driver, **params).median


# --- the run as a whole ---------------------------------------------------------------------------

def test_no_scenario_failed(report: harness.Report) -> None:
    assert report.errors == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_scenario_ran(report: harness.Report, driver: str) -> None:
    measured(report, driver)
    for name in scenarios.resolve(["all"]):  # engines runs when named (test_bench_engines.py)
        rows = report.find(name, target=driver)
        skips = [s for s in report.skipped if s["target"] == driver and s["scenario"] == name
                 and s["metric"] is None]
        assert rows, f"{name} recorded nothing on {driver} ({skips})"
        assert not skips, skips


def test_results_record_the_machine(report: harness.Report) -> None:
    assert report.results
    for r in report.results:
        assert r.kernel == platform.release()
        assert r.cpu and r.backing_fs and r.driver and r.params is not None
        assert r.min <= r.median <= r.max, r
        assert r.n >= 1 and (r.samples is None or len(r.samples) == r.n)
    fs = {t["label"]: t["backing_fs"] for t in report.targets if t["supported"]}
    if "btrfs" in fs:
        assert fs["btrfs"] == "btrfs"


def test_json_schema_round_trip(report: harness.Report, tmp_path: Path) -> None:
    path = harness.write_json(report, tmp_path / "out.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "layerfs-bench"
    assert data["schema_version"] == harness.SCHEMA_VERSION
    assert {"kernel", "cpu", "cpus"} <= set(data["host"])
    for row in data["results"]:
        assert set(harness.RESULT_FIELDS) <= set(row)
    again = harness.load_json(path)
    assert len(again.results) == len(report.results)
    data["schema_version"] = 999
    with pytest.raises(ValueError, match="schema_version"):
        harness.validate(data)


# --- copy-up ----------------------------------------------------------------------------------------

def test_copy_up_grows_with_size_on_overlay2(report: harness.Report) -> None:
    measured(report, "overlay2")
    sizes = sorted(r.params["size"] for r in report.find("copy-up", "first_write", "overlay2"))
    # Noise (other I/O, fsync hiccups) only ever adds time, so the fastest of the
    # repetitions is what shows the physics: 4 KiB -> 1 MiB -> 8 MiB copy more data.
    fastest = [report.one("copy-up", "first_write", "overlay2", size=s).min for s in sizes]
    shown = dict(zip(sizes, fastest, strict=True))
    assert fastest[-1] > 3 * fastest[0], shown
    assert fastest[-1] > fastest[1] > 0.8 * fastest[0], shown
    first = median(report, "copy-up", "first_write", "overlay2", size=sizes[-1])
    second = median(report, "copy-up", "second_write", "overlay2", size=sizes[-1])
    assert second * 5 < first, "the second write must not copy again"
    chmod = [report.one("copy-up", "first_chmod", "overlay2", size=s, metacopy=False).min
             for s in (sizes[0], sizes[-1])]
    assert chmod[1] > 3 * chmod[0], chmod


@pytest.mark.parametrize("driver", ["btrfs", "vfs"])
def test_copy_up_flat_where_no_file_is_copied(report: harness.Report, driver: str) -> None:
    measured(report, driver)
    measured(report, "overlay2")
    sizes = sorted(r.params["size"] for r in report.find("copy-up", "first_write", driver))
    small = median(report, "copy-up", "first_write", driver, size=sizes[0])
    large = median(report, "copy-up", "first_write", driver, size=sizes[-1])
    reference = median(report, "copy-up", "first_write", "overlay2", size=sizes[-1])
    assert large < 0.1 * reference, (driver, large, reference)
    assert large < max(3 * small, 0.2), (driver, small, large)  # ms


def test_metacopy_chmod_copies_no_data(report: harness.Report) -> None:
    measured(report, "overlay2")
    rows = report.find("copy-up", "first_chmod", "overlay2", metacopy=True)
    if not rows:
        pytest.skip(f"metacopy not measured: {report.skipped}")
    size = max(r.params["size"] for r in rows)
    meta = median(report, "copy-up", "first_chmod", "overlay2", size=size, metacopy=True)
    full = median(report, "copy-up", "first_chmod", "overlay2", size=size, metacopy=False)
    assert meta < 0.25 * full, (meta, full)


# --- whiteouts ----------------------------------------------------------------------------------------

def test_whiteout_inode_counts(report: harness.Report) -> None:
    costs = {r.target: r.median for r in report.find("whiteout", "whiteout_inodes")}
    if "aufs" in costs:  # one .wh.NAME file per deleted name
        assert 0.9 <= costs["aufs"] <= 1.1, costs
    if "overlay2" in costs:
        # A 0/0 char device per name; since Linux 5.8 they share one inode (hardlinks).
        assert 0 <= costs["overlay2"] <= 1.05, costs
        if tuple(int(x) for x in platform.release().split(".")[:2]) >= (5, 8):
            assert costs["overlay2"] < 0.5, costs
    for driver in ("vfs", "btrfs"):  # the layer holds a full copy: deleting frees its inode
        if driver in costs:
            assert -1.1 <= costs[driver] <= -0.9, costs
    for driver in ("overlay2", "aufs"):
        if driver in costs:
            assert median(report, "whiteout", "opaque_inodes", driver) >= 1  # the new dir


def test_deleted_names_are_gone_everywhere(report: harness.Report) -> None:
    # The scenario itself asserts that listings are empty; here: nothing failed doing so.
    assert not [e for e in report.errors if e["scenario"] == "whiteout"]
    assert report.find("whiteout", "readdir", dir="whiteouts")


# --- stat lookups -----------------------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["aufs", "overlay2"])
def test_deeper_stacks_are_not_faster(report: harness.Report, driver: str) -> None:
    measured(report, driver)
    rows = report.find("stat-lookup", "stat", driver, position="bottom", cache="first")
    deepest = max(r.params["depth"] for r in rows)
    by_layers = {r.params["layers"]: r.median for r in rows if r.params["depth"] == deepest}
    shallow, deep = by_layers[min(by_layers)], by_layers[max(by_layers)]
    assert deep >= 0.8 * shallow, by_layers


def test_aufs_counted_lookups_match_the_prediction(report: harness.Report) -> None:
    measured(report, "aufs")
    rows = report.find("stat-lookup", "lookups", "aufs")
    if not rows:
        pytest.skip("the aufs FUSE filesystem exposes no user.layerfs.stats counters")
    for r in rows:
        layers, depth = r.params["layers"], r.params["depth"]
        want = layers * depth
        if r.params["position"] == "top":  # found in the top branch: the last step stops
            want = layers * (depth - 1) + 1
        assert r.min == r.max == want, (r.params, r.samples)


# --- layers -------------------------------------------------------------------------------------------

def test_space_per_layer(report: harness.Report) -> None:
    for driver in ("overlay2", "aufs"):
        if report.find("layers", "layer_inodes", driver):
            base = median(report, "layers", "base_inodes", driver)
            assert median(report, "layers", "layer_inodes", driver) < base / 4
    if report.find("layers", "layer_inodes", "vfs"):  # a full copy per layer
        assert median(report, "layers", "layer_inodes", "vfs") >= \
            median(report, "layers", "base_inodes", "vfs")
    if report.find("layers", "cow_layer_bytes", "overlay2"):  # copy-up of the whole file
        big = report.find("layers", "cow_layer_bytes", "overlay2")[0].params["file"]
        assert median(report, "layers", "cow_layer_bytes", "overlay2") >= big
    if report.find("layers", "cow_exclusive_bytes", "btrfs"):  # one extent, the rest shared
        big = report.find("layers", "cow_exclusive_bytes", "btrfs")[0].params["file"]
        assert median(report, "layers", "cow_exclusive_bytes", "btrfs") <= 128 * 1024
        assert median(report, "layers", "cow_shared_bytes", "btrfs") >= big // 2


def test_mount_time_recorded_per_depth(report: harness.Report) -> None:
    for driver in DRIVERS:
        rows = report.find("layers", "mount", driver)
        if rows:
            assert sorted(r.params["image_layers"] for r in rows) == \
                sorted(scenarios.SCENARIOS["layers"].profiles["tiny"]["depths"])


# --- export --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("driver", DRIVERS)
def test_export_rows(report: harness.Report, driver: str) -> None:
    measured(report, driver)
    tiny = scenarios.SCENARIOS["export"].profiles["tiny"]
    new = report.one("export", "export", driver, new_files=tiny["new_files"],
                     base_files=tiny["base_files"])
    few = report.one("export", "export", driver, changed_files=tiny["changed"] + 1,
                     base_files=tiny["base_files"])
    assert new.n == few.n == tiny["reps"] and new.min > 0 and few.min > 0


def test_io_throughput_rows(report: harness.Report) -> None:
    for driver in DRIVERS:
        if not report.find("io-throughput", target=driver):
            continue
        files = {(r.metric, r.params.get("file"), r.params.get("cache"))
                 for r in report.find("io-throughput", target=driver)}
        assert {("seq_read", "lower", "cold"), ("seq_read", "lower", "warm"),
                ("seq_read", "copied-up", "warm"), ("seq_read", "new", "warm"),
                ("seq_write", "new", None), ("rand_read_4k", "lower", None),
                ("rand_read_4k", "copied-up", None), ("rand_write_4k", "copied-up", None),
                ("rand_write_4k", "new", None), ("copy_up", None, None)} == files, driver


def test_aufs_mounts_warm_from_the_fork_server(report: harness.Report) -> None:
    measured(report, "aufs")
    paths = {r.params["path"]: r for r in report.find("mount", "mount", "aufs")}
    assert set(paths) == {"warm-fork", "cold-helper"}
    # A fork of a warm process against a new interpreter: an order of magnitude.
    assert paths["warm-fork"].min * 3 < paths["cold-helper"].min, paths
    assert {r.params["path"] for r in report.find("mount", "mount", "overlay2")} == {"driver"}


# --- the interfaces ----------------------------------------------------------------------------------

def test_plots(report: harness.Report, tmp_path: Path) -> None:
    written = plots.plot_all(report, tmp_path)
    assert {p.name for p in written} == {"copy_up.png", "stat_depth.png",
                                         "inodes_per_layer.png", "mount_depth.png"}
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_profiles_fit_the_scenarios() -> None:
    for s in scenarios.SCENARIOS.values():
        assert set(s.profiles) == set(harness.PROFILES), s.name
        for params in s.profiles.values():
            inspect.signature(s.fn).bind(None, **params)


def test_unsupported_drivers_are_skipped_with_a_reason(tmp_path: Path) -> None:
    rep = runner.run([harness.parse_target("devicemapper"), harness.parse_target("nosuch")],
                      ["copy-up"], "tiny", scratch=tmp_path)
    assert rep.errors == [] and rep.results == []
    reasons = {s["target"]: s["reason"] for s in rep.skipped}
    assert "--vm" in reasons["devicemapper"] or "device" in reasons["devicemapper"]
    assert "no such driver" in reasons["nosuch"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    rc = cli.main(["bench", "vfs", "--profile", "tiny", "--scenario", "copy-up", "--json",
                   str(out), "--no-progress"])
    assert rc == 0
    assert harness.load_json(out).find("copy-up", "first_write", "vfs")
    assert "first_write" in capsys.readouterr().out
    assert cli.main(["bench", "--from-json", str(out), "--plot", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "copy_up.png").exists()
    assert cli.main(["bench", "vfs", "--scenario", "nosuch"]) == 1
    assert "unknown scenario" in capsys.readouterr().err


@pytest.mark.parametrize("driver", DRIVERS)
def test_inspect_rows(report: harness.Report, driver: str) -> None:
    """The inspect scenario's five rows (the terminal UI's drawn on a pseudo-terminal);
    the command costs more than its analysis alone (Python start-up and opening the
    root come on top)."""
    measured(report, driver)
    metrics = {r.metric for r in report.find("inspect", target=driver)}
    assert metrics == {"first_index", "explore_tui", "explore_cli", "explain_cli",
                       "explore_analysis"}
    params = scenarios.SCENARIOS["inspect"].profiles["tiny"]
    p = {k: params[k] for k in ("layers", "files", "size")}
    for command in ("explore_cli", "explore_tui"):
        assert median(report, "inspect", "explore_analysis", driver, **p) < \
            median(report, "inspect", command, driver, **p)
