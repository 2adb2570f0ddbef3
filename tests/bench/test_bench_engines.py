"""The bench's ``engines`` scenario in CI: one tiny run on overlay2 makes every row.

containerd and Docker, each on its own storage and on layerfs's server for the
driver, interleaved: ``ctr run``, ``ctr image import``, ``docker run``, ``docker
load``, and the layerfs/native ratio of each. Timings are not judged here (the
ratios are for the notes and docs/engines.md); the rows must exist and agree.
It starts four engines (~20 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from layerfs_bench import harness, runner, scenarios
from layerfs_bench.engine_peers import ContainerdDaemon
from layerfs_bench.peers import DockerDaemon

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the bench mounts filesystems: root"),
              pytest.mark.slow, pytest.mark.timeout(600)]

METRICS = ["ctr run", "ctr image import", "docker run", "docker load"]


def test_engines_is_named_not_default() -> None:
    assert "engines" not in scenarios.resolve(["all"])
    assert scenarios.resolve(["engines"]) == ["engines"]


def test_the_engines_scenario_measures_both_sides(tmp_path: Path) -> None:
    reason = ContainerdDaemon.unavailable() or DockerDaemon.unavailable()
    if reason:
        pytest.skip(reason)
    report = runner.run([harness.parse_target("overlay2")], ["engines"], "tiny",
                         scratch=tmp_path)
    assert report.errors == [] and report.skipped == [], (report.errors, report.skipped)
    for metric in METRICS:
        native = report.one("engines", metric, "overlay2", storage="native")
        plugin = report.one("engines", metric, "overlay2", storage="layerfs")
        ratio = report.one("engines", metric, "overlay2", storage="layerfs÷native")
        assert native.n == plugin.n == 2 and native.median > 0 and plugin.median > 0
        assert ratio.kind == "ratio"
        assert ratio.median == pytest.approx(plugin.median / native.median)
