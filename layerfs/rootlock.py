"""Who may make, use and take away a root, when several processes open it at once.

Two ``layerfs daemon`` services, or two commands, started together on a new root used to
race: both made the directory (``FileExistsError``), both wrote the new database, or one
that failed took the root away again while the other had it open (sqlite's "disk I/O
error"). Two ``flock`` locks order them, both on directories -- no lock file, so a root
that is never made leaves nothing behind, and ``info`` still creates nothing:

* **the root's parent directory**, exclusively, while a root in it is made (the check,
  ``mkdir``, database, driver) or taken away again (:meth:`LayerStore.discard`). The
  second opener of a new root waits here, then finds the root made and adopts it.
* **the root directory itself**: exclusively while the root is being initialized, then
  shared for as long as a :class:`~layerfs.layers.LayerStore` has it open. Opening a root
  that is already made takes only this shared lock -- openers of a made root never wait
  for each other -- and a root is taken away only by a process that can turn its own
  shared lock into an exclusive one, i.e. while no other process has the root open.

The parent's lock is always taken before the root's, and an opener holds the root's only
for its check when it then needs the parent's, so the two cannot deadlock. Where a
directory cannot be locked (unreadable for this user, a filesystem without ``flock``)
the open goes on unguarded, as before these locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InUse

#: How long the maker of a root waits for another process's shared lock on a directory
#: that has no database (see :meth:`RootHold.make`); the opener's check takes microseconds.
MAKE_WAIT = 10.0

_UNLOCKABLE = (errno.EACCES, errno.EPERM, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


def _locked_dir(path: Path, operation: int) -> int | None:
    """An fd of directory ``path`` holding ``flock(operation)``; None if it cannot be locked
    (see the module docstring). Raises FileNotFoundError / NotADirectoryError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in _UNLOCKABLE:
            return None
        raise
    try:
        fcntl.flock(fd, operation)
    except OSError as err:
        os.close(fd)
        if err.errno in _UNLOCKABLE:
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def making_roots_in(parent: Path) -> Iterator[None]:
    """Exclusive while a root in ``parent`` is made or taken away. A parent that does not
    exist is not locked: making the root then fails with its own message."""
    fd = None
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        fd = _locked_dir(parent, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


class RootHold:
    """This process's lock on a root directory (fd None: the directory cannot be locked).
    Released by :meth:`release`, or when the process exits."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def existing(cls, root: Path) -> RootHold | None:
        """A shared hold on ``root`` if it is a made root (its database is there): it waits
        while the root is being made or taken away. None if there is no root there yet
        (or it was taken away while we waited)."""
        try:
            fd = _locked_dir(root, fcntl.LOCK_SH)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if fd is None:
            return cls(None) if (root / "layerfs.db").is_file() else None
        try:
            held = os.fstat(fd)
            now = os.stat(root)
            made = stat.S_ISREG(os.stat("layerfs.db", dir_fd=fd).st_mode)
        except FileNotFoundError:   # taken away (or its database) while we waited
            made = False
        else:
            made = made and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
        if not made:
            os.close(fd)
            return None
        return cls(fd)

    @classmethod
    def make(cls, root: Path) -> RootHold:
        """An exclusive hold on the directory of a root being made (under
        :func:`making_roots_in`): openers that find its database wait until it is complete.
        Only an opener's brief check holds a root without a database, unless a process
        still has one open whose database was deleted under it: refused after
        :data:`MAKE_WAIT` seconds rather than waiting for ever."""
        fd = _locked_dir(root, fcntl.LOCK_SH)
        if fd is None:
            return cls(None)
        deadline = time.monotonic() + MAKE_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(fd)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise InUse(f"cannot make root {root}: another process still has it "
                                f"open although its layerfs.db is gone (was it reset under "
                                f"a running daemon?); stop that process first") from None
                time.sleep(0.01)
            except BaseException:
                os.close(fd)
                raise

    def share(self) -> None:
        """Made: let other openers in (and keep them from taking the root away)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_SH)

    def take_exclusive(self) -> bool:
        """Whether no other process has the root open (then it is ours to take away).
        The lock may be lost when this fails: the store is closed next anyway."""
        if self.fd is None:
            return True
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
