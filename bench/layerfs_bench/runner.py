"""Running the scenarios on targets: :func:`run` (a whole bench) and :func:`run_scenario`
(one scenario on one prepared target, also what pytest-benchmark calls).

The orchestration sits here, on top of :mod:`.harness` (targets, sessions, results,
reports) and :mod:`.scenarios` (what is measured), so that neither of those imports
the other's caller: scenarios use the harness's context, the harness knows no scenario.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layerfs.errors import InvalidArgument, LayerfsError

from . import scenarios as sc
from .harness import (
    PROFILES,
    SCRATCH,
    Ctx,
    NullReporter,
    Report,
    Reporter,
    ScenarioSkip,
    Target,
    TargetSession,
    cleanup_stale,
    host_info,
    new_run_dir,
)


def run(targets: Sequence[Target], scenario_names: Sequence[str], profile: str = "quick", *,
        reporter: Reporter | None = None, scratch: Path = SCRATCH,
        params_override: dict[str, dict[str, Any]] | None = None) -> Report:
    """Run ``scenario_names`` on every target with ``profile``; never raises for a driver
    that fails or is unsupported (those become ``skipped``/``errors`` rows)."""
    if profile not in PROFILES:
        raise InvalidArgument(f"unknown profile {profile!r} (use {', '.join(PROFILES)})")
    names = sc.resolve(scenario_names)
    reporter = reporter or NullReporter()
    report = Report(profile=profile, scenarios=list(names), host=host_info())
    t0 = time.perf_counter()
    cleanup_stale(scratch)
    run_dir = new_run_dir(scratch)
    sessions: list[TargetSession] = []
    reporter.plan(len(names) * len(targets))
    try:
        for i, target in enumerate(targets):
            session = TargetSession(target, profile, run_dir / f"t{i}", reporter)
            reporter.start("setup", target.label)
            session.setup()
            reporter.finish("setup", target.label, "ok" if session.reason is None else "skipped")
            sessions.append(session)
        for name in names:
            for session in sessions:
                run_scenario(session, name, report, reporter,
                             (params_override or {}).get(name))
    finally:
        for session in sessions:
            with contextlib.suppress(Exception):
                session.teardown()
            report.targets.append(session.info)
        shutil.rmtree(run_dir, ignore_errors=True)
        report.seconds = time.perf_counter() - t0
    return report


def run_scenario(session: TargetSession, name: str, report: Report, reporter: Reporter,
                 override: dict[str, Any] | None = None, benchmark: Any = None) -> str:
    """Run one scenario on one prepared target; returns ok / skipped / error."""
    label = session.target.label
    reporter.start(name, label)
    if session.reason is not None:
        report.skipped.append({"target": label, "scenario": name, "metric": None, "params": {},
                               "reason": session.reason})
        reporter.finish(name, label, "skipped")
        return "skipped"
    scenario = sc.SCENARIOS[name]
    params = dict(scenario.profiles[session.profile])
    params.update(override or {})
    ctx = Ctx(session, name, report, reporter, benchmark)
    started = time.perf_counter()
    status = "ok"
    try:
        scenario.fn(ctx, **params)
    except ScenarioSkip as err:
        status = "skipped"
        ctx.skip(str(err))
    except (LayerfsError, OSError, subprocess.SubprocessError, AssertionError) as err:
        status = "error"
        report.errors.append({"target": label, "scenario": name,
                              "error": f"{type(err).__name__}: {err}"})
    finally:
        try:
            ctx.close()
        except (LayerfsError, OSError) as err:
            report.errors.append({"target": label, "scenario": name,
                                  "error": f"cleanup: {type(err).__name__}: {err}"})
            status = "error"
    elapsed = time.perf_counter() - started
    session.active += elapsed
    reporter.finish(name, label, f"{status} {elapsed:.1f}s")
    return status
