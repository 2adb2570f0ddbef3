"""Build hooks (everything else is in pyproject.toml).

1. layerfs/runtime/layerfs-init from pid1.c. The runner executes this small static
   program from a sealed memfd so that no container process ever has the host's
   python as its /proc/self/exe when it execs (layerfs/runtime/pid1.c says why). It
   must be static: it runs after pivot_root, where the host's dynamic loader is out
   of sight. Needs musl-gcc (Debian's musl-tools) or cc with a static libc (gcc,
   libc6-dev); scripts/setup installs them.

2. layerfs's protobuf modules from the ``.proto`` files. The gRPC APIs that layerfs
   serves (containerd's snapshots service) and speaks (the Kubernetes CRI, for tests
   and docs) are described by ``.proto`` files in ``layerfs/engines/proto/``, written
   from the published field definitions. The Python message classes (``*_pb2.py``)
   and their type stubs (``*_pb2.pyi``) are generated here, never committed.
   ``grpcio-tools`` (protoc) is a build requirement only; the runtime needs
   ``protobuf`` and ``grpcio``.

Both go into the wheel's build directory for a normal build, and next to their
sources for an editable install (``pip install -e .``), where they are git-ignored.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HELPER_SOURCE = Path("layerfs/runtime/pid1.c")
HELPER = "layerfs/runtime/layerfs-init"
PROTO_DIR = Path("layerfs/engines/proto")


def build_helper(out_root: Path) -> None:
    out = out_root / HELPER
    out.parent.mkdir(parents=True, exist_ok=True)
    # musl makes a ~60 KB binary (glibc: ~800 KB), which is what each runner
    # process copies into its memfd and each container start execs twice.
    cc = os.environ.get("CC") or shutil.which("musl-gcc") or "cc"
    subprocess.run([cc, "-static", "-Os", "-s", "-Wall", "-o", str(out),
                    str(HELPER_SOURCE)], check=True)


def generate_protos(out_root: Path) -> None:
    from grpc_tools import protoc  # build-system requirement (pyproject.toml)

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p) for p in PROTO_DIR.glob("*.proto"))
    out_root.mkdir(parents=True, exist_ok=True)
    args = ["protoc", "-I.", f"-I{well_known}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(protos)}")


class BuildPyWithGenerated(build_py):
    def run(self) -> None:
        super().run()
        # An editable install imports from the source tree, so the outputs go there.
        out_root = Path(".") if self.editable_mode else Path(self.build_lib)
        build_helper(out_root)
        generate_protos(out_root)


setup(cmdclass={"build_py": BuildPyWithGenerated})
