"""aufs: Docker's first storage driver, on kernel aufs or on our own FUSE union filesystem.

The driver is :class:`layerfs_drivers.aufs.driver.AufsDriver` (its module opens
with the on-disk layout); the FUSE filesystem is
:mod:`layerfs_drivers.aufs.unionfs`, speaking the kernel protocol through
:mod:`layerfs_drivers.aufs.fuseproto`; :mod:`layerfs_drivers.aufs.forkserver`
starts union servers from a warm process.

This package imports nothing itself: ``python -m layerfs_drivers.aufs.unionfs``
(the mount helper) then starts without loading layerfs's driver machinery.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AufsDriver"]


def __getattr__(name: str) -> Any:
    # The entry point names layerfs_drivers.aufs:AufsDriver; load it on first use.
    if name == "AufsDriver":
        from .driver import AufsDriver

        return AufsDriver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
