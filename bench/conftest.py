"""pytest entry of the bench: ``pytest bench/ --benchmark-only [--benchmark-json FILE]``.

Every (scenario, driver) pair is one test, in scenario-major order so drivers
interleave as in ``layerfs bench``. Each test runs the whole scenario through
the harness; its headline operation (the probe marked ``primary``: first write
to the largest file, unlink, warm stat through the deepest stack, mount at the
deepest depth, container start) is timed by pytest-benchmark itself, and every
row the scenario recorded goes into the benchmark's ``extra_info["layerfs"]``
(same fields as ``layerfs bench --json``), so ``--benchmark-json`` holds all of it.

Options: ``--bench-driver NAME`` (repeatable, also ``overlay2:metacopy=true`` or
a peer; default: overlay2, aufs, btrfs, vfs, overlay), ``--bench-profile``
(tiny, quick (default), full), ``--bench-scenario NAME`` (repeatable).
Run as root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from layerfs_bench import harness, scenarios

DEFAULT_DRIVERS = ("overlay2", "aufs", "btrfs", "vfs", "overlay")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("layerfs bench")
    group.addoption("--bench-driver", action="append", default=None, metavar="NAME",
                    help=f"driver or peer to measure (repeatable; default: "
                         f"{', '.join(DEFAULT_DRIVERS)})")
    group.addoption("--bench-profile", default=os.environ.get("LAYERFS_BENCH_PROFILE", "quick"),
                    choices=harness.PROFILES, help="scenario parameters (default: quick)")
    group.addoption("--bench-scenario", action="append", default=None, metavar="NAME",
                    help="scenario to run (repeatable; default: all)")


def _drivers(config: pytest.Config) -> list[str]:
    return list(config.getoption("--bench-driver") or DEFAULT_DRIVERS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    names = scenarios.resolve(config.getoption("--bench-scenario"))
    cases = [(name, driver) for name in names for driver in _drivers(config)]
    metafunc.parametrize("bench_case", cases, ids=[f"{n}-{d}" for n, d in cases])


class _Sessions:
    """Prepared targets, made on first use and torn down at the end of the session."""

    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.run_dir = harness.new_run_dir()
        self.report = harness.Report(profile=profile, scenarios=list(scenarios.SCENARIOS),
                                     host=harness.host_info())
        self.sessions: dict[str, harness.TargetSession] = {}

    def get(self, spec: str) -> harness.TargetSession:
        if spec not in self.sessions:
            target = harness.parse_target(spec)
            session = harness.TargetSession(target, self.profile,
                                            self.run_dir / f"t{len(self.sessions)}",
                                            harness.NullReporter())
            session.setup()
            self.sessions[spec] = session
        return self.sessions[spec]

    def close(self) -> None:
        for session in self.sessions.values():
            session.teardown()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def bench_sessions(request: pytest.FixtureRequest) -> Iterator[_Sessions]:
    if os.geteuid() != 0:
        pytest.skip("the bench mounts filesystems: run it as root")
    harness.cleanup_stale()
    sessions = _Sessions(request.config.getoption("--bench-profile"))
    try:
        yield sessions
    finally:
        sessions.close()
