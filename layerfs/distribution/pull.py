"""Pulling an image (:func:`pull`).

The layers whose chain id is not stored yet are downloaded in parallel
(``max_concurrent`` at a time, bottom first) into staged files under the root
(``ROOT/tmp/registry-blobs``), while the image store applies them in order *from those
same files as they grow*, so extracting overlaps downloading. A download cut off
mid-blob is resumed with an HTTP ``Range`` request. Across pulls, only when asked
(``resume=True``, ``layerfs pull --resume``): a failed pull keeps the ``.partial`` files
it could continue from (network gone, too slow, Ctrl-C; not a full disk or a digest
mismatch), and a pull continues a blob's ``.partial`` file from where it stopped
(re-hashing what is already there). Without it a failed pull removes its partial
downloads, and a ``.partial`` file it finds (left by a pull killed with -9, which could
not clean up, or kept by an earlier ``--resume`` pull) is discarded. Each blob is
checked against its digest and size; a mismatch deletes the staged file and fails the
pull. The image becomes visible only when every layer is applied
(:meth:`ImageStore.load_images`): a failed pull leaves no image and no layer behind. Two
pulls (even in two processes) that need the same blob download it once: a per-blob
``flock`` serialises the downloads and the second finds the finished file (or the layer
already applied).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import httpx

from .. import oci
from ..digests import chain_ids, hasher_for, short_id
from ..downloads import (
    STAGE_DIR,
    STAGE_MAX_AGE,
    Cancelled,
    blob_lock,
    discard_download,
    staged_downloads,
)
from ..errors import CorruptState, DiskFull, InvalidArgument, LayerfsError, NotFound
from ..oci import Platform, parse_descriptor
from ..reference import RemoteReference
from . import limits as bounds
from .blobs import ensure_schema, record_blobs
from .errors import RegistryError, ssl_error, transfer_error, transport_message
from .transport import CHUNK, Manifest, Registry, RegistryOptions

if TYPE_CHECKING:
    from ..images import Image, ImageStore, Progress

log = logging.getLogger(__name__)

CONFIG_TYPES = {oci.MT_OCI_CONFIG, oci.MT_DOCKER_CONFIG}


# --- staged downloads ---------------------------------------------------------------------

class _Download:
    """One blob downloading into ``ROOT/tmp/registry-blobs``; readers follow the file.

    States: ``pending`` (waiting for the per-blob lock) → ``running`` → ``done``;
    or ``skipped`` (the layer got stored meanwhile: nothing to download) or
    ``failed`` (``error`` says why). ``written`` bytes of the file are readable.
    """

    def __init__(self, source: RemoteSource, digest: str, size: int,
                 needed: Callable[[], bool]) -> None:
        self.source = source
        self.digest = digest
        self.size = size
        self.needed = needed
        self.cond = threading.Condition()
        self.state = "pending"
        self.error: BaseException | None = None
        self.written = 0
        self.read_fd = -1
        self.network_bytes = 0
        self.resumed_from: int | None = None
        self.cancelled = threading.Event()
        self.future: Future[None] | None = None
        self._socket: socket.socket | None = None
        hexpart = digest.replace(":", "-")
        stage = source.stage
        self.final = stage / hexpart
        self.partial = stage / f"{hexpart}.partial"
        self.lock_path = stage / f"{hexpart}.lock"

    # -- states -----------------------------------------------------------------------------
    def _set(self, state: str, error: BaseException | None = None) -> None:
        with self.cond:
            self.state = state
            if error is not None:
                self.error = error
            self.cond.notify_all()

    def _grow(self, n: int) -> None:
        with self.cond:
            self.written += n
            self.cond.notify_all()

    def finished(self) -> bool:
        return self.state in ("done", "skipped", "failed")

    def abort(self) -> None:
        """Stop at once: a read blocked on the network is woken by shutting its socket."""
        self.cancelled.set()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def wait(self, timeout: float | None = None) -> None:
        with self.cond:
            self.cond.wait_for(self.finished, timeout)

    # -- the work ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Cancelled as err:
            self._set("failed", LayerfsError(f"download of {self.digest} cancelled"))
            log.debug("%s: %s", self.digest, err)
        except BaseException as err:
            self._set("failed", err)

    def _run(self) -> None:
        with blob_lock(self.lock_path, self.cancelled):
            if not self.needed():
                self._set("skipped")
                return
            if self.final.exists():
                # Finished by an earlier pull: checked again, it is about to be trusted.
                fd = os.open(self.final, os.O_RDONLY | os.O_CLOEXEC)
                hasher = hasher_for(self.digest)
                size = os.fstat(fd).st_size
                if size == self.size:
                    _hash_file(fd, size, hasher)
                if size == self.size and \
                        f"{self.digest.split(':', 1)[0]}:{hasher.hexdigest()}" == self.digest:
                    self.read_fd = fd
                    with self.cond:
                        self.written = self.size
                    self._set("done")
                    return
                os.close(fd)
                self.final.unlink()
            self._download()

    def _download(self) -> None:
        src = self.source
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            offset = os.fstat(fd).st_size
            if offset > self.size or (offset and not src.resume):
                # Not asked to resume: bytes an earlier pull left are not trusted to be
                # wanted (a Range request is what the user did not ask for).
                os.ftruncate(fd, 0)
                offset = 0
            hasher = hasher_for(self.digest)
            if offset:
                self.resumed_from = offset
                _hash_file(fd, offset, hasher)
            self.read_fd = os.open(self.partial, os.O_RDONLY | os.O_CLOEXEC)
            self._set("running")
            self._grow(offset)
            key = f"download:{self.digest}"
            progress = src.progress
            if progress is not None:
                progress.begin(key, f"{short_id(self.digest)} download", self.size)
                if offset:
                    progress.advance(key, offset)
            try:
                offset = self._fetch(fd, offset, hasher, key)
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # Kept, the partial file would hold the disk at 100% for nothing: the
                # next pull cannot resume into space that is not there.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.partial)
                raise DiskFull(f"no space left in {src.stage} after {offset} of {self.size} "
                               f"bytes; the partial download was removed") from None
            finally:
                if progress is not None:
                    progress.end(key)
            got = f"{self.digest.split(':', 1)[0]}:{hasher.hexdigest()}"
            if offset != self.size or got != self.digest:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.partial)
                if offset != self.size:
                    raise InvalidArgument(f"the registry sent {offset} bytes, the manifest "
                                          f"says {self.size}")
                raise InvalidArgument(f"digest mismatch: expected {self.digest}, got {got} "
                                      f"(the registry sent other bytes than the manifest "
                                      f"names)")
            os.rename(self.partial, self.final)
        finally:
            os.close(fd)
        self._set("done")

    def _fetch(self, fd: int, offset: int, hasher: Any, key: str) -> int:
        src = self.source
        reg = src.registry
        url = reg.url(f"/v2/{src.ref.repository}/blobs/{self.digest}")
        what = "download"   # errors are prefixed with the repository and layer by the caller
        failures = 0
        progress_at = -1    # offset of the last failure: attempts count only without progress
        delay = 0.2
        opts = reg.options
        slow = (f"slower than {opts.speed_limit} bytes/s for {opts.speed_time:g} s "
                f"({src.after_failure})")
        with bounds.deadline(opts.speed_time, slow) as rate:
            assert rate is not None
            speed = bounds.SpeedLimit(rate, opts.speed_limit, opts.speed_time)
            while offset < self.size:
                headers = {"Accept-Encoding": "identity"}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                try:
                    speed.restart()
                    reg.requests += 1
                    with reg.client.stream("GET", url, headers=headers) as r:
                        stream = r.extensions.get("network_stream")
                        self._socket = stream.get_extra_info("socket") if stream else None
                        if self.cancelled.is_set():
                            raise Cancelled()
                        if r.status_code == 416 and offset:
                            # The server does not agree our partial file is a prefix.
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(self.partial)
                            raise RegistryError(f"the registry refused to resume at byte "
                                                f"{offset}; the partial download was removed, "
                                                f"run the pull again")
                        if r.status_code in (429, 500, 502, 503, 504):
                            raise _Retry(f"HTTP {r.status_code}")
                        if r.status_code not in (200, 206):
                            raise reg.status_error(r, what)
                        skip = offset if (r.status_code == 200 and offset) else 0
                        if r.status_code == 206:
                            start = _content_range_start(r.headers.get("content-range"))
                            if start != offset:
                                raise InvalidArgument(f"asked for bytes from {offset}, got a "
                                                      f"range starting at {start}")
                        for chunk in r.iter_raw(CHUNK):
                            if self.cancelled.is_set():
                                raise Cancelled()
                            if skip:
                                drop = min(skip, len(chunk))
                                chunk, skip = chunk[drop:], skip - drop
                                if not chunk:
                                    continue
                            if offset + len(chunk) > self.size:
                                raise InvalidArgument(f"longer than the {self.size} bytes the "
                                                      f"manifest says")
                            os.pwrite(fd, chunk, offset)
                            hasher.update(chunk)
                            offset += len(chunk)
                            self.network_bytes += len(chunk)
                            src.count_bytes(len(chunk))
                            self._grow(len(chunk))
                            if src.progress is not None:
                                src.progress.advance(key, len(chunk))
                            speed.count(len(chunk))
                    self._socket = None
                    if offset < self.size:
                        raise _Retry("connection closed early")
                except (httpx.HTTPError, _Retry) as err:
                    self._socket = None
                    if self.cancelled.is_set():
                        raise Cancelled() from err
                    if isinstance(err, httpx.HTTPError):
                        final = transfer_error(err, what, rate)
                        if final is not None:
                            raise final from err
                    if isinstance(err, httpx.TransportError) and ssl_error(err) is not None \
                            and offset == 0:
                        raise reg._connect_error(err, url) from err
                    if offset > progress_at:
                        failures, progress_at = 0, offset
                    failures += 1
                    if failures > reg.options.retries:
                        raise RegistryError(f"download failed at byte {offset} of {self.size}: "
                                            f"{transport_message(err)} ({failures} attempts "
                                            f"without progress; {src.after_failure})"
                                            ) from err
                    log.info("%s: %s at byte %d; resuming", what, transport_message(err), offset)
                    src.resumes += 1
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
        return offset


class _Retry(Exception):
    pass


def _resumable(job: _Download) -> bool:
    """Whether a failed download left bytes a later pull can continue from."""
    for f in (job.final, job.partial):
        with contextlib.suppress(FileNotFoundError):
            if f.stat().st_size > 0:
                return True
    return False


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", value or "")
    return int(m.group(1)) if m else None


def _hash_file(fd: int, length: int, hasher: Any) -> None:
    pos = 0
    while pos < length:
        data = os.pread(fd, min(CHUNK * 4, length - pos), pos)
        if not data:
            break
        hasher.update(data)
        pos += len(data)




class _TailReader:
    """Reads a blob file while its download is still writing it (waits for more bytes).

    At the end it returns EOF only once the download finished and verified the
    digest; if the download failed, its error is raised here, inside the apply."""

    def __init__(self, job: _Download) -> None:
        self.job = job
        self.pos = 0
        self.closed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        job = self.job
        view = memoryview(buf).cast("B")
        while True:
            with job.cond:
                available = job.written - self.pos
                state = job.state
                if available <= 0:
                    if state == "done":
                        return 0
                    if state == "failed":
                        assert job.error is not None
                        raise _reraise(job.error)
                    if state == "skipped":
                        raise LayerfsError(f"blob {job.digest}: download was skipped")
                    job.cond.wait(1.0)
                    continue
            n = os.preadv(job.read_fd, [view[:min(len(view), available)]], self.pos)
            if n <= 0:
                raise CorruptState(f"blob {job.digest}: staged file is shorter than expected")
            self.pos += n
            return n

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> _TailReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reraise(err: BaseException) -> BaseException:
    """A fresh copy of a download's error for a reader (the same exception object must
    not be raised from two threads)."""
    if isinstance(err, LayerfsError):
        try:
            copy = type(err)(str(err))
        except TypeError:
            return LayerfsError(str(err))
        copy.__cause__ = err.__cause__
        return copy
    return LayerfsError(f"download failed: {err}")


class RemoteSource:
    """An :class:`oci.Source` whose members are blobs downloading from a registry.

    ``path`` of a layer is its blob digest. :meth:`start` begins downloading every
    blob whose layer the store lacks; :meth:`open` returns a reader that follows a
    download (starting it if needed); :meth:`close` stops them and cleans up.
    """

    def __init__(self, images: ImageStore, registry: Registry, ref: RemoteReference,
                 layers: Sequence[oci.LayerToLoad], chains: Sequence[str],
                 progress: Progress | None = None, *, resume: bool = False) -> None:
        self.images = images
        self.resume = resume
        #: What becomes of a download cut off for good (the end of its error message).
        self.after_failure = ("pull again with --resume to continue from there" if resume
                              else "the partial download is removed, --resume would keep it")
        self.registry = registry
        self.ref = ref
        self.description = f"{ref.registry}/{ref.repository}"
        self.progress = progress
        self.stage = images.scratch / STAGE_DIR
        self.stage.mkdir(parents=True, exist_ok=True)
        self._sizes = {la.digest: la.size or 0 for la in layers if la.digest}
        self._chains: dict[str, list[str]] = {}
        for layer, chain in zip(layers, chains, strict=True):
            assert layer.digest is not None
            self._chains.setdefault(layer.digest, []).append(chain)
        self._jobs: dict[str, _Download] = {}
        self._all_jobs: list[_Download] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, registry.options.max_concurrent),
                                        thread_name_prefix="layerfs-pull")
        self._extra_threads: list[threading.Thread] = []
        self.downloaded = 0
        self.resumes = 0
        self.reading: _Download | None = None
        self.opened: list[str] = []

    # -- Source protocol ------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return name in self._sizes

    def size(self, name: str) -> int:
        return self._sizes[name]

    def open(self, name: str) -> BinaryIO:
        with self._lock:
            job = self._jobs.get(name)
            if job is None or job.state == "skipped" or \
                    (job.state == "failed" and job.cancelled.is_set()):
                job = self._new_job(name)
                # Needed now: start at once rather than queue behind other downloads.
                thread = threading.Thread(target=job.run, name="layerfs-pull-now", daemon=True)
                self._extra_threads.append(thread)
                thread.start()
        self.reading = job
        self.opened.append(name)
        return cast(BinaryIO, _TailReader(job))

    # -- downloads ------------------------------------------------------------------------------
    def count_bytes(self, n: int) -> None:
        with self._lock:
            self.downloaded += n

    def _needed(self, digest: str) -> Callable[[], bool]:
        chains = self._chains[digest]
        return lambda: not all(self.images.layer_chain_ready(c) for c in chains)

    def _needed_from_thread(self, digest: str) -> Callable[[], bool]:
        """The same question from a download thread, on a connection of its own: the
        store's connection (and its lock) may be busy in the applying thread, which may
        be waiting for this very download."""
        chains = self._chains[digest]
        path = self.images.store.path

        def needed() -> bool:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
            try:
                marks = ",".join("?" * len(chains))
                ready = db.execute(f"SELECT COUNT(DISTINCT chain_id) FROM image_layers WHERE "
                                   f"state = 'ready' AND chain_id IN ({marks})",
                                   chains).fetchone()[0]
            finally:
                db.close()
            return bool(ready < len(set(chains)))

        return needed

    def _new_job(self, digest: str) -> _Download:
        job = _Download(self, digest, self._sizes[digest], self._needed_from_thread(digest))
        self._jobs[digest] = job
        self._all_jobs.append(job)
        return job

    def start(self) -> list[str]:
        """Start downloading (bottom layer first) every blob whose layer is not stored.
        Returns the digests being downloaded."""
        self._gc()
        started = []
        for digest in self._chains:
            if digest in self._jobs or not self._needed(digest)():
                continue
            with self._lock:
                job = self._new_job(digest)
            job.future = self._pool.submit(job.run)
            started.append(digest)
        return started

    def _gc(self) -> None:
        """Remove staged blobs nobody has touched for a day (their pulls are long over)."""
        cutoff = time.time() - STAGE_MAX_AGE
        for lock, _digest, files in staged_downloads(self.images):
            try:
                stale = all(f.stat().st_mtime < cutoff for f in files if f.exists()) and \
                    lock.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale:
                with blob_lock(lock, wait=False) as held:
                    if held:
                        discard_download(lock, files)

    def explain(self, err: BaseException) -> BaseException | None:
        """If the blob being applied when ``err`` happened turns out to be corrupt or
        incomplete, that is the real cause: wait for its download and return its error."""
        job = self.reading
        if job is None or isinstance(err, KeyboardInterrupt):
            return None
        job.wait(timeout=30)
        if job.state == "failed" and job.error is not None and \
                not job.cancelled.is_set():
            return job.error
        return None

    def close(self, success: bool) -> None:
        """Stop downloads, close files; remove staged blobs that are no longer needed:
        all after a success, and all after a failure unless asked to ``resume``; then
        only the rest stay (layer not stored, bytes kept: not a digest mismatch or a full
        disk, which removed theirs) for a later ``resume`` pull to continue."""
        for job in self._all_jobs:
            job.abort()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for thread in self._extra_threads:
            thread.join()
        for job in self._all_jobs:
            if job.read_fd >= 0:
                os.close(job.read_fd)
                job.read_fd = -1
        for digest in {job.digest for job in self._all_jobs}:
            job = self._jobs[digest]
            if not success and self.resume and self._needed(digest)() and _resumable(job):
                continue
            with blob_lock(job.lock_path, wait=False) as held:
                if not held:
                    continue  # another pull is downloading it right now
                discard_download(job.lock_path, [job.final, job.partial])
        with contextlib.suppress(OSError):
            self.stage.rmdir()  # only if empty

    @property
    def jobs(self) -> list[_Download]:
        return list(self._all_jobs)


# --- pull ----------------------------------------------------------------------------------

@dataclass
class PullResult:
    image: Image
    reference: RemoteReference
    manifest_digest: str           # of the platform manifest pulled
    index_digest: str | None       # of the index/list it was chosen from, if any
    name: str | None               # local name given to the image
    up_to_date: bool               # the image was already here under that name
    layers_present: int            # layers skipped because they were stored
    layers_downloaded: int
    downloaded_bytes: int
    resumes: int                   # downloads resumed (Range) after a cut


def _resolve_manifest(reg: Registry, ref: RemoteReference, platform: Platform,
                      explicit_platform: bool) -> tuple[Manifest, str | None]:
    """The image manifest for ``platform`` (following an index); (manifest, index digest)."""
    manifest = reg.get_manifest(ref.repository, ref.reference)
    index_digest = None
    depth = 0
    while manifest.media_type in oci.INDEX_TYPES or "manifests" in manifest.doc:
        depth += 1
        if depth > 3:
            raise InvalidArgument(f"{ref}: indexes nested too deep")
        index_digest = index_digest or manifest.digest
        entries = manifest.doc.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"{ref}: index {manifest.digest} has no \"manifests\" list")
        chosen = None
        offered = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            p: dict[str, Any] = entry["platform"] if isinstance(entry.get("platform"),
                                                                dict) else {}
            offered.append("/".join(str(x) for x in (p.get("os"), p.get("architecture"),
                                                     p.get("variant")) if x) or "?")
            if platform.matches(p):
                parse_descriptor(entry, f"{ref}: index manifests[{i}]")
                chosen = entry
                break
        if chosen is None:
            listed = ", ".join(o for o in offered if o != "unknown/unknown") or "none"
            raise NotFound(f"{ref}: no image for {platform} in the index (it has: {listed})"
                           f"; choose one with --platform")
        manifest = reg.get_manifest(ref.repository, chosen["digest"])
    if manifest.media_type not in oci.MANIFEST_TYPES:
        raise InvalidArgument(f"{ref}: manifest {manifest.digest} has media type "
                              f"{manifest.media_type!r}, not an image manifest")
    return manifest, index_digest


def _read_image(reg: Registry, ref: RemoteReference, manifest: Manifest, platform: Platform,
                explicit_platform: bool) -> oci.ImageToLoad:
    where = f"{ref}: manifest {short_id(manifest.digest)}"
    doc = manifest.doc
    c = oci.manifest_config(doc, where)
    if c.media_type and c.media_type not in CONFIG_TYPES:
        raise InvalidArgument(f"{where}: config media type {c.media_type!r}: this is not a "
                              f"container image (an artifact?)")
    config_bytes = reg.get_blob_bytes(ref.repository, c.digest, c.size, f"{ref}: config")
    config = oci.parse_config(config_bytes, f"{ref}: config {short_id(c.digest)}")
    if explicit_platform and (config.get("os"), config.get("architecture")) != \
            (platform.os, platform.architecture):
        raise InvalidArgument(f"{ref}: the image is {config.get('os')}/"
                              f"{config.get('architecture')}, not {platform}")
    diff_ids = config["rootfs"]["diff_ids"]
    layers = [oci.LayerToLoad(d.digest, diff_id, d.digest, d.size, d.media_type or None)
              for d, diff_id in zip(oci.manifest_layers(doc, diff_ids, where), diff_ids,
                                    strict=True)]
    names = [ref.local_name] if ref.local_name else []
    return oci.ImageToLoad(config_bytes, config, layers, names, where)


def pull(images: ImageStore, reference: str | RemoteReference, *,
         platform: str | None = None, options: RegistryOptions | None = None,
         resume: bool = False, progress: Progress | None = None,
         report: Callable[[str], None] | None = None) -> PullResult:
    """Pull an image into the store: ``REGISTRY/REPO:TAG`` or ``REGISTRY/REPO@DIGEST``.

    A tag becomes the local name (``127.0.0.1:5000/lab/app:v1``, Docker Hub names
    short); a pull by digest alone leaves the image untagged. ``report`` gets
    one line per step (``abc123: Already exists``, ``abc123: Pull complete``).

    ``resume``: if the pull fails in a way a later pull can continue from (network,
    speed limit, interrupted), keep the partial downloads; and continue from partial
    downloads found in the root. Without it nothing partial is kept or reused."""
    ref = reference if isinstance(reference, RemoteReference) else \
        RemoteReference.parse(reference)
    opts = options or RegistryOptions()
    if opts.insecure and not ref.explicit_registry:
        raise InvalidArgument(f"{ref}: --insecure needs a reference that names its registry "
                              f"host explicitly")
    want = Platform.parse(platform)
    say = report or (lambda line: None)
    ensure_schema(images)
    with Registry(ref.registry, opts) as reg:
        reg.auth.add_scope(f"repository:{ref.repository}:pull")
        reg.ping()
        manifest, index_digest = _resolve_manifest(reg, ref, want, platform is not None)
        todo = _read_image(reg, ref, manifest, want, platform is not None)
        chains = chain_ids([la.diff_id for la in todo.layers])
        before = None
        if ref.local_name and images.exists(ref.local_name):
            before = images.resolve(ref.local_name)
        source = RemoteSource(images, reg, ref, todo.layers, chains, progress, resume=resume)
        success = False
        try:
            started = source.start()
            for layer in todo.layers:
                if layer.digest not in started:
                    say(f"{short_id(layer.digest or '')}: Already exists")
            try:
                loaded = images.load_images(source, [todo], verify_present=False,
                                            progress=progress)
            except Exception as err:
                cause = source.explain(err)
                if cause is not None and cause is not err:
                    where = f"{source.description}: layer {source.reading.digest}" \
                        if source.reading else source.description
                    raise _with_where(cause, where) from err
                raise
            success = True
            for job in source.jobs:
                if job.state == "done":
                    say(f"{short_id(job.digest)}: Pull complete")
        finally:
            source.close(success)
    # Blobs that went through an apply were checked against both digests: remember them
    # (a push of the same layer can then HEAD or mount instead of uploading).
    record_blobs(images, ref.registry, ref.repository,
                  [(la.diff_id, la.digest or "", la.media_type or "", la.size or 0)
                   for la in todo.layers if la.digest in source.opened] +
                  [(todo.id, todo.id, oci.MT_OCI_CONFIG, len(todo.config_bytes))])
    image = loaded[0]
    downloaded = [j for j in source.jobs if j.network_bytes]
    present = sum(1 for la in todo.layers if la.digest not in started)
    return PullResult(image, ref, manifest.digest, index_digest, ref.local_name,
                      before == image.id, present, len(downloaded),
                      source.downloaded, source.resumes)


def _with_where(err: BaseException, where: str) -> LayerfsError:
    text = str(err)
    if text.startswith(where):
        return err if isinstance(err, LayerfsError) else LayerfsError(text)
    cls = type(err) if isinstance(err, LayerfsError) else LayerfsError
    try:
        return cls(f"{where}: {text}")
    except TypeError:
        return LayerfsError(f"{where}: {text}")

