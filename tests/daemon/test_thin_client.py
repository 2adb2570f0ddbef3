"""Import-time work: the thin client, the daemonless CLI, the daemon's warm-up.

Speed itself is measured by the bench (bench/layerfs_bench/start_latency.py), never
asserted here; what is asserted is *what gets imported*, which decides it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import layerfs
from layerfs.cli import build_parser

from .conftest import Daemon, Root

LAYERFS = str(Path(sys.executable).with_name("layerfs"))


def imported(argv: list[str], env: dict[str, str]) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The modules ``argv`` imports, read from ``-X importtime`` (as PYTHONPROFILEIMPORTTIME,
    so that the console script is what runs)."""
    proc = subprocess.run(argv, capture_output=True, text=True,
                          env=dict(env, PYTHONPROFILEIMPORTTIME="1"))
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    modules.discard("imported package")
    return modules, proc


def heavy(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in names or m in names)


def test_a_command_sent_to_the_daemon_imports_only_the_client(root: Root, daemon: Daemon) -> None:
    modules, proc = imported([LAYERFS, "--root", str(root.path), "images", "-q"],
                             root.environ("daemon", None))
    assert proc.returncode == 0 and len(proc.stdout.split()) == 1, proc.stderr[-2000:]
    assert "layerfs.daemon.client" in modules
    assert heavy(modules, ("rich", "sqlite3", "pyfuse3", "trio", "httpx", "argparse",
                           "typing", "socket", "json", "subprocess", "pathlib")) == []
    assert heavy(modules, ("layerfs.images", "layerfs.cli", "layerfs.layers",
                           "layerfs.metastore", "layerfs.runtime")) == []


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["run", "--help"]])
def test_help_and_version_import_no_library(args: list[str], tmp_path: Path) -> None:
    env = dict(os.environ, LAYERFS_DAEMON="0", LAYERFS_ROOT=str(tmp_path / "root"))
    modules, proc = imported([LAYERFS, *args], env)
    assert proc.returncode == 0 and proc.stdout, proc.stderr[-2000:]
    assert heavy(modules, ("rich", "sqlite3", "pyfuse3", "trio", "httpx", "typing", "json",
                           "subprocess", "layerfs_drivers", "zstandard")) == []
    assert heavy(modules, ("layerfs.images", "layerfs.layers", "layerfs.metastore",
                           "layerfs.runtime", "layerfs.distribution", "layerfs.tar",
                           "layerfs.oci", "layerfs.driver", "layerfs.plugins")) == []
    if args == ["--version"]:   # printed without building the parser
        assert proc.stdout == f"layerfs {layerfs.__version__}\n"
        assert heavy(modules, ("argparse", "layerfs.cli", "textwrap", "pathlib")) == []


def test_layer_ls_imports_no_image_code(root: Root) -> None:
    modules, proc = imported([LAYERFS, "--root", str(root.path), "layer", "ls"],
                             root.environ("in-process", None))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sqlite3" in modules     # it does use that (piped, the table is plain rows: no rich)
    assert heavy(modules, ("pyfuse3", "trio", "httpx", "zstandard")) == []
    assert heavy(modules, ("layerfs.images", "layerfs.distribution", "layerfs.tar",
                           "layerfs.oci", "layerfs.runtime")) == []


def test_every_subcommand_parser_is_the_same_built_alone() -> None:
    """Building only the subcommand argv runs gives the very parser a full build gives."""
    full = build_parser(None)
    sub = next(a for a in full._actions if a.dest == "command")
    choices = sub.choices
    assert choices is not None and len(choices) > 20
    assert build_parser(["--help"]).format_help() == full.format_help()
    for name, parser in choices.items():   # type: ignore[union-attr]
        alone = build_parser(["--root", "/x", name, "--help"])
        alone_sub = next(a for a in alone._actions if a.dest == "command")
        assert alone_sub.choices[name].format_help() == parser.format_help(), name  # type: ignore[index]


def test_every_public_name_imports() -> None:
    for name in layerfs.__all__:
        assert getattr(layerfs, name) is not None, name


def test_the_warm_up_leaves_no_process_state_behind() -> None:
    """What the daemon imports before forking workers: no thread, no SQLite connection,
    no rich console (it would carry the daemon's terminal and environment into every
    worker), none of the modules that read the environment at import."""
    code = """
import gc, sqlite3, sys, threading
from layerfs.daemon.warm import warm_up, WARM_MODULES
failed = warm_up()
assert not failed, failed
assert threading.active_count() == 1, threading.enumerate()
assert not [o for o in gc.get_objects() if isinstance(o, sqlite3.Connection)]
console = sys.modules["layerfs.cli.console"]
assert "out" not in vars(console) and "err" not in vars(console)
assert "layerfs_bench.harness" not in sys.modules
assert all(m in sys.modules for m in WARM_MODULES)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout == "ok\n", proc.stderr[-3000:]
