"""OCI / Docker layer tars: write them from a tree, apply them onto a layer directory.

A layer tar is an ordinary POSIX tar with two conventions (the OCI image spec,
"Representing Changes"):

* a regular file ``DIR/.wh.NAME`` means "``DIR/NAME`` is deleted";
* a regular file ``DIR/.wh..wh..opq`` means "``DIR`` is opaque": nothing from
  the layers below shows through it, only what this layer puts in it.

Producers differ in how they say "directory replaced". Docker's overlay2 and
aufs drivers write the opaque marker; Docker's naive differ (vfs, btrfs,
devicemapper) and umoci write one ``.wh.`` per deleted child instead. Both are
accepted everywhere.

Three operations:

* :func:`export_changes` turns a tree plus a list of :class:`~layerfs.changes.Change`
  into a tar (the naive diff, any driver).
* :func:`export_native` tars a union driver's diff directory, translating its
  on-disk whiteouts into the OCI ones.
* :func:`apply_layer` extracts a (possibly gzip or zstd compressed) tar into a
  layer directory, translating OCI whiteouts into the destination's
  :class:`~layerfs.changes.WhiteoutFormat`; it treats every byte as hostile.

One parser for the format, several readers on top of it:

=============  ===========================================================================
:mod:`.header`  the codec: header blocks, PAX records, GNU long names, numbers, checksums
:mod:`.stream`  gzip/zstd detection (:func:`open_layer_stream`)
:mod:`.reader`  a layer tar as a stream of members, with the layer policy
:mod:`.apply`   :func:`apply_layer`
:mod:`.export`  :func:`export_changes`, :func:`export_native` (the writer)
:mod:`.split`   tar-split: record a tar's bytes on load, re-create them on save
:mod:`.index`   a seekable tar indexed once (image archives)
=============  ===========================================================================

The tar reader and writer are implemented here rather than with :mod:`tarfile`:
``tarfile`` silently treats a corrupt or truncated header in the middle of an
archive as its end (a layer would be half-applied without an error), applies
global PAX headers to later entries, and its stream mode copies data through
small buffers. What is read: ustar, GNU and PAX headers (``path``,
``linkpath``, ``size``, ``uid``, ``gid``, ``mtime``, ``atime``,
``SCHILY.xattr.*``), GNU long names and long link names, base-256 numbers.
Refused as unsupported: sparse files, multi-volume archives and other vendor
types. Global PAX headers (``git archive`` writes one) are read and ignored,
as Go's archive/tar and therefore Docker do.
"""

from ..changes import WhiteoutFormat
from .apply import apply_layer
from .export import export_changes, export_native
from .stream import Readable, open_layer_stream

__all__ = [
    "Readable",
    "WhiteoutFormat",
    "apply_layer",
    "export_changes",
    "export_native",
    "open_layer_stream",
]
