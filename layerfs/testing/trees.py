"""Build, edit and fingerprint directory trees in tests.

:func:`tree_manifest` is the yardstick of the layer round-trip tests: two trees
are "the same layer" when their manifests are equal. It records, for every
entry below a root, everything a layer is supposed to carry: type, permission
bits (setuid, setgid and sticky included), owner, size and content digest,
symlink target, device number, xattrs, mtime (microseconds) and which paths
share an inode. It leaves out what no layer format preserves: inode numbers,
ctimes, atimes, directory sizes and directory mtimes (a directory's mtime
moves whenever its entries change, so extraction order decides it; tars
carry it, and the tests that care check it separately).

:func:`make_tree` builds a tree from a compact spec, and :func:`apply_edit`
performs one random-ish edit (the vocabulary of the property tests) so that
driver tests can replay the same edits inside a mounted container.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "EDIT_KINDS",
    "Device",
    "Dir",
    "Edit",
    "Entry",
    "Fifo",
    "File",
    "Hardlink",
    "Spec",
    "Symlink",
    "apply_edit",
    "list_paths",
    "make_tree",
    "tree_manifest",
]

_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}


@dataclass(frozen=True)
class Entry:
    """What a layer must reproduce about one path. Compare manifests with ``==``."""

    type: str                       # file, dir, symlink, chr, blk, fifo, socket
    mode: int                       # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int | None = None         # None for directories (fs-dependent)
    sha256: str | None = None       # regular files
    target: str | None = None       # symlinks
    rdev: tuple[int, int] | None = None          # devices: (major, minor)
    xattrs: tuple[tuple[str, bytes], ...] = ()   # sorted; trusted.overlay.* left out
    mtime_us: int | None = None     # None for directories
    hardlinks: tuple[str, ...] = () # every path sharing this inode, if more than one


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    names = os.listxattr(path, follow_symlinks=False)
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                        for n in names if not n.startswith("trusted.overlay.")))


def tree_manifest(path: Path | str) -> dict[str, Entry]:
    """Every entry below ``path`` (not ``path`` itself), keyed by relative path ("a/b").

    Symlinks are not followed. Hardlink groups are computed within the tree.
    """
    root = os.fspath(path)
    raw: dict[str, tuple[os.stat_result, Entry]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    stack = [""]  # iterative: trees may nest deeper than the recursion limit
    while stack:
        rel = stack.pop()
        with os.scandir(f"{root}/{rel}" if rel else root) as it:
            entries = list(it)
        for e in entries:
            crel = f"{rel}/{e.name}" if rel else e.name
            p = e.path
            st = os.lstat(p)
            kind = _TYPES[stat.S_IFMT(st.st_mode)]
            entry = Entry(
                type=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                size=None if kind == "dir" else st.st_size,
                sha256=_sha256(p) if kind == "file" else None,
                target=os.readlink(p) if kind == "symlink" else None,
                rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))
                if kind in ("chr", "blk") else None,
                xattrs=_xattrs(p),
                mtime_us=None if kind == "dir" else st.st_mtime_ns // 1000,
            )
            raw[crel] = (st, entry)
            if kind != "dir" and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(crel)
            if kind == "dir":
                stack.append(crel)

    out: dict[str, Entry] = {}
    for rel, (st, entry) in raw.items():
        group = inodes.get((st.st_dev, st.st_ino), ())
        if len(group) > 1:
            entry = Entry(**{**entry.__dict__, "hardlinks": tuple(sorted(group))})
        out[rel] = entry
    return out


# ---------------------------------------------------------------------------
# make_tree


@dataclass(frozen=True)
class File:
    content: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Symlink:
    target: str
    uid: int = 0
    gid: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Hardlink:
    target: str   # relative path of an entry made earlier in the spec


@dataclass(frozen=True)
class Device:
    kind: str     # "chr" or "blk"
    major: int
    minor: int
    mode: int = 0o600
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Fifo:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None


Spec = Mapping[str, "bytes | File | Dir | Symlink | Hardlink | Device | Fifo"]


def make_tree(root: Path | str, spec: Spec) -> Path:
    """Create ``spec`` under ``root`` (created if missing) and return ``root``.

    Keys are relative paths; values are bytes (a 0644 root-owned file) or one
    of :class:`File`, :class:`Dir`, :class:`Symlink`, :class:`Hardlink`,
    :class:`Device`, :class:`Fifo`. Entries are made in the spec's order
    (missing parents as 0755 directories); directory modes and mtimes are set
    last, after their contents.
    """
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    late: list[tuple[str, Dir]] = []
    for rel, item in spec.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        p = os.fspath(path)
        if isinstance(item, bytes):
            item = File(item)
        if isinstance(item, File):
            path.write_bytes(item.content)
            os.chown(p, item.uid, item.gid)
            for k, v in item.xattrs.items():
                os.setxattr(p, k, v)
            os.chmod(p, item.mode)
            if item.mtime_ns is not None:
                os.utime(p, ns=(item.mtime_ns, item.mtime_ns))
        elif isinstance(item, Dir):
            path.mkdir(exist_ok=True)
            os.chown(p, item.uid, item.gid)
            for k, v in item.xattrs.items():
                os.setxattr(p, k, v)
            late.append((p, item))
        elif isinstance(item, Symlink):
            os.symlink(item.target, p)
            os.chown(p, item.uid, item.gid, follow_symlinks=False)
            for k, v in item.xattrs.items():
                os.setxattr(p, k, v, follow_symlinks=False)
            if item.mtime_ns is not None:
                os.utime(p, ns=(item.mtime_ns, item.mtime_ns), follow_symlinks=False)
        elif isinstance(item, Hardlink):
            os.link(base / item.target, p, follow_symlinks=False)
        elif isinstance(item, Device | Fifo):
            if isinstance(item, Device):
                ifmt = stat.S_IFCHR if item.kind == "chr" else stat.S_IFBLK
                os.mknod(p, ifmt | 0o600, os.makedev(item.major, item.minor))
            else:
                os.mkfifo(p, 0o600)
            os.chown(p, item.uid, item.gid)
            os.chmod(p, item.mode)
            if item.mtime_ns is not None:
                os.utime(p, ns=(item.mtime_ns, item.mtime_ns))
        else:  # pragma: no cover - a typo in a test
            raise TypeError(f"make_tree: {rel}: unknown spec {item!r}")
    for p, d in reversed(late):
        os.chmod(p, d.mode)
        if d.mtime_ns is not None:
            os.utime(p, ns=(d.mtime_ns, d.mtime_ns))
    return base


# ---------------------------------------------------------------------------
# Random edits


#: The edit vocabulary. Each names what :func:`apply_edit` does to the chosen path.
EDIT_KINDS = (
    "add_file", "add_dir", "add_symlink", "add_hardlink", "add_fifo",
    "write", "append", "chmod", "chown", "setxattr", "removexattr", "touch",
    "rename", "delete", "file_to_dir", "dir_to_file", "recreate_dir",
)


@dataclass(frozen=True)
class Edit:
    """One edit, in data: ``kind`` from :data:`EDIT_KINDS`; ``pick`` and ``pick2``
    choose existing paths (index modulo the sorted list), ``name`` a new name,
    ``value`` a small integer used for modes, owners, content and mtimes."""

    kind: str
    pick: int = 0
    pick2: int = 0
    name: str = "n"
    value: int = 0


def list_paths(root: Path | str) -> list[str]:
    """All relative paths below ``root``, sorted (directories included)."""
    out: list[str] = []
    base = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        for n in dirnames + filenames:
            out.append(n if rel == "." else f"{rel}/{n}")
    return sorted(out)


_MODES = (0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o444, 0o700)
_OWNERS = ((0, 0), (1000, 1000), (1000, 0), (65534, 65534), (123456, 7))
_XATTR_VALUES = (b"", b"v", b"\x00\xff\x01binary\n", bytes(range(32)),
                 # security.capability v2 blob: cap_net_bind_service, effective
                 b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
                 b"\x00\x00\x00\x00")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _rename_replacing(src: str, dst: str) -> None:
    """Move ``src`` to ``dst``, removing whatever ``dst`` is first (mv -T without the
    copy), all or nothing: a union filesystem may refuse to move a directory from a
    lower layer (EXDEV: aufs without dirren, overlay without redirect_dir), so ``src``
    is first moved aside in its own directory, where that refusal comes before
    ``dst`` is gone. A caller that skips the failed edit on another tree then keeps
    the two trees equal."""
    if not os.path.lexists(dst):
        os.rename(src, dst)
        return
    aside = os.path.join(os.path.dirname(src), f".moving-{os.path.basename(src)}")
    os.rename(src, aside)
    _remove(dst)
    os.rename(aside, dst)


def apply_edit(root: Path | str, edit: Edit) -> str | None:
    """Perform ``edit`` under ``root``; return a short description, or None if skipped.

    Edits choose their targets among the paths that exist now, so any sequence
    of edits is valid on any tree; an edit that does not apply (a chown of
    nothing, a hardlink to a directory) is skipped. A rename that raises has
    changed nothing (a union filesystem's EXDEV): callers that replay edits in
    lockstep on two trees can skip it on both.
    """
    base = os.fspath(root)
    paths = list_paths(base)
    dirs = [""] + [p for p in paths if os.path.isdir(f"{base}/{p}")
                   and not os.path.islink(f"{base}/{p}")]
    target = paths[edit.pick % len(paths)] if paths else None
    tpath = f"{base}/{target}" if target is not None else None
    parent = dirs[edit.pick2 % len(dirs)]
    new = f"{base}/{parent}/{edit.name}" if parent else f"{base}/{edit.name}"
    v = edit.value
    kind = edit.kind
    if kind.startswith("add_"):
        if os.path.lexists(new):
            _remove(new)
        if kind == "add_file":
            with open(new, "wb") as f:
                f.write(bytes([v % 256]) * (v % 5000))
            os.chmod(new, _MODES[v % len(_MODES)])
        elif kind == "add_dir":
            os.mkdir(new)
            os.chmod(new, (0o755, 0o700, 0o1777, 0o2775)[v % 4])
        elif kind == "add_symlink":
            os.symlink(("target", "../up", "/abs/path", "a/b/c")[v % 4], new)
        elif kind == "add_fifo":
            os.mkfifo(new)
        else:  # add_hardlink
            files = [p for p in paths if os.path.isfile(f"{base}/{p}")
                     and not os.path.islink(f"{base}/{p}")]
            if not files:
                return None
            src = f"{base}/{files[v % len(files)]}"
            if not os.path.lexists(src) or src == new:
                return None
            os.link(src, new)
        return f"{kind} {os.path.relpath(new, base)}"
    if target is None or tpath is None:
        return None
    is_dir = os.path.isdir(tpath) and not os.path.islink(tpath)
    is_file = os.path.isfile(tpath) and not os.path.islink(tpath)
    if kind in ("write", "append"):
        if not is_file:
            return None
        before = os.lstat(tpath)
        with open(tpath, "wb" if kind == "write" else "ab") as f:
            f.write(bytes([(v + 1) % 256]) * (v % 3000 + 1))
        after = os.lstat(tpath)
        if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
            # Written within the same clock tick as the copy it came from: move the
            # mtime on, as a finer clock would have (naive diffs rely on it).
            os.utime(tpath, ns=(after.st_atime_ns, after.st_mtime_ns + 1000))
    elif kind == "chmod":
        if os.path.islink(tpath):
            return None
        os.chmod(tpath, _MODES[v % len(_MODES)])
    elif kind == "chown":
        uid, gid = _OWNERS[v % len(_OWNERS)]
        os.chown(tpath, uid, gid, follow_symlinks=False)
    elif kind == "setxattr":
        key = ("user.a", "user.b", "trusted.t", "security.capability")[v % 4]
        if key.startswith("user.") and not (is_file or is_dir):
            key = "trusted.t"  # the kernel allows user.* only on files and directories
        if key == "security.capability" and not is_file:
            return None
        os.setxattr(tpath, key, _XATTR_VALUES[v % len(_XATTR_VALUES)] if key !=
                    "security.capability" else _XATTR_VALUES[-1], follow_symlinks=False)
    elif kind == "removexattr":
        names = [n for n in os.listxattr(tpath, follow_symlinks=False)
                 if not n.startswith("trusted.overlay.")]
        if not names:
            return None
        os.removexattr(tpath, sorted(names)[v % len(names)], follow_symlinks=False)
    elif kind == "touch":
        t = 1_500_000_000_000_000_000 + v * 1_000_003_001
        os.utime(tpath, ns=(t, t), follow_symlinks=False)
    elif kind == "rename":
        if new == tpath or new.startswith(tpath + "/") or tpath.startswith(new + "/"):
            return None
        _rename_replacing(tpath, new)
    elif kind == "delete":
        _remove(tpath)
    elif kind == "file_to_dir":
        if is_dir:
            return None
        _remove(tpath)
        os.mkdir(tpath)
        with open(f"{tpath}/inside", "wb") as f:
            f.write(b"inside %d" % v)
    elif kind == "dir_to_file":
        if not is_dir:
            return None
        shutil.rmtree(tpath)
        with open(tpath, "wb") as f:
            f.write(b"was a dir %d" % v)
    elif kind == "recreate_dir":
        if not is_dir:
            return None
        st = os.lstat(tpath)
        shutil.rmtree(tpath)
        os.mkdir(tpath)
        os.chown(tpath, st.st_uid, st.st_gid)
        os.chmod(tpath, stat.S_IMODE(st.st_mode))
        if v % 2:
            with open(f"{tpath}/fresh", "wb") as f:
                f.write(b"fresh")
    else:
        raise ValueError(f"apply_edit: unknown edit kind {kind!r}")
    return f"{kind} {target}"
