"""What a container's root filesystem says and needs, for :mod:`.containers`.

The user a container runs as (``uid[:gid]`` or names looked up in the
image's ``/etc/passwd`` and ``/etc/group``, read as hostile files), the mount
points the engine will have to create in the layer because the image lacks
them, and dropping those again from the tar a commit writes. Kept apart from
the manager: each is a small function of a rootfs or a tar, testable alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import InvalidArgument
from .files import read_small_file


def numeric_user(text: str) -> tuple[int, int] | None:
    """``""`` → root; ``"1000"``/``"1000:50"`` → ids without looking at the image (a numeric
    uid alone gets gid 0 unless the image's passwd says otherwise, as in Docker)."""
    if not text:
        return (0, 0)
    user, _, group = text.partition(":")
    if user.isdigit() and group.isdigit():
        return int(user), int(group)
    return None


def _read_etc(rootfs: Path, name: str) -> list[list[str]]:
    """Lines of the image's /etc/<name>, split on ':'. The file is hostile input: see
    :func:`layerfs.runtime.files.read_small_file` (inside the root, regular files only,
    bounded). A missing file is empty."""
    data = read_small_file(rootfs, f"etc/{name}")
    if data is None:
        return []
    text = data.decode(errors="replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(rootfs: Path, text: str) -> tuple[int, int]:
    """``user[:group]`` (names or numbers) → ``(uid, gid)`` using the image's /etc/passwd and
    /etc/group. A uid alone takes its primary group from passwd, else 0 (Docker's rules)."""
    user, _, group = text.partition(":")
    passwd = _read_etc(rootfs, "passwd")
    uid = gid = None
    for fields in passwd:
        if len(fields) < 4 or not fields[2].isdigit() or not fields[3].isdigit():
            continue
        if fields[0] == user or (user.isdigit() and fields[2] == user):
            uid, gid = int(fields[2]), int(fields[3])
            break
    if uid is None:
        if not user.isdigit():
            raise InvalidArgument(f"user {user!r}: no such user in the image's /etc/passwd; "
                                  f"use a numeric uid[:gid]")
        uid, gid = int(user), 0
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = [f for f in _read_etc(rootfs, "group")
                     if len(f) >= 3 and f[0] == group and f[2].isdigit()]
            if not match:
                raise InvalidArgument(f"group {group!r}: no such group in the image's "
                                      f"/etc/group; use a numeric gid")
            gid = int(match[0][2])
    assert gid is not None
    return uid, gid


def missing_mountpoints(rootfs: Path, targets: Iterable[str]) -> list[str]:
    """The paths (and parent directories) the engine will have to create in the layer for
    ``targets`` because the image lacks them; relative, ``/``-separated. A path with a
    symlink on the way is left out (the engine resolves it inside the container)."""
    created: list[str] = []
    for target in targets:
        parts = [p for p in target.split("/") if p]
        path = str(rootfs)
        for i, part in enumerate(parts):
            path = os.path.join(path, part)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                for j in range(i, len(parts)):
                    rel = "/".join(parts[:j + 1])
                    if rel not in created:
                        created.append(rel)
                break
            except OSError:
                break
            if os.path.islink(path) or (i < len(parts) - 1 and not _is_dir(st.st_mode)):
                break
    return created


def _is_dir(mode: int) -> bool:
    import stat
    return stat.S_ISDIR(mode)


def drop_mountpoints(tar_path: Path, mountpoints: Sequence[str]) -> list[str]:
    """Rewrite a layer tar without the mount points the engine created (empty files, and
    directories with nothing else of the diff under them). Returns what was dropped."""
    if not mountpoints:
        return []
    import tarfile

    wanted = set(mountpoints)
    with tarfile.open(tar_path, "r:") as tar:
        members = tar.getmembers()

    def key(m: tarfile.TarInfo) -> str:
        name = m.name[2:] if m.name.startswith("./") else m.name
        return name.strip("/") if name not in (".", "") else ""

    names = [key(m) for m in members]
    drop: set[str] = set()
    # Deepest first, so that a directory whose only child was dropped goes too.
    for m, name in sorted(zip(members, names, strict=True), key=lambda mn: -mn[1].count("/")):
        if name not in wanted:
            continue
        empty_file = m.isfile() and m.size == 0
        if empty_file or (m.isdir() and not any(n.startswith(name + "/") and n not in drop
                                                for n in names)):
            drop.add(name)
    if not drop:
        return []
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tar_path, "r:") as src, tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) \
            as dst:
        for m in src:
            if key(m) in drop:
                continue
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    os.replace(tmp, tar_path)
    return sorted(drop)

