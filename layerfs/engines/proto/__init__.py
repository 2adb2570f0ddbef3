"""Protobuf messages of the gRPC APIs layerfs serves and speaks.

The ``.proto`` files here are layerfs's own, written from the published API
definitions (containerd's snapshots service, Kubernetes' CRI). The Python
modules ``*_pb2.py`` (and ``*_pb2.pyi`` stubs) are generated from them when
layerfs is built or installed (see setup.py) and are not in the repository.
"""

MISSING_HINT = ("layerfs's protobuf modules are generated at install time and are missing: "
                "run `pip install -e .` (or ./scripts/setup) in the checkout")
