"""Images: named, content-addressed stacks of read-only layers, on top of the layer store.

An image is a *config* (a JSON document: how to run it, and which layers it
has, as ``rootfs.diff_ids``) plus those layers. Everything is named by digest:

* the **image id** is the sha256 of the config bytes, as in Docker;
* a layer's **diff id** is the sha256 of its uncompressed tar;
* a layer's **chain id** names it together with everything below it
  (:func:`~layerfs.digests.chain_ids`). Two images whose first layers are the same
  share those layers on disk: a layer is applied once per chain id, whatever
  archive or image it arrives in.

Tables (in the root's sqlite database, next to the layer store's own)::

    images        id (sha256 of config), config (bytes, verbatim), top_chain, created, size
    image_names   name ("repo:tag") -> image
    image_layers  chain_id -> diff_id, parent_chain, layer (id in the layer store), state,
                  owner, size, tar_size, tar_split (to re-create the tar byte for byte)
    image_leases  (chain_id, owner): a load in progress holds the layers it uses
    image_users   (image, container): containers using an image; rmi refuses while any

Loading is all or nothing. Every digest is checked while the bytes stream
into the driver (so a bad layer fails inside the apply and the layer store
removes it); an image row and its names appear in one transaction at the end;
on any error the layers this load made are removed again, and layers that
already existed are left alone. Two loads that need the same chain id meet at
the ``image_layers`` primary key: the first inserts an ``applying`` row inside
a store transaction and applies; the second sees that row and waits for it.
A process killed half-way leaves rows whose owner is dead; the next
:class:`ImageStore` finishes cleaning them up.

Saving writes each layer tar again *exactly* (same bytes, so the same digests
and image id) from the layer's files plus the tar-split record kept at load
time (:class:`~layerfs.tar.split.TarSplitRecorder`), the technique Docker uses.

Modules: :mod:`.catalog` (the tables: names, lookups, users, removal, recovery),
:mod:`.load` (archives, registry blobs, root filesystems and commits in), :mod:`.save`
(archives out), :mod:`.config` (image configs and Dockerfile-style changes).
:class:`ImageStore` is all of them together.
"""

from .catalog import (
    IMAGES_SCHEMA_VERSION,
    LABEL_CHAIN,
    LABEL_DIFF,
    LABEL_OWNER,
    HistoryEntry,
    Image,
    ImageLayer,
    Progress,
)
from .config import DEFAULT_PATH, RunConfig, apply_change
from .load import Loading
from .save import Saving


class ImageStore(Loading, Saving):
    """Images of one layerfs root. Construct on an open :class:`~layerfs.layers.LayerStore`::

        with layerfs.open_root(root) as layers:
            images = ImageStore(layers)
            loaded = images.load("busybox.tar")            # docker save / OCI layout
            image = images.get("busybox:latest")
            box = layers.create(parent=image.top_layer)    # a container's layer
    """


__all__ = [
    "DEFAULT_PATH", "IMAGES_SCHEMA_VERSION", "LABEL_CHAIN", "LABEL_DIFF", "LABEL_OWNER",
    "HistoryEntry", "Image", "ImageLayer", "ImageStore", "Progress", "RunConfig",
    "apply_change",
]
