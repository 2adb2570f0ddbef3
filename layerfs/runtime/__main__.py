"""``python -m layerfs.runtime``: run one container from the command line (debugging, benchmarks).

Not the user CLI (``layerfs run`` wraps the same engine calls); kept to the
standard library and parsed by hand so that its own startup stays small::

    python -m layerfs.runtime run [--network none|host|bridge] [--state DIR] [-m SIZE]
        [--cpus N] [--pids N] [-v SRC:DST[:ro]]... [-p [IP:]HP:CP[/proto]]... [-e K=V]...
        [-u UID[:GID]] [-w DIR] [-h NAME] [--userns] [--read-only] [--cap-add CAP]...
        [--cap-drop CAP]... [--security-opt OPT]... [-d] [--keep] ROOTFS CMD...
    python -m layerfs.runtime ps|cleanup [--state DIR]

Exits with the container's exit code (``run``). ``--keep`` keeps the exited
container's record (by default it is removed, like ``docker run --rm``).
"""

from __future__ import annotations

import os
import sys

DEFAULT_STATE = "/run/layerfs"

_VALUE_FLAGS = {"--network", "--state", "-m", "--cpus", "--pids", "-v", "-p", "-e", "-u", "-w",
                "-h", "--cap-add", "--cap-drop", "--security-opt"}
_BOOL_FLAGS = {"--userns", "--read-only", "-d", "--keep"}


def _parse(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    opts: dict[str, list[str]] = {}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        flag = args[i]
        if flag == "--":
            i += 1
            break
        if flag in _VALUE_FLAGS and i + 1 < len(args):
            opts.setdefault(flag, []).append(args[i + 1])
            i += 2
        elif flag in _BOOL_FLAGS:
            opts[flag] = ["1"]
            i += 1
        else:
            raise SystemExit(f"unknown option {flag!r} (see the module docstring)")
    return opts, args[i:]


def main(argv: list[str]) -> int:
    from pathlib import Path

    from ..errors import LayerfsError
    from ..units import parse_size
    from . import engine, spec
    from . import state as records

    if not argv or argv[0] not in ("run", "ps", "cleanup"):
        print(__doc__, file=sys.stderr)
        return 2
    opts, rest = _parse(argv[1:])
    state = opts.get("--state", [DEFAULT_STATE])[-1]
    try:
        if argv[0] == "ps":
            for info in records.list_containers(state):
                print(f"{info.id[:12]}  {info.status:8s} {info.pid or '-':>7}  "
                      f"{info.address or '-':15s} {' '.join(info.argv)}")
            return 0
        if argv[0] == "cleanup":
            for cid in records.cleanup_stale(state):
                print(f"cleaned {cid[:12]}")
            return 0
        if len(rest) < 2:
            print("run: need ROOTFS and a command", file=sys.stderr)
            return 2
        one = {k: v[-1] for k, v in opts.items()}
        security = spec.parse_security_opts(opts.get("--security-opt", []))
        s = spec.ContainerSpec(
            rootfs=Path(rest[0]).absolute(), argv=rest[1:],
            env=spec.parse_env(opts.get("-e", [])), cwd=one.get("-w", "/"),
            user=spec.parse_user(one["-u"]) if "-u" in one else (0, 0),
            hostname=one.get("-h"),
            volumes=[spec.parse_volume(v) for v in opts.get("-v", [])],
            memory=parse_size(one["-m"]) if "-m" in one else None,
            cpus=float(one["--cpus"]) if "--cpus" in one else None,
            pids_limit=int(one["--pids"]) if "--pids" in one else None,
            network=one.get("--network", "bridge"),  # type: ignore[arg-type]
            ports=[spec.parse_port(p) for p in opts.get("-p", [])],
            userns="--userns" in one, read_only="--read-only" in one,
            cap_add=opts.get("--cap-add", []), cap_drop=opts.get("--cap-drop", []),
            seccomp=security.seccomp, no_new_privileges=security.no_new_privileges)
        if "-d" in one:
            info = engine.run_detached(s, state)
            print(info.id)
            return 0
        c = engine.start(s, state)
        try:
            status = c.wait()
        except KeyboardInterrupt:
            c.kill(9)
            status = c.wait()
        if "--keep" not in one:
            records.remove(state, s.id)
        if status.oom_killed:
            print(f"container {s.short_id}: killed by the OOM killer", file=sys.stderr)
        return status.code
    except LayerfsError as err:
        print(f"layerfs: {err}", file=sys.stderr)
        return 125


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: nothing is left to finalize
