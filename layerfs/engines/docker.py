"""Docker's graphdriver plugin protocol: layerfs as ``dockerd --storage-driver layerfs-<driver>``.

Docker 20.10 can load a storage driver from a plugin when started with
``--experimental``: at start it looks for ``/run/docker/plugins/NAME.sock``,
calls ``Plugin.Activate`` there, and from then on every layer operation is a
JSON POST to ``/GraphDriver.<Method>``. Docker made this API so that drivers
such as AUFS and devicemapper could live outside Docker; this module serves it
for a layerfs root, so Docker's AUFS works on a kernel without aufs, through
layerfs's FUSE union.

Docker names its layers itself (its *cache ids*: 64 hex digits, ``-init`` for
a container's init layer) and those names are layerfs layer ids directly.

=====================  ============================================================
GraphDriver.           layerfs
=====================  ============================================================
Init                   checks the options (driver options belong to the layerfs root)
Create, CreateReadWrite  :meth:`LayerStore.create` (read-write; an image layer is
                       committed read-only once its diff is applied)
ApplyDiff              :meth:`LayerStore.apply_diff`, then :meth:`LayerStore.commit`
Get, Put               :meth:`LayerStore.mount` / :meth:`~LayerStore.unmount`: the
                       store counts users, so Docker's nested Gets nest
Remove, Exists         remove (mounts first) / whether the layer is ready
Diff, Changes,         the driver's diff family (native for overlay2 and aufs,
DiffSize               the naive tree walk elsewhere); Changes also lists every
                       directory with a change inside, as ``docker diff`` does
Status, GetMetadata    ``docker info``'s and ``docker inspect``'s driver lines
Capabilities           ``ReproducesExactDiffs: false``: Docker keeps its tar-split
                       data and rebuilds the exact tars it was given on save
=====================  ============================================================

Errors are answered with HTTP 500 and ``{"Err": "..."}``, which Docker's
plugin client turns into the error message ``docker`` prints.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerfs.changes import Change, ChangeKind
from layerfs.errors import InvalidArgument, LayerfsError, NotFound
from layerfs.layers import LayerStore

from .snapshots import ENGINE_LABEL
from .unixhttp import Request, Response, UnixHTTPServer, json_response

log = logging.getLogger("layerfs.engines.docker")

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
ENGINE = "docker"

# Docker's archive.ChangeType: ChangeModify = 0, ChangeAdd = 1, ChangeDelete = 2.
_CHANGE_KINDS = {ChangeKind.MODIFY: 0, ChangeKind.ADD: 1, ChangeKind.DELETE: 2}


class GraphDriverPlugin:
    """The graphdriver methods over one :class:`LayerStore`."""

    def __init__(self, layers: LayerStore) -> None:
        self.layers = layers
        # Get/Put/Remove change mount state: one at a time, so a second Get of a
        # layer never returns before the first one's mount is live.
        self._mount_lock = threading.Lock()
        self.methods: dict[str, Callable[[Request], Response]] = {
            "/Plugin.Activate": self.activate,
            "/GraphDriver.Init": self.init,
            "/GraphDriver.Create": self.create,
            "/GraphDriver.CreateReadWrite": self.create,
            "/GraphDriver.Remove": self.remove,
            "/GraphDriver.Get": self.get,
            "/GraphDriver.Put": self.put,
            "/GraphDriver.Exists": self.exists,
            "/GraphDriver.Status": self.status,
            "/GraphDriver.GetMetadata": self.get_metadata,
            "/GraphDriver.Cleanup": self.cleanup,
            "/GraphDriver.Diff": self.diff,
            "/GraphDriver.Changes": self.changes,
            "/GraphDriver.ApplyDiff": self.apply_diff,
            "/GraphDriver.DiffSize": self.diff_size,
            "/GraphDriver.Capabilities": self.capabilities,
        }

    # --- dispatch -------------------------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        method = self.methods.get(request.path)
        if method is None or request.method != "POST":
            return _error(f"layerfs: no plugin method {request.method} {request.path}", 404)
        try:
            return method(request)
        except LayerfsError as err:
            log.info("%s: %s", request.path, err)
            return _error(str(err))
        except Exception as err:
            log.exception("%s failed", request.path)
            return _error(f"layerfs: {type(err).__name__}: {err}")

    # --- the methods ----------------------------------------------------------------------------
    def activate(self, request: Request) -> Response:
        return _ok({"Implements": ["GraphDriver"]})

    def init(self, request: Request) -> Response:
        args = _args(request)
        if args.get("Opts"):
            raise InvalidArgument(
                f"layerfs: storage options {args['Opts']} belong to the layerfs root, not to "
                "dockerd: set them with `layerfs daemon -s KEY=VALUE`")
        if args.get("UIDMaps") or args.get("GIDMaps"):
            raise InvalidArgument("layerfs: user namespace remapping (userns-remap) is not "
                                  "supported by the layerfs plugin")
        log.info("Docker initialised the %s driver (its home: %s)", self.layers.driver.name,
                 args.get("Home"))
        return _ok({})

    def create(self, request: Request) -> Response:
        args = _args(request)
        layer_id = _id(args)
        storage = dict(args.get("StorageOpt") or {})
        size = storage.pop("size", None)
        if storage:
            raise InvalidArgument(f"layerfs: unknown storage option(s) {sorted(storage)} "
                                  "(known: size)")
        self.layers.create(args.get("Parent") or None, layer_id=layer_id, size=size,
                           labels={ENGINE_LABEL: ENGINE})
        return _ok({})

    def remove(self, request: Request) -> Response:
        layer_id = _id(_args(request))
        with self._mount_lock:
            if not self.layers.exists(layer_id):
                return _ok({})  # Docker retries removals: gone is done
            for m in self.layers.store.list_mounts(layer_id):
                self.layers.unmount(layer_id, m.target, force=True)
            self.layers.remove(layer_id)
        return _ok({})

    def get(self, request: Request) -> Response:
        layer_id = _id(_args(request))
        with self._mount_lock:
            path = self.layers.mount(layer_id)
        return _ok({"Dir": str(path)})

    def put(self, request: Request) -> Response:
        layer_id = _id(_args(request))
        with self._mount_lock:
            try:
                self.layers.unmount(layer_id)
            except NotFound:
                log.info("Put of %s, which is not mounted", layer_id)
        return _ok({})

    def exists(self, request: Request) -> Response:
        return _ok({"Exists": self.layers.exists(_id(_args(request)))})

    def status(self, request: Request) -> Response:
        return _ok({"Status": [[k, v] for k, v in self.layers.status().items()]})

    def get_metadata(self, request: Request) -> Response:
        layer_id = _id(_args(request))
        metadata = self.layers.metadata(layer_id)
        # Where Get mounts the layer (the name Docker's overlay2 uses for it), so that
        # `docker inspect` shows where a container's root filesystem lives.
        metadata["MergedDir"] = str(self.layers.mnt_dir / layer_id)
        return _ok({"Metadata": metadata})

    def cleanup(self, request: Request) -> Response:
        # dockerd is shutting down; layers and the store stay for its next start.
        return _ok({})

    def diff(self, request: Request) -> Response:
        args = _args(request)
        layer_id = self._checked_parent(args)

        def write(out: io.RawIOBase) -> None:
            buffered = io.BufferedWriter(out, 256 * 1024)
            self.layers.diff(layer_id, buffered)
            buffered.flush()

        return Response(200, write, [("Content-Type", "application/x-tar")])

    def changes(self, request: Request) -> Response:
        layer_id = self._checked_parent(_args(request))
        changes = [{"Path": c.path, "Kind": _CHANGE_KINDS[c.kind]}
                   for c in docker_changes(self.layers.changes(layer_id))]
        return _ok({"Changes": changes})

    def apply_diff(self, request: Request) -> Response:
        layer_id = request.query.get("id", "")
        if not layer_id:
            raise InvalidArgument("layerfs: ApplyDiff without a layer id")
        self._checked_parent({"ID": layer_id, "Parent": request.query.get("parent", "")})
        size = self.layers.apply_diff(layer_id, request.body)
        # Docker never writes to an image layer again: make it read-only in place.
        self.layers.commit(layer_id)
        return _ok({"Size": size})

    def diff_size(self, request: Request) -> Response:
        layer_id = self._checked_parent(_args(request))
        return _ok({"Size": self.layers.diff_size(layer_id)})

    def capabilities(self, request: Request) -> Response:
        return _ok({"Capabilities": {"ReproducesExactDiffs": False}})

    def _checked_parent(self, args: dict[str, Any]) -> str:
        """The layer id; a parent Docker names must be the layer's own."""
        layer_id = _id(args)
        parent = args.get("Parent") or None
        rec = self.layers.get(layer_id)
        if parent is not None and parent != rec.parent:
            raise InvalidArgument(f"layerfs: layer {layer_id}'s parent is {rec.parent}, not "
                                  f"{parent}: diffs are against a layer's own parent")
        return layer_id


def docker_changes(changes: list[Change]) -> list[Change]:
    """``changes`` as ``docker diff`` lists them: every directory with a change inside is
    itself changed (moby's ChangesDirs does this "to restore permissions"), where
    layerfs's naive walk reports a directory only for its own metadata."""
    listed = {c.path for c in changes}
    parents = set()
    for change in changes:
        parent = posixpath.dirname(change.path)
        while parent != "/" and parent not in listed and parent not in parents:
            parents.add(parent)
            parent = posixpath.dirname(parent)
    return sorted([*changes, *(Change(p, ChangeKind.MODIFY) for p in parents)])


def _args(request: Request) -> dict[str, Any]:
    raw = request.body.read(1 << 20)
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise InvalidArgument(f"layerfs: request body is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise InvalidArgument("layerfs: request body is not a JSON object")
    return value


def _id(args: dict[str, Any]) -> str:
    layer_id = args.get("ID")
    if not isinstance(layer_id, str) or not layer_id:
        raise InvalidArgument("layerfs: request without a layer ID")
    return layer_id


def _ok(payload: dict[str, Any]) -> Response:
    return json_response(payload, 200, CONTENT_TYPE)


def _error(message: str, status: int = 500) -> Response:
    return json_response({"Err": message}, status, CONTENT_TYPE)


def start_plugin(layers: LayerStore, socket_path: Path) -> UnixHTTPServer:
    """Serve the graphdriver protocol for ``layers`` on ``socket_path`` (mode 0600)."""
    return UnixHTTPServer(socket_path, GraphDriverPlugin(layers).handle)
