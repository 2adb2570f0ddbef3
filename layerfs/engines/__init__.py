"""Real container engines on layerfs storage.

Two servers put a layerfs root behind the plug-in points the engines made for
exactly this:

* :mod:`.containerd` — containerd's snapshots API over gRPC: a *proxy
  snapshotter* that ``ctr``, the CRI plugin (and so the kubelet) use by name;
* :mod:`.docker` — Docker's graphdriver plugin protocol (JSON over HTTP),
  which ``dockerd --experimental --storage-driver layerfs-<driver>`` loads.

:func:`serve` runs either or both on one root until it is told to stop. It
uses threads (gRPC's), so a supervisor that forks must start it in a child
forked before any thread exists (see ``layerfs daemon``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DOCKER_PLUGIN_DIR", "docker_plugin_socket", "serve"]


def __getattr__(name: str) -> Any:
    # grpcio and the protobuf modules load only when a server is wanted.
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .server import DOCKER_PLUGIN_DIR, docker_plugin_socket, serve
