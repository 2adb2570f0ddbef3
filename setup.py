"""Builds layerfs/runtime/layerfs-init from pid1.c (everything else is in pyproject.toml).

The runner executes this small static program from a sealed memfd so that no
container process ever has the host's python as its /proc/self/exe when it execs
(layerfs/runtime/pid1.c says why). It must be static: it runs after pivot_root,
where the host's dynamic loader is out of sight. Needs musl-gcc (Debian's
musl-tools) or cc with a static libc (gcc, libc6-dev); scripts/setup installs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HELPER_SOURCE = Path("layerfs/runtime/pid1.c")
HELPER = "layerfs/runtime/layerfs-init"


class BuildPyWithHelper(build_py):
    def run(self) -> None:
        super().run()
        # An editable install imports from the source tree: the binary goes next to its
        # source there; a wheel gets it in the build directory.
        out = Path(HELPER) if self.editable_mode else Path(self.build_lib) / HELPER
        out.parent.mkdir(parents=True, exist_ok=True)
        # musl makes a ~60 KB binary (glibc: ~800 KB), which is what each runner
        # process copies into its memfd and each container start execs twice.
        cc = os.environ.get("CC") or shutil.which("musl-gcc") or "cc"
        subprocess.run([cc, "-static", "-Os", "-s", "-Wall", "-o", str(out),
                        str(HELPER_SOURCE)], check=True)


setup(cmdclass={"build_py": BuildPyWithHelper})
