"""The bench scenarios under pytest-benchmark (see conftest.py for the options).

    pytest bench/ --benchmark-only --benchmark-json out.json
    pytest bench/ --benchmark-only --bench-driver overlay2 --bench-profile tiny
"""

from __future__ import annotations

from typing import Any

import pytest
from layerfs_bench import harness, runner


def test_scenario(benchmark: Any, bench_sessions: Any, bench_case: tuple[str, str]) -> None:
    name, driver = bench_case
    session = bench_sessions.get(driver)
    report = bench_sessions.report
    first_row, first_skip = len(report.results), len(report.skipped)
    first_error = len(report.errors)
    status = runner.run_scenario(session, name, report, harness.NullReporter(),
                                  benchmark=benchmark)
    rows = report.results[first_row:]
    benchmark.extra_info["layerfs"] = {
        "schema": harness.SCHEMA, "schema_version": harness.SCHEMA_VERSION,
        "host": report.host, "target": session.info, "profile": report.profile,
        "results": [r.as_dict() for r in rows], "skipped": report.skipped[first_skip:]}
    if status == "skipped":
        reasons = "; ".join(s["reason"] for s in report.skipped[first_skip:])
        pytest.skip(f"{name} on {driver}: {reasons}")
    if status == "error":
        pytest.fail("; ".join(e["error"] for e in report.errors[first_error:]))
    assert rows, f"{name} on {driver} recorded nothing"
