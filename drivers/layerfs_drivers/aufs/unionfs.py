"""A FUSE union filesystem with AUFS semantics, for kernels without aufs.

Usage (a mount helper: it returns once the mount is live)::

    python -m layerfs_drivers.aufs.unionfs [--foreground] [--entry-timeout S]
        [--attr-timeout S] [--keep-cache | --no-keep-cache] [--stats-file PATH]
        [--copyup-fsync] [--readahead-kb KB] [--dirren] [--no-passthrough]
        [--log PATH] TOP:rw LOWER:ro ... MOUNTPOINT

The first branch is the top one and the only writable one (``TOP:ro`` makes
the whole union read-only); the others are read-only, top to bottom. Without
``--foreground`` the process forks: the child (a new session, cwd ``/``, no
inherited fds) mounts, tells the parent over a pipe, and serves until the
filesystem is unmounted (``umount``), then exits 0. The parent exits 0 once
the mount is live, or 1 with the error on stderr (2 for bad arguments).
SIGTERM, SIGINT and SIGHUP unmount and exit; SIGUSR1 writes ``--stats-file``.
The mount is ``fuse.layerfs-union`` with ``allow_other``,
``default_permissions`` (the kernel checks permissions against the modes we
report), ``suid`` and ``dev``; mounting needs root. The server outlives the
helper, so it is re-parented: whoever runs the helper should be a child
subreaper, or it stays a zombie after it exits. A long-lived process avoids
both the cold start and the re-parenting with
:class:`layerfs_drivers.aufs.forkserver.ForkServer`, which forks servers from
a warm process (:func:`serve_forked`).

The server speaks the kernel's FUSE protocol itself
(:mod:`layerfs_drivers.aufs.fuseproto`), single-threaded.

Branches use AUFS's on-disk format, as Docker's aufs driver left it::

    BRANCH/
      .wh.NAME            NAME is deleted in the branches below
      dir/.wh..wh..opq    dir is opaque: the branches below add nothing to it;
                          with dirren, the file may instead hold a redirect
                          ("layerfs-dirren:/old/path": see *Renaming a directory*)
      .wh..wh.orph/       (top branch) scratch for copy-up in progress;
      .wh..wh.dirren      (top branch) present once a redirect was written;
                          every .wh..wh.* name is an AUFS internal, never shown

How it works
------------
*Backing access* never builds a path from a branch root: every operation is
``*at()`` relative to a directory fd (``openat``, ``fstatat``, ``mkdirat``,
``renameat2``, ``linkat``, ``symlinkat``, ``mknodat``, ``unlinkat``,
``fchownat``, ``utimensat``; xattrs with ``getxattrat`` and its siblings, or through
``/proc/self/fd/DIRFD/NAME`` before Linux 6.13), so
a union path up to PATH_MAX works however deep the branches are. Directory
fds (``O_PATH``) are cached per branch and backing path, opened component by
component from the branch root when missing.

*Lookup* of NAME in a directory walks the directory's branches top-down; in
each one it probes ``.wh.NAME`` (a whiteout ends the walk) and then ``NAME``.
A non-directory ends the walk; directories found in several branches merge.
A directory's branch list is cut below the first branch where it is opaque;
that is checked lazily, the first time the directory is used as a parent,
in each branch of it that has another branch below. Every probe is counted
(see *Counters*).

*Copy-up* is per file: opening for write, truncate, chmod, chown, utimens,
set/removexattr, link and rename copy the whole file to the top branch first
(FICLONE when the backing filesystem can reflink — O(1) whatever the size —
else copy_file_range over the data extents, so sparse files stay sparse),
with mode, owner, xattrs and times, into ``.wh..wh.orph`` and then rename it
into place, so a crash never leaves a half-copied file visible. Missing parent
directories are created in the top branch with their lower modes, owners,
xattrs and times, and the parents' times are restored afterwards, since a
copy-up changes nothing the union shows. Opening with O_TRUNC or truncating
copies no data. Copy-up does not fsync (neither did aufs, nor does
fuse-overlayfs); ``--copyup-fsync`` adds it.

*Reads and writes* go straight from the kernel to the backing file where the
kernel offers FUSE passthrough (Linux >= 6.9): the open reply names a backing
file registered with FUSE_DEV_IOC_BACKING_OPEN and no READ or WRITE request
reaches this process. The kernel allows one backing file per inode at a time,
so a file whose data is about to change in its copy (opened for writing,
truncated) while handles opened on its lower file are still open gets a new
inode: the request fails with ESTALE, which the kernel retries once after
looking the name up again. The handles open before keep reading the lower
file (as with fuse-overlayfs), and the name's st_ino changes; another hard
link name the kernel still caches opens the new inode the same way, but a
stat of it may show the old inode's attributes until it is looked up again.
Without passthrough (``--no-passthrough``, older kernels, a backing
filesystem that is itself stacked), reads and writes are served here, with
the kernel's page cache kept across opens (``--keep-cache``), and read-only
handles are switched to the copy on copy-up (dup2), so they see later writes.

*Deleting* a lower entry writes a whiteout ``.wh.NAME`` in the top branch;
rmdir of a directory that still shows entries is ENOTEMPTY; a directory
created where a whiteout was is made opaque. A whiteout name must fit in
NAME_MAX, so names longer than 251 bytes (255 - len(".wh.")) work in the top
branch but a lower entry with such a name cannot be deleted or renamed
(ENAMETOOLONG), as in aufs.

*Renaming* files copies them up and renames them in the top branch; the old
name is whited out if it exists below. ``renameat2`` flags: RENAME_NOREPLACE
(EEXIST), RENAME_EXCHANGE (both entries are brought to the top branch and
swapped) and RENAME_WHITEOUT (a whiteout ``.wh.OLD`` is always left in the
top branch, in AUFS's form: the name is hidden in the union, whatever the
branches below hold); other flags are EINVAL.

*Renaming a directory* that exists in a lower branch — with contents or
empty — fails with EXDEV by default, as aufs without ``dirren`` does. Every
program that moves files handles EXDEV (what a rename across filesystems
returns): ``mv`` and ``shutil.move`` fall back to copy + delete. Directories
that live only in the top branch (or are opaque there) are renamed natively.
With ``--dirren`` (AUFS's opt-in, the driver's ``dirren`` option) a lower
directory is renamed in place, in O(1): its top-branch part (made if missing)
moves to the new name and records where its lower contents are, as a
redirect in its ``.wh..wh..opq`` file (``layerfs-dirren:`` + its absolute
path in the union of the branches below); the old name is whited out. A
redirect is opaque for the new name and reads the branches below at the
recorded path, resolved there as a lookup of its own (whiteouts, opaque
directories and older redirects in those branches apply), so it stays right
when the branch becomes a lower branch of a later mount. As with overlayfs's
``redirect_dir``, such a branch is no longer a self-contained change set: the
aufs driver then diffs and exports the layer by walking the mounted trees.
Crash safety: the record is written first, the rename is atomic, the
whiteout comes last; a crash in between shows the directory under both names.

*Inode numbers* (``st_ino`` and the FUSE node id are the same number) stay
stable for the life of the mount, across copy-up and kernel forgets: a
table maps a key to a number that is never reused. Directories are keyed by
their path in the union (they merge across branches); other files by the
(st_dev, st_ino) of their backing file, so hardlinks in one branch share a
number and a copy-up re-keys the file to its copy. Hardlinked names the
kernel knows are linked up together; a lower hardlink first reached after its
sibling was copied up is a separate file (as in overlayfs without index).
Merged directories report st_nlink 1, as overlayfs does.

*Caching*: every change goes through this process (branches of a mounted
union must not be changed behind its back, as with aufs and overlayfs), so
the kernel's dentry, attribute, negative-entry and page caches cannot go
stale and long timeouts are safe: the defaults (``--entry-timeout`` and
``--attr-timeout`` 86400 s, ``--keep-cache``) let warm lookups and stats be
answered by the kernel without a round trip here.
``bench/layerfs_bench/aufs_fuse.py`` measures the difference.

Counters
--------
Readable while mounted as JSON from the virtual xattr ``user.layerfs.stats``
of the mount root, reset by setting ``user.layerfs.stats.reset``; neither is
listed by listxattr. ``lookup_name_stats``, ``lookup_whiteout_probes`` and
``lookup_opaque_probes`` are the probes made by lookups; ``backing_stats`` is
every stat/existence probe on a branch path, those included. A cold lookup of
a path of D components whose directories exist in all L branches, with the
file only in the bottom one, costs L*D name stats, L*D whiteout probes and
(L-1)*(D-1) opaque probes. ``passthrough_opens`` and ``cached_opens`` count
how opened files do their I/O, ``reads_served`` and ``writes_served`` the READ
and WRITE requests that reached this process.

The code
--------
This module is the front door: the design above, the names other code uses,
and the mount helper's ``python -m`` entry. The filesystem is one class,
:class:`UnionFS`, built in layers that each use only the ones before:

- :mod:`.union_state`: the AUFS on-disk names, :class:`Node` (one inode) and
  :class:`Stats` (the counters);
- :mod:`.union_lookup`: resolution (*Lookup*: whiteouts, opaque directories,
  redirects), the inode table, lookup/forget and readdir;
- :mod:`.union_copyup`: changing the top branch (*Copy-up*, whiteouts, the
  work dir, creating over a whiteout);
- :mod:`.union_rename`: rename, RENAME_EXCHANGE and *Renaming a directory*
  (dirren);
- :mod:`.union_ops`: :class:`UnionFS` itself, the remaining FUSE operations
  (attributes, create/link/unlink/rmdir, open files and passthrough, xattrs,
  counters);
- :mod:`.union_mount`: the mount helper (arguments, daemon, signals,
  :func:`serve_forked` for the fork server).
"""

from __future__ import annotations

import sys

from .union_copyup import FICLONE
from .union_mount import main, parse_branches, serve_forked, warm_up
from .union_ops import UnionFS
from .union_rename import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT
from .union_state import (
    CAPS_XATTR,
    DEFAULT_TIMEOUT,
    DIRREN_FLAG,
    FSTYPE,
    MAX_REDIRECT,
    OPAQUE,
    REDIRECT_MAGIC,
    RESET_XATTR,
    STATS_XATTR,
    WH,
    WH_META,
    WH_NAME_MAX,
    WORKDIR,
    Node,
    Stats,
    parse_redirect,
)

__all__ = [
    "CAPS_XATTR", "DEFAULT_TIMEOUT", "DIRREN_FLAG", "FICLONE", "FSTYPE", "MAX_REDIRECT",
    "OPAQUE", "REDIRECT_MAGIC", "RENAME_EXCHANGE", "RENAME_NOREPLACE", "RENAME_WHITEOUT",
    "RESET_XATTR", "STATS_XATTR", "WH", "WH_META", "WH_NAME_MAX", "WORKDIR", "Node", "Stats",
    "UnionFS", "main", "parse_branches", "parse_redirect", "serve_forked", "warm_up",
]

if __name__ == "__main__":
    sys.exit(main())
