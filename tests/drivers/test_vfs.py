"""vfs only: a ``kill -9`` of ``layer create`` while ``cp`` copies a big parent (issue 20)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from layerfs.layers import LayerStore
from layerfs.testing.conformance import close_and_check

from ..host_resources import pids_whose_argv


def copies_writing_under(root: Path) -> list[int]:
    """Pids of ``cp`` processes whose command line names a path under ``root`` (exact)."""
    prefix = str(root).encode() + b"/"
    return pids_whose_argv(lambda argv: os.path.basename(argv[0]) == b"cp" and
                           any(a.startswith(prefix) for a in argv[1:]))


def test_kill_during_create_of_a_big_copy(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LayerStore.open(root, "vfs")
    base = store.create(layer_id="base").id
    with store.mounted(base) as path:
        # 12,000 small files (a copy of a few seconds here): 500 written, the rest cp'd.
        (path / "d0").mkdir()
        for i in range(500):
            (path / "d0" / f"f{i}").write_bytes(b"x" * 64)
        for d in range(1, 24):
            subprocess.run(["cp", "-a", str(path / "d0"), str(path / f"d{d}")], check=True)
    store.close()
    creator = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from layerfs.layers import LayerStore
        LayerStore.open(sys.argv[1], "vfs").create(sys.argv[2], layer_id="child")
    """), str(root), base])
    home = root / "vfs"
    deadline = time.monotonic() + 30
    while not copies_writing_under(root):
        assert creator.poll() is None and time.monotonic() < deadline, "the copy never started"
        time.sleep(0.01)
    time.sleep(0.1)                                     # well into the copy
    creator.send_signal(signal.SIGKILL)
    creator.wait()
    # The copy dies with its creator (it used to go on for as long as it took).
    deadline = time.monotonic() + 0.5
    while copies_writing_under(root):
        assert time.monotonic() < deadline, f"cp still running: {copies_writing_under(root)}"
        time.sleep(0.02)
    # The next command recovers at once, and nothing half-copied is visible.
    store = LayerStore.open(root, "vfs")
    assert [r.id for r in store.layers()] == [base]
    assert not (home / "dir" / "child").exists()
    assert not any((home / "staging").iterdir())
    store.create(base, layer_id="child")                # the same id works again
    assert len(list((home / "dir" / "child").rglob("f*"))) == 12_000
    close_and_check(store)


def test_recovery_tolerates_a_tree_still_being_written(tmp_path: Path) -> None:
    """A stray copy still writing into a dead creator's staging directory (as one from
    an older layerfs would) does not make recovery fail; the leftover goes later."""
    root = tmp_path / "root"
    store = LayerStore.open(root, "vfs")
    base = store.create(layer_id="base").id
    store.close()
    staging = root / "vfs" / "staging" / "999999999_1_child"   # a dead owner's copy
    staging.mkdir(parents=True)
    writer = subprocess.Popen(["sh", "-c", f"i=0; while [ $i -lt 400 ]; do mkdir -p "
                                           f"{staging}/d$i && : > {staging}/d$i/f; "
                                           f"i=$((i+1)); done"])
    try:
        store = LayerStore.open(root, "vfs")
        store.create(base, layer_id="other")            # sweeps: never an error
        assert {r.id for r in store.layers()} == {base, "other"}
    finally:
        writer.wait()
    store.remove("other")                               # sweeps again, now it is still
    assert not staging.exists()
    close_and_check(store)
