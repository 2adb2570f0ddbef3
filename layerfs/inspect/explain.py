"""``layerfs explain PATH``: where a path comes from, what it hides, what finding it costs.

For a path of an image (or a layer chain, or a container) :func:`explain` says

* which layer serves it, with the command that made that layer, and the entry's kind,
  size, mode and owner there; for a directory, which layers it is merged from;
* which lower copies it hides and how: replaced by a later copy (*override*), deleted
  by a whiteout, hidden by an opaque directory above it, or by a directory above it
  becoming a file; with the bytes each hidden copy still takes (*wasted*);
* what the storage driver adds (:meth:`~layerfs.driver.Driver.path_facts`): overlay2
  tells a metacopy, redirected or copied-up upper file; btrfs and devicemapper how many
  of the file's bytes the layer shares with other layers and how many it holds alone;
* on aufs, what a lookup of it costs: the branch probes computed from the layers'
  indexes with the union's own search rule (:func:`lookup_cost`), and, when the layer
  is mounted, the union's counters around a real lookup.

Symbolic links in the directories on the way are followed inside the image, as the
kernel would (``/lib/x`` on a merged-/usr system is ``/usr/lib/x``); the last component
is explained as it is. A path that does not exist is reported with its nearest existing
parent.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..changes import WhiteoutFormat
from ..errors import InvalidArgument
from ..layers import LayerStore
from .index import DIR, FILE, HARDLINK, KIND_NAMES, SYMLINK, WHITEOUT, Entry, Indexer
from .stack import (
    OPAQUE_CAUSE,
    REPLACED_CAUSE,
    WHITEOUT_CAUSE,
    Event,
    Stack,
    ancestors,
)
from .targets import Target, load_stack

MAX_SYMLINKS = 40           # the kernel's limit on links followed in one lookup
WH_NAME_MAX = 255 - len(".wh.")


@dataclass(frozen=True)
class Copy:
    """A layer's version of the path: the one served, a hidden one, or a deletion."""

    position: int           # 0 = bottom layer
    layer_id: str
    command: str
    entry: Entry | None     # None for a deletion
    how: str                # "serves", "override", "whiteout", "opaque", "replaced"
    by: str = ""            # the layer (override) or path (whiteout, opaque) that hides it
    wasted: int = 0

    def as_dict(self, total: int) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.position + 1, "of": total, "layer_id": self.layer_id,
                             "command": self.command, "how": self.how}
        if self.by:
            d["by"] = self.by
        if self.entry is not None:
            d["entry"] = self.entry.as_dict()
        if self.wasted:
            d["wasted_bytes"] = self.wasted
        return d


@dataclass(frozen=True)
class LookupCost:
    """What the aufs union's top-down search spends to find a path, cold."""

    branches: int
    components: int
    lookups: int
    name_stats: int
    whiteout_probes: int
    opaque_probes: int
    found: bool

    def as_dict(self) -> dict[str, Any]:
        return {"branches": self.branches, "components": self.components,
                "lookups": self.lookups, "lookup_name_stats": self.name_stats,
                "lookup_whiteout_probes": self.whiteout_probes,
                "lookup_opaque_probes": self.opaque_probes, "found": self.found}


@dataclass
class Explanation:
    path: str                       # as asked, absolute
    resolved: str                   # after symlinks in its directories, absolute
    target: Target
    driver: str
    entry: Entry | None = None
    serving: Copy | None = None
    merged_from: list[Copy] = field(default_factory=list)
    hidden: list[Copy] = field(default_factory=list)
    deleted: Copy | None = None
    nearest_parent: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    facts_layer: int | None = None
    data_from: Copy | None = None
    lookup: LookupCost | None = None
    counted: dict[str, int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exists(self) -> bool:
        return self.entry is not None

    @property
    def wasted_bytes(self) -> int:
        return sum(c.wasted for c in self.hidden)

    def as_dict(self) -> dict[str, Any]:
        total = len(self.target.layers)
        d: dict[str, Any] = {"path": self.path, "resolved": self.resolved,
                             "target": self.target.as_dict(), "driver": self.driver,
                             "exists": self.exists, "wasted_bytes": self.wasted_bytes,
                             "hidden": [c.as_dict(total) for c in self.hidden]}
        if self.entry is not None:
            d["entry"] = self.entry.as_dict()
        if self.serving is not None:
            d["serving"] = self.serving.as_dict(total)
        if self.merged_from:
            d["merged_from"] = [c.as_dict(total) for c in self.merged_from]
        if self.deleted is not None:
            d["deleted"] = self.deleted.as_dict(total)
        if self.nearest_parent is not None:
            d["nearest_parent"] = self.nearest_parent
        if self.facts:
            d["driver_facts"] = {"layer": (self.facts_layer or 0) + 1, **self.facts}
        if self.data_from is not None:
            d["data_from"] = self.data_from.as_dict(total)
        if self.lookup is not None:
            d["lookup"] = self.lookup.as_dict()
        if self.counted is not None:
            d["counted"] = self.counted
        if self.notes:
            d["notes"] = self.notes
        return d


def normalize(path: str) -> str:
    """``/usr//lib/./x`` -> ``usr/lib/x`` (relative, as indexes hold paths)."""
    if not path or "\0" in path:
        raise InvalidArgument(f"explain: {path!r} is not a path")
    norm = posixpath.normpath("/" + path.strip())
    return norm.lstrip("/")


def _stack_for(indexer: Indexer, target: Target, path: str) -> Stack:
    return load_stack(indexer, target, [*ancestors(path), path] if path else [])


def resolve(indexer: Indexer, target: Target, path: str) -> tuple[str, Stack, list[str]]:
    """Follow symlinks in the directories of ``path`` inside the target's merged tree.
    Returns (resolved path, its stack, notes on the links followed)."""
    notes: list[str] = []
    hops = 0
    parts = path.split("/") if path else []
    done: list[str] = []
    while True:
        stack = _stack_for(indexer, target, "/".join(done + parts))
        for i in range(len(parts) - 1):
            prefix = "/".join(done + parts[:i + 1])
            entry = stack.entry_at(prefix)
            if entry is None or entry.kind != SYMLINK:
                continue
            hops += 1
            if hops > MAX_SYMLINKS:
                raise InvalidArgument(f"explain: too many levels of symbolic links in /{path}")
            link = entry.link
            rest = parts[i + 1:]
            base = "" if link.startswith("/") else "/".join(done + parts[:i])
            new = posixpath.normpath(posixpath.join("/" + base, link)).lstrip("/")
            notes.append(f"/{prefix} is a symlink to {link}")
            done = []
            parts = (new.split("/") if new else []) + rest
            break
        else:
            return "/".join(done + parts), stack, notes


def _copies(stack: Stack, path: str) -> tuple[Copy | None, list[Copy], Copy | None,
                                              list[Copy]]:
    """(serving copy, hidden copies newest first, deletion, directory layers)."""
    events = stack.copies(path)
    layers = stack.layers

    def copy(ev: Event, how: str, by: str = "", wasted: int = 0) -> Copy:
        sl = layers[ev.layer]
        return Copy(ev.layer, sl.layer_id, sl.command, ev.entry, how, by, wasted)

    serving = deleted = None
    hidden: list[Copy] = []
    merged: list[Copy] = []
    last = events[-1] if events else None
    if last is not None and last.entry is not None:
        serving = copy(last, "serves")
    elif last is not None:
        deleted = copy(last, last.cause, last.by)
    for i, ev in enumerate(events[:-1]):
        if ev.entry is None:
            continue
        nxt = events[i + 1]
        if nxt.entry is not None and ev.entry.kind == DIR and nxt.entry.kind == DIR:
            continue            # directories merge: the lower one is not hidden
        if nxt.entry is not None:
            how, by = "override", f"layer {nxt.layer + 1}"
        else:
            how, by = nxt.cause, nxt.by
        wasted = ev.entry.size if ev.entry.kind == FILE else 0
        hidden.append(copy(ev, how, by, wasted))
    if serving is not None and serving.entry is not None and serving.entry.kind == DIR:
        # The directory's contents come from every layer since it last became a directory
        # (a deletion, a non-directory, or an opaque copy stops the merge).
        for ev in reversed(events):
            if ev.entry is None or ev.entry.kind != DIR:
                break
            merged.append(copy(ev, "merged"))
            if ev.entry.opaque:
                break
        merged.reverse()
    hidden.reverse()
    return serving, hidden, deleted, merged


def lookup_cost(stack: Stack, path: str) -> LookupCost:
    """The probes an aufs-style union makes to look ``path`` up cold (nothing cached).

    The search, per component, as :mod:`layerfs_drivers.aufs.unionfs` does it: in each
    branch its parent directory is in (top-down), first a whiteout probe (``.wh.NAME``:
    found means deleted, stop), then a stat of NAME: a non-directory stops the search, a
    directory is merged with those in the branches below and the search goes on. Each
    branch of a found directory, except the bottom branch of the union, is then probed
    once for the opaque marker, which cuts off the branches below it. The root directory
    is merged at mount time (no probes). Branches are the stack's layers, top first.
    """
    branches = list(reversed(stack.layers))
    nbranches = len(branches)
    parts = path.split("/") if path else []
    dir_layers = list(range(nbranches))       # the root: every branch
    name_stats = wh_probes = opaque_probes = lookups = 0
    found = True
    for depth, name in enumerate(parts):
        current = "/".join(parts[:depth + 1])
        lookups += 1
        dirs: list[int] = []
        hit: Entry | None = None
        for b in dir_layers:
            entries = branches[b].entries
            entry = entries.get(current)
            if len(name) <= WH_NAME_MAX:
                wh_probes += 1
                if entry is not None and entry.kind == WHITEOUT:
                    break
            name_stats += 1
            if entry is None or entry.kind == WHITEOUT:
                continue
            if entry.kind == DIR:
                if hit is None:
                    hit = entry
                    dirs = [b]
                elif hit.kind == DIR:
                    dirs.append(b)
            else:
                if hit is None:
                    hit = entry
                break
        if hit is None:
            found = False
            break
        if hit.kind != DIR or depth == len(parts) - 1:
            # A directory's branches are checked for the opaque marker only when something
            # is looked up inside it, not when it is itself the last component.
            break
        dir_layers, probes = _cut_opaque(dirs, branches, current, nbranches)
        opaque_probes += probes
    return LookupCost(nbranches, len(parts), lookups, name_stats, wh_probes, opaque_probes,
                      found)


def _cut_opaque(dirs: list[int], branches: list[Any], path: str,
                nbranches: int) -> tuple[list[int], int]:
    out: list[int] = []
    probes = 0
    for b in dirs:
        out.append(b)
        if b == nbranches - 1:
            break
        probes += 1
        entry = branches[b].entries.get(path)
        if entry is not None and entry.opaque:
            break
    return out, probes


def explain(layers: LayerStore, indexer: Indexer, target: Target, path: str) -> Explanation:
    """Everything layerfs knows about ``path`` in ``target`` (see the module docstring)."""
    asked = normalize(path)
    resolved, stack, notes = resolve(indexer, target, asked)
    ex = Explanation("/" + asked, "/" + resolved, target, layers.driver.name, notes=notes)
    ex.entry = stack.entry_at(resolved) if resolved else Entry("", DIR)
    ex.serving, ex.hidden, ex.deleted, ex.merged_from = _copies(stack, resolved)
    if not resolved:
        ex.notes.append("the root directory is every layer's")
    if ex.entry is None:
        parent = ""
        for a in reversed(ancestors(resolved)):
            if stack.exists(a):
                parent = a
                break
        ex.nearest_parent = "/" + parent
    driver = layers.driver
    if ex.entry is not None and ex.serving is not None and stack.layers:
        # Block-level drivers keep a whole tree per layer: the top layer's copy is the one
        # in use. Union drivers keep each copy in the layer that wrote it.
        pos = stack.top if driver.capabilities.block_level_cow else ex.serving.position
        facts = driver.path_facts(stack.layers[pos].layer_id, resolved)
        if facts:
            ex.facts, ex.facts_layer = facts, pos
        if facts.get("metacopy"):
            ex.data_from = next((c for c in ex.hidden if c.entry is not None
                                 and c.entry.kind in (FILE, HARDLINK)), None)
            # That lower copy is not hidden: its data is what a read gets.
            ex.hidden = [replace(c, how="metacopy-data", by="", wasted=0)
                         if c is ex.data_from else c for c in ex.hidden]
            if ex.data_from is not None:
                ex.data_from = replace(ex.data_from, how="metacopy-data", by="", wasted=0)
    if driver.capabilities.whiteout_format is WhiteoutFormat.AUFS and stack.layers:
        ex.lookup = lookup_cost(stack, resolved)
        ex.counted = _count_lookup(layers, target, resolved)
    return ex


def _count_lookup(layers: LayerStore, target: Target, path: str) -> dict[str, int] | None:
    """Look ``path`` up through a live mount of the target's top layer and return how far
    the union's counters moved (None if it is not mounted or keeps no counters)."""
    top = target.layers[-1].layer_id
    mounts = layers.store.list_mounts(top)
    if not mounts:
        return None
    where = Path(mounts[0].target)
    driver = layers.driver
    before = driver.counters(where)
    if before is None:
        return None
    try:
        os.lstat(where / path)
    except OSError:
        pass
    after = driver.counters(where)
    assert after is not None
    keys = ("lookups", "lookups_negative", "lookup_name_stats", "lookup_whiteout_probes",
            "lookup_opaque_probes")
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if k in after}


def human_lines(ex: Explanation, size: Any) -> list[str]:
    """The explanation as lines for a terminal (or a pipe): ``size`` formats bytes."""
    total = len(ex.target.layers)

    def layer(c: Copy) -> str:
        cmd = f" ({c.command})" if c.command else ""
        return f"layer {c.position + 1} of {total}{cmd}"

    def describe(e: Entry) -> str:
        what = KIND_NAMES[e.kind]
        if e.kind in (FILE, HARDLINK):
            what += f", {size(e.size)}"
        if e.link:
            what += f" -> {e.link}"
        return f"{what}, mode {e.mode:04o}, owner {e.uid}:{e.gid}"

    head = f"{ex.path} in {ex.target.describe()}"
    if ex.resolved != ex.path:
        head += f", resolved to {ex.resolved}"
    out = [head]
    out += [f"  {n}" for n in ex.notes]
    if ex.entry is None:
        if ex.deleted is not None:
            how = {WHITEOUT_CAUSE: f"by a whiteout of {'/' + ex.deleted.by}",
                   OPAQUE_CAUSE: f"by the opaque directory /{ex.deleted.by}",
                   REPLACED_CAUSE: f"as /{ex.deleted.by} became a non-directory"}
            out.append(f"  deleted in {layer(ex.deleted)} "
                       f"{how.get(ex.deleted.how, ex.deleted.how)}")
        else:
            out.append("  no such file or directory in any layer")
    elif ex.serving is not None and ex.entry is not None:
        if ex.entry.kind == DIR and ex.merged_from:
            where = ", ".join(str(c.position + 1) for c in ex.merged_from)
            out.append(f"  directory from {layer(ex.serving)}, merged from layer"
                       f"{'s' if len(ex.merged_from) > 1 else ''} {where}: "
                       f"{describe(ex.entry)}")
            if ex.merged_from[0].entry is not None and ex.merged_from[0].entry.opaque:
                out.append(f"  opaque in layer {ex.merged_from[0].position + 1}: nothing "
                           f"from the layers below shows through")
        else:
            out.append(f"  served by {layer(ex.serving)}: {describe(ex.entry)}")
    for c in ex.hidden:
        if c.how == "metacopy-data":
            out.append(f"  reads its data from the file in {layer(c)} (metacopy): nothing "
                       f"wasted")
            continue
        hidden_how = {"override": f"replaced by {c.by}",
               WHITEOUT_CAUSE: f"deleted by a whiteout of /{c.by}",
               OPAQUE_CAUSE: f"hidden by the opaque directory /{c.by}",
               REPLACED_CAUSE: f"hidden as /{c.by} became a non-directory"}.get(c.how, c.how)
        assert c.entry is not None
        waste = f", {size(c.wasted)} wasted" if c.wasted else ""
        out.append(f"  hides the {KIND_NAMES[c.entry.kind]} from {layer(c)}: {hidden_how}"
                   f"{waste}")
    hidden = [c for c in ex.hidden if c.wasted]
    if hidden:
        out.append(f"  wasted: {size(ex.wasted_bytes)} in {len(hidden)} hidden "
                   f"cop{'ies' if len(hidden) > 1 else 'y'}")
    if ex.nearest_parent is not None:
        out.append(f"  nearest existing parent: {ex.nearest_parent}")
    out += _fact_lines(ex, size, layer)
    if ex.lookup is not None:
        lk = ex.lookup
        out.append(f"  aufs lookup (cold): {lk.lookups} lookups through {lk.branches} "
                   f"branches: {lk.name_stats} name stats, {lk.whiteout_probes} whiteout "
                   f"probes, {lk.opaque_probes} opaque probes"
                   + ("" if lk.found else " (not found)"))
    if ex.counted is not None:
        moved = ", ".join(f"{k} +{v}" for k, v in ex.counted.items())
        out.append(f"  counted on the mounted union: {moved}"
                   + (" (answered from the kernel's cache)" if not any(ex.counted.values())
                      else ""))
    return out


def _fact_lines(ex: Explanation, size: Any, layer: Any) -> list[str]:
    f = ex.facts
    if not f:
        return []
    out: list[str] = []
    where = f"layer {(ex.facts_layer or 0) + 1}"
    if ex.driver in ("overlay2", "overlay") and f.get("in_diff"):
        if f.get("metacopy"):
            src = f" from {layer(ex.data_from)}" if ex.data_from else " from a lower layer"
            out.append(f"  overlay: metacopy in {where}: only the metadata was copied up, "
                       f"the data is still read{src}")
        if f.get("redirect"):
            out.append(f"  overlay: redirected to {f['redirect']}")
        if f.get("copied_up"):
            out.append(f"  overlay: copied up into {where} from a lower layer (origin xattr)")
        if f.get("opaque"):
            out.append(f"  overlay: opaque directory in {where}")
    if "exclusive_bytes" in f:
        out.append(f"  {ex.driver}: in {where}, {size(f['exclusive_bytes'])} of the file are "
                   f"exclusive to the layer, {size(f['shared_bytes'])} shared with other "
                   f"layers" + (f", {size(f['inline_bytes'])} inline" if f.get("inline_bytes")
                                else ""))
    if "device_exclusive_bytes" in f:
        out.append(f"  devicemapper: the thin device of {where} maps "
                   f"{size(f['device_mapped_bytes'])}: {size(f['device_exclusive_bytes'])} "
                   f"exclusive, {size(f['device_shared_bytes'])} shared")
    return out
