"""containerd's snapshots API over gRPC: layerfs as a containerd *proxy snapshotter*.

containerd loads a snapshotter from any process that serves
``containerd.services.snapshots.v1.Snapshots`` on a unix socket, declared in
its configuration::

    [proxy_plugins.layerfs-overlay2]
      type = "snapshot"
      address = "/run/layerfs/containerd-snapshotter.sock"

and then ``ctr --snapshotter layerfs-overlay2 ...`` or the CRI plugin's
``snapshotter = "layerfs-overlay2"`` use it. This module turns the gRPC calls
into :class:`~layerfs.engines.snapshots.Snapshots` operations and layerfs's
errors into the status codes containerd's clients turn back into its error
kinds (``errdefs``): NotFound, AlreadyExists, FailedPrecondition,
InvalidArgument.

The handlers are registered by name (``grpc.method_handlers_generic_handler``)
with the generated message classes, so no generated service code is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from layerfs.errors import (
    AlreadyExists,
    DriverNotSupported,
    FailedPrecondition,
    InUse,
    InvalidArgument,
    LayerfsError,
    NotFound,
)
from layerfs.mount import Mount

from .proto import MISSING_HINT
from .snapshots import Kind, SnapshotInfo, Snapshots
from .sockets import root_only_socket

try:
    from .proto import mount_pb2
    from .proto import snapshots_pb2 as api
except ImportError as err:  # pragma: no cover - an install without the generated modules
    raise LayerfsError(MISSING_HINT) from err

SERVICE = "containerd.services.snapshots.v1.Snapshots"
log = logging.getLogger("layerfs.engines.containerd")

# Most specific first: InUse is the layer store's word for a failed precondition.
_STATUS: list[tuple[type[LayerfsError], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (DriverNotSupported, grpc.StatusCode.UNIMPLEMENTED),
]

_KINDS = {Kind.VIEW: api.VIEW, Kind.ACTIVE: api.ACTIVE, Kind.COMMITTED: api.COMMITTED}

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


def status_of(err: LayerfsError) -> grpc.StatusCode:
    """The gRPC status code containerd expects for a layerfs error."""
    for cls, code in _STATUS:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _mounts(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def info_message(info: SnapshotInfo) -> api.Info:
    return api.Info(name=info.name, parent=info.parent, kind=_KINDS[info.kind],
                    created_at=_timestamp(info.created_ns), updated_at=_timestamp(info.updated_ns),
                    labels=dict(info.labels))


class SnapshotterService:
    """The gRPC handlers of containerd's Snapshots service on one :class:`Snapshots`."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    # --- the RPCs ---------------------------------------------------------------------------
    def prepare(self, req: api.PrepareSnapshotRequest) -> api.PrepareSnapshotResponse:
        mounts = self.snapshots.prepare(req.key, req.parent, dict(req.labels))
        return api.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def view(self, req: api.ViewSnapshotRequest) -> api.ViewSnapshotResponse:
        mounts = self.snapshots.view(req.key, req.parent, dict(req.labels))
        return api.ViewSnapshotResponse(mounts=_mounts(mounts))

    def mounts(self, req: api.MountsRequest) -> api.MountsResponse:
        return api.MountsResponse(mounts=_mounts(self.snapshots.mounts(req.key)))

    def commit(self, req: api.CommitSnapshotRequest) -> empty_pb2.Empty:
        self.snapshots.commit(req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    def remove(self, req: api.RemoveSnapshotRequest) -> empty_pb2.Empty:
        self.snapshots.remove(req.key)
        return empty_pb2.Empty()

    def stat(self, req: api.StatSnapshotRequest) -> api.StatSnapshotResponse:
        return api.StatSnapshotResponse(info=info_message(self.snapshots.stat(req.key)))

    def update(self, req: api.UpdateSnapshotRequest) -> api.UpdateSnapshotResponse:
        paths = list(req.update_mask.paths) if req.HasField("update_mask") else []
        info = self.snapshots.update(req.info.name, dict(req.info.labels), paths)
        return api.UpdateSnapshotResponse(info=info_message(info))

    def list_snapshots(self, req: api.ListSnapshotsRequest) -> Iterator[api.ListSnapshotsResponse]:
        batch: list[api.Info] = []
        for info in self.snapshots.walk(list(req.filters)):
            batch.append(info_message(info))
            if len(batch) == 100:  # bounded messages, as containerd's own server sends
                yield api.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield api.ListSnapshotsResponse(info=batch)

    def usage(self, req: api.UsageRequest) -> api.UsageResponse:
        used = self.snapshots.usage(req.key)
        return api.UsageResponse(size=used.bytes, inodes=used.inodes)

    def cleanup(self, req: api.CleanupRequest) -> empty_pb2.Empty:
        for action in self.snapshots.cleanup():
            log.info("cleanup: %s", action)
        return empty_pb2.Empty()

    # --- plumbing -----------------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[[Req], Resp], req: type[Req],
                  resp: type[Resp]) -> grpc.RpcMethodHandler[Req, Resp]:
            return grpc.unary_unary_rpc_method_handler(
                _translated(fn), request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString)

        stream = grpc.unary_stream_rpc_method_handler(
            _translated_stream(self.list_snapshots), request_deserializer=api.ListSnapshotsRequest.FromString,
            response_serializer=api.ListSnapshotsResponse.SerializeToString)
        empty = empty_pb2.Empty
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Prepare": unary(self.prepare, api.PrepareSnapshotRequest, api.PrepareSnapshotResponse),
            "View": unary(self.view, api.ViewSnapshotRequest, api.ViewSnapshotResponse),
            "Mounts": unary(self.mounts, api.MountsRequest, api.MountsResponse),
            "Commit": unary(self.commit, api.CommitSnapshotRequest, empty),
            "Remove": unary(self.remove, api.RemoveSnapshotRequest, empty),
            "Stat": unary(self.stat, api.StatSnapshotRequest, api.StatSnapshotResponse),
            "Update": unary(self.update, api.UpdateSnapshotRequest, api.UpdateSnapshotResponse),
            "List": stream,
            "Usage": unary(self.usage, api.UsageRequest, api.UsageResponse),
            "Cleanup": unary(self.cleanup, api.CleanupRequest, empty),
        })


def _abort(context: grpc.ServicerContext, name: str, err: BaseException) -> None:
    if isinstance(err, LayerfsError):
        code = status_of(err)
        log.info("%s: %s: %s", name, code.name, err)
        context.abort(code, str(err))
    log.exception("%s failed", name)
    context.abort(grpc.StatusCode.INTERNAL, f"layerfs: {type(err).__name__}: {err}")


def _translated(fn: Callable[[Req], Resp]) -> Callable[[Req, grpc.ServicerContext], Resp]:
    def call(req: Req, context: grpc.ServicerContext) -> Resp:
        try:
            return fn(req)
        except Exception as err:
            _abort(context, fn.__name__, err)
            raise  # not reached: abort raises

    return call


def _translated_stream(fn: Callable[[Req], Iterator[Resp]],
                       ) -> Callable[[Req, grpc.ServicerContext], Iterator[Resp]]:
    def call(req: Req, context: grpc.ServicerContext) -> Iterator[Resp]:
        try:
            yield from fn(req)
        except Exception as err:
            _abort(context, fn.__name__, err)
            raise  # not reached: abort raises

    return call


def start_server(snapshots: Snapshots, socket_path: Path, *, workers: int = 8) -> grpc.Server:
    """Serve the snapshots API on ``socket_path`` (mode 0600, root only); returns the server."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"),
                         handlers=[SnapshotterService(snapshots).handler()])
    with root_only_socket(socket_path):
        if server.add_insecure_port(f"unix:{socket_path}") == 0:
            raise LayerfsError(f"cannot listen on {socket_path}")
        server.start()
    return server
