"""layerfs: container storage drivers you can mount, measure and learn from.

The public API is small::

    import layerfs

    with layerfs.open_root("/var/lib/layerfs", driver="overlay2") as store:
        base = store.apply(open("rootfs.tar", "rb"))         # image layer from a tar
        box = store.create(parent=base.id)                     # container layer
        with store.mounted(box.id) as path:                    # always unmounted
            (path / "hello").write_text("hi\\n")
        with open("changes.tar", "wb") as out:
            store.diff(box.id, out)                            # OCI layer tar
        store.remove(box.id)

See :class:`layerfs.layers.LayerStore` for every operation, :mod:`layerfs.driver` and
docs/writing-a-driver.md for writing a driver, and :func:`register` (or a driver class
passed to :func:`open_root`) for using one that is not installed as a package.
"""

from __future__ import annotations

# Not `from typing import ...`: every `layerfs` command imports this package, and
# typing costs milliseconds (docs/architecture.md, "Import time"). mypy reads any
# TYPE_CHECKING as true.
TYPE_CHECKING = False

__version__ = "0.1.0"

# Names are imported on first use: `layerfs run` and other short-lived commands
# should not pay for modules they never touch.
_EXPORTS = {
    "Change": "changes", "ChangeKind": "changes",
    "Capabilities": "driver", "Driver": "driver", "DriverOptions": "options", "Usage": "fsinfo",
    "AlreadyExists": "errors", "CorruptState": "errors", "DriverNotSupported": "errors",
    "InUse": "errors", "InvalidArgument": "errors", "LayerfsError": "errors",
    "NotFound": "errors", "UnsafeArchive": "errors",
    "LayerStore": "layers", "open_root": "layers",
    "Mount": "mount",
    "LayerRecord": "metastore",
    "register": "plugins",
}

__all__ = [
    "AlreadyExists", "Capabilities", "Change", "ChangeKind", "CorruptState", "Driver",
    "DriverNotSupported", "DriverOptions", "InUse", "InvalidArgument", "LayerRecord",
    "LayerStore", "LayerfsError", "Mount", "NotFound", "UnsafeArchive", "Usage", "open_root",
    "register",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'layerfs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from typing import Any

    from .changes import Change, ChangeKind
    from .driver import Capabilities, Driver
    from .errors import (
        AlreadyExists,
        CorruptState,
        DriverNotSupported,
        InUse,
        InvalidArgument,
        LayerfsError,
        NotFound,
        UnsafeArchive,
    )
    from .fsinfo import Usage
    from .layers import LayerStore, open_root
    from .metastore import LayerRecord
    from .mount import Mount
    from .options import DriverOptions
    from .plugins import register
