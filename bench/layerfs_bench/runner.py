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

from layerfs import mount as mountlib
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
            override = (params_override or {}).get(name)
            if sc.SCENARIOS[name].joint:
                run_joint_scenario(sessions, name, report, reporter, override)
                continue
            for session in sessions:
                run_scenario(session, name, report, reporter, override)
    finally:
        for session in sessions:
            with contextlib.suppress(Exception):
                session.teardown()
            report.targets.append(session.info)
        shutil.rmtree(run_dir, ignore_errors=True)
        report.seconds = time.perf_counter() - t0
    return report


def run_joint_scenario(sessions: Sequence[TargetSession], name: str, report: Report,
                       reporter: Reporter, override: dict[str, Any] | None = None) -> str:
    """Run a joint scenario once over every prepared target; returns ok / skipped / error."""
    scenario = sc.SCENARIOS[name]
    active = []
    for session in sessions:
        reporter.start(name, session.target.label)
        if session.reason is None:
            active.append(session)
            continue
        report.skipped.append({"target": session.target.label, "scenario": name,
                               "metric": None, "params": {}, "reason": session.reason})
        reporter.finish(name, session.target.label, "skipped")
    if not active:
        return "skipped"
    params = dict(scenario.profiles[active[0].profile])
    params.update(override or {})
    ctxs = [Ctx(s, name, report, reporter) for s in active]
    forker = next((s.forker for s in active if s.forker is not None), None)
    previous_forker = mountlib.set_fuse_forker(forker)
    started = time.perf_counter()
    status = "ok"
    try:
        scenario.fn(ctxs, **params)
    except ScenarioSkip as err:
        status = "skipped"
        for ctx in ctxs:
            ctx.skip(str(err))
    except (LayerfsError, OSError, subprocess.SubprocessError, AssertionError) as err:
        status = "error"
        for s in active:
            report.errors.append({"target": s.target.label, "scenario": name,
                                  "error": f"{type(err).__name__}: {err}"})
    finally:
        for ctx in ctxs:
            try:
                ctx.close()
            except (LayerfsError, OSError) as err:
                report.errors.append({"target": ctx.target.label, "scenario": name,
                                      "error": f"cleanup: {type(err).__name__}: {err}"})
                status = "error"
        mountlib.set_fuse_forker(previous_forker)
    elapsed = time.perf_counter() - started
    for s in active:
        s.active += elapsed / len(active)
        reporter.finish(name, s.target.label, f"{status} {elapsed:.1f}s (joint)")
    return status


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
    previous_forker = mountlib.set_fuse_forker(session.forker)
    try:
        scenario.fn([ctx] if scenario.joint else ctx, **params)
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
        mountlib.set_fuse_forker(previous_forker)
    elapsed = time.perf_counter() - started
    session.active += elapsed
    reporter.finish(name, label, f"{status} {elapsed:.1f}s")
    return status
