"""``layerfs image diff A B``: what changes from one image (layer, container) to another.

Both sides are stacks of layer indexes (:mod:`.stack`); their merged trees are compared
path by path, as ``docker diff`` compares a container with its image: a path only in B
is *added*, only in A *deleted*, in both but different (type, mode, owner, size, mtime,
link target; a directory by its own metadata only) *changed*. Layers the two share are
found by chain id (a chain id names a layer together with everything below it, so two
images share a prefix of their layers); those are stored once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .index import DIR, KIND_NAMES, Entry
from .stack import Stack
from .targets import Target

ADDED, CHANGED, DELETED = "A", "C", "D"


@dataclass(frozen=True)
class FileChange:
    path: str
    kind: str                # A, C or D
    before: Entry | None
    after: Entry | None

    @property
    def size(self) -> int:
        e = self.after if self.after is not None else self.before
        return e.size if e is not None and e.kind != DIR else 0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": "/" + self.path, "kind": self.kind, "size": self.size}
        if self.before is not None:
            d["before"] = self.before.as_dict()
        if self.after is not None:
            d["after"] = self.after.as_dict()
        return d


@dataclass
class StackDiff:
    a: Target
    b: Target
    changes: list[FileChange]
    shared: int                                  # layers shared (from the bottom)
    shared_bytes: int
    a_only: int
    b_only: int
    sizes: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(1 for c in self.changes if c.kind == kind)

    def bytes(self, kind: str) -> int:
        return sum(c.size for c in self.changes if c.kind == kind)

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a.as_dict(), "b": self.b.as_dict(),
                "summary": {"added": self.count(ADDED), "changed": self.count(CHANGED),
                            "deleted": self.count(DELETED), "added_bytes": self.bytes(ADDED),
                            "changed_bytes": self.bytes(CHANGED),
                            "deleted_bytes": self.bytes(DELETED)},
                "layers": {"shared": self.shared, "shared_bytes": self.shared_bytes,
                           "a_only": self.a_only, "b_only": self.b_only},
                "changes": [c.as_dict() for c in self.changes]}

    def human_lines(self, size: Callable[[int], str], limit: int | None = 200) -> list[str]:
        out = [f"A: {self.a.describe()}", f"B: {self.b.describe()}"]
        out.append(f"layers: {self.shared} shared by chain id ({size(self.shared_bytes)}, "
                   f"stored once), {self.a_only} only in A, {self.b_only} only in B")
        shown = self.changes if limit is None else self.changes[:limit]
        for c in shown:
            e = c.after if c.after is not None else c.before
            assert e is not None
            what = KIND_NAMES[e.kind]
            detail = f"  {size(c.size)}" if e.kind != DIR else ""
            if c.kind == CHANGED and c.before is not None and c.after is not None \
                    and c.before.kind != DIR and c.after.size != c.before.size:
                detail = f"  {size(c.before.size)} -> {size(c.after.size)}"
            out.append(f"{c.kind} /{c.path}  ({what}){detail}")
        if len(shown) < len(self.changes):
            out.append(f"... {len(self.changes) - len(shown)} more (--all or --json lists "
                       f"every change)")
        out.append(f"{self.count(ADDED)} added ({size(self.bytes(ADDED))}), "
                   f"{self.count(CHANGED)} changed ({size(self.bytes(CHANGED))}), "
                   f"{self.count(DELETED)} deleted ({size(self.bytes(DELETED))})")
        return out


def same(a: Entry, b: Entry) -> bool:
    """Whether two entries describe the same file (``docker diff``'s rule: what a copy
    keeps; a directory by its own metadata, not its contents)."""
    if a is b:
        return True
    if (a.kind, a.mode, a.uid, a.gid) != (b.kind, b.mode, b.uid, b.gid):
        return False
    if a.kind == DIR:
        return True
    return (a.size, a.mtime_ns, a.link) == (b.size, b.mtime_ns, b.link)


def diff_stacks(a: Target, sa: Stack, b: Target, sb: Stack) -> StackDiff:
    changes: list[FileChange] = []
    for path in sorted(set(sa.history) | set(sb.history)):
        ea = sa.entry_at(path)
        eb = sb.entry_at(path)
        if ea is None and eb is None:
            continue
        if ea is None:
            changes.append(FileChange(path, ADDED, None, eb))
        elif eb is None:
            changes.append(FileChange(path, DELETED, ea, None))
        elif not same(ea, eb):
            changes.append(FileChange(path, CHANGED, ea, eb))
    shared = 0
    for la, lb in zip(a.layers, b.layers, strict=False):
        if (la.chain_id or la.layer_id) != (lb.chain_id or lb.layer_id):
            break
        shared += 1
    shared_bytes = sum(layer.size for layer in sa.layers[:shared])
    return StackDiff(a, b, changes, shared, shared_bytes, len(a.layers) - shared,
                     len(b.layers) - shared)
