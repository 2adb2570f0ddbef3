"""The ``inspect`` scenario: how long ``layerfs image explore`` and ``explain`` take to open
an image, once its layers are indexed, against reading the image the way dive does.

An image of ``layers`` layers holding ``files`` files and about ``size`` bytes (a base
layer with most of them, then layers that add files and overwrite or delete some, so the
explorer has wasted space to find) is loaded into the target's store. Then:

``first_index``      the first ``load_stack`` of the image (every layer's index read from
                     its tar-split record and written to the store), in-process;
``explore_analysis`` the explorer's work once indexed: every index read from the store,
                     the stack replayed, wasted space and efficiency computed (in-process);
``explore_cli``      ``layerfs image explore IMG --json`` as a process (Python start-up,
                     opening the root, the analysis, JSON out);
``explain_cli``      ``layerfs explain --image IMG PATH`` as a process, for a deep path;
``explore_tui``      ``layerfs image explore IMG`` on a pseudo-terminal (160x50), from the
                     start of the process until the file tree of the top layer is on the
                     screen: what a user waits for (quitting it is not timed).

On the ``docker`` peer the row is ``docker save IMG | tar -t``: dive reads the whole
image archive on every start (it asks the engine for ``docker save``), and listing that
stream is the floor under what it does; dive itself is not in Debian 12 or on PyPI.
The goal (issue 21) is an open in ≤ 2 s for a 1 GB, 20-layer, 60,000-file image.
"""

from __future__ import annotations

import io
import os
import random
import re
import select
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from .harness import Ctx, Probe, ScenarioSkip

FIXED_MTIME = 1_700_000_000
IMAGE = "layerfs-bench/inspect:1"


def _layer_tar(out: Path, files: dict[str, int], deleted: list[str], blob: memoryview,
               rng: random.Random) -> None:
    """A layer tar: ``files`` (path -> size, contents cut from ``blob``) and whiteouts."""
    from layerfs.testing.images import write_tar

    members: dict[str, bytes | memoryview] = {}
    for path, size in files.items():
        off = rng.randrange(0, max(1, len(blob) - size))
        members[path] = blob[off:off + size]
    for path in deleted:
        parent, _, name = path.rpartition("/")
        members[f"{parent}/.wh.{name}" if parent else f".wh.{name}"] = b""
    write_tar(out, members)


def build_archive(scratch: Path, *, layers: int, files: int, size: int,
                  seed: int = 21) -> Path:
    """A ``docker save`` archive of the bench image (deterministic), written to disk layer
    by layer so a 1 GB image never sits in memory whole."""
    import hashlib
    import json

    rng = random.Random(seed)
    blob = memoryview(rng.randbytes(min(size, 64 << 20) + 4096))
    per_file = max(1, size // files)
    base_files = files * 6 // 10
    rest = files - base_files
    uppers = max(1, layers - 1)
    plan: list[tuple[dict[str, int], list[str]]] = []
    names: list[str] = []

    def new_files(n: int, tag: str) -> dict[str, int]:
        out = {}
        for i in range(n):
            path = f"usr/{tag}/lib{i // 400}/pkg{i // 20}/file{i}.so"
            out[path] = max(0, int(rng.paretovariate(1.5) * per_file / 3))
        return out

    base = new_files(base_files, "base")
    names += list(base)
    plan.append((base, []))
    for n in range(1, layers):
        added = new_files(rest // uppers, f"l{n}")
        # overwrite and delete a few of what lower layers hold: the waste to find
        overwritten = {p: max(1, int(per_file * rng.random())) for p in rng.sample(names, 20)}
        gone = rng.sample([p for p in names if p not in overwritten], 10)
        names = [p for p in names if p not in gone] + list(added)
        plan.append(({**added, **overwritten}, gone))
    tars: list[Path] = []
    diff_ids: list[str] = []
    for n, (files_, gone) in enumerate(plan):
        path = scratch / f"layer{n}.tar"
        _layer_tar(path, files_, gone, blob, rng)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        tars.append(path)
        diff_ids.append("sha256:" + h.hexdigest())
    config = {"architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
              "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created_by": f"/bin/sh -c build step {n}"}
                          for n in range(len(tars))]}
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    archive = scratch / "image.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as out:
        members = []
        for n, path in enumerate(tars):
            out.add(path, arcname=f"l{n}/layer.tar")
            members.append(f"l{n}/layer.tar")
            path.unlink()
        for name, data in ((config_name, config_bytes), ("manifest.json", json.dumps(
                [{"Config": config_name, "RepoTags": [IMAGE], "Layers": members}]).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), FIXED_MTIME
            out.addfile(info, io.BytesIO(data))
    return archive


#: Escape sequences a terminal UI writes (CSI with parameters, OSC, two-byte ESC x),
#: removed before looking for text on the screen.
_ESCAPES = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


class TerminalSession:
    """A command on a pseudo-terminal of ``columns`` x ``rows``, for timing how long a
    terminal UI takes until some text is on its screen."""

    def __init__(self, argv: list[str], env: dict[str, str], *, columns: int = 160,
                 rows: int = 50) -> None:
        import fcntl
        import struct
        import termios

        self.argv, self.env = argv, dict(env, TERM="xterm-256color", COLUMNS=str(columns),
                                         LINES=str(rows))
        self.master, self._slave = os.openpty()
        fcntl.ioctl(self._slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.proc: subprocess.Popen[bytes] | None = None
        self._screen = bytearray()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=self._slave, stdout=self._slave,
                                     stderr=self._slave, env=self.env, start_new_session=True)
        os.close(self._slave)

    def wait_for(self, text: str, timeout: float) -> None:
        """Read the terminal until ``text`` shows (escape sequences removed); a process
        that exits or stays silent for ``timeout`` s first makes the scenario skip, with
        the end of what it wrote."""
        wanted = text.encode()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(0.0, left))
            chunk = b""
            if ready:
                try:
                    chunk = os.read(self.master, 1 << 16)
                except OSError:  # EIO: the last holder of the terminal's other side is gone
                    pass
            if not chunk:
                tail = _ESCAPES.sub(b"", bytes(self._screen[-2000:])).decode(errors="replace")
                why = "exited" if ready else f"showed nothing new for {timeout:.0f} s"
                raise ScenarioSkip(f"{' '.join(self.argv[-3:])} {why} before {text!r} was "
                                   f"on screen: ...{tail[-300:].strip()}")
            self._screen += chunk
            # a screen's text is split by escape sequences, never by a chunk boundary
            # that the joined buffer would not mend: search all of it, cleaned
            if wanted in _ESCAPES.sub(b"", bytes(self._screen)):
                return

    def close(self, keys: bytes = b"q", timeout: float = 30.0) -> None:
        """Type ``keys`` (quit), drain the terminal, reap the process (killed if it stays).
        Once; later calls do nothing."""
        if self.master < 0:
            return
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.write(self.master, keys)
                deadline = time.monotonic() + timeout
                while self.proc.poll() is None and time.monotonic() < deadline:
                    ready, _, _ = select.select([self.master], [], [], 0.1)
                    if ready:
                        try:
                            os.read(self.master, 1 << 16)
                        except OSError:
                            break
                if self.proc.poll() is None:
                    self.proc.kill()
                self.proc.wait()
        finally:
            os.close(self.master)
            self.master = -1
            if self.proc is None:
                os.close(self._slave)


def deep_path(names: list[str]) -> str:
    return "/" + max(names, key=lambda p: (p.count("/"), p))


def inspect(ctx: Ctx, *, layers: int, files: int, size: int, reps: int) -> None:
    params = {"layers": layers, "files": files, "size": size}
    ctx.step(f"building a {layers}-layer image of {files} files")
    archive = build_archive(ctx.scratch, layers=layers, files=files, size=size)
    try:
        if ctx.docker is not None:
            _docker_floor(ctx, archive, params, reps)
            return
        _layerfs(ctx, archive, params, reps)
    finally:
        archive.unlink(missing_ok=True)


def _layerfs(ctx: Ctx, archive: Path, params: dict[str, Any], reps: int) -> None:
    from layerfs.images import ImageStore
    from layerfs.inspect.explore import Analysis
    from layerfs.inspect.index import Indexer
    from layerfs.inspect.targets import image_target, load_stack

    store = ctx.store
    images = ImageStore(store)
    ctx.step("layerfs load")
    images.load(archive)
    target = image_target(images, IMAGE)
    indexer = Indexer(store, images)
    t0 = time.perf_counter()
    stack = load_stack(indexer, target)
    first = time.perf_counter() - t0
    ctx.record("first_index", [first], unit="s", params=params,
               note="every layer indexed from its tar-split record and stored")
    path = deep_path(list(stack.history))
    env = dict(os.environ, LAYERFS_ROOT=str(store.root))
    env.pop("LAYERFS_DRIVER", None)

    def analysis(_: Any) -> None:
        Analysis.of(target, load_stack(indexer, target))

    def cli(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "layerfs", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def terminal(_: int) -> TerminalSession:
        return TerminalSession([sys.executable, "-m", "layerfs", "image", "explore", IMAGE], env)

    def tui_open(session: TerminalSession) -> None:
        try:
            session.start()
            session.wait_for(f"Files as of layer {len(target.layers)} (", timeout=300)
        except BaseException:
            session.close()  # `after` runs only for a timing that succeeded
            raise

    ctx.run_probes([
        Probe("explore_tui", tui_open, params, setup=terminal, after=TerminalSession.close,
              unit="s", note="layerfs image explore IMG on a 160x50 pseudo-terminal, until "
                             "the top layer's file tree is drawn"),
        Probe("explore_cli", lambda _: cli("image", "explore", IMAGE, "--json"), params,
              primary=True, unit="s",
              note="layerfs image explore IMG --json, a process, indexes kept"),
        Probe("explain_cli", lambda _: cli("explain", "--image", IMAGE, path), params, unit="s",
              note=f"layerfs explain --image IMG {path}, a process"),
        Probe("explore_analysis", analysis, params, unit="s",
              note="in-process: indexes from the store, replay, efficiency"),
    ], reps, label="open")


def _docker_floor(ctx: Ctx, archive: Path, params: dict[str, Any], reps: int) -> None:
    daemon = ctx.docker
    ctx.step("docker load")
    daemon.docker("load", "-q", "-i", str(archive))

    def save_list(_: Any) -> None:
        from .peers import docker_client

        save = subprocess.Popen([docker_client(), "-H", daemon.host, "save", IMAGE],
                                stdout=subprocess.PIPE, env=daemon.client_env)
        assert save.stdout is not None
        listing = subprocess.run(["tar", "-t"], stdin=save.stdout, stdout=subprocess.DEVNULL)
        save.stdout.close()
        if save.wait() != 0 or listing.returncode != 0:
            raise ScenarioSkip("docker save | tar -t failed")

    try:
        samples = ctx.run_probes([
            Probe("explore_cli", save_list, params, primary=True, unit="s",
                  note="docker save IMG | tar -t: reading the image as dive does on every "
                       "start (the floor under it)"),
        ], reps, label="docker save")
        # dive draws its UI only once it has read the archive: the same floor is the peer
        # of the explorer's terminal UI
        ctx.record("explore_tui", next(iter(samples.values())), unit="s", params=params,
                   note="the explore_cli samples: dive's UI shows after reading the image")
    finally:
        daemon.docker("rmi", "-f", IMAGE, check=False)
