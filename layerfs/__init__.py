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

See :class:`layerfs.layers.LayerStore` for every operation, and
:mod:`layerfs.driver` for writing a driver.
"""

from .changes import Change, ChangeKind
from .driver import Capabilities, Driver, DriverOptions, Usage
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
from .layers import LayerStore, open_root
from .mount import Mount
from .store import LayerRecord

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists", "Capabilities", "Change", "ChangeKind", "CorruptState", "Driver",
    "DriverNotSupported", "DriverOptions", "InUse", "InvalidArgument", "LayerRecord",
    "LayerStore", "LayerfsError", "Mount", "NotFound", "UnsafeArchive", "Usage", "open_root",
]
