"""``layerfs run|ps|stop|kill|rm|exec|logs|inspect|commit``: containers from images.

Thin, like the rest of the CLI: parse Docker's flags, call
:class:`~layerfs.runtime.containers.ContainerManager`, render. The ``run`` path imports
only what starting a container needs (no rich, no image tables): ``python -X
importtime -m layerfs.cli.run run ...`` shows it. ``python -m layerfs.cli.run``
is this module alone, with the same global options as ``layerfs``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

from ..errors import InvalidArgument, LayerfsError, NotFound
from .common import SubParsers, add_global_options, command_parser, emit_json, subcommands

TYPE_CHECKING = False       # typing costs ms at import; mypy reads TYPE_CHECKING as True

if TYPE_CHECKING:
    from typing import Any

    from ..runtime.containers import Container, ContainerManager, ContainerState, RunOptions
    from ..runtime.engine import RuntimeConfig

#: Signals ``run`` and ``exec`` pass on to the container instead of dying (Docker's sig-proxy).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)


# --- helpers -----------------------------------------------------------------------------------

def _runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    from ..runtime.engine import RuntimeConfig

    kw: dict[str, Any] = {}
    if getattr(args, "cgroup_parent", None):
        kw["cgroup_parent"] = args.cgroup_parent
    if getattr(args, "network", "none") == "bridge":
        net = {"bridge": args.bridge, "subnet": args.subnet,
               "table": os.environ.get("LAYERFS_NFT_TABLE") or None,
               "ip_forward": os.environ.get("LAYERFS_IP_FORWARD", "1") not in ("0", "false",
                                                                               "no")}
        if any(v is not None for k, v in net.items() if k != "ip_forward") or \
                not net["ip_forward"]:
            from ..runtime.network import NetworkConfig
            kw["network"] = NetworkConfig(**{k: v for k, v in net.items() if v is not None})
    return RuntimeConfig(**kw)


def _manager(args: argparse.Namespace, config: RuntimeConfig | None = None) -> ContainerManager:
    from ..runtime.containers import ContainerManager

    driver = getattr(args, "run_driver", None) or args.driver
    return ContainerManager(args.root, driver, args.storage_opt or None, config=config)


def _env(items: list[str] | None) -> dict[str, str]:
    """``-e K=V`` sets; ``-e K`` copies K from this environment if set (Docker's rule)."""
    env: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not key:
            raise InvalidArgument(f"environment {item!r}: use NAME=value or NAME")
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def _run_options(args: argparse.Namespace) -> RunOptions:
    from ..runtime.containers import RunOptions
    from ..runtime.spec import parse_port, parse_volume
    from ..units import parse_size

    entrypoint = None
    if args.entrypoint is not None:
        entrypoint = [args.entrypoint] if args.entrypoint else []
    return RunOptions(
        name=args.name, hostname=args.hostname, env=_env(args.env), entrypoint=entrypoint,
        workdir=args.workdir, user=args.user,
        memory=parse_size(args.memory) if args.memory else None, cpus=args.cpus,
        pids_limit=args.pids_limit, network=args.network,
        ports=tuple(parse_port(p) for p in args.publish or ()),
        volumes=tuple(parse_volume(v) for v in args.volume or ()), userns=args.userns,
        read_only=args.read_only, auto_remove=args.rm, cap_add=tuple(args.cap_add or ()),
        cap_drop=tuple(args.cap_drop or ()), security_opt=tuple(args.security_opt or ()))


class _Forwarder:
    """While active, the signals we get go to ``target.kill(sig)`` (a container or an exec
    process); those that arrive before the target exists are delivered once it does. The
    same signal a second time before then aborts the start (``KeyboardInterrupt``: what is
    half-made is undone on the way out), so a start that hangs can still be stopped."""

    def __init__(self) -> None:
        self.target: Any = None
        self.pending: list[int] = []
        self._previous: dict[int, Any] = {}

    def _handle(self, sig: int, _frame: object) -> None:
        if self.target is None:
            if sig in self.pending:
                raise KeyboardInterrupt(f"signal {sig} twice before the container started")
            self.pending.append(sig)
        else:
            self.target.kill(sig)

    def attach(self, target: Any) -> None:
        self.target = target
        while self.pending:
            target.kill(self.pending.pop(0))

    def __enter__(self) -> _Forwarder:
        for sig in FORWARDED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _exit_code_for(err: LayerfsError) -> int | None:
    """Docker's codes when the command itself cannot run: 127 not found, 126 not executable."""
    text = str(err)
    if isinstance(err, NotFound) and "executable" in text:
        return 127
    if ": exec:" in text:
        return 126
    return None


def _error(message: str) -> None:
    from .boundary import error_line

    error_line(message)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                       ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''}"
    n = int(seconds)
    return "Less than a second" if n < 1 else f"{n} second{'s' if n > 1 else ''}"


def _status_text(st: ContainerState) -> str:
    now = time.time()
    if st.status == "running":
        return f"Up {_duration(now - (st.started or st.created))}"
    if st.status == "exited":
        code = "?" if st.exit_code is None else str(st.exit_code)
        oom = " (OOM killed)" if st.oom_killed else ""
        when = f" {_duration(now - st.finished)} ago" if st.finished else ""
        return f"Exited ({code}){oom}{when}"
    return st.status.capitalize()


def _state_dict(st: ContainerState) -> dict[str, Any]:
    return {"id": st.id, "name": st.name, "image": st.image, "image_ref": st.image_ref,
            "layer": st.layer, "status": st.status, "created": st.created,
            "command": st.argv, "pid": st.pid, "started": st.started, "finished": st.finished,
            "exit_code": st.exit_code, "exit_signal": st.exit_signal,
            "oom_killed": st.oom_killed, "address": st.address, "ports": st.ports,
            "auto_remove": st.auto_remove, "log_path": str(st.log_path) if st.log_path else None}


def _each(refs: list[str], fn: Any) -> int:
    """Apply ``fn`` to every ref, printing it; with several refs, report errors and go on."""
    failures = 0
    for ref in refs:
        try:
            fn(ref)
            print(ref, flush=True)
        except LayerfsError as e:
            if len(refs) == 1:
                raise
            _error(str(e))
            failures += 1
    return 1 if failures else 0


# --- commands ----------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    if args.tty:
        raise InvalidArgument("-t: layerfs has no pseudo-terminals; run without -t (the "
                              "container's output is a pipe, as with docker run without -t)")
    opts = _run_options(args)
    with _manager(args, _runtime_config(args)) as mgr:
        command = args.argv or None
        if args.detach:
            st = mgr.run_detached(args.image, command, options=opts)
            print(st.id)
            return 0
        stdin = None if args.interactive else os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # Signals are ours to pass on from before the start: a Ctrl-C that arrives while
        # the container starts reaches it as soon as it runs (and cannot leave it behind).
        with _Forwarder() as forward:
            try:
                container: Container = mgr.run(args.image, command, options=opts,
                                               stdin=stdin,
                                               stdio_passthrough=args.stdio_passthrough)
            except LayerfsError as err:
                code = _exit_code_for(err)
                if code is None:
                    raise
                _error(str(err))
                return code
            finally:
                if stdin is not None:
                    os.close(stdin)
            forward.attach(container)
            status = container.wait()
    if status.oom_killed:
        limit = f" ({args.memory})" if args.memory else ""
        sys.stderr.write(f"layerfs: OOM killed: container {container.short_id} went over its "
                         f"memory limit{limit}\n")
    return status.code


def cmd_ps(args: argparse.Namespace) -> int:
    with _manager(args) as mgr:
        listed = mgr.containers(all=args.all)
    if args.quiet:
        for st in listed:
            print(st.id if args.no_trunc else st.short_id)
        return 0
    if args.json:
        emit_json([_state_dict(st) for st in listed])
        return 0
    import shlex

    from .console import print_table

    rows = []
    for st in listed:
        command = shlex.join(st.argv)
        if not args.no_trunc and len(command) > 30:
            command = command[:29] + "…"
        rows.append([st.id if args.no_trunc else st.short_id, st.image_ref, command,
                     f"{_duration(time.time() - st.created)} ago", _status_text(st),
                     ", ".join(st.ports), st.name or ""])
    print_table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"],
                rows, title=f"containers ({len(listed)})", no_trunc=args.no_trunc)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with _manager(args) as mgr:
        def stop(ref: str) -> None:
            with contextlib.suppress(NotFound):   # --rm: it is gone once stopped
                mgr.stop(ref, args.time)
        return _each(args.containers, stop)


def cmd_kill(args: argparse.Namespace) -> int:
    from ..runtime.containers import signal_number

    sig = signal_number(args.signal)
    with _manager(args) as mgr:
        return _each(args.containers, lambda ref: mgr.kill(ref, sig))


def cmd_rm(args: argparse.Namespace) -> int:
    with _manager(args) as mgr:
        return _each(args.containers, lambda ref: mgr.remove(ref, force=args.force))


def cmd_exec(args: argparse.Namespace) -> int:
    if args.tty:
        raise InvalidArgument("-t: layerfs has no pseudo-terminals; run without -t")
    if not args.argv:
        raise InvalidArgument("exec: give a command to run in the container")
    with _manager(args) as mgr:
        st = mgr.get(args.container)
        kw: dict[str, Any] = {}
        if args.env:
            kw["env"] = {**st.config.get("env", {}), "HOSTNAME": st.config.get("hostname", ""),
                         **_env(args.env)}
        if args.workdir:
            kw["cwd"] = args.workdir
        if args.user:
            from ..runtime.containers import resolve_user
            kw["user"] = resolve_user(mgr.layers.mnt_dir / st.layer, args.user)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            if args.detach:
                kw.update(stdin=null, stdout=null, stderr=null)
            elif not args.interactive:
                kw["stdin"] = null
            kw["passthrough"] = args.stdio_passthrough
            try:
                proc = mgr.exec(st.id, args.argv, **kw)
            except NotFound as err:
                if not str(err).startswith("exec in"):   # the command, not the container
                    raise
                _error(str(err))
                return 127
        finally:
            os.close(null)
        if args.detach:
            return 0
        with _Forwarder() as forward:
            forward.attach(proc)
            status = proc.wait()
    return status.code


def cmd_logs(args: argparse.Namespace) -> int:
    with _manager(args) as mgr:
        st = mgr.get(args.container)
        path = mgr.log_path(st.id)
        out = sys.stdout.buffer
        with open(path, "rb") as f:
            if args.tail is not None:
                lines = f.read().splitlines(keepends=True)
                out.write(b"".join(lines[-args.tail:] if args.tail > 0 else []))
            else:
                while chunk := f.read(1 << 16):
                    out.write(chunk)
            out.flush()
            if not args.follow:
                return 0
            while True:
                chunk = f.read(1 << 16)
                if chunk:
                    out.write(chunk)
                    out.flush()
                    continue
                try:
                    if mgr.get(st.id).status != "running":
                        out.write(f.read())
                        out.flush()
                        return 0
                except NotFound:
                    return 0
                time.sleep(0.1)


def cmd_inspect(args: argparse.Namespace) -> int:
    result = []
    with _manager(args) as mgr:
        for ref in args.refs:
            if args.type != "image":
                try:
                    result.append(mgr.inspect(ref))
                    continue
                except NotFound:
                    if args.type == "container":
                        raise
            try:
                result.append(mgr.images.inspect(ref))
            except NotFound:
                raise NotFound(f"no such container or image: {ref}") from None
    emit_json(result)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    with _manager(args) as mgr:
        image = mgr.commit(args.container, args.name, message=args.message, author=args.author,
                           changes=args.change or ())
    print(image.id)
    return 0


# --- parser ---------------------------------------------------------------------------------------

RUN_DESCRIPTION = (
    "Run COMMAND (default: the image's Entrypoint + Cmd) in a new container: a read-write "
    "layer on the image, mounted through the storage driver, with its own pid, mount, uts, "
    "ipc, network and cgroup namespaces, pivot_root into the layer, a cgroup with the "
    "limits, Docker's 14 default capabilities, Docker's default seccomp profile and "
    "no_new_privs. Attached (the default) it "
    "streams the output and exits with the command's exit code (128+N for signal N, 137 when "
    "the memory limit killed it); the signals layerfs gets (Ctrl-C, SIGTERM, ...) go to the "
    "container. With -d it prints the container id; `logs`, `stop`, `rm` take it from there.")

RUN_EXAMPLES = """\
  layerfs run --rm busybox echo hello                  # prints hello, exit code 0
  layerfs run --rm --network none busybox ps -ef       # PID 1 is layerfs-init, then ps
  layerfs run --rm -h box busybox hostname             # box
  layerfs run --rm busybox ip -o link                  # only lo and eth0 (bridge mode)
  layerfs run -d --name web -p 8080:80 busybox httpd -f -p 80
  curl http://127.0.0.1:8080/                          # answered by the container
  layerfs run --rm -m 16m busybox sh -c 'x=a; while :; do x=$x$x; done'    # exit 137
  layerfs run --rm --pids-limit 20 busybox sh -c 'for i in $(seq 50); do sleep 5 & done'
  layerfs run --rm -v /srv/data:/data:ro busybox ls /data
  layerfs run --rm -u 1000:1000 -e GREETING=hi -w /tmp busybox sh -c 'id; pwd; env'
  layerfs run --rm --cap-drop ALL --cap-add NET_BIND_SERVICE busybox grep Cap /proc/self/status
  layerfs run --rm --security-opt seccomp=unconfined busybox unshare -U true  # no filter

what to look at: `cat /proc/self/cgroup` and `cat /proc/1/cmdline` inside, `layerfs ps`,
`layerfs inspect NAME` (cgroup paths, the layer, its mount), `ip link` on the host (a veth
lfv<id> on the bridge), `nft list table ip layerfs` (the -p rules).

environment: LAYERFS_BRIDGE, LAYERFS_SUBNET, LAYERFS_NFT_TABLE, LAYERFS_IP_FORWARD (0 keeps
net.ipv4.ip_forward as it is) and LAYERFS_CGROUP_PARENT choose the host names used, so a
second setup (tests) does not share the default layerfs0 bridge, 10.87.0.0/16, the nft table
layerfs and the cgroup parent layerfs.
"""


def _add_run(sub: SubParsers) -> None:
    p = command_parser(sub, "run", "run a command in a new container",
                       RUN_DESCRIPTION, RUN_EXAMPLES, add_help=False)
    p.add_argument("--help", action="help", help="show this help message and exit")
    g = p.add_argument_group("lifecycle")
    g.add_argument("--rm", action="store_true", help="remove the container (its layer and "
                   "record) when it exits")
    g.add_argument("-d", "--detach", action="store_true", help="run in the background under a "
                   "monitor process; print the container id (output: layerfs logs ID)")
    g.add_argument("--name", help="a name to use instead of the id (unique)")
    g.add_argument("-i", "--interactive", action="store_true", help="keep stdin connected "
                   "(default: /dev/null, as Docker without -i)")
    g.add_argument("-t", "--tty", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--stdio-passthrough", action="store_true", help="give the container this "
                   "process's own stdin/stdout/stderr instead of pipes relayed by layerfs (no "
                   "copy, but the container can then reopen the files behind them through "
                   "/proc/self/fd, e.g. read or truncate a file you redirected to; "
                   "docs/security.md)")
    g = p.add_argument_group("what runs")
    g.add_argument("-e", "--env", action="append", metavar="K=V",
                   help="environment variable (repeatable); -e K copies K from here")
    g.add_argument("-w", "--workdir", metavar="DIR", help="working directory (created if "
                   "missing; default: the image's WorkingDir, else /)")
    g.add_argument("-u", "--user", metavar="UID[:GID]", help="user and group, numbers or "
                   "names from the image's /etc/passwd and /etc/group (default: the image's "
                   "User, else root)")
    g.add_argument("--entrypoint", metavar="CMD", help="replace the image's Entrypoint (and "
                   "drop its Cmd); '' clears it")
    g.add_argument("-h", "--hostname", metavar="NAME", help="host name inside (default: the "
                   "first 12 characters of the id)")
    g.add_argument("--read-only", action="store_true", help="mount the container's root "
                   "read-only (volumes keep their own mode)")
    g = p.add_argument_group("privileges (docs/security.md)")
    g.add_argument("--cap-add", action="append", metavar="CAP", help="add a capability to "
                   "Docker's default 14 (e.g. NET_ADMIN; ALL for every one; repeatable)")
    g.add_argument("--cap-drop", action="append", metavar="CAP", help="drop a capability "
                   "(e.g. NET_RAW; ALL for none but the --cap-add ones; repeatable)")
    g.add_argument("--security-opt", action="append", metavar="OPT",
                   help="seccomp=unconfined (no syscall filter), seccomp=PROFILE.json (Docker's "
                   "JSON format; default: layerfs's copy of Docker's profile), "
                   "no-new-privileges[=true|false] (default true: setuid bits grant nothing)")
    g = p.add_argument_group("limits (cgroup)")
    g.add_argument("-m", "--memory", metavar="SIZE", help="memory limit, e.g. 64m, 1g (no "
                   "swap on top); going over it kills the command: exit code 137")
    g.add_argument("--cpus", type=float, metavar="N", help="CPU time, in CPUs (0.5 = half of "
                   "one)")
    g.add_argument("--pids-limit", type=int, metavar="N", help="most tasks at once (fork "
                   "fails beyond it; layerfs's PID 1 counts)")
    g.add_argument("--cgroup-parent", metavar="NAME",
                   default=os.environ.get("LAYERFS_CGROUP_PARENT") or None,
                   help="cgroup to create containers under (default: layerfs)")
    g = p.add_argument_group("network and files")
    g.add_argument("--network", "--net", choices=["bridge", "none", "host"], default="bridge",
                   help="bridge (default): own netns with lo and eth0 on the bridge; none: "
                   "only lo; host: the host's interfaces")
    g.add_argument("-p", "--publish", action="append", metavar="[IP:]HOST:CONTAINER[/PROTO]",
                   help="publish a container port on the host (bridge only; repeatable)")
    g.add_argument("-v", "--volume", action="append", metavar="HOSTDIR:DIR[:ro]",
                   help="bind-mount a host directory (created if missing; repeatable)")
    g.add_argument("--bridge", default=os.environ.get("LAYERFS_BRIDGE") or None,
                   help="bridge device (default: layerfs0)")
    g.add_argument("--subnet", default=os.environ.get("LAYERFS_SUBNET") or None,
                   help="the bridge's IPv4 subnet (default: 10.87.0.0/16)")
    g.add_argument("--userns", action="store_true", help="own user namespace: root inside is "
                   "uid 100000 outside (files of the image then belong to nobody)")
    g.add_argument("--driver", dest="run_driver", metavar="D",
                   help="storage driver (same as the global --driver)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD ...",
                   help="command and arguments (default: the image's)")
    p.set_defaults(func=cmd_run)


def register(sub: SubParsers) -> None:
    _add_run(sub)

    p = command_parser(sub, "ps", "list containers",
                       "Running containers; -a adds created, exited and dead ones (a runner that "
                       "was killed leaves a dead one: listing cleans it up).",
                       "  layerfs ps\n  layerfs ps -a\n  layerfs ps -aq | xargs layerfs rm -f\n"
                       "  layerfs ps --json\n")
    p.add_argument("-a", "--all", action="store_true", help="not only running containers")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    p.add_argument("--json", action="store_true", help="every field, as JSON")
    p.add_argument("--no-trunc", action="store_true", help="full ids and commands")
    p.set_defaults(func=cmd_ps)

    p = command_parser(sub, "stop", "stop containers: the stop signal, then SIGKILL",
                       "Send the image's StopSignal (default SIGTERM) to each container's main "
                       "process; SIGKILL if it still runs after -t seconds. Waits until it is "
                       "stopped (and, for --rm containers, removed).",
                       "  layerfs stop web\n  layerfs stop -t 0 web db\n")
    p.add_argument("-t", "--time", type=float, default=10, metavar="SECONDS",
                   help="grace period before SIGKILL (default: %(default)s)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_stop)

    p = command_parser(sub, "kill", "send a signal to containers (default SIGKILL)",
                       "The signal goes to the container's PID 1 (layerfs-init), which passes it "
                       "on to the main process; SIGKILL ends everything at once.",
                       "  layerfs kill web\n  layerfs kill -s HUP web\n")
    p.add_argument("-s", "--signal", default="KILL", help="name or number (default: KILL)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_kill)

    p = command_parser(sub, "rm", "remove containers: record, layer, and the image's use",
                       "Remove stopped containers: the engine record and log, the container's "
                       "layer, and its claim on the image (so `layerfs rmi` can remove the image). "
                       "Running ones are refused unless -f (SIGKILL first).",
                       "  layerfs rm web\n  layerfs rm -f $(layerfs ps -aq)\n")
    p.add_argument("-f", "--force", action="store_true", help="kill running containers first")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p.set_defaults(func=cmd_rm)

    p = command_parser(sub, "exec", "run a command in a running container",
                       "The command joins the container's namespaces (user, ipc, uts, net, cgroup, "
                       "mount, pid) and its cgroup, with the container's user, environment and "
                       "working directory unless given, the same capabilities and no_new_privs. "
                       "Exits with its exit code.",
                       "  layerfs exec web ps -ef\n  layerfs exec -e DEBUG=1 -w /tmp web env\n"
                       "  layerfs exec web cat /proc/self/cgroup    # the container's cgroup\n")
    p.add_argument("-d", "--detach", action="store_true", help="do not wait for it")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin connected")
    p.add_argument("-t", "--tty", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stdio-passthrough", action="store_true", help="this process's own "
                   "stdio instead of relayed pipes (see run --help)")
    p.add_argument("-e", "--env", action="append", metavar="K=V",
                   help="environment variable (repeatable; default: the container's)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory (default: the "
                   "container's)")
    p.add_argument("-u", "--user", metavar="UID[:GID]", help="user and group, numbers or names "
                   "(default: the container's)")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD ...")
    p.set_defaults(func=cmd_exec)

    p = command_parser(sub, "logs", "the output of a container",
                       "stdout and stderr of a container, as kept in ROOT/containers/ID/"
                       "container.log (detached containers, and attached ones without --rm).",
                       "  layerfs logs web\n  layerfs logs -f web      # follow until it exits\n"
                       "  layerfs logs --tail 5 web\n")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the "
                   "container exits")
    p.add_argument("-n", "--tail", type=int, metavar="N", help="only the last N lines")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(func=cmd_logs)

    p = command_parser(sub, "inspect", "everything about containers (or images), as JSON",
                       "Like `docker inspect`: state, exit code and OOM flag, config, limits, "
                       "network address, the layer and where it is mounted, cgroup paths. A name "
                       "that is not a container is looked up as an image.",
                       "  layerfs inspect web\n  layerfs inspect web | jq '.[0].State'\n"
                       "  layerfs inspect --type image busybox\n")
    p.add_argument("--type", choices=["container", "image"], help="only look for this kind")
    p.add_argument("refs", nargs="+", metavar="CONTAINER|IMAGE")
    p.set_defaults(func=cmd_inspect)

    p = command_parser(sub, "commit", "a new image from a container's changes",
                       "The container's changes (its layer's diff, through the storage driver) "
                       "become one more layer on top of its image's layers; the new image's config "
                       "is the container's (command, environment, working directory, user), then "
                       "the -c instructions. Mount points layerfs made (/etc/hosts, ...) are left "
                       "out. Prints the image id.",
                       "  layerfs run --name box busybox sh -c 'echo hi > /greeting'\n"
                       "  layerfs commit -m 'add greeting' box lab/greeting:v1\n"
                       "  layerfs run --rm lab/greeting:v1 cat /greeting      # hi\n"
                       "  layerfs commit -c 'CMD [\"cat\", \"/greeting\"]' box lab/greeting:v2\n")
    p.add_argument("-m", "--message", help="comment for the history entry")
    p.add_argument("-a", "--author", help="author (e.g. 'Name <mail>')")
    p.add_argument("-c", "--change", action="append", metavar="INSTRUCTION",
                   help="Dockerfile instruction for the config: CMD, ENTRYPOINT, ENV, WORKDIR, "
                   "USER, EXPOSE, LABEL, STOPSIGNAL, VOLUME (repeatable)")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("name", nargs="?", metavar="NAME[:TAG]", help="name for the image (none: "
                   "untagged)")
    p.set_defaults(func=cmd_commit)


# --- python -m layerfs.cli.run: these commands alone ----------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from .boundary import dispatch

    parser = argparse.ArgumentParser(prog="layerfs", description="layerfs container commands")
    add_global_options(parser)
    sub = subcommands(parser, sys.argv[1:] if argv is None else argv, dest="command_name",
                      metavar="COMMAND")
    register(sub)
    return dispatch(parser, argv)


__all__ = ["main", "register"]

if __name__ == "__main__":
    sys.exit(main())
