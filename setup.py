"""Build hook: generate layerfs's protobuf modules from the ``.proto`` files at build time.

The gRPC APIs that layerfs serves (containerd's snapshots service) and speaks
(the Kubernetes CRI, for tests and docs) are described by ``.proto`` files in
``layerfs/engines/proto/``, written from the published field definitions. The
Python message classes (``*_pb2.py``) and their type stubs (``*_pb2.pyi``) are
generated here, never committed: into the wheel's build directory for a normal
build, and next to the ``.proto`` files for an editable install
(``pip install -e .``), where they are git-ignored. ``grpcio-tools`` (protoc)
is a build requirement only; the runtime needs ``protobuf`` and ``grpcio``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_DIR = Path("layerfs/engines/proto")


def generate_protos(out_root: Path) -> None:
    from grpc_tools import protoc  # build-system requirement (pyproject.toml)

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p) for p in PROTO_DIR.glob("*.proto"))
    out_root.mkdir(parents=True, exist_ok=True)
    args = ["protoc", "-I.", f"-I{well_known}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(protos)}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        super().run()
        # Editable installs import from the source tree, so the modules go there.
        generate_protos(Path(".") if self.editable_mode else Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithProtos})
