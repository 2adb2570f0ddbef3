"""Containers: an image, a read-write layer on top of it, and the runtime engine.

This is the glue behind ``layerfs run``. The three pieces it joins stay
ignorant of each other: the image store knows images and which containers use
them, the layer store knows layers and mounts, the engine runs a command in a
mounted directory. A container is::

    ROOT/
      layerfs.db            layers, images, image_users, and the `containers` table below
      mnt/<id>/             its root filesystem while it runs: layer <id>, mounted
      containers/<id>/      the engine's state: state.json, lock, container.log, /etc files
      network.db            address and port leases (engine)

    image top layer ──▶ layer <id> (read-write, label layerfs.container=<id>)

Its life, and what is written first (crash safety: intent before action)::

    1. row in `containers` (state creating, owner = this process) + image_users row   one transaction
    2. create layer <id> on the image's top layer, mount it at ROOT/mnt/<id>
    3. engine start (attached: this process; -d: a monitor process)     row → running
    4. exit: unmount the layer; --rm: remove engine record, layer, image user, row
                                else: row → exited (the layer stays for commit/logs/rm)

``owner`` is the ``pid:starttime`` of the process that will do step 4: the
``layerfs run`` process, or for ``-d`` a double-forked monitor (which, once the
container exits, execs a fresh ``python -m layerfs.runtime.containers finish`` under the
same pid, so that no SQLite connection is used across ``fork``). A row whose
owner is dead and whose engine lock is free belongs to a runner that was
killed: :meth:`ContainerManager.cleanup_stale`, run whenever a manager opens
(every ``layerfs run/ps/rm/...``), lets the engine kill what is left and free
its cgroup, veth, rules and leases, then unmounts the layer and finishes step 4.

Mount points the engine has to create in the layer (``/etc/hosts``,
``/etc/hostname``, ``/etc/resolv.conf``, volume targets, ...) are recorded at
start when the image lacks them, and left out of :meth:`ContainerManager.commit`
(Docker keeps them in a separate ``-init`` layer instead).

This module holds :class:`ContainerManager` (the lifecycle above) and the
``finish`` entry; the values it takes and returns are in
:mod:`.container_types`, what it reads from and writes to a rootfs in
:mod:`.container_rootfs`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AlreadyExists, InUse, InvalidArgument, LayerfsError, NotFound
from ..images import Image, ImageStore
from ..metastore import now, process_alive, process_token
from . import engine
from . import state as records
from .container_rootfs import drop_mountpoints, missing_mountpoints, numeric_user, resolve_user
from .container_types import Container, ContainerState, RunOptions, Stdio, signal_number
from .spec import ContainerSpec, parse_security_opts

if TYPE_CHECKING:
    from .engine import ExecProcess, RuntimeConfig

# The runner's names, importable from here as before the split.
__all__ = [
    "LABEL_CONTAINER", "Container", "ContainerManager", "ContainerState", "RunOptions", "Stdio",
    "drop_mountpoints", "missing_mountpoints", "resolve_user", "signal_number",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS containers (
    id          TEXT PRIMARY KEY,
    name        TEXT UNIQUE,
    image       TEXT NOT NULL,
    image_ref   TEXT NOT NULL,
    layer       TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('creating', 'running', 'exited', 'removing')),
    owner       TEXT,
    auto_remove INTEGER NOT NULL DEFAULT 0,
    created     REAL NOT NULL,
    config      TEXT NOT NULL
)
"""

#: Label on a container's layer in the layer store.
LABEL_CONTAINER = "layerfs.container"

#: Paths the engine mounts over; created in the layer when the image lacks them.
_ENGINE_MOUNTPOINTS = ("/proc", "/sys", "/dev", "/etc/hostname", "/etc/hosts",
                       "/etc/resolv.conf")


def _fileno(stream: Stdio, default: int) -> int:
    if stream is None:
        return default
    return stream if isinstance(stream, int) else stream.fileno()


@dataclass
class _Prepared:
    id: str
    image: Image
    spec: ContainerSpec
    options: RunOptions
    config: dict[str, Any]


# --- the manager --------------------------------------------------------------------------------

class ContainerManager:
    """Containers of one layerfs root::

        with ContainerManager("/var/lib/layerfs", "overlay2") as mgr:
            c = mgr.run("busybox", ["sh", "-c", "echo hi"], network="none", auto_remove=True)
            status = c.wait()                       # ExitStatus(code=0, ...)
            info = mgr.run_detached("busybox", ["httpd", "-f"], name="web", ports=[...])
            mgr.stop("web"); mgr.commit("web", "lab/web:v2"); mgr.remove("web")

    Opening one cleans up after runners that were killed (:meth:`cleanup_stale`).
    ``config`` chooses the cgroup parent and the bridge (tests use their own).
    """

    def __init__(self, root: str | os.PathLike[str], driver: str | None = None,
                 options: dict[str, str] | list[str] | None = None, *,
                 config: RuntimeConfig | None = None, recover: bool = True) -> None:
        self.images = ImageStore.open(root, driver, options)
        try:
            self.layers = self.images.layers
            self.store = self.layers.store
            with self.store._lock:
                known = self.store.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                                              " AND name = 'containers'").fetchone()
            if known is None:
                self.store.extend_schema(_SCHEMA)
            self.root = self.layers.root
            self.state_dir = self.root
            self.config = config or engine.RuntimeConfig()
            self._options = options
            self.cleanup_errors: list[str] = []
            if recover:
                self.cleanup_stale(raise_errors=False)
        except BaseException:
            self.images.close()
            raise

    def close(self) -> None:
        self.images.close()

    def __enter__(self) -> ContainerManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def driver(self) -> str:
        return self.layers.driver.name

    # --- rows --------------------------------------------------------------------------------
    def _row(self, cid: str) -> dict[str, Any] | None:
        with self.store._lock:
            row = self.store.db.execute("SELECT * FROM containers WHERE id = ?", (cid,)).fetchone()
        return None if row is None else dict(row)

    def _rows(self) -> list[dict[str, Any]]:
        with self.store._lock:
            rows = self.store.db.execute("SELECT * FROM containers ORDER BY created").fetchall()
        return [dict(r) for r in rows]

    def _resolve(self, ref: str) -> str:
        """Container id for a full id, a name, or a unique id prefix."""
        text = ref.strip()
        if not text:
            raise InvalidArgument("empty container reference")
        with self.store._lock:
            db = self.store.db
            row = db.execute("SELECT id FROM containers WHERE id = ? OR name = ?",
                             (text, text)).fetchone()
            if row is not None:
                return str(row[0])
            hexdigits = all(c in "0123456789abcdef" for c in text)
            rows = db.execute("SELECT id FROM containers WHERE id LIKE ?",
                              (text + "%",)).fetchall() if hexdigits else []
        if len(rows) == 1:
            return str(rows[0][0])
        if rows:
            raise InvalidArgument(f"container id prefix {text!r} is ambiguous ({len(rows)} "
                                  f"containers); give more digits")
        raise NotFound(f"no such container: {ref}")

    def _set(self, cid: str, **values: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        with self.store.transaction() as db:
            db.execute(f"UPDATE containers SET {cols} WHERE id = ?", (*values.values(), cid))

    def _claim(self, cid: str, expected_owner: str | None, state: str | None = None) -> bool:
        """Take over a row from ``expected_owner`` (compare-and-set); False if someone else did."""
        with self.store.transaction() as db:
            cur = db.execute("UPDATE containers SET owner = ?, state = COALESCE(?, state) "
                             "WHERE id = ? AND owner IS ?",
                             (process_token(), state, cid, expected_owner))
            return cur.rowcount == 1

    # --- creating and starting -----------------------------------------------------------------
    def _spec(self, image: Image, command: Sequence[str] | None, opts: RunOptions,
              cid: str) -> tuple[ContainerSpec, dict[str, Any]]:
        rc = image.run_config
        if opts.entrypoint is not None:
            entrypoint = list(opts.entrypoint)
            cmd = list(command or [])         # Docker: --entrypoint drops the image's Cmd
        else:
            entrypoint = list(rc.entrypoint or [])
            cmd = list(command) if command else list(rc.cmd or [])
        argv = entrypoint + cmd
        if not argv:
            raise InvalidArgument(f"image {image.names[0] if image.names else image.short_id} "
                                  f"has no command (Entrypoint/Cmd): give one after the image")
        env = rc.environment()
        env.update(opts.env)
        workdir = opts.workdir or rc.working_dir or "/"
        if not workdir.startswith("/"):
            workdir = "/" + workdir
        user = opts.user if opts.user is not None else (rc.user or "")
        numeric = numeric_user(user)
        security = parse_security_opts(opts.security_opt)
        spec = ContainerSpec(
            rootfs=self.layers.mnt_dir / cid, argv=argv, env=env, cwd=workdir,
            user=numeric or (0, 0), hostname=opts.hostname, volumes=opts.volumes,
            memory=opts.memory, cpus=opts.cpus, pids_limit=opts.pids_limit,
            network=opts.network, ports=opts.ports, userns=opts.userns,  # type: ignore[arg-type]
            read_only=opts.read_only, cap_add=opts.cap_add, cap_drop=opts.cap_drop,
            seccomp=security.seccomp, no_new_privileges=security.no_new_privileges,
            id=cid, name=opts.name)
        config = {
            "argv": argv, "entrypoint": entrypoint, "cmd": cmd, "command_given": bool(command),
            "entrypoint_given": opts.entrypoint is not None, "env": env, "workdir": workdir,
            "user": user, "uid": spec.user[0], "gid": spec.user[1], "hostname": spec.hostname,
            "memory": opts.memory, "cpus": opts.cpus, "pids_limit": opts.pids_limit,
            "network": opts.network, "ports": [str(p) for p in spec.ports],
            "volumes": [f"{v.source}:{v.target}{':ro' if v.readonly else ''}"
                        for v in spec.volumes],
            "userns": opts.userns, "read_only": opts.read_only,
            "cap_add": list(opts.cap_add), "cap_drop": list(opts.cap_drop),
            "security_opt": list(opts.security_opt),
            "stop_signal": rc.stop_signal, "exposed_ports": rc.exposed_ports,
            "mountpoints": [], "numeric_user": numeric is not None,
        }
        return spec, config

    def _prepare(self, image_ref: str, command: Sequence[str] | None,
                 opts: RunOptions) -> _Prepared:
        image = self.images.get(image_ref)
        cid = os.urandom(32).hex()
        spec, config = self._spec(image, command, opts, cid)
        for v in spec.volumes:          # Docker creates a missing host directory for -v
            if not os.path.lexists(v.source):
                v.source.mkdir(parents=True, exist_ok=True)
        with self.store.transaction() as db:
            if opts.name is not None:
                taken = db.execute("SELECT id FROM containers WHERE name = ?",
                                   (opts.name,)).fetchone()
                if taken is not None:
                    raise AlreadyExists(f"container name {opts.name!r} is already in use by "
                                        f"container {taken[0][:12]}; remove it or pick another")
            db.execute("INSERT INTO containers (id, name, image, image_ref, layer, state, owner,"
                       " auto_remove, created, config) VALUES (?, ?, ?, ?, ?, 'creating', ?, ?, "
                       "?, ?)", (cid, opts.name, image.id, image_ref, cid, process_token(),
                                 int(opts.auto_remove), now(), json.dumps(config)))
            self.images.add_user(image.id, cid)     # joins this transaction
        try:
            self.layers.create(image.top_layer, layer_id=cid, labels={LABEL_CONTAINER: cid})
            rootfs = self.layers.mount(cid)
            if not config["numeric_user"] and config["user"]:
                uid, gid = resolve_user(rootfs, config["user"])
                spec = replace(spec, user=(uid, gid))
                config.update(uid=uid, gid=gid)
            config["mountpoints"] = missing_mountpoints(
                rootfs, [*_ENGINE_MOUNTPOINTS, *(v.target for v in spec.volumes)])
        except BaseException:
            self._delete(cid)
            raise
        return _Prepared(cid, image, spec, opts, config)

    def run(self, image: str, command: Sequence[str] | None = None, *,
            options: RunOptions | None = None, stdin: Stdio = None, stdout: Stdio = None,
            stderr: Stdio = None, log: bool | None = None, stdio_passthrough: bool = False,
            **kw: Any) -> Container:
        """Create and start a container in this process (``layerfs run`` without ``-d``).

        ``options`` or keyword arguments (the :class:`RunOptions` fields) say how.
        stdio ``None`` is this process's 0, 1, 2; the container gets pipes that this
        process relays (``stdio_passthrough``: the descriptors themselves, see
        :mod:`layerfs.runtime.stdio`). ``log`` (default: unless ``auto_remove``) also
        copies stdout and stderr to the container's log. Returns once the command has
        exec'd; :meth:`Container.wait`.
        """
        opts = replace(options, **kw) if options is not None else RunOptions(**kw)
        prep = self._prepare(image, command, opts)
        keep_log = log if log is not None else not opts.auto_remove
        try:
            running = engine.start(prep.spec, self.state_dir, self.config,
                                   stdin=_fileno(stdin, 0), stdout=_fileno(stdout, 1),
                                   stderr=_fileno(stderr, 2), log=keep_log, clean_stale=False,
                                   passthrough=stdio_passthrough and not keep_log)
        except BaseException:
            self._delete(prep.id)
            raise
        self._set(prep.id, state="running", config=json.dumps(prep.config))
        return Container(self, prep.id, opts.name, prep.image, running)

    def run_detached(self, image: str, command: Sequence[str] | None = None, *,
                     options: RunOptions | None = None, **kw: Any) -> ContainerState:
        """``layerfs run -d``: start under a monitor process that outlives this one.

        The monitor (double-forked, its own session) starts the container with its
        output in the log, waits for it, then execs ``python -m layerfs.runtime.containers
        finish`` to unmount (and with ``auto_remove`` remove) it. Returns once the
        command has exec'd, or raises the start error (nothing is left behind).
        """
        opts = replace(options, **kw) if options is not None else RunOptions(**kw)
        prep = self._prepare(image, command, opts)
        monitor: str | None = None
        try:
            monitor, result = self._spawn_monitor(prep)
            if result.get("error"):
                kinds = {"NotFound": NotFound, "AlreadyExists": AlreadyExists, "InUse": InUse,
                         "InvalidArgument": InvalidArgument}
                raise kinds.get(result["type"], LayerfsError)(result["error"])
            with self.store.transaction() as db:
                db.execute("UPDATE containers SET state = 'running', config = ? WHERE id = ? "
                           "AND state = 'creating'", (json.dumps(prep.config), prep.id))
        except BaseException:
            # Take the row back from a monitor that failed (or never got going).
            if monitor is None or self._claim(prep.id, monitor):
                self._delete(prep.id)
            raise
        return self.get(prep.id)

    def _spawn_monitor(self, prep: _Prepared) -> tuple[str, dict[str, Any]]:
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            self._monitor(prep, info_r, info_w, go_r, go_w)   # never returns
        os.close(info_w)
        os.close(go_r)
        try:
            os.waitpid(pid, 0)    # the first child exits as soon as it has forked the monitor
            with os.fdopen(info_r, "rb", closefd=False) as f:
                line = f.readline()
                if not line.strip().isdigit():
                    raise LayerfsError(f"container {prep.id[:12]}: the monitor process died")
                token = process_token(int(line))
                # The monitor owns the row from here on: it does the cleanup after the exit.
                self._set(prep.id, owner=token)
                os.write(go_w, b"G")
                os.close(go_w)
                go_w = -1
                data = f.read()
        finally:
            os.close(info_r)
            if go_w >= 0:
                os.close(go_w)
        try:
            return token, json.loads(data or b'{"error": "the monitor process died", '
                                              b'"type": "LayerfsError"}')
        except ValueError:
            return token, {"error": f"monitor: {data[:200]!r}", "type": "LayerfsError"}

    def _monitor(self, prep: _Prepared, info_r: int, info_w: int, go_r: int, go_w: int) -> None:
        """The monitor process: never touches SQLite (the parent's connections were copied
        by fork); the store work after the exit is done by a freshly exec'd Python."""
        try:
            os.close(info_r)
            os.close(go_w)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            from . import _sys
            _sys.close_all_except({info_w, go_r})
            os.write(info_w, f"{os.getpid()}\n".encode())
            if os.read(go_r, 1) != b"G":
                os._exit(0)                       # the parent gave up: it cleans up
            os.close(go_r)
            try:
                c = engine.start(prep.spec, self.state_dir, self.config, log=True,
                                 clean_stale=False)
            except BaseException as err:
                os.write(info_w, json.dumps({"error": str(err),
                                             "type": type(err).__name__}).encode())
                os._exit(1)
            os.write(info_w, b"{}")
            os.close(info_w)
            with contextlib.suppress(BaseException):
                c.wait()
            argv = [sys.executable, "-m", "layerfs.runtime.containers", "finish", str(self.root),
                    self.driver, json.dumps(self._options), prep.id]
            os.execv(sys.executable, argv)
        finally:
            os._exit(1)

    # --- after the exit -------------------------------------------------------------------------
    def _unmount(self, layer: str) -> None:
        for m in self.store.list_mounts(layer):
            with contextlib.suppress(NotFound):
                self.layers.unmount(layer, m.target, force=True)

    def _after_exit(self, cid: str) -> None:
        """Step 4, by the owner: unmount; remove everything with auto_remove, else mark exited."""
        row = self._row(cid)
        if row is None:
            return
        if row["auto_remove"] or row["state"] == "removing":
            self._delete(cid)
            return
        self._unmount(row["layer"])
        self._set(cid, state="exited", owner=None)

    def _delete(self, cid: str) -> None:
        """Remove the engine record, the layer and the row (intent first: state removing)."""
        row = self._row(cid)
        if row is None:
            return
        self._set(cid, state="removing", owner=process_token())
        with contextlib.suppress(NotFound):
            records.remove(self.state_dir, cid)
        self._unmount(row["layer"])
        if self.layers.exists(row["layer"]):
            self.layers.remove(row["layer"])
        with self.store.transaction() as db:
            self.images.remove_user(row["image"], cid)
            db.execute("DELETE FROM containers WHERE id = ?", (cid,))
        with contextlib.suppress(OSError):
            (self.layers.mnt_dir / row["layer"]).rmdir()

    def cleanup_stale(self, *, raise_errors: bool = True) -> list[str]:
        """Finish the containers whose runner or monitor died (``kill -9``); returns their ids.

        The engine first kills what is left of such containers and frees their
        cgroups, veths, nft rules and leases; then each row whose owner is dead
        (and whose engine lock nobody holds) is taken over: its layer is
        unmounted, and it is removed (``--rm``, or never started) or marked exited.
        A container whose cleanup fails is retried next time; the errors are raised
        at the end unless ``raise_errors`` is false (opening a manager must not fail
        because of one container's leftovers: they are in :attr:`cleanup_errors`).
        """
        errors: list[str] = []
        try:
            records.cleanup_stale(self.state_dir, raise_errors=True)
        except LayerfsError as err:
            errors.append(str(err))
        done = []
        for row in self._rows():
            if row["state"] == "exited" or process_alive(row["owner"]):
                continue
            cid = row["id"]
            if self._engine_alive(cid):
                continue   # a runner still holds the engine's lock
            if not self._claim(cid, row["owner"]):
                continue   # another process is on it
            started = (records.containers_dir(self.state_dir) / cid / "state.json").exists()
            try:
                if row["auto_remove"] or row["state"] == "removing" or not started:
                    self._delete(cid)
                else:
                    self._unmount(row["layer"])
                    self._set(cid, state="exited", owner=None)
            except LayerfsError as err:
                errors.append(f"container {cid[:12]}: {err}")
                continue
            done.append(cid)
        self.cleanup_errors = errors
        if errors and raise_errors:
            raise LayerfsError("cleanup of stale containers: " + "; ".join(errors))
        return done

    def _engine_alive(self, cid: str) -> bool:
        fd = records.try_lock(records.containers_dir(self.state_dir) / cid / "lock", create=False)
        if fd is None:
            return (records.containers_dir(self.state_dir) / cid / "lock").exists()
        os.close(fd)
        return False

    # --- queries ----------------------------------------------------------------------------------
    def _state(self, row: dict[str, Any]) -> ContainerState:
        cdir = records.containers_dir(self.state_dir) / row["id"]
        rec = records.read_record(cdir) if cdir.is_dir() else {}
        state = row["state"]
        if state == "running":
            # The engine knows best: running (its lock is held), exited (the owner has not
            # updated the row yet) or dead (the owner was killed; cleanup_stale will finish).
            info = records.record_info(cdir, rec) if rec else None
            status = info.status if info else ("creating" if process_alive(row["owner"])
                                               else "dead")
            status = "created" if status == "creating" else status
        elif state == "creating":
            status = "created" if process_alive(row["owner"]) or self._engine_alive(row["id"]) \
                else "dead"
        else:
            status = state
        st = ContainerState(
            id=row["id"], name=row["name"], image=row["image"], image_ref=row["image_ref"],
            layer=row["layer"], status=status, created=row["created"],
            auto_remove=bool(row["auto_remove"]), config=json.loads(row["config"]), record=rec)
        if rec:
            exit_ = rec.get("exit") or {}
            running = status == "running"
            st.pid = rec.get("pid") if running else None
            st.started = rec.get("created")
            st.finished = rec.get("finished")
            st.exit_code = exit_.get("code")
            st.exit_signal = exit_.get("signal")
            st.oom_killed = bool(exit_.get("oom_killed"))
            st.address = ((rec.get("network") or {}).get("address") or None) if running else None
            st.ports = list(rec.get("ports", []))
            log = cdir / "container.log"
            st.log_path = log if log.exists() else None
        return st

    def get(self, ref: str) -> ContainerState:
        cid = self._resolve(ref)
        row = self._row(cid)
        if row is None:
            raise NotFound(f"no such container: {ref}")
        return self._state(row)

    def containers(self, all: bool = True) -> list[ContainerState]:
        """Containers, oldest first; without ``all`` only running ones (``ps`` vs ``ps -a``)."""
        states = [self._state(r) for r in self._rows()]
        return states if all else [s for s in states if s.status == "running"]

    def inspect(self, ref: str) -> dict[str, Any]:
        """Everything about a container, shaped like ``docker inspect``."""
        st = self.get(ref)
        cfg = st.config
        rec = st.record

        def iso(ts: float | None) -> str | None:
            if not ts:
                return None
            import datetime
            return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat()

        cgroup = rec.get("cgroup") or {}
        return {
            "Id": st.id,
            "Name": st.name,
            "Created": iso(st.created),
            "Path": cfg["argv"][0] if cfg.get("argv") else None,
            "Args": cfg.get("argv", [])[1:],
            "State": {"Status": st.status, "Running": st.status == "running", "Pid": st.pid,
                      "ExitCode": st.exit_code, "Signal": st.exit_signal,
                      "OOMKilled": st.oom_killed, "StartedAt": iso(st.started),
                      "FinishedAt": iso(st.finished),
                      "Error": (rec.get("exit") or {}).get("reason")},
            "Image": st.image,
            "Config": {"Image": st.image_ref, "Hostname": cfg.get("hostname"),
                       "Env": [f"{k}={v}" for k, v in cfg.get("env", {}).items()],
                       "Cmd": cfg.get("cmd"), "Entrypoint": cfg.get("entrypoint"),
                       "WorkingDir": cfg.get("workdir"), "User": cfg.get("user"),
                       "ExposedPorts": cfg.get("exposed_ports", []),
                       "StopSignal": cfg.get("stop_signal")},
            "HostConfig": {"AutoRemove": st.auto_remove, "Memory": cfg.get("memory"),
                           "Cpus": cfg.get("cpus"), "PidsLimit": cfg.get("pids_limit"),
                           "NetworkMode": cfg.get("network"), "PortBindings": st.ports,
                           "Binds": cfg.get("volumes", []), "ReadonlyRootfs": cfg.get("read_only"),
                           "CapAdd": cfg.get("cap_add", []), "CapDrop": cfg.get("cap_drop", []),
                           "SecurityOpt": cfg.get("security_opt", []),
                           "UsernsMode": "private" if cfg.get("userns") else "host",
                           "Uid": cfg.get("uid"), "Gid": cfg.get("gid")},
            "NetworkSettings": {"IPAddress": st.address, "Ports": st.ports},
            "GraphDriver": {"Name": self.driver, "Data": {
                "Layer": st.layer, "MergedDir": str(self.layers.mnt_dir / st.layer)
                if self.store.list_mounts(st.layer) else None}},
            "LogPath": str(st.log_path) if st.log_path else None,
            "Layerfs": {"StateDir": str(records.containers_dir(self.state_dir) / st.id),
                        "Cgroup": cgroup, "Mountpoints": cfg.get("mountpoints", [])},
        }

    # --- acting on containers ---------------------------------------------------------------------
    def kill(self, ref: str, sig: int = signal.SIGKILL) -> None:
        """Signal the container's main process (through its PID 1)."""
        st = self.get(ref)
        if st.status != "running":
            raise InvalidArgument(f"container {st.short_id} is not running ({st.status})")
        records.kill(self.state_dir, st.id, sig)

    def stop(self, ref: str, timeout: float = 10) -> ContainerState:
        """``docker stop``: the image's stop signal (SIGTERM), SIGKILL after ``timeout`` s."""
        st = self.get(ref)
        if st.status == "running":
            sig = signal_number(st.config.get("stop_signal") or "SIGTERM")
            with contextlib.suppress(NotFound):
                records.kill(self.state_dir, st.id, sig)
            if not self._wait_exit(st, timeout):
                with contextlib.suppress(NotFound):
                    records.kill(self.state_dir, st.id, signal.SIGKILL)
                self._wait_exit(st, 10)
        return self.wait_settled(st.id)

    def _wait_exit(self, st: ContainerState, timeout: float) -> bool:
        pid, start = st.record.get("pid"), st.record.get("pid_start")
        if not isinstance(pid, int) or not records.same_process(pid, start):
            return True
        import select
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        try:
            return bool(select.select([pidfd], [], [], timeout)[0])
        finally:
            os.close(pidfd)

    def wait_settled(self, ref: str, timeout: float = 20) -> ContainerState:
        """Wait until the owner of a container that exited has finished with it (row exited).

        Raises :class:`NotFound` if it was removed on the way (``--rm``); finishes it
        here if its owner died.
        """
        cid = self._resolve(ref)
        deadline = time.monotonic() + timeout
        while True:
            row = self._row(cid)
            if row is None:
                raise NotFound(f"container {cid[:12]} was removed (--rm)")
            if row["state"] == "exited":
                return self._state(row)
            if not process_alive(row["owner"]) and not self._engine_alive(cid):
                self.cleanup_stale(raise_errors=False)     # its owner died: finish it here
            elif time.monotonic() > deadline:
                raise LayerfsError(f"container {cid[:12]}: still {row['state']} after "
                                   f"{timeout:g} s")
            else:
                time.sleep(0.02)

    def wait(self, ref: str) -> ContainerState:
        """Block until the container has exited and its owner is done; its final state.
        Raises :class:`NotFound` if it was removed (``--rm``)."""
        st = self.get(ref)
        while st.status in ("running", "created"):
            self._wait_exit(st, 1.0)
            st = self.get(st.id)
        return self.wait_settled(st.id, timeout=60)

    def remove(self, ref: str, force: bool = False) -> str:
        """``docker rm``: the record, the layer and the image's use. Returns the id.

        A running container is refused unless ``force`` (SIGKILL first).
        """
        st = self.get(ref)
        if st.status == "dead":
            self.cleanup_stale(raise_errors=False)
            try:
                st = self.get(st.id)
            except NotFound:
                return st.id
        if st.status in ("running", "created", "removing"):
            if not force:
                raise InUse(f"container {st.short_id} is {st.status}: stop it first, or "
                            f"rm -f to kill it")
            if st.status == "running":
                with contextlib.suppress(NotFound):
                    records.kill(self.state_dir, st.id, signal.SIGKILL)
                self._wait_exit(st, 10)
        try:
            st = self.wait_settled(st.id)    # its owner unmounts it (or removes it: --rm)
        except NotFound:
            return st.id
        if not self._claim(st.id, None, state="removing"):
            raise InUse(f"container {st.short_id}: another process is removing it")
        self._delete(st.id)
        return st.id

    def exec(self, ref: str, argv: Sequence[str], **kwargs: Any) -> ExecProcess:
        """Run ``argv`` in a running container: its namespaces, cgroup, user, env and cwd.
        ``kwargs``: ``env``, ``cwd``, ``user``, ``stdin``, ``stdout``, ``stderr``,
        ``passthrough``."""
        st = self.get(ref)
        if st.status != "running":
            raise InvalidArgument(f"container {st.short_id} is not running ({st.status})")
        info = records.inspect(self.state_dir, st.id)
        return engine.exec_in(info, argv, **kwargs)

    def log_path(self, ref: str) -> Path:
        st = self.get(ref)
        if st.log_path is None:
            raise NotFound(f"container {st.short_id} has no log (it ran attached with --rm "
                           f"or has not started)")
        return st.log_path

    def commit(self, ref: str, name: str | None = None, *, message: str | None = None,
               author: str | None = None, changes: Iterable[str] = ()) -> Image:
        """``docker commit``: the container's changes (its layer's diff) as a new image layer.

        The new image's config is the container's: its command, environment, working
        directory and user, then ``changes`` (Dockerfile instructions). A running
        container is not paused (overlay's diff reads the upper directory as it is).
        """
        import shlex
        import shutil
        import tempfile

        from ..driver import scratch_prefix

        st = self.get(ref)
        if st.status in ("created", "removing"):
            raise InUse(f"container {st.short_id} is {st.status}")
        cfg = st.config
        self.images.scratch.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix("images-commit", st.id),
                                    dir=self.images.scratch))
        try:
            diff = tmp / "layer.tar"
            with open(diff, "wb") as f:
                self.layers.diff(st.layer, f)
            drop_mountpoints(diff, cfg.get("mountpoints", []))
            run_config: dict[str, Any] = {
                "Env": [f"{k}={v}" for k, v in cfg.get("env", {}).items()]}
            if cfg.get("command_given") or cfg.get("entrypoint_given"):
                run_config["Cmd"] = cfg.get("cmd") or None
            if cfg.get("entrypoint_given"):
                run_config["Entrypoint"] = cfg.get("entrypoint") or None
            if cfg.get("workdir") and cfg["workdir"] != "/":
                run_config["WorkingDir"] = cfg["workdir"]
            if cfg.get("user"):
                run_config["User"] = cfg["user"]
            return self.images.commit(st.image, diff, name, run_config=run_config,
                                      changes=changes, message=message, author=author,
                                      created_by=shlex.join(cfg.get("argv", [])))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --- python -m layerfs.runtime.containers finish ROOT DRIVER OPTIONS CID ----------------------------------

def _finish_main(argv: list[str]) -> int:
    """What a detached container's monitor execs once the container has exited."""
    root, driver, options, cid = argv
    with ContainerManager(root, driver, json.loads(options), recover=False) as mgr:
        mgr._after_exit(cid)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["finish"] and len(sys.argv) == 6:
        sys.exit(_finish_main(sys.argv[2:]))
    print("usage: python -m layerfs.runtime.containers finish ROOT DRIVER OPTIONS_JSON CONTAINER_ID",
          file=sys.stderr)
    sys.exit(2)
