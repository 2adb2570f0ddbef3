"""A stack of layer indexes: what each path is at each layer, and why.

:class:`Stack` replays the layers bottom to top once and keeps, for every path that any
layer mentions, its *history*: one :class:`Event` per layer that changed it, either an
entry (the path is added, or replaced: the layer's copy hides the ones below) or a
deletion, with its cause:

``whiteout``  the layer holds ``.wh.NAME`` for the path, or for a directory above it;
``opaque``    a directory above the path is opaque in the layer (``.wh..wh..opq``):
              nothing below shows through it;
``replaced``  a directory above the path became a non-directory in the layer.

From the histories come the merged tree as of any layer, the change marks dive colours
(added, modified, removed, unmodified; for one layer or aggregated), the hidden copies
``explain`` lists, and the wasted space and efficiency score (:func:`efficiency`).

The replay is the union filesystem's own rule, applied to indexes instead of mounts: a
layer's whiteouts and opaque directories first hide what is below, then its entries are
laid over the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .index import DIR, FILE, IMPLICIT_FLAG, OPAQUE_FLAG, WHITEOUT, Entry

# Causes of a deletion.
WHITEOUT_CAUSE = "whiteout"
OPAQUE_CAUSE = "opaque"
REPLACED_CAUSE = "replaced"

# Change marks, as dive names and colours them.
ADDED, MODIFIED, REMOVED, UNMODIFIED = "added", "modified", "removed", "unmodified"


class Event(NamedTuple):
    """What layer ``layer`` did to a path: set it to ``entry``, or deleted it (``entry`` is
    None; ``cause`` says how and ``by`` names the whiteout's or opaque directory's path)."""

    layer: int
    entry: Entry | None
    cause: str = ""
    by: str = ""


@dataclass
class StackLayer:
    """One layer of a stack, bottom first: ``position`` 0 is the base."""

    position: int
    layer_id: str
    entries: dict[str, Entry]
    size: int = 0
    command: str = ""
    readonly: bool = True
    diff_id: str | None = None
    chain_id: str | None = None
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.position + 1, "layer": self.layer_id, "size": self.size,
                "command": self.command, "readonly": self.readonly, "diff_id": self.diff_id,
                "chain_id": self.chain_id, "entries": len(self.entries)}


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def ancestors(path: str) -> list[str]:
    """``a/b/c`` -> ``["a", "a/b"]`` (the root, "", excluded)."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@dataclass
class Stack:
    """The layers of an image (or a layer chain, or a container), bottom first."""

    layers: list[StackLayer]
    history: dict[str, list[Event]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._names: dict[str, list[str]] | None = None
        self._changed: list[set[str]] | None = None
        self._dirs_cache: dict[tuple[int, bool], set[str]] = {}
        self._sizes_cache: dict[int, dict[str, int]] = {}
        self._replay()

    # --- the replay ---------------------------------------------------------------------
    def _replay(self) -> None:
        # Written for speed: the explorer replays tens of thousands of entries on start.
        history = self.history
        present: dict[str, Entry] = {}
        kids: dict[str, set[str]] = {"": set()}

        def record(path: str, event: Event) -> None:
            events = history.get(path)
            if events is None:
                history[path] = [event]
            elif events[-1].layer == event.layer:
                events[-1] = event   # a later step of the same layer wins
            else:
                events.append(event)

        def delete_below(path: str, layer: int, cause: str, by: str) -> None:
            # Everything under ``path`` (not ``path`` itself) disappears.
            stack = [path]
            while stack:
                d = stack.pop()
                for name in kids.pop(d, ()):
                    child = f"{d}/{name}" if d else name
                    if present.pop(child, None) is not None:
                        record(child, Event(layer, None, cause, by))
                        stack.append(child)
                kids[d] = set()

        def delete(path: str, layer: int, cause: str, by: str) -> None:
            if present.pop(path, None) is None:
                return
            record(path, Event(layer, None, cause, by))
            delete_below(path, layer, cause, by)
            kids.pop(path, None)
            parent, _, name = path.rpartition("/")
            siblings = kids.get(parent)
            if siblings is not None:
                siblings.discard(name)

        for pos, layer in enumerate(self.layers):
            entries = layer.entries
            # A layer's deletions hide what is below before its own entries are laid over.
            for e in entries.values():
                if e.kind == WHITEOUT:
                    if e.path in present:
                        delete(e.path, pos, WHITEOUT_CAUSE, e.path)
                    else:  # nothing below to delete: kept, so explain can show it
                        record(e.path, Event(pos, None, WHITEOUT_CAUSE, e.path))
                elif e.flags & OPAQUE_FLAG and e.path in present:
                    delete_below(e.path, pos, OPAQUE_CAUSE, e.path)
            for path, e in entries.items():
                kind = e.kind
                if kind == WHITEOUT:
                    continue
                old = present.get(path)
                if old is not None and old.kind == DIR:
                    if kind != DIR:
                        delete_below(path, pos, REPLACED_CAUSE, path)
                        kids.pop(path, None)
                    elif e.flags & IMPLICIT_FLAG:
                        continue  # a directory the tar only implies: the one below stays
                present[path] = e
                if kind == DIR and path not in kids:
                    kids[path] = set()
                parent, _, name = path.rpartition("/")
                siblings = kids.get(parent)
                if siblings is None:
                    kids[parent] = {name}
                else:
                    siblings.add(name)
                record(path, Event(pos, e))

    @property
    def names(self) -> dict[str, list[str]]:
        """Every name ever seen under a directory, sorted (the tree's shape across all
        layers)."""
        if self._names is None:
            names: dict[str, set[str]] = {}
            for path in self.history:
                parent, _, name = path.rpartition("/")
                names.setdefault(parent, set()).add(name)
            self._names = {d: sorted(n) for d, n in names.items()}
        return self._names

    @property
    def changed(self) -> list[set[str]]:
        """The paths each layer changed (entries and deletions), by position."""
        if self._changed is None:
            changed: list[set[str]] = [set() for _ in self.layers]
            for path, events in self.history.items():
                for ev in events:
                    changed[ev.layer].add(path)
            self._changed = changed
        return self._changed

    # --- queries ----------------------------------------------------------------------
    @property
    def top(self) -> int:
        return len(self.layers) - 1

    def event_at(self, path: str, layer: int) -> Event | None:
        """The event of ``layer`` itself for ``path``, if it changed it."""
        for ev in self.history.get(path, ()):
            if ev.layer == layer:
                return ev
            if ev.layer > layer:
                break
        return None

    def last_event(self, path: str, layer: int) -> Event | None:
        """The latest event at or below ``layer`` for ``path``."""
        last = None
        for ev in self.history.get(path, ()):
            if ev.layer > layer:
                break
            last = ev
        return last

    def entry_at(self, path: str, layer: int | None = None) -> Entry | None:
        """What ``path`` is in the merged tree as of ``layer`` (default: the top)."""
        if path == "":
            return Entry("", DIR)
        ev = self.last_event(path, self.top if layer is None else layer)
        return None if ev is None else ev.entry

    def exists(self, path: str, layer: int | None = None) -> bool:
        return self.entry_at(path, layer) is not None

    def children(self, path: str, layer: int, *, with_removed: bool = False,
                 since: int | None = None) -> list[str]:
        """Names under directory ``path`` as of ``layer``; ``with_removed`` adds the names
        that were there before ``since`` (default: ``layer``) and are gone as of ``layer``
        (dive shows those, in red)."""
        out = []
        base = layer if since is None else since
        for name in self.names.get(path, ()):
            child = f"{path}/{name}" if path else name
            gone = with_removed and base > 0 and self.exists(child, base - 1)
            if gone or self.exists(child, layer):
                out.append(name)
        return out

    def mark(self, path: str, layer: int, *, aggregated: bool = False) -> str:
        """How ``path`` changed: in ``layer`` alone, or (``aggregated``) in layers 1 to
        ``layer`` together, relative to the base layer (dive's two compare modes)."""
        lo = 0 if aggregated else layer - 1
        before = self.entry_at(path, lo) if lo >= 0 else None
        after = self.entry_at(path, layer)
        changed = any(lo < ev.layer <= layer for ev in self.history.get(path, ()))
        if after is None:
            return REMOVED if before is not None else UNMODIFIED
        if before is None:
            return ADDED
        if not changed:
            return UNMODIFIED
        if after.kind == DIR and before.kind == DIR and (
                after.mode, after.uid, after.gid) == (before.mode, before.uid, before.gid):
            return UNMODIFIED  # a directory listed again only because its contents changed
        return MODIFIED

    def dirs_with_changes(self, layer: int, *, aggregated: bool = False) -> set[str]:
        """Directories holding a path that changed in ``layer`` (or, aggregated, in layers
        1 to ``layer``): dive shows them as modified even when they are not themselves."""
        key = (layer, aggregated)
        cached = self._dirs_cache.get(key)
        if cached is not None:
            return cached
        out: set[str] = set()
        for pos in range(1, layer + 1) if aggregated else (layer,):
            for path in self.changed[pos]:
                parent = path.rpartition("/")[0]
                while parent and parent not in out:
                    out.add(parent)
                    parent = parent.rpartition("/")[0]
        self._dirs_cache[key] = out
        return out

    def dir_sizes(self, layer: int) -> dict[str, int]:
        """Bytes of the regular files below each directory as of ``layer`` ("" is the
        root): one pass over every path, kept per layer."""
        cached = self._sizes_cache.get(layer)
        if cached is not None:
            return cached
        sizes: dict[str, int] = {}
        for path, events in self.history.items():
            last = events[-1]
            if last.layer <= layer:
                entry = last.entry
            else:
                entry = None
                for ev in events:
                    if ev.layer > layer:
                        break
                    entry = ev.entry
            if entry is None or entry.kind != FILE or not entry.size:
                continue
            parent = path.rpartition("/")[0]
            sizes[parent] = sizes.get(parent, 0) + entry.size
        # then each directory into its parent, deepest first
        for d in sorted(self.names, key=lambda p: -p.count("/")):
            if d and d in sizes:
                parent = d.rpartition("/")[0]
                sizes[parent] = sizes.get(parent, 0) + sizes[d]
        self._sizes_cache[layer] = sizes
        return sizes

    def copies(self, path: str) -> list[Event]:
        """Every event of ``path``, bottom first (its copies and deletions)."""
        return list(self.history.get(path, ()))

    def paths(self) -> Iterator[str]:
        return iter(self.history)


# --- wasted space and the efficiency score -------------------------------------------------

@dataclass(frozen=True)
class Inefficiency:
    """A path stored more than once across layers: dive's "inefficient file"."""

    path: str
    count: int
    wasted: int      # dive's "wasted space": every copy's bytes (cumulative size)
    layers: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"path": "/" + self.path, "count": self.count, "wasted_bytes": self.wasted,
                "layers": [n + 1 for n in self.layers]}


@dataclass(frozen=True)
class Efficiency:
    score: float
    wasted_bytes: int
    size_bytes: int
    user_size_bytes: int
    inefficiencies: list[Inefficiency]

    @property
    def user_wasted_ratio(self) -> float:
        """Wasted bytes over the bytes of all layers but the base (dive's
        ``userWastedPercent``, a ratio); infinite when the upper layers hold no bytes
        but waste some, as dive's division gives."""
        if self.user_size_bytes == 0:
            return 0.0 if self.wasted_bytes == 0 else float("inf")
        return self.wasted_bytes / self.user_size_bytes

    def as_dict(self) -> dict[str, Any]:
        ratio = self.user_wasted_ratio
        return {"efficiency": self.score, "wasted_bytes": self.wasted_bytes,
                "size_bytes": self.size_bytes, "user_size_bytes": self.user_size_bytes,
                "user_wasted_percent": None if ratio == float("inf") else ratio,
                "inefficient_files": [i.as_dict() for i in self.inefficiencies]}


def efficiency(stack: Stack) -> Efficiency:
    """dive's efficiency score and wasted space, computed from the stack.

    dive's definition (``filetree.Efficiency``): every non-directory path gets one *node*
    per layer that writes it (its size in that layer's tar) and one per layer that
    deletes it (size 0); a path with two or more nodes is *inefficient* and wastes the
    sum of its nodes' sizes; the score is the sum over all paths of their smallest node
    over the sum of all nodes (1.0 for an image without file bytes). The image's size is
    the sum of its layers' tar payloads, and the "user" size leaves out the base layer.

    Where layerfs differs from dive's code, on purpose: a file deleted together with its
    directory (a whiteout of the directory, an opaque directory, a directory replaced by a
    file) gets its deletion node too. dive attaches such a deletion to the directory
    alone, where it never meets the files' own nodes, and ignores opaque markers
    altogether, so it reports no waste for ``rm -rf`` of a directory a lower layer filled.
    For images whose later layers only overwrite or delete single files, both give the
    same numbers.
    """
    minimum = 0
    cumulative = 0
    found: list[Inefficiency] = []
    for path, events in stack.history.items():
        sizes: list[int] = []
        layers: list[int] = []
        previous: Entry | None = None
        for ev in events:
            if ev.entry is not None and ev.entry.kind != DIR:
                sizes.append(ev.entry.size if ev.entry.kind != "h" else 0)
                layers.append(ev.layer)
            elif previous is not None and previous.kind != DIR:
                # deleted (or replaced by a directory): a node of size 0
                sizes.append(0)
                layers.append(ev.layer)
            previous = ev.entry
        if not sizes:
            continue
        total = sum(sizes)
        cumulative += total
        minimum += min(sizes)
        if len(sizes) > 1:
            found.append(Inefficiency(path, len(sizes), total, tuple(layers)))
    found.sort(key=lambda i: (-i.wasted, i.path))
    size = sum(layer.size for layer in stack.layers)
    user = sum(layer.size for layer in stack.layers[1:])
    score = 1.0 if cumulative == 0 else minimum / cumulative
    return Efficiency(score, sum(i.wasted for i in found), size, user, found)


def restricted(entries: dict[str, Entry], paths: Iterable[str]) -> dict[str, Entry]:
    """The entries of ``paths`` only (what ``explain`` needs of a layer)."""
    return {p: entries[p] for p in paths if p in entries}
