"""docs/example.py must keep working: it is what a new user copies first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_example_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(DOCS / "example.py"), str(tmp_path / "root"),
                           "overlay2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "driver: overlay2"
    assert "C /etc/motd" in lines and "D /etc/hostname" in lines and "A /hello.txt" in lines
    assert "diff: 11 bytes of file data" in lines
    assert lines[-1] == "copy sees: ['motd'] hi"


def test_example_interrupted_half_way_leaves_no_layers(tmp_path: Path) -> None:
    """Ctrl-C after the layers are made (here: in ``changes``) still removes them."""
    root = tmp_path / "root"
    code = ("import runpy, sys\n"
            "import layerfs.layers as layers\n"
            "def interrupt(*args):\n"
            "    raise KeyboardInterrupt\n"
            "layers.LayerStore.changes = interrupt\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(DOCS / "example.py"), str(root),
                           "overlay2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    import layerfs
    with layerfs.open_root(root) as store:
        assert store.layers() == []
