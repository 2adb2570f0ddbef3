"""What the inspect commands look at: an image, a layer chain or a container, as a list
of layers bottom first, each with the command that made it; and the :class:`Stack` of
their indexes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptState, LayerfsError, NotFound
from ..images import Image, ImageStore
from .index import Indexer, LayerIndex
from .stack import Stack, StackLayer


@dataclass(frozen=True)
class LayerRef:
    layer_id: str
    command: str = ""
    readonly: bool = True
    diff_id: str | None = None
    chain_id: str | None = None


@dataclass
class Target:
    """An image, a layer (with its parents) or a container (its layer on its image)."""

    kind: str                       # "image", "layer" or "container"
    name: str
    layers: list[LayerRef]          # bottom first
    image: Image | None = None
    container: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        n = len(self.layers)
        return f"{self.kind} {self.name} ({n} layer{'s' if n != 1 else ''})"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "name": self.name, "layers": len(self.layers)}
        if self.image is not None:
            d["image_id"] = self.image.id
        if self.container is not None:
            d["container_id"] = self.container
        return d


def short_command(created_by: str) -> str:
    """A history entry's command as a person reads it: Docker's ``/bin/sh -c #(nop) ``
    prefix of metadata-only steps dropped, a shell step shown as ``RUN ...``."""
    text = " ".join(created_by.split())
    if text.startswith("/bin/sh -c #(nop) "):
        return text[len("/bin/sh -c #(nop) "):].strip()
    if text.startswith("/bin/sh -c "):
        return "RUN " + text[len("/bin/sh -c "):]
    return text


def image_target(images: ImageStore, ref: str) -> Target:
    image = images.get(ref)
    history = [h for h in image.config.get("history") or [] if isinstance(h, dict)]
    commands = [short_command(str(h.get("created_by") or "")) for h in history
                if not h.get("empty_layer")]
    refs = []
    for i, layer in enumerate(image.layers):
        refs.append(LayerRef(layer.layer_id, commands[i] if i < len(commands) else "",
                             True, layer.diff_id, layer.chain_id))
    name = image.names[0] if image.names else image.short_id
    return Target("image", name, refs, image=image)


def layer_target(images: ImageStore, layer_id: str) -> Target:
    layers = images.layers
    chain = list(reversed(layers.chain(layer_id)))
    known = images.image_layers_by_layer()
    refs = []
    for lid in chain:
        rec = layers.get(lid)
        il = known.get(lid)
        refs.append(LayerRef(lid, "", rec.readonly, il.diff_id if il else None,
                             il.chain_id if il else None))
    return Target("layer", layer_id[:12], refs)


def container_target(images: ImageStore, container_id: str, name: str, image_id: str,
                     layer_id: str) -> Target:
    base = image_target(images, image_id)
    refs = [*base.layers, LayerRef(layer_id, f"container {name} (read-write)", False)]
    return Target("container", name, refs, image=base.image, container=container_id)


def _read(indexer: Indexer, target: Target, pos: int, paths: list[str] | None) -> LayerIndex:
    """One layer's index (or, with ``paths``, those entries of it). A layer the target names
    but the store lacks, or whose index cannot be read, is a broken target: one error
    naming the target and the layer."""
    ref = target.layers[pos]
    where = (f"{target.kind} {target.name}: layer {pos + 1} of {len(target.layers)} "
             f"({ref.layer_id[:12]})")
    try:
        return indexer.index(ref.layer_id) if paths is None else \
            indexer.lookup(ref.layer_id, paths)
    except NotFound as err:
        raise CorruptState(f"{where} is missing from the store ({err})") from err
    except LayerfsError as err:
        raise CorruptState(f"{where} cannot be read: {err}") from err


def ensure_indexed(indexer: Indexer, target: Target,
                   progress: Callable[[int, int], None] | None = None) -> None:
    """Index the target's read-only layers that have no stored index yet (the first look
    at an image); read-write layers are read when used, never kept."""
    missing = [pos for pos, ref in enumerate(target.layers)
               if ref.readonly and not indexer.cached(ref.layer_id)]
    for done, pos in enumerate(missing, 1):
        _read(indexer, target, pos, None)
        if progress is not None:
            progress(done, len(missing))


def load_stack(indexer: Indexer, target: Target, paths: list[str] | None = None,
               progress: Callable[[int, int], None] | None = None) -> Stack:
    """The target's layers as a :class:`Stack`: with every entry, or (``paths``) only those
    entries (what ``explain`` needs)."""
    layers: list[StackLayer] = []
    total = len(target.layers)
    for pos, ref in enumerate(target.layers):
        index = _read(indexer, target, pos, paths)
        layers.append(StackLayer(pos, ref.layer_id, index.entries, index.bytes, ref.command,
                                 ref.readonly, ref.diff_id, ref.chain_id, index.source))
        if progress is not None:
            progress(pos + 1, total)
    return Stack(layers)
