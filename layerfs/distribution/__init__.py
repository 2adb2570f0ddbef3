"""Pulling images from and pushing them to OCI registries (the distribution API).

Speaks the registry HTTP API v2 (CNCF Distribution, Docker Hub, GHCR, Harbor, ...)
through :mod:`httpx`:

* **References**: ``[HOST[:PORT]/]REPO[:TAG|@DIGEST]``, as Docker reads them: the
  first component is a registry host if it has a ``.`` or a ``:`` or is
  ``localhost``; otherwise the image is on Docker Hub (``busybox`` is
  ``docker.io/library/busybox:latest``).
* **Manifests**: OCI image manifests and indexes, Docker v2 schema 2 manifests
  and manifest lists. An index resolves to one platform (this host's, or
  ``platform=``). Every manifest, config and layer is checked against its digest.
* **Auth**: the registry's ``WWW-Authenticate`` challenge decides. ``Basic``:
  the stored credentials go with every request. ``Bearer``: a token for the
  scopes the operation needs is fetched from the challenge's realm (with the
  credentials, if any) and cached until it expires or more scopes are needed.
  Credentials come from :mod:`.auth` (Docker's ``config.json`` format).
* **TLS**: verified against the system CAs plus ``ca=`` (a PEM file). With
  ``insecure=True``, and only for the host of the reference, the certificate is
  not checked and plain HTTP is tried when the host does not speak TLS;
  every other host (a token realm, a blob redirect) is still verified.

**Pull** (:func:`pull`): the layers whose chain id is not stored yet are
downloaded in parallel (``max_concurrent`` at a time, bottom first) into
staged files under the root (``ROOT/tmp/registry-blobs``), while the image
store applies them in order *from those same files as they grow*, so
extracting overlaps downloading. A download cut off mid-blob is resumed with
an HTTP ``Range`` request. Across pulls only with ``resume=True``: a failed
pull keeps its ``.partial`` files and the next ``resume`` pull of the same blob
continues from where it stopped (re-hashing what is already there); without it
partial downloads are removed on failure and never continued. Each blob is
checked against its digest and size; a mismatch deletes the staged file and
fails the pull. The image becomes visible only when every layer is applied
(:meth:`ImageStore.load_images`): a failed pull leaves no image and no layer
behind. Two pulls (even in two processes) that need the same blob download it
once: a per-blob ``flock`` serialises the downloads and the second finds the
finished file (or the layer already applied).

**Push** (:func:`push`): for each layer, a blob the registry already has
(``HEAD``) is skipped, a blob known to be in another repository of the same
registry is cross-mounted (``POST ...?mount=&from=``), and only the rest is
compressed (gzip by default, zstd or none for OCI) and uploaded, in parallel.
The config is pushed verbatim, so the image id is the same everywhere. Which
blob holds which diff id, and where it was seen, is kept in the root's
database (table ``registry_blobs``), filled by pulls and pushes.

Modules, by flow: :mod:`.auth` (credentials
and challenges), :mod:`.errors`, :mod:`.transport` (one registry host over HTTP; login),
:mod:`.blobs` (the blob table; the staging folder is :mod:`layerfs.downloads`), :mod:`.pull`, :mod:`.push`.
In this package "registry" always means an OCI registry; the storage driver registry is
:mod:`layerfs.plugins`.
"""

from ..downloads import StagedUsage, remove_staged_blobs, staged_blobs, staged_usage
from ..oci import Platform
from ..reference import RemoteReference
from .auth import Credentials, CredentialStore, RegistryAuth, parse_challenges
from .errors import RegistryError, Unauthorized
from .pull import PullResult, RemoteSource, pull
from .push import MEDIA_TYPES, PushResult, push
from .transport import MANIFEST_ACCEPT, Manifest, Registry, RegistryOptions, login, logout

__all__ = [
    "MANIFEST_ACCEPT", "MEDIA_TYPES", "CredentialStore", "Credentials", "Manifest", "Platform",
    "PullResult", "PushResult", "Registry", "RegistryAuth", "RegistryError", "RegistryOptions",
    "RemoteReference", "RemoteSource", "StagedUsage", "Unauthorized", "login", "logout",
    "parse_challenges", "pull", "push", "remove_staged_blobs", "staged_blobs", "staged_usage",
]
