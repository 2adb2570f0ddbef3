"""The change model: what a layer adds, modifies and deletes relative to its parent.

A layer is described two ways in layerfs. On disk, each driver has its own
encoding (a full copy of the tree for vfs/btrfs/devicemapper, an upper
directory with whiteouts for overlay and aufs). Between drivers, and in images,
a layer is an OCI tar changeset (see :mod:`layerfs.tar`). This module is
the model in the middle: a sorted list of :class:`Change` values, each naming
one absolute path inside the layer and whether it was added, modified or
deleted (the three letters ``docker diff`` prints).

One rule, whichever way the list is computed (every driver, native or naive,
gives the same list for the same edits; the conformance suite checks it):

* ADD: the path exists only in the layer. A new directory is listed with
  everything below it.
* DELETE: the path existed in the parent and is gone. Only the top-most
  deleted path is listed; a deleted directory's contents are implied.
* MODIFY: the path exists in both and what a copy preserves differs (see
  :func:`naive_changes` for the exact fields), or its type changed.
* **Parent directories** (moby's rule): every directory above a changed path,
  except the layer root, is listed too, as MODIFY unless the layer added it,
  even when its own metadata is unchanged. moby's naive walk does this "to
  properly save and restore filesystem permissions" and its union walk for
  moby#13590; ``docker diff`` shows ``C /etc`` next to ``A /etc/new``. It is
  also what a union driver's diff directory holds (the copied-up parents),
  and what an exported tar carries (the parents before their entries).

Three ways to compute it, all ending in :func:`with_parent_directories`:

* :func:`naive_changes` compares two complete trees (parent and child). It works
  for every driver, because every driver can show a layer as a full tree, but
  it walks both trees. This is moby's ``archive.ChangesDirs``.
* :func:`changes_from_diff_dir` reads the candidates straight out of a union
  driver's diff directory, where deletions are already recorded as whiteouts,
  and compares each with the parent's branches. It only walks the (usually
  small) diff.
* btrfs finds candidates from the filesystem's own trees and classifies them
  with :func:`entry_differs` (``layerfs_drivers.btrfs``).

Whiteouts, the markers for "this path was deleted", have one meaning and three
encodings, listed by :class:`WhiteoutFormat`. The OCI tar encoding (``.wh.NAME``
files and the ``.wh..wh..opq`` opaque marker) is the exchange format; the
others are what overlay and aufs expect on disk.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path

from .errors import InvalidArgument, NotFound

__all__ = [
    "AUFS_META_PREFIX",
    "WHITEOUT_OPAQUE",
    "WHITEOUT_PREFIX",
    "Change",
    "ChangeKind",
    "WhiteoutFormat",
    "changes_from_diff_dir",
    "entry_differs",
    "is_private_xattr",
    "lstat_or_none",
    "naive_changes",
    "with_parent_directories",
]

#: A file named ``.wh.NAME`` in a tar (or an aufs branch) deletes ``NAME``.
WHITEOUT_PREFIX = ".wh."
#: A file with this name in a directory hides everything below that directory
#: in the layers underneath ("opaque directory").
WHITEOUT_OPAQUE = ".wh..wh..opq"
#: aufs keeps its own bookkeeping in root-level names with this prefix
#: (``.wh..wh.plnk``, ``.wh..wh.aufs``, ``.wh..wh.orph``); they are never layer content.
AUFS_META_PREFIX = ".wh..wh."


class WhiteoutFormat(Enum):
    """How deletions are written into a layer directory when a tar is applied.

    The OCI tar format itself is fixed; this says what the *destination* uses.
    """

    #: The destination is a full copy of the parent (vfs, btrfs, devicemapper):
    #: a deletion is performed, nothing is recorded.
    IN_PLACE = "in-place"
    #: overlayfs upper directory: a deleted path becomes a character device 0/0,
    #: an opaque directory carries ``trusted.overlay.opaque=y``.
    OVERLAY = "overlay"
    #: overlayfs mounted with ``userxattr`` (rootless): as OVERLAY, but the
    #: opaque marker is ``user.overlay.opaque=y``.
    OVERLAY_USER = "overlay-user"
    #: aufs branch: same names as the OCI tar (``.wh.NAME``, ``.wh..wh..opq``).
    AUFS = "aufs"

    @property
    def opaque_xattr(self) -> str | None:
        """The xattr that marks an opaque directory, for the overlay formats."""
        if self is WhiteoutFormat.OVERLAY:
            return "trusted.overlay.opaque"
        if self is WhiteoutFormat.OVERLAY_USER:
            return "user.overlay.opaque"
        return None

    @property
    def is_overlay(self) -> bool:
        return self in (WhiteoutFormat.OVERLAY, WhiteoutFormat.OVERLAY_USER)


def is_private_xattr(name: str) -> bool:
    """True for xattrs that belong to overlayfs, not to the layer's content.

    ``trusted.overlay.*`` (and ``user.overlay.*`` on ``userxattr`` mounts) is
    overlayfs's own bookkeeping: opaque markers, but also ``redirect``,
    ``origin`` and ``metacopy``, which make the kernel look up *other* paths.
    Such names never go into a tar, are never taken from one (a layer carrying
    them could steer whichever overlay mount later uses it as a lower layer),
    and are ignored when comparing trees. The opaque markers are produced and
    consumed only as whiteout translations.
    """
    return name.startswith(("trusted.overlay.", "user.overlay."))


class ChangeKind(StrEnum):
    """What happened to a path; the values are the letters ``docker diff`` prints."""

    ADD = "A"
    MODIFY = "C"
    DELETE = "D"


@dataclass(frozen=True, order=True)
class Change:
    """One changed path, absolute inside the layer (``/etc/passwd``).

    Changes order by path, which puts every directory before its contents.
    """

    path: str
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{self.kind.value} {self.path}"


def with_parent_directories(changes: Iterable[Change]) -> list[Change]:
    """``changes`` plus MODIFY for every directory above a changed path (moby's rule).

    The layer root is never listed. A parent already in the list keeps its kind
    (an added directory stays ADD). Such a parent exists as a directory in both
    trees: a DELETE or a type change hides everything below it, so nothing
    below one is ever in the list. Returns the sorted list.
    """
    result = {c.path: c for c in changes}
    for path in list(result):
        parent = path.rpartition("/")[0]
        while parent and parent not in result:
            result[parent] = Change(parent, ChangeKind.MODIFY)
            parent = parent.rpartition("/")[0]
    # Paths are unique here, so their order is Change's order (and far cheaper
    # than comparing dataclasses: this sorts every entry of a big layer).
    return [result[path] for path in sorted(result)]


# ---------------------------------------------------------------------------
# naive_changes: compare two full trees


def read_xattrs(path: str) -> dict[str, bytes]:
    """All xattrs of ``path`` (not following a final symlink), minus private ones."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in _NO_XATTR_SUPPORT:
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        if is_private_xattr(name):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as err:
            # Removed between list and get (ENODATA) is not an error.
            if err.errno not in (*_NO_XATTR_SUPPORT, _ENODATA):
                raise
    return out


_ENODATA = 61
_NO_XATTR_SUPPORT = (95,)  # EOPNOTSUPP == ENOTSUP on Linux


def _same_xattrs(a: str, b: str) -> bool:
    # Listing is one syscall and settles most cases; values only when both list
    # the same names.
    try:
        na = sorted(n for n in os.listxattr(a, follow_symlinks=False) if not is_private_xattr(n))
        nb = sorted(n for n in os.listxattr(b, follow_symlinks=False) if not is_private_xattr(n))
    except OSError as err:
        if err.errno in _NO_XATTR_SUPPORT:
            return True
        raise
    if na != nb:
        return False
    return all(os.getxattr(a, n, follow_symlinks=False) == os.getxattr(b, n, follow_symlinks=False)
               for n in na)


def _stat_differs(lo: os.stat_result, up: os.stat_result) -> bool:
    """Docker's rule: compare what a copy preserves, never inode, ctime or blocks.

    Directories ignore size and mtime: both change whenever an entry is added or
    removed below, which is reported by that entry's own change (moby#9874).
    """
    if (lo.st_mode != up.st_mode or lo.st_uid != up.st_uid or lo.st_gid != up.st_gid
            or lo.st_rdev != up.st_rdev):
        return True
    if stat.S_ISDIR(up.st_mode):
        return False
    return lo.st_size != up.st_size or lo.st_mtime_ns != up.st_mtime_ns


def entry_differs(lpath: str, upath: str, lo: os.stat_result, up: os.stat_result) -> bool:
    """Whether one path of the parent (``lpath``, stat ``lo``) and of the layer
    (``upath``, ``up``) differ by the MODIFY rule, hardlink groups aside: the
    stat fields of :func:`_stat_differs`, a symlink's target, the xattrs."""
    return (_stat_differs(lo, up)
            or (stat.S_ISLNK(up.st_mode) and os.readlink(lpath) != os.readlink(upath))
            or not _same_xattrs(lpath, upath))


def _scan(path: str) -> dict[str, os.stat_result]:
    with os.scandir(path) as it:
        return {e.name: e.stat(follow_symlinks=False) for e in it}


def naive_changes(lower: Path | None, upper: Path) -> list[Change]:
    """Changes that turn the tree ``lower`` into the tree ``upper`` (``None``: empty).

    The rules, those of ``docker diff`` (moby ``archive.ChangesDirs``) except
    where noted:

    * ADD: the path exists only in ``upper``. A new directory is listed together
      with everything below it.
    * DELETE: the path exists only in ``lower``. Only the top-most deleted path
      is listed; a deleted directory's contents are implied.
    * MODIFY: the path exists in both and its type, permission bits, owner,
      device number or xattrs (except ``trusted.overlay.*``) differ; for
      non-directories also its size, mtime (to the nanosecond) or symlink target.
      (``user.overlay.*`` is ignored too, see :func:`is_private_xattr`.)
      A directory's own size and mtime never count: they move whenever an entry
      below is added or removed, which that entry's change reports, and the
      parent directory rule lists the directory anyway. A change of type
      (file to directory, directory to symlink, ...) is a MODIFY of the path;
      when the new object is a directory its children are ADDs, and when the
      old one was a directory its old children are not listed (replacing the
      path removes them).
    * Parent directories: see the module docstring (:func:`with_parent_directories`).
    * Hardlinks (beyond Docker): a non-directory whose set of hardlinked paths
      inside the tree changed (a new link to it was made, or it was split from
      its partners) is a MODIFY, so that an exported changeset can recreate the
      link groups exactly. Docker misses this and silently unlinks files.

    Content is *not* read. ``upper`` is typically a copy of ``lower`` (vfs) or a
    snapshot (btrfs, devicemapper), so inode numbers and ctimes differ for every
    file and cannot show what changed; reading content whenever size and mtime
    agree would cost a full read of both trees. Like Docker and rsync's quick
    check, a write that keeps the size and then forges the mtime back goes
    unnoticed. Two paths with the same device and inode number are the same
    file and are never compared further.
    """
    upper_s = os.fspath(upper)
    if not os.path.isdir(upper_s):
        raise NotFound(f"naive_changes: upper tree {upper_s} is not a directory")
    lower_s = os.fspath(lower) if lower is not None else None
    if lower_s is not None and not os.path.isdir(lower_s):
        raise NotFound(f"naive_changes: lower tree {lower_s} is not a directory")

    changes: list[Change] = []
    # (dev, ino) -> paths, for non-directories with more than one link, per tree.
    groups_lo: dict[tuple[int, int], list[str]] = {}
    groups_up: dict[tuple[int, int], list[str]] = {}
    # Paths present and unchanged in both trees whose link groups need comparing.
    link_checks: list[tuple[str, tuple[int, int], tuple[int, int]]] = []

    def note_links(groups: dict[tuple[int, int], list[str]], rel: str, st: os.stat_result) -> None:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)

    # Explicit stacks, not recursion: a layer may nest deeper than Python's
    # recursion limit (PATH_MAX allows ~2000 levels).
    to_add: list[tuple[str, str]] = []       # (rel, upper path): everything below is ADD
    to_note: list[tuple[str, str]] = []      # (rel, lower path): gone, but count its links
    to_compare: list[tuple[str, str, str]] = []  # (rel, lower path, upper path)
    if lower_s is None:
        to_add.append(("", upper_s))
    else:
        to_compare.append(("", lower_s, upper_s))

    while to_compare:
        rel, lpath, upath = to_compare.pop()
        lo_entries = _scan(lpath)
        for name, up in _scan(upath).items():
            crel = f"{rel}/{name}"
            cup = f"{upath}/{name}"
            note_links(groups_up, crel, up)
            lo = lo_entries.pop(name, None)
            if lo is None:
                changes.append(Change(crel, ChangeKind.ADD))
                if stat.S_ISDIR(up.st_mode):
                    to_add.append((crel, cup))
                continue
            clo = f"{lpath}/{name}"
            note_links(groups_lo, crel, lo)
            if stat.S_IFMT(lo.st_mode) != stat.S_IFMT(up.st_mode):
                changes.append(Change(crel, ChangeKind.MODIFY))
                if stat.S_ISDIR(lo.st_mode):
                    to_note.append((crel, clo))
                if stat.S_ISDIR(up.st_mode):
                    to_add.append((crel, cup))
                continue
            if (lo.st_dev, lo.st_ino) == (up.st_dev, up.st_ino):
                continue  # the very same file (e.g. a bind mount of one tree)
            if entry_differs(clo, cup, lo, up):
                changes.append(Change(crel, ChangeKind.MODIFY))
            elif (lo.st_nlink > 1 or up.st_nlink > 1) and not stat.S_ISDIR(up.st_mode):
                link_checks.append((crel, (lo.st_dev, lo.st_ino), (up.st_dev, up.st_ino)))
            if stat.S_ISDIR(up.st_mode):
                to_compare.append((crel, clo, cup))
        for name, lo in lo_entries.items():
            crel = f"{rel}/{name}"
            changes.append(Change(crel, ChangeKind.DELETE))
            note_links(groups_lo, crel, lo)
            if stat.S_ISDIR(lo.st_mode):
                to_note.append((crel, f"{lpath}/{name}"))

    while to_add:
        rel, path = to_add.pop()
        for name, st in _scan(path).items():
            crel = f"{rel}/{name}"
            changes.append(Change(crel, ChangeKind.ADD))
            note_links(groups_up, crel, st)
            if stat.S_ISDIR(st.st_mode):
                to_add.append((crel, f"{path}/{name}"))

    # A deleted or replaced subtree still counts for the lower link groups: a
    # surviving file linked to a deleted one has lost a partner.
    while to_note:
        rel, path = to_note.pop()
        for name, st in _scan(path).items():
            note_links(groups_lo, f"{rel}/{name}", st)
            if stat.S_ISDIR(st.st_mode):
                to_note.append((f"{rel}/{name}", f"{path}/{name}"))

    for rel, lkey, ukey in link_checks:
        if set(groups_lo.get(lkey, (rel,))) != set(groups_up.get(ukey, (rel,))):
            changes.append(Change(rel, ChangeKind.MODIFY))
    return with_parent_directories(changes)


# ---------------------------------------------------------------------------
# changes_from_diff_dir: union drivers


class _Branches:
    """The merged view of a stack of union branches (nearest first), read without
    mounting it: the parent layer as a union driver's diff directories show it.

    Lookups follow overlayfs and aufs alike: the first branch holding a name
    decides; a whiteout there hides the name; a non-directory hides what the
    branches below hold at that name; a directory merges with the directories
    below it until one is opaque (or a branch below holds a non-directory).
    """

    def __init__(self, branches: Sequence[Path], fmt: WhiteoutFormat) -> None:
        self.fmt = fmt
        # Resolved once: overlay2 names its lowers through l/ symlinks.
        roots = [os.path.realpath(b) for b in branches]
        # rel -> the branches whose directory at rel takes part in the merge, top first.
        self._merged: dict[str, list[str]] = {"": self._until_opaque(roots, "")}

    def _until_opaque(self, roots: list[str], rel: str) -> list[str]:
        for i, root in enumerate(roots):
            if _is_opaque(f"{root}/{rel}" if rel else root, self.fmt):
                return roots[:i + 1]
        return roots

    def _whited_out(self, root: str, rel: str, st: os.stat_result | None) -> bool:
        if self.fmt is WhiteoutFormat.AUFS:
            parent, _, name = rel.rpartition("/")
            wh = f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name
            return os.path.lexists(f"{root}/{wh}")
        return st is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0

    def merged(self, rel: str) -> list[str]:
        """Branches whose directory ``rel`` shows through (empty: no directory there)."""
        found = self._merged.get(rel)
        if found is None:
            parent, _, _ = rel.rpartition("/")
            found = []
            top = self.lookup(rel, self.merged(parent))
            if top is not None and stat.S_ISDIR(top[1].st_mode):
                for root in self.merged(parent):
                    st = lstat_or_none(f"{root}/{rel}")
                    if self._whited_out(root, rel, st):
                        break
                    if st is None:
                        continue
                    if not stat.S_ISDIR(st.st_mode):
                        break
                    found.append(root)
                    if _is_opaque(f"{root}/{rel}", self.fmt):
                        break
            self._merged[rel] = found
        return found

    def lookup(self, rel: str, merged_parent: list[str] | None = None) -> \
            tuple[str, os.stat_result] | None:
        """The path and stat that the merged view shows at ``rel``, or None."""
        if merged_parent is None:
            merged_parent = self.merged(rel.rpartition("/")[0])
        for root in merged_parent:
            path = f"{root}/{rel}"
            st = lstat_or_none(path)
            if self._whited_out(root, rel, st):
                return None
            if st is not None:
                return path, st
        return None

    def names(self, rel: str) -> set[str]:
        """The names the merged view lists in the directory ``rel``."""
        shown: set[str] = set()
        hidden: set[str] = set()
        for root in self.merged(rel):
            with os.scandir(f"{root}/{rel}" if rel else root) as it:
                for entry in it:
                    name = entry.name
                    if self.fmt is WhiteoutFormat.AUFS and name.startswith(WHITEOUT_PREFIX):
                        if not name.startswith(AUFS_META_PREFIX):
                            hidden.add(name[len(WHITEOUT_PREFIX):])
                        continue
                    if name in hidden or name in shown:
                        continue
                    if self.fmt.is_overlay and not entry.is_dir(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                            hidden.add(name)
                            continue
                    shown.add(name)
        return shown


def lstat_or_none(path: str) -> os.stat_result | None:
    """``os.lstat``, or None where nothing is (also when a component is not a directory)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def changes_from_diff_dir(diff_dir: Path, fmt: WhiteoutFormat,
                          parent_branches: Sequence[Path]) -> list[Change]:
    """Changes recorded in a union driver's diff directory (overlay upper, aufs branch).

    ``parent_branches`` are the parent layer's branches, nearest first (its own
    diff directory, then its parents'), in the same whiteout format; the parent's
    view is read from them without mounting it. The result is exactly what
    :func:`naive_changes` reports for the mounted parent and layer:

    * A whiteout (char device 0/0 for the overlay formats, ``.wh.NAME`` for aufs)
      is a DELETE of the path it hides, if the parent has it.
    * Every other entry is ADD if the parent has nothing there, else compared
      with the parent's entry by :func:`entry_differs`: a copy-up that changed
      nothing (a file opened for writing and closed, a chown to the same owner,
      a directory that only holds changes) is not a change of its own.
    * An opaque directory hides the parent's entries below it: each name the
      parent lists there and the diff does not is a DELETE.
    * Hardlinks: a copied-up file whose parent version had several links lost
      them (overlayfs and aufs break a link on copy-up), and a file linked
      inside the diff changed its link group: both are MODIFY. The names the
      split left behind in the lower branches are not listed (that would take
      a walk of the branches); the naive walk of the two mounted trees lists
      them too, as their link group shrank.
    * aufs bookkeeping at the branch root (``.wh..wh.plnk`` etc.) is skipped.

    Overlay directories using ``redirect_dir`` (renamed directories) or
    ``metacopy`` (data still in a lower layer) cannot be read this way; such a
    diff raises :class:`InvalidArgument` and the caller should fall back to
    :func:`naive_changes` (Docker's overlay2 does the same).
    """
    if fmt is WhiteoutFormat.IN_PLACE:
        raise InvalidArgument("changes_from_diff_dir: IN_PLACE layers are full trees; "
                              "use naive_changes")
    root = os.fspath(diff_dir)
    if not os.path.isdir(root):
        raise NotFound(f"changes_from_diff_dir: {root} is not a directory")
    below = _Branches(parent_branches, fmt)
    aufs = fmt is WhiteoutFormat.AUFS
    changes: dict[str, ChangeKind] = {}
    # (dev, ino) -> paths in the diff, for files with several links.
    links: dict[tuple[int, int], list[str]] = {}
    link_checks: list[tuple[str, tuple[int, int]]] = []

    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        entries = _scan(path)
        shown: set[str] = set()
        for name, st in entries.items():
            crel = f"{rel}/{name}" if rel else name
            cpath = f"{path}/{name}"
            if aufs and name.startswith(WHITEOUT_PREFIX):
                hidden = name[len(WHITEOUT_PREFIX):]
                if name != WHITEOUT_OPAQUE and not name.startswith(AUFS_META_PREFIX) and \
                        below.lookup(f"{rel}/{hidden}" if rel else hidden) is not None:
                    changes[f"/{rel}/{hidden}" if rel else f"/{hidden}"] = ChangeKind.DELETE
                continue
            if not aufs and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                if below.lookup(crel) is not None:
                    changes["/" + crel] = ChangeKind.DELETE
                continue
            if not aufs:
                check_overlay_features(cpath, fmt)
            shown.add(name)
            lower = below.lookup(crel)
            if lower is None:
                changes["/" + crel] = ChangeKind.ADD
            elif (stat.S_IFMT(lower[1].st_mode) != stat.S_IFMT(st.st_mode)
                  or entry_differs(lower[0], cpath, lower[1], st)):
                changes["/" + crel] = ChangeKind.MODIFY
            elif not stat.S_ISDIR(st.st_mode) and lower[1].st_nlink > 1:
                changes["/" + crel] = ChangeKind.MODIFY  # split from its lower links
            elif not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                link_checks.append(("/" + crel, (st.st_dev, st.st_ino)))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                links.setdefault((st.st_dev, st.st_ino), []).append("/" + crel)
            if stat.S_ISDIR(st.st_mode):
                stack.append((crel, cpath))
        if rel and below.merged(rel) and _is_opaque(path, fmt):
            for name in below.names(rel) - shown:
                changes[f"/{rel}/{name}"] = ChangeKind.DELETE

    # A file with several links in the diff and one in the parent: its group grew
    # unless the diff holds it under its one old name only.
    for crel, key in link_checks:
        if links.get(key, [crel]) != [crel]:
            changes[crel] = ChangeKind.MODIFY
    return with_parent_directories(Change(p, k) for p, k in changes.items())


def _is_opaque(path: str, fmt: WhiteoutFormat) -> bool:
    """Whether the directory ``path`` of a union branch is opaque (hides the branches below)."""
    if fmt is WhiteoutFormat.AUFS:
        return os.path.lexists(f"{path}/{WHITEOUT_OPAQUE}")
    key = fmt.opaque_xattr
    assert key is not None
    try:
        return os.getxattr(path, key, follow_symlinks=False) == b"y"
    except OSError:
        return False


def check_overlay_features(path: str, fmt: WhiteoutFormat) -> None:
    """Refuse overlay entries whose meaning depends on other layers.

    ``redirect`` (a renamed directory) and ``metacopy`` (metadata copied up, data
    left below) make the upper directory an incomplete description of the
    layer; only a naive diff of the mounted tree is correct for them.
    """
    prefix = "user.overlay." if fmt is WhiteoutFormat.OVERLAY_USER else "trusted.overlay."
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in _NO_XATTR_SUPPORT:
            return
        raise
    for feature in ("redirect", "metacopy"):
        if prefix + feature in names:
            raise InvalidArgument(
                f"{path}: overlay {feature} xattr present; this diff directory cannot be "
                f"exported on its own (mount with redirect_dir=off,metacopy=off or use the "
                f"naive diff)")
