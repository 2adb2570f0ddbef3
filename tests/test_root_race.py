"""Many processes opening one brand-new root at the same instant (two ``layerfs daemon``
services, or two commands, started together on a new ``--root``).

Every opener must succeed -- the first makes the root, the others wait for it and adopt
it -- the root must end with one driver pinned and a sane database, and a first command
that fails and takes the root away again (:meth:`LayerStore.discard`) must not pull it
from under an opener that is using it. Used to fail about one round in four with
``FileExistsError`` or sqlite's "disk I/O error".

The library tests keep ``OPENERS`` spawned processes alive over all rounds and release
them together at a barrier each round, so the opens really overlap; the CLI test starts
the real command ``OPENERS`` times at once.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from layerfs.errors import DriverNotSupported
from layerfs.layers import LayerStore
from layerfs.metastore import SCHEMA_VERSION

OPENERS = 8
ROUNDS = 30
CLI_ROUNDS = 6

#: What an opened (and closed) root holds, whichever driver: no trace of a second driver.
ROOT_ENTRIES = {"layerfs.db", "layerfs.db-wal", "layerfs.db-shm", "mnt", "tmp"}


def _opener(worker: int, roots: list[str], driver: str, discard_odd: bool,
            barrier: Any, results: Any) -> None:
    """One process: each round, wait at the barrier with the others, then open that
    round's root. With ``discard_odd``, once all have opened, odd workers play a first
    command that failed (discard: whichever of them made the root would take it away),
    and after that even ones store a layer in it."""
    for root in roots:
        barrier.wait()
        store: LayerStore | None = None
        outcome = ""
        try:
            store = LayerStore.open(root, driver)
            outcome = f"opened {store.driver.name}"
        except BaseException as err:   # reported to the test, which fails on it
            outcome = f"{type(err).__name__}: {err}"
        if discard_odd:
            barrier.wait()   # every store is open
            if store is not None and worker % 2:
                try:
                    store.discard()
                    outcome = "discarded"
                except BaseException as err:
                    outcome = f"{type(err).__name__}: {err}"
                store = None
            barrier.wait()   # the failed first commands are over
        if store is not None:
            try:
                if discard_odd:
                    store.create(layer_id=f"layer-{worker}")
            except BaseException as err:
                outcome = f"{type(err).__name__}: {err}"
            finally:
                store.close()
        results.put((worker, root, outcome))


def race(tmp_path: Path, driver: str, rounds: int, *,
         discard_odd: bool = False) -> dict[str, list[str]]:
    """Run the openers over ``rounds`` new roots; each root's outcomes."""
    ctx = multiprocessing.get_context("spawn")   # no lock or fd of the test process leaks in
    roots = [str(tmp_path / f"root-{n}") for n in range(rounds)]
    barrier = ctx.Barrier(OPENERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_opener, args=(w, roots, driver, discard_odd, barrier,
                                               results)) for w in range(OPENERS)]
    for proc in procs:
        proc.start()
    outcomes: dict[str, list[str]] = {root: [] for root in roots}
    try:
        for _ in range(OPENERS * rounds):
            _, root, outcome = results.get(timeout=120)
            outcomes[root].append(outcome)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert all(proc.exitcode == 0 for proc in procs)
    return outcomes


def assert_sane_root(root: Path, driver: str) -> None:
    """One driver pinned, the schema complete, the database intact, nothing else made."""
    entries = set(os.listdir(root))
    assert entries <= ROOT_ENTRIES | {driver}, entries
    assert driver in entries
    with sqlite3.connect(root / "layerfs.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        settings = dict(db.execute("SELECT key, value FROM settings").fetchall())
    assert settings["driver"] == driver
    assert settings["schema"] == str(SCHEMA_VERSION)


def test_openers_of_a_new_root_all_succeed(tmp_path: Path) -> None:
    outcomes = race(tmp_path, "vfs", ROUNDS)
    failed = {root: o for root, o in outcomes.items() if o != ["opened vfs"] * OPENERS}
    assert not failed, f"{len(failed)} of {ROUNDS} rounds failed: {failed}"
    for root in outcomes:
        assert_sane_root(Path(root), "vfs")


def test_openers_of_a_new_root_overlay2(tmp_path: Path) -> None:
    """Once with a driver whose check mounts a probe next to the root."""
    try:
        LayerStore.open(tmp_path / "probe", "overlay2").discard()
    except DriverNotSupported as err:
        pytest.skip(f"overlay2: {err.reason}")
    outcomes = race(tmp_path, "overlay2", 5)
    failed = {root: o for root, o in outcomes.items() if o != ["opened overlay2"] * OPENERS}
    assert not failed, f"{len(failed)} of 5 rounds failed: {failed}"
    for root in outcomes:
        assert_sane_root(Path(root), "overlay2")


def test_failed_first_command_leaves_a_root_in_use(tmp_path: Path) -> None:
    """Half the openers discard (a first command that failed) while the other half have the
    root open: the root stays, and every layer they store is there afterwards."""
    outcomes = race(tmp_path, "vfs", ROUNDS, discard_odd=True)
    expected = sorted(["discarded"] * (OPENERS // 2) + ["opened vfs"] * (OPENERS // 2))
    failed = {root: o for root, o in outcomes.items() if sorted(o) != expected}
    assert not failed, f"{len(failed)} of {ROUNDS} rounds failed: {failed}"
    for root in outcomes:
        assert_sane_root(Path(root), "vfs")
        with LayerStore.open(root) as store:
            assert sorted(rec.id for rec in store.layers()) == \
                sorted(f"layer-{w}" for w in range(0, OPENERS, 2))


#: The ``layerfs`` executable's entry point, started with its imports done (the parser
#: built once, the driver loaded), saying "ready" and then held until a byte arrives on
#: stdin: eight
#: interpreters started one after another would otherwise reach the root tens of
#: milliseconds apart and rarely overlap.
_HELD_COMMAND = """
import os, sys
import layerfs.cli.layers, layerfs.plugins
from layerfs._entry import main
layerfs.cli.build_parser(sys.argv[1:])
layerfs.plugins.load("vfs")
print("ready", flush=True)
os.read(0, 1)
sys.exit(main())
"""


def test_commands_on_a_new_root_started_together(tmp_path: Path) -> None:
    """The real command, ``OPENERS`` at once, a few rounds: no traceback, all exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERFS_")}
    env["LAYERFS_DAEMON"] = "0"
    for n in range(CLI_ROUNDS):
        root = tmp_path / f"root-{n}"
        procs = [subprocess.Popen([sys.executable, "-c", _HELD_COMMAND, "--root", str(root),
                                   "--driver", "vfs", "layer", "ls"], env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
                 for _ in range(OPENERS)]
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go")
            proc.stdin.flush()
        errors = []
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            if (proc.returncode, err) != (0, ""):
                errors.append(f"exit {proc.returncode}: {err}")
        assert not errors, f"round {n}: " + "\n".join(errors)
        assert_sane_root(root, "vfs")


def test_a_root_whose_database_went_under_an_open_store_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process still has the root open but its database is gone (emptied under it, as a
    reset of a root that is a mount point does): making a new root there is refused, in
    one clear error, instead of waiting for ever or writing a database the open store
    does not see -- and nothing is made."""
    from layerfs import rootlock
    from layerfs.errors import InUse

    monkeypatch.setattr(rootlock, "MAKE_WAIT", 0.2)
    root = tmp_path / "root"
    with LayerStore.open(root, "vfs"):
        for name in ("layerfs.db", "layerfs.db-wal", "layerfs.db-shm"):
            (root / name).unlink(missing_ok=True)
        before = sorted(os.listdir(root))
        with pytest.raises(InUse, match="another process still has it open"):
            LayerStore.open(root, "vfs")
        assert sorted(os.listdir(root)) == before
