"""The supervisor: ``layerfs daemon --root ROOT``.

One single-threaded process per root. It imports the CLI and the library once
("warm"), then for every request on ``ROOT/daemon.sock`` forks a worker that
adopts the client's stdio, cwd, umask, environment and argv and runs the
ordinary CLI (:mod:`.worker`): there is no second implementation of any
command. The supervisor itself only accepts, forks, relays signals, reaps and
reports exit statuses::

    client ──request+fds──▶ supervisor ──fork──▶ worker: layerfs CLI main(argv)
           ◀──started─────             ◀─SIGCHLD─ (exit status)
           ──signal N────▶  kill(worker, N)
           ◀──exit───────

Why it never starts a thread: it forks after every request, and fork copies
only the calling thread (a lock another thread held stays locked forever in the
child; grpcio forbids it outright). Servers that need threads (the engines'
gRPC and HTTP endpoints, issue 18) run as *services*: children forked at
start-up, supervised and restarted here (:mod:`.services`). Why it never opens
the metadata store: SQLite connections must not cross fork, so workers open
their own; start-up recovery runs in a forked child too.

Crash semantics (docs/daemon.md):

* Workers carry ``PR_SET_PDEATHSIG=SIGKILL``: if the supervisor is killed, they
  die at once, as a ``layerfs`` process killed with ``kill -9`` would, and the
  store's intent-first records (owner ``pid:starttime``) make the next command
  (or the restarted daemon's recovery) finish or roll back their work;
  containers they ran die with them (the runtime's liveness pipe) and are cleaned
  up the same way.
* A client that goes away mid-command hangs up its worker like a closed
  terminal: SIGHUP, then SIGTERM and SIGKILL ``hangup_grace`` seconds apart (10).
* Every worker that dies of a signal is followed by a recovery child, so the
  root is tidy even if no other command comes.
* The supervisor is a child subreaper: FUSE servers and detached-container
  monitors that their parents leave behind are re-parented to it and reaped
  (this VM's PID 1 does not reap).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from ..errors import InvalidArgument, LayerfsError
from . import union, warm, wire
from .services import Service

log = logging.getLogger("layerfs.daemon")

#: Seconds between the SIGHUP a worker gets when its client went away and SIGTERM,
#: and again until SIGKILL.
HANGUP_GRACE = 10.0
#: Signals the supervisor handles; blocked around fork so that a worker never runs the
#: supervisor's handlers.
_HANDLED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Seconds new commands wait for a recovery in progress before they are served anyway (a
#: hung unmount in it must not stop the daemon from serving).
RECOVERY_GATE = 30.0

PR_SET_CHILD_SUBREAPER = 36
#: What a worker gets, ``hangup_grace`` seconds apart, once its client has gone away.
_ESCALATION = (signal.SIGHUP, signal.SIGTERM, signal.SIGKILL)


@dataclass
class Request:
    """A client's command, as the worker will adopt it."""

    argv0: bytes
    args: list[bytes]
    env: list[bytes]
    umask: int
    stdio: dict[int, int]       # 0/1/2 -> the received fd (missing: closed in the client)
    cwd: int                    # received O_PATH fd of the client's cwd
    cwd_gone: bool = False
    ignored: tuple[signal.Signals, ...] = ()   # signals the client ignores (SIG_IGN)

    @property
    def command(self) -> str:
        """The command's name, for the log (never its arguments: they may hold secrets)."""
        from .client import scan

        return scan([os.fsdecode(a) for a in self.args])[1] or "(no command)"

    def fds(self) -> list[int]:
        return [*self.stdio.values(), self.cwd]


@dataclass
class Connection:
    sock: socket.socket
    peer_pid: int
    frames: wire.Frames = field(default_factory=wire.Frames)
    fds: list[int] = field(default_factory=list)     # received with a request not yet whole
    job: Job | None = None


@dataclass
class Job:
    pid: int
    conn: Connection | None
    command: str
    started: float
    hangup: int = 0             # how far along _ESCALATION it is (0: not hung up)


@dataclass(order=True)
class _Timer:
    when: float
    seq: int
    action: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class Supervisor:
    """``layerfs daemon`` for one root; :meth:`serve` runs until SIGTERM/SIGINT/SIGHUP."""

    def __init__(self, root: str | os.PathLike[str], *, drain_timeout: float = 30.0,
                 hangup_grace: float = HANGUP_GRACE,
                 services: Sequence[tuple[str, list[str]]] = ()) -> None:
        self.root = Path(root).absolute()
        self.socket_path = wire.socket_path(self.root)
        self.drain_timeout = drain_timeout
        self.hangup_grace = hangup_grace
        self.service_specs = list(services)
        self.pid = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self._own_socket: tuple[int, int] | None = None    # (dev, ino) of a socket we bound
        self._lock_fd = -1
        self._wake_r = self._wake_w = -1
        self.conns: dict[int, Connection] = {}              # by fd
        self.jobs: dict[int, Job] = {}                      # by worker pid
        self.children: dict[int, Callable[[int], None]] = {}  # other children: pid -> on exit
        self.services: dict[str, Service] = {}
        self._timers: list[_Timer] = []
        self._seq = itertools.count()
        self._recovery_pid: int | None = None
        self._recovery_again = False
        self._gate: _Timer | None = None
        self._keeper_pid: int | None = None
        self._union_pid: int | None = None
        self.stopping = False
        self._stop_deadline_armed = False

    # --- start-up -----------------------------------------------------------------------------
    def serve(self) -> int:
        if os.geteuid() != 0:
            raise LayerfsError("layerfs daemon must run as root (it mounts, and its socket is "
                               "root-only)")
        services = [Service.load(name, args) for name, args in self.service_specs]
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
            warm.warm_up()
            self._probe_root()
            # Objects that exist now are never collected: a worker's collections skip them
            # instead of writing to every page the fork shares with us (copy-on-write).
            gc.freeze()
            self._listen()
            self._install_signals()
            self._start_union_fork_server()      # first: the children below inherit it
            self._start_recovery()
            for service in services:
                self._start_service(service)
            _sd_notify(b"READY=1\nSTATUS=serving " + os.fsencode(self.socket_path))
            log.info("serving %s on %s (pid %d)", self.root, self.socket_path, self.pid)
            self._loop()
            log.info("stopped")
            return 0
        finally:
            self._close_listener()
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)

    def _probe_root(self) -> None:
        """Check the root's driver against this host once: workers inherit the answer
        (layerfs.plugins keeps it) instead of probing on every command."""
        from .. import plugins

        try:
            prior = plugins.prior_driver(self.root)
            if prior is not None:
                plugins.probe(prior, self.root)
        except LayerfsError as err:
            log.warning("probing the root's driver: %s", err)

    def _lock(self) -> None:
        """One daemon per root: a POSIX lock on ROOT/daemon.lock (POSIX locks belong to
        the process, so no worker or FUSE server that inherits the fd keeps it)."""
        path = self.root / wire.LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _lock_holder(fd)
            os.close(fd)
            raise LayerfsError(f"another layerfs daemon{f' (pid {holder})' if holder else ''} "
                               f"serves {self.root}") from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % self.pid)
        self._lock_fd = fd

    def _listen(self) -> None:
        activated = _activated_socket()
        if activated is not None:
            name = activated.getsockname()
            if not isinstance(name, str) or os.path.realpath(name) != os.path.realpath(
                    self.socket_path):
                activated.close()
                raise InvalidArgument(
                    f"the socket systemd passed listens on {name!r}, not {self.socket_path}: "
                    f"set ListenStream={self.socket_path} (clients look there)")
            self.listener = activated
            log.info("using the listening socket from systemd (socket activation)")
        else:
            self.listener = self._bind()
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "listener")

    def _bind(self) -> socket.socket:
        path = self.socket_path
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise InvalidArgument(f"{path} exists and is not a socket; remove it")
            os.unlink(path)          # left by a daemon that was killed: we hold the lock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        address, dir_fd = wire.short_address(path)
        # Root-only from the first instant: the mode comes from the umask at bind(2).
        mask = os.umask(0o177)
        try:
            sock.bind(address)
        finally:
            os.umask(mask)
            if dir_fd is not None:
                os.close(dir_fd)
        os.chmod(path, 0o600)
        sock.listen(128)
        st = os.lstat(path)
        self._own_socket = (st.st_dev, st.st_ino)
        return sock

    def _close_listener(self) -> None:
        if self.listener is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None
        if self._own_socket is not None:
            # Only the file we bound: a newer daemon may already have replaced it.
            with contextlib.suppress(OSError):
                st = os.lstat(self.socket_path)
                if (st.st_dev, st.st_ino) == self._own_socket:
                    os.unlink(self.socket_path)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        for sig in _HANDLED:
            signal.signal(sig, _no_op)
        # The C handler writes each signal's number to the pipe: the loop reads which.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "signals")

    # --- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not (self.stopping and self._idle()):
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0].when - time.monotonic())
            for key, _ in self.sel.select(timeout):
                tag = key.data
                if tag == "listener":
                    self._accept()
                elif tag == "signals":
                    self._signals()
                else:
                    self._readable(key.fd)
            self._run_timers()
            self._reap()

    def _idle(self) -> bool:
        running = any(s.pid is not None for s in self.services.values())
        return not (self.jobs or running or self._recovery_pid or self._keeper_pid)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0].when <= now:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.action()

    def after(self, seconds: float, action: Callable[[], None]) -> _Timer:
        timer = _Timer(time.monotonic() + seconds, next(self._seq), action)
        heapq.heappush(self._timers, timer)
        return timer

    def _signals(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for sig in data:
            if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.stop(f"got {signal.Signals(sig).name}")

    # --- connections ----------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:      # EMFILE and the like: keep serving the others
                log.warning("accept: %s", err)
                return
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid != 0:
                # The socket is 0600 root: only a changed mode lets anyone else in.
                log.warning("refused uid %d (pid %d): only root may use the daemon", uid, pid)
                with contextlib.suppress(OSError):
                    sock.sendall(wire.encode(b"error", [(b"message", b"the layerfs daemon "
                                                         b"serves root only")]))
                sock.close()
                continue
            sock.setblocking(False)
            conn = Connection(sock, pid)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, "conn")

    def _readable(self, fd: int) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        try:
            data, ancdata, flags, _ = conn.sock.recvmsg(
                65536, socket.CMSG_SPACE(wire.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            log.warning("client pid %d: %s", conn.peer_pid, err)
            self._hang_up(conn)
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(payload) // 4
                conn.fds += struct.unpack(f"{n}i", payload[:n * 4])
        try:
            if flags & socket.MSG_CTRUNC or len(conn.fds) > wire.MAX_FDS or \
                    (conn.fds and conn.job is not None):
                raise ValueError("unexpected file descriptors")
            messages = [wire.decode(body) for body in conn.frames.feed(data)]
        except ValueError as err:
            log.warning("client pid %d: %s", conn.peer_pid, err)
            self._hang_up(conn)
            return
        for message in messages:
            if conn.job is None and message[0] == b"request":
                fds, conn.fds = conn.fds, []
                self._start(conn, message, fds)
                if conn.job is None:
                    return           # refused, and dropped
            elif conn.job is not None and message[0] == b"signal":
                self._relay(conn.job, message)
            else:
                log.warning("client pid %d: unexpected %r", conn.peer_pid, message[0])
        if not data:
            self._hang_up(conn)

    def _relay(self, job: Job, message: wire.Message) -> None:
        try:
            sig = int(wire.field(message, b"number"))
            signal.Signals(sig)
        except ValueError:
            return
        if job.pid in self.jobs:        # not reaped yet: the pid cannot have been reused
            if sig != signal.SIGWINCH:   # a terminal resize is no news
                log.info("worker %d (%s): relaying %s from its client", job.pid, job.command,
                         signal.Signals(sig).name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.pid, sig)

    def _hang_up(self, conn: Connection) -> None:
        """The client went away (or misbehaved): close; a running worker is hung up."""
        self._drop(conn)
        job = conn.job
        if job is None or job.pid not in self.jobs:
            return
        job.conn = None
        log.info("worker %d (%s): client went away, hanging up", job.pid, job.command)
        self._escalate(job, signal.SIGHUP)

    def _escalate(self, job: Job, sig: int) -> None:
        """Send ``sig`` unless a later signal of SIGHUP → SIGTERM → SIGKILL was sent; the
        next one follows ``hangup_grace`` seconds later if the worker still runs."""
        stage = _ESCALATION.index(sig) + 1
        if job.pid not in self.jobs or job.hangup >= stage:
            return
        job.hangup = stage
        with contextlib.suppress(ProcessLookupError):
            os.kill(job.pid, sig)
            if sig == signal.SIGHUP:
                os.kill(job.pid, signal.SIGCONT)   # as a terminal hangup does
        if stage < len(_ESCALATION):
            following = _ESCALATION[stage]
            self.after(self.hangup_grace, lambda: self._escalate(job, following))

    def _drop(self, conn: Connection) -> None:
        _close_fds(conn.fds)
        conn.fds = []
        fd = conn.sock.fileno()
        if fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn.sock)
            self.conns.pop(fd, None)
        conn.sock.close()

    def _send(self, conn: Connection, frame: bytes) -> None:
        try:
            conn.sock.send(frame)   # small frames to a client that is reading: never blocks
        except OSError:
            pass                    # gone: its EOF arrives through the loop

    # --- workers ----------------------------------------------------------------------------------
    def _start(self, conn: Connection, message: wire.Message, fds: list[int]) -> None:
        try:
            request = _parse_request(message, fds)
        except ValueError as err:
            _close_fds(fds)
            log.warning("client pid %d: bad request: %s", conn.peer_pid, err)
            self._send(conn, wire.encode(b"error", [(b"message", f"bad request: {err}".encode())]))
            self._drop(conn)
            return
        if self.stopping or wire.field(message, b"version", b"") != wire.VERSION:
            # Not a word: the client runs the command itself (nothing has run).
            _close_fds(request.fds())
            self._drop(conn)
            return
        # "started" goes first: a client that got it never runs the command a second time
        # in-process, whatever happens to us next.
        self._send(conn, wire.encode(b"started"))
        try:
            pid = self._fork(lambda: self._worker(request))
        finally:
            _close_fds(request.fds())
        conn.job = Job(pid, conn, request.command, time.monotonic())
        self.jobs[pid] = conn.job
        log.debug("worker %d: %s for client pid %d", pid, request.command, conn.peer_pid)

    def _fork(self, child: Callable[[], None], deathsig: int = signal.SIGKILL) -> int:
        """Fork a child that runs ``child()`` and exits; the supervisor's signals stay
        blocked in it until it has dropped the supervisor's handlers and files."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            raise
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            return pid
        code = 1
        try:
            _prctl(1, deathsig)          # PR_SET_PDEATHSIG
            if os.getppid() != self.pid:  # the supervisor died before the prctl
                os._exit(1)
            self._forget_in_child()
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            child()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            log.exception("child %d failed", os.getpid())
        os._exit(code)

    def _forget_in_child(self) -> None:
        """In a fresh child: drop the supervisor's signal handlers and close its files."""
        signal.set_wakeup_fd(-1)
        for sig in _HANDLED:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                          else signal.SIG_DFL)
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.conns.values()):
            conn.sock.close()
        self.sel.close()
        for fd in (self._wake_r, self._wake_w, self._lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _worker(self, request: Request) -> NoReturn:
        from . import worker

        worker.run(request)

    def _reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.jobs.pop(pid, None)
            if job is not None:
                self._finished(job, status, usage.ru_utime + usage.ru_stime)
            elif pid in self.children:
                self.children.pop(pid)(status)
            else:
                log.debug("reaped orphan %d (%s)", pid, _describe(status))

    def _finished(self, job: Job, status: int, cpu: float) -> None:
        ms = (time.monotonic() - job.started) * 1000
        if job.conn is not None:             # the client first, the log after
            if os.WIFSIGNALED(status):
                item = (b"signal", b"%d" % os.WTERMSIG(status))
            else:
                item = (b"status", b"%d" % os.waitstatus_to_exitcode(status))
            self._send(job.conn, wire.encode(b"exit", [item]))
            self._drop(job.conn)
        log.info("worker %d (%s): %s in %.0f ms (cpu %.0f ms)", job.pid, job.command,
                 _describe(status), ms, cpu * 1000)
        if os.WIFSIGNALED(status):
            self._start_recovery()   # it may have left half-done work behind
        else:
            if self._keeper_pid is None:
                self._start_keeper()     # the first command may have made the database
            if self._union_pid is None:
                self._start_union_fork_server()   # ... or made it an aufs root

    # --- recovery ---------------------------------------------------------------------------------
    def _start_recovery(self) -> None:
        """Finish what dead processes left half-done on the root (layers, mounts,
        containers), in a child: the supervisor never opens the store."""
        if self._recovery_pid is not None:
            self._recovery_again = True
            return
        if self.stopping or not (self.root / "layerfs.db").exists():
            return
        from . import worker

        pid = self._fork(lambda: worker.recover(self.root))
        self._recovery_pid = pid
        self.children[pid] = self._recovered
        self._close_gate()

    def _recovered(self, status: int) -> None:
        self._recovery_pid = None
        if status != 0:
            log.warning("recovery: %s", _describe(status))
        if self._recovery_again:
            self._recovery_again = False
            self._start_recovery()
        if self._recovery_pid is None:
            self._open_gate()
        self._start_keeper()

    def _close_gate(self) -> None:
        """Accept no new client while a recovery runs (they wait in the listen backlog):
        as without a daemon, where the next command recovers before it does anything,
        the first command after a kill -9 sees the root recovered, never half-way."""
        if self._gate is not None or self.listener is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.listener)
        self._gate = self.after(RECOVERY_GATE, self._gate_timed_out)

    def _gate_timed_out(self) -> None:
        log.warning("recovery still runs after %.0f s: serving commands meanwhile", RECOVERY_GATE)
        self._open_gate()

    def _open_gate(self) -> None:
        if self._gate is None:
            return
        self._gate.cancelled = True
        self._gate = None
        if self.listener is not None:
            self.sel.register(self.listener, selectors.EVENT_READ, "listener")

    def _start_keeper(self) -> None:
        """A child that keeps one connection to the root's database open, so that no
        worker's connection is ever the last to close: SQLite checkpoints the WAL into
        the database (and syncs it) when the last connection closes, which would cost
        each command milliseconds; with a connection kept, WAL pages are copied back
        by SQLite's automatic checkpoint every ~1000 pages instead."""
        if self._keeper_pid is not None or self.stopping or \
                not (self.root / "layerfs.db").exists():
            return
        from . import worker

        pid = self._fork(lambda: worker.keep_store_open(self.root))
        self._keeper_pid = pid

        def exited(status: int) -> None:
            self._keeper_pid = None
            if not self.stopping and status != 0:
                log.warning("store keeper: %s", _describe(status))
        self.children[pid] = exited

    # --- services (issue 18) and the union fork server (issue 17, part 3) --------------------------
    def _start_service(self, service: Service) -> None:
        self.services[service.name] = service
        pid = self._fork(lambda: service.run(self.root), deathsig=signal.SIGTERM)
        service.pid = pid
        service.started = time.monotonic()
        self.children[pid] = lambda status: self._service_exited(service, status)
        log.info("service %s: started (pid %d)", service.name, pid)

    def _service_exited(self, service: Service, status: int) -> None:
        service.pid = None
        if self.stopping or status == 0:
            log.info("service %s: %s", service.name, _describe(status))
            self.services.pop(service.name, None)
            return
        # Restart with backoff; a service that ran a while starts again quickly.
        ran = time.monotonic() - service.started
        service.backoff = 1.0 if ran > 60 else min(30.0, service.backoff * 2 or 1.0)
        log.warning("service %s: %s; restarting in %.0f s", service.name, _describe(status),
                    service.backoff)

        def again() -> None:
            if not self.stopping:
                self._start_service(service)
        self.after(service.backoff, again)

    def _start_union_fork_server(self) -> None:
        """The aufs fork server (:mod:`.union`), once the root is an aufs root: every
        worker forked after this mounts through it."""
        if self._union_pid is not None or self.stopping or not union.wanted(self.root):
            return
        pid = union.start_fork_server()
        if pid is None:
            return
        self._union_pid = pid

        def exited(status: int) -> None:
            self._union_pid = None
            union.forget_fork_server()
            if not self.stopping:
                log.warning("union fork server: %s; restarting it", _describe(status))
                self.after(1.0, self._start_union_fork_server)
        self.children[pid] = exited

    # --- stopping ---------------------------------------------------------------------------------
    def stop(self, why: str) -> None:
        """Stop taking commands; let running ones finish for ``drain_timeout`` seconds, then
        SIGTERM them (SIGKILL ``hangup_grace`` seconds later); stop the services."""
        if self.stopping:
            if not self._stop_deadline_armed:
                return
            log.info("%s again: terminating the running commands now", why)
            self._terminate_jobs()
            return
        self.stopping = True
        self._stop_deadline_armed = True
        _sd_notify(b"STOPPING=1")
        log.info("%s: stopping (%d running command(s))", why, len(self.jobs))
        self._close_listener()
        for conn in list(self.conns.values()):
            if conn.job is None:
                self._drop(conn)          # not started: the client runs it itself
        for service in self.services.values():
            service.terminate(self)
        self.after(self.drain_timeout, self._terminate_jobs)
        self._stop_keeper()

    def _stop_keeper(self) -> None:
        """The keeper goes once the commands are done (its close checkpoints the WAL)."""
        if self._keeper_pid is None:
            return
        if self.jobs:
            self.after(0.05, self._stop_keeper)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._keeper_pid, signal.SIGTERM)

    def _terminate_jobs(self) -> None:
        self._stop_deadline_armed = False
        for job in list(self.jobs.values()):
            self._escalate(job, signal.SIGTERM)


# --- helpers ----------------------------------------------------------------------------------------

def _parse_request(message: wire.Message, fds: list[int]) -> Request:
    present = wire.field(message, b"fds")
    if len(fds) != len(present) + 1 or any(c not in b"012" for c in present):
        raise ValueError(f"{len(fds)} descriptors for stdio {present!r} + cwd")
    stdio = {int(chr(c)): fd for c, fd in zip(present, fds, strict=False)}
    ignored = tuple(signal.Signals(int(n)) for n in wire.fields(message, b"ignore"))
    return Request(argv0=wire.field(message, b"argv0"), args=wire.fields(message, b"arg"),
                   env=wire.fields(message, b"env"), umask=int(wire.field(message, b"umask"), 8),
                   stdio=stdio, cwd=fds[-1], cwd_gone=wire.field(message, b"cwd_gone", b"") == b"1",
                   ignored=ignored)


def _activated_socket() -> socket.socket | None:
    """The listening socket systemd passed (``LISTEN_FDS``, fd 3), if it is for us."""
    pid, count = os.environ.pop("LISTEN_PID", ""), os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not count or pid != str(os.getpid()):
        return None
    if int(count) != 1:
        raise InvalidArgument(f"systemd passed {count} sockets; the layerfs daemon takes one")
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.close()
        raise InvalidArgument("the socket systemd passed is not a listening unix stream socket")
    os.set_inheritable(3, False)
    return sock


def _sd_notify(message: bytes) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message, address)


def serving_daemon(root: str | os.PathLike[str]) -> int | None:
    """The pid of the daemon that serves ``root`` now (it holds ROOT/daemon.lock), or None."""
    try:
        fd = os.open(Path(root) / wire.LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query))
        return None if kind == fcntl.F_UNLCK else pid
    except OSError:
        return None
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _prctl(option: int, arg: int) -> None:
    from ..runtime import _sys

    _sys.prctl(option, arg)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def _no_op(_sig: int, _frame: object) -> None:
    """The wakeup fd carries the signal; the handler only has to exist."""
