"""What ``layerfs`` promises at its top level exists (psutil's test_contracts idea): every
name in ``__all__`` resolves, lazily, to the object of the module that defines it."""

from __future__ import annotations

import subprocess
import sys

import layerfs


def test_every_exported_name_resolves() -> None:
    for name in layerfs.__all__:
        value = getattr(layerfs, name)
        assert getattr(value, "__name__", name) == name


def test_the_top_level_imports_nothing_heavy() -> None:
    # `import layerfs` must stay cheap: names are imported on first use.
    code = "import layerfs, sys; print(sorted(m for m in sys.modules if m.startswith('layerfs')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['layerfs']"
