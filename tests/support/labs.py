"""Run the teaching labs in ``docs/labs/`` as tests: parse a lab, run its blocks, check output.

A lab is a Markdown file. Its executable parts are fenced code blocks whose
info string carries a marker after the language::

    ```sh lab                  run this block (the lab fails if it fails)
    ```sh lab timeout=300      ... with its own time limit in seconds (default 120)
    ```sh lab-cleanup          always run, even after an earlier block failed
    ```text expect             what the output of the previous lab block must show

Any other code block (```` ```sh ````, ```` ```text ````) is prose for the reader
and is not run. An ``expect`` block belongs to the nearest ``lab`` block before
it (prose may stand between them, another code block may not). Each non-empty
line of it is a pattern, and the patterns must match lines of the block's
output (stdout and stderr together) **in order** (a pattern may match the same
line as the one before it, or any later line):

* plain text matches a line that contains it; ``...`` stands for any text and
  a run of spaces for any run of whitespace, so a table row or a line with a
  timing can be written as the student sees it: ``first write ... ms``;
* ``re: REGEX`` is a Python regular expression searched in one line;
* ``not: TEXT`` (same wildcards) and ``not re: REGEX`` must match no line of the
  output at all (these are not ordered).

A lab may start with front matter::

    ---
    runs-in: guest        run the whole lab inside the qemu guest (one boot), unless
                          this kernel has device-mapper and LAB_DISK names a spare
                          disk (see host_can_run)
    guest-disk: 4G        size of the guest's scratch disk /dev/vda (default 4G)
    guest-timeout: 600    seconds the guest may take (default: the sum of the blocks')
    ---

How blocks run: each block is a fresh ``bash`` with ``set -Eeuo pipefail``, but
the lab has one shell *state*: variables (exported or not), functions and the
working directory a block leaves behind are restored before the next block,
so ``base=$(layerfs layer apply ...)`` in one block is ``$base`` in the next.
The environment has ``LAB_DIR`` (a fresh empty directory, removed afterwards;
labs keep everything there), ``LAYERFS_ROOT=$LAB_DIR/root`` (a guard: nothing a
lab does can reach /var/lib/layerfs), ``LAB_REPO`` (the checkout) and ``PATH``
with the repo's ``.venv/bin`` first. stdin is /dev/null. Once a ``lab`` block
fails, the remaining ``lab`` blocks are skipped and the ``lab-cleanup`` blocks
still run. Whatever a block starts in the background is killed after the lab.

After the lab the runner looks for what it left behind: mounts and loop
devices under ``LAB_DIR``, device-mapper devices, network namespaces, veth
interfaces, nft rules made by layerfs containers, cgroups and processes. Any of
those fails the lab (``LabResult.leftovers``) and is then removed, so one
broken lab does not break the next.

Usage::

    python -m tests.support.labs docs/labs/03-overlay.md      # run one lab, live output
    python -m tests.support.labs --list docs/labs/03-overlay.md
    python -m tests.support.labs --keep docs/labs/01-*.md     # keep LAB_DIR to look around

or from Python: ``run_lab(Path("docs/labs/01-copy-on-write.md")).ok``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from layerfs import mount as mountlib

from ..host_resources import wait_gone

if TYPE_CHECKING:
    from . import qemu as qemu_types

REPO_ROOT = Path(__file__).resolve().parents[2]
LABS_DIR = REPO_ROOT / "docs" / "labs"
DEFAULT_BASE = Path(os.environ.get("LAB_BASE", "/tmp/lfs-labs"))
DEFAULT_TIMEOUT = 120.0
MAX_OUTPUT = 256 * 1024  # bytes of output kept per block (the tail)

RUN, CLEANUP = "lab", "lab-cleanup"
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------


@dataclass
class Block:
    """One executable code block of a lab, with the expectations that follow it."""

    index: int                  # 1-based among the lab's executable blocks
    kind: str                   # "lab" or "lab-cleanup"
    code: str
    line: int                   # line of the opening fence in the Markdown file
    timeout: float = DEFAULT_TIMEOUT
    expect: list[str] = field(default_factory=list)
    expect_line: int | None = None
    heading: str = ""           # the section the block is in

    @property
    def always(self) -> bool:
        return self.kind == CLEANUP


@dataclass
class Lab:
    path: Path
    title: str
    meta: dict[str, str]
    blocks: list[Block]

    @property
    def in_guest(self) -> bool:
        return self.meta.get("runs-in", "host") == "guest"

    @property
    def budget(self) -> float:
        """Seconds the whole lab may take (blocks only, no guest boot)."""
        return sum(b.timeout for b in self.blocks)


class LabFormatError(ValueError):
    """The Markdown does not follow the lab format (the message says where)."""


def _front_matter(lines: list[str]) -> tuple[dict[str, str], int]:
    if not lines or lines[0].strip() != "---":
        return {}, 0
    meta: dict[str, str] = {}
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return meta, i + 1
        key, sep, value = lines[i].partition(":")
        if sep and key.strip():
            meta[key.strip()] = value.strip()
    raise LabFormatError("front matter: no closing ---")


def parse_lab(path: Path | str, text: str | None = None) -> Lab:
    """Read a lab: its title, front matter and executable blocks with their expectations."""
    path = Path(path)
    text = path.read_text() if text is None else text
    lines = text.splitlines()
    meta, i = _front_matter(lines)
    title, heading = path.stem, ""
    blocks: list[Block] = []
    last_run: Block | None = None  # the lab block an expect block may attach to
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            if line.startswith("# ") and title == path.stem:
                title = heading
            i += 1
            continue
        m = _FENCE.match(line)
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = lines[i].strip()
            if close.startswith(fence[0] * len(fence)) and not close.strip(fence[0]):
                break
            body.append(lines[i])
            i += 1
        else:
            raise LabFormatError(f"{path}:{start + 1}: code block never closed")
        i += 1
        words = info.split()
        flags = words[1:]
        if RUN in flags or CLEANUP in flags:
            kind = CLEANUP if CLEANUP in flags else RUN
            timeout = DEFAULT_TIMEOUT
            for w in flags:
                if w.startswith("timeout="):
                    try:
                        timeout = float(w.split("=", 1)[1])
                    except ValueError as err:
                        raise LabFormatError(f"{path}:{start + 1}: bad {w}") from err
            block = Block(len(blocks) + 1, kind, "\n".join(body) + "\n", start + 1, timeout,
                          heading=heading)
            blocks.append(block)
            last_run = block
        elif "expect" in flags:
            if last_run is None:
                raise LabFormatError(f"{path}:{start + 1}: expect block without a lab block "
                                     "before it")
            if last_run.expect_line is not None:
                raise LabFormatError(f"{path}:{start + 1}: second expect block for the block "
                                     f"at line {last_run.line}")
            last_run.expect = [p for p in body if p.strip()]
            last_run.expect_line = start + 1
            for pattern in last_run.expect:
                _compile(pattern)  # fail on a bad regex now, not after a 2-minute run
            last_run = None
        else:
            last_run = None  # an unmarked code block cuts the link to expectations
    return Lab(path, title, meta, blocks)


# --------------------------------------------------------------------------
# expectations
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    text: str
    regex: re.Pattern[str]
    negative: bool


def _compile(pattern: str) -> Pattern:
    p = pattern.strip()
    negative = False
    if p.startswith("not re:"):
        negative, p = True, p[4:]
    elif p.startswith("not:"):
        return Pattern(pattern, re.compile(_glob(p[4:].strip())), True)
    if p.startswith("re:"):
        try:
            return Pattern(pattern, re.compile(p[3:].strip()), negative)
        except re.error as err:
            raise LabFormatError(f"bad regex {p!r}: {err}") from err
    return Pattern(pattern, re.compile(_glob(p)), negative)


def _glob(text: str) -> str:
    out = []
    for part in re.split(r"(\.\.\.|\s+)", text):
        if part == "...":
            out.append(".*?")
        elif part and part.isspace():
            out.append(r"\s+")
        else:
            out.append(re.escape(part))
    return "".join(out)


def check_expect(patterns: Sequence[str], output: str) -> str | None:
    """None if ``output`` satisfies the patterns, else why not."""
    lines = output.splitlines()
    pos = 0
    for raw in patterns:
        pat = _compile(raw)
        if pat.negative:
            for n, line in enumerate(lines):
                if pat.regex.search(line):
                    return f"line {n + 1} matches forbidden pattern {raw.strip()!r}: {line!r}"
            continue
        for n in range(pos, len(lines)):
            if pat.regex.search(lines[n]):
                pos = n  # the next pattern may match this line too, or a later one
                break
        else:
            where = f"at or after output line {pos + 1}" if pos else "in the output"
            earlier = any(pat.regex.search(line) for line in lines[:pos])
            hint = " (it matches an earlier line: check the order)" if earlier else ""
            return f"expected {raw.strip()!r} {where}, not found{hint}"
    return None


# --------------------------------------------------------------------------
# running blocks
# --------------------------------------------------------------------------

# Bash variables that belong to the shell, not the lab: never saved between blocks.
_SHELL_VARS = (
    "BASH* COMP_* DIRSTACK EPOCHREALTIME EPOCHSECONDS EUID FUNCNAME GROUPS HISTCMD HOSTNAME "
    "HOSTTYPE IFS LINENO MACHTYPE OLDPWD OPTARG OPTERR OPTIND OSTYPE PIPESTATUS PPID PS4 "
    "PWD RANDOM SECONDS SHELLOPTS SHLVL SRANDOM UID _ LAB_STATE_FILE BASH_ENV"
)

_PRELUDE = r"""
unset BASH_ENV  # read once, by this shell: the scripts a block runs must not source it
__lab_save() {
  local __rc=$?
  trap - ERR
  set +eEu
  {
    local __n __d __f
    for __n in $(compgen -v); do
      case " $__LAB_SKIP " in *" $__n "*) continue ;; esac
      case $__n in BASH*|COMP_*|__*) continue ;; esac
      __d=$(declare -p "$__n" 2>/dev/null) || continue
      __f=${__d#declare -}; __f=${__f%% *}
      case $__f in *r*) continue ;; esac
      printf '%s\n' "$__d"
    done
    declare -f | sed '/^__lab_save ()/,/^}/d'
    printf 'cd %q 2>/dev/null || true\n' "$PWD"
  } > "$LAB_STATE_FILE.new" && mv -f "$LAB_STATE_FILE.new" "$LAB_STATE_FILE"
  exit $__rc
}
__LAB_SKIP='@SKIP@'
if [ -s "$LAB_STATE_FILE" ]; then . "$LAB_STATE_FILE"; fi
trap __lab_save EXIT
trap 'echo "lab: exit status $? from: $BASH_COMMAND (line $LINENO)" >&2' ERR
set -Eeuo pipefail
"""


@dataclass
class BlockResult:
    index: int
    kind: str
    line: int
    heading: str
    status: str                 # passed, failed, timeout, mismatch, skipped
    returncode: int | None = None
    seconds: float = 0.0
    output: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "skipped")


@dataclass
class LabResult:
    path: str
    title: str
    blocks: list[BlockResult]
    seconds: float
    leftovers: list[str] = field(default_factory=list)
    where: str = "host"
    boot_seconds: float | None = None
    error: str = ""             # the lab could not run at all (guest failure, bad format)
    daemon_commands: int | None = None   # with daemon=True: commands the daemon served

    @property
    def failed_block(self) -> BlockResult | None:
        return next((b for b in self.blocks if not b.ok), None)

    @property
    def ok(self) -> bool:
        return not self.error and self.failed_block is None and not self.leftovers

    def report(self) -> str:
        """Why the lab failed, for a test assertion message."""
        out = [f"{self.path}: {self.title} ({self.where}, {self.seconds:.1f} s)"]
        if self.error:
            out.append(f"ERROR: {self.error}")
        for b in self.blocks:
            if b.ok:
                continue
            out.append(f"block {b.index} ({b.kind}, line {b.line}, section {b.heading!r}) "
                       f"{b.status}: {b.reason}")
            out.append("--- its output ---")
            out.append(b.output.rstrip()[-8000:] or "(none)")
            out.append("---")
        if self.leftovers:
            out.append("left behind (now removed): " + "; ".join(self.leftovers))
        return "\n".join(out)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LabResult:
        blocks = [BlockResult(**b) for b in data.pop("blocks")]  # type: ignore[arg-type, attr-defined]
        return cls(blocks=blocks, **data)  # type: ignore[arg-type]


def _venv_bin() -> Path:
    return REPO_ROOT / ".venv" / "bin"


def lab_environment(lab_dir: Path, state_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("LAYERFS_DRIVER", "LAYERFS_STORAGE_OPTS", "LAYERFS_DAEMON", "BASH_ENV", "ENV",
              "CDPATH", "PYTEST_CURRENT_TEST", "PYTHONDONTWRITEBYTECODE"):
        env.pop(k, None)
    path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for d in ("/usr/local/sbin", "/usr/sbin", "/sbin"):  # lvm, losetup, ... for non-login shells
        if d not in path.split(":"):
            path += ":" + d
    env.update(
        PATH=f"{_venv_bin()}:{path}",
        LAB_DIR=str(lab_dir),
        LAB_REPO=str(REPO_ROOT),
        LAYERFS_ROOT=str(lab_dir / "root"),
        LAB_STATE_FILE=str(state_file),
        LANG="C.UTF-8",
        LC_ALL="C.UTF-8",
        COLUMNS="120",
        TERM="dumb",
        PYTHONUNBUFFERED="1",
    )
    if os.environ.get("LAYERFS_IN_GUEST") != "1":
        # the guest compiles the repo into its tmpfs once per boot; on the host
        # keep the checkout free of .pyc files, as the rest of the tooling does
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


_DAEMON_SHIM = """\
#!{python}
# `layerfs` for a lab run with daemon=True: every root gets its own `layerfs daemon`,
# started on the root's first command; then the real command, with LAYERFS_DAEMON=1.
import fcntl, os, socket, subprocess, sys, time
from layerfs.daemon import wire
from layerfs.daemon.client import scan

REAL, WORK = {real!r}, {work!r}
args = sys.argv[1:]
root, command = scan(args)

def answers(path):
    try:
        address, fd = wire.short_address(path)
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(address)
        finally:
            if fd is not None:
                os.close(fd)
        return True
    except OSError:
        return False

if command == "pool" and "destroy" in args:
    # As a user would: stop the daemons serving roots on the pool first (they keep it busy).
    import signal, select
    target = os.path.abspath(args[-1]) + "/"
    for pid_file in sorted(os.listdir(os.path.join(WORK, "daemons"))):
        if not pid_file.endswith(".pid"):
            continue
        base = os.path.join(WORK, "daemons", pid_file[:-4])
        with open(base + ".root") as f:
            served = f.read()
        if (served + "/").startswith(target):
            pid = int(open(os.path.join(WORK, "daemons", pid_file)).read())
            try:
                pidfd = os.pidfd_open(pid)
                os.kill(pid, signal.SIGTERM)
                select.select([pidfd], [], [], 60)
                os.close(pidfd)
            except ProcessLookupError:
                pass
    # ... and run the destroy itself in-process: a daemon for a root on the pool would
    # keep it busy again.
    os.environ["LAYERFS_DAEMON"] = "0"
elif root is not None and command not in (None, "daemon"):
    root = os.path.abspath(root)
    path = wire.socket_path(root)
    with open(os.path.join(WORK, "daemons.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not answers(path):
            n = len(os.listdir(os.path.join(WORK, "daemons")))
            log = os.path.join(WORK, "daemons", f"{{n}}.log")
            with open(log, "wb") as f:
                proc = subprocess.Popen([REAL, "daemon", "--root", root], stdin=subprocess.DEVNULL,
                                        stdout=f, stderr=f, start_new_session=True)
            with open(log + ".root", "w") as f:
                f.write(root)
            with open(log + ".pid", "w") as f:
                f.write(str(proc.pid))
            deadline = time.monotonic() + 60
            while not answers(path) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
    os.environ["LAYERFS_DAEMON"] = "1"
os.execv(REAL, [REAL, *args])
"""


class _LabDaemons:
    """``run_lab(daemon=True)``: a ``layerfs`` first on PATH that starts one ``layerfs
    daemon`` per root on that root's first command, and sends every command there."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.dir = work / "daemons"
        self.dir.mkdir()
        shim = work / "bin" / "layerfs"
        shim.parent.mkdir()
        shim.write_text(_DAEMON_SHIM.format(python=sys.executable, work=str(work),
                                            real=str(_venv_bin() / "layerfs")))
        shim.chmod(0o755)
        env["PATH"] = f"{shim.parent}:{env['PATH']}"
        self.commands = 0

    def stop(self) -> list[str]:
        """Stop every daemon (SIGTERM); what went wrong: a daemon that did not stop
        cleanly, or processes they started that still run."""
        problems = []
        for pid_file in sorted(self.dir.glob("*.pid")):
            pid = int(pid_file.read_text())
            log = pid_file.with_suffix("")          # N.log.pid -> N.log
            started = _descendants(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                wait_gone(pid, 60)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            text = _read(str(log))
            self.commands += text.count("): exit ") + text.count("): killed by ")
            if "layerfs daemon: stopped" not in text or "Traceback" in text:
                problems.append(f"layerfs daemon {pid} did not stop cleanly: {text[-1500:]}")
            time.sleep(0.1)
            for child in sorted(started):
                stat = _read(f"/proc/{child}/stat")
                if stat and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    problems.append(f"process {child} ({_read(f'/proc/{child}/comm').strip()}) "
                                    f"started through daemon {pid}")
        return problems


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child in _read(f"/proc/{parent}/task/{parent}/children").split():
            if int(child) not in found:
                found.add(int(child))
                todo.append(int(child))
    return found


def _kill_session(sid: int) -> list[int]:
    """SIGKILL every process whose session is ``sid`` (a block's own session)."""
    killed = []
    for pid in _pids():
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return killed


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def run_block(block: Block, env: dict[str, str], out_path: Path,
              echo: TextIO | None = None) -> tuple[int | None, float, str, int]:
    """Run one block; returns (returncode or None on timeout, seconds, output, session id)."""
    # The prelude comes through BASH_ENV, and the block is padded with blank
    # lines, so bash's "line N" in an error message is the line in the Markdown.
    prelude = out_path.with_name("prelude.sh")
    if not prelude.exists():
        prelude.write_text(_PRELUDE.replace("@SKIP@", " ".join(_SHELL_VARS.split())))
    env = dict(env, BASH_ENV=str(prelude))
    script = "\n" * block.line + block.code
    with open(out_path, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(["bash", "--noprofile", "--norc", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=env["LAB_DIR"],
                                start_new_session=True)
        # Output goes to a file, not a pipe: a background job the block starts
        # keeps its stdout open, and must not make us wait for it.
        done = threading.Event()
        tail = threading.Thread(target=_follow, args=(out_path, done, echo), daemon=True)
        if echo is not None:
            tail.start()
        try:
            rc: int | None = proc.wait(timeout=block.timeout)
        except subprocess.TimeoutExpired:
            rc = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.monotonic() - t0
        done.set()
        if echo is not None:
            tail.join(timeout=5)
    data = out_path.read_bytes()
    if len(data) > MAX_OUTPUT:
        data = b"[... output cut ...]\n" + data[-MAX_OUTPUT:]
    return rc, seconds, data.decode("utf-8", "replace"), proc.pid


def _follow(path: Path, done: threading.Event, echo: TextIO | None) -> None:
    assert echo is not None
    with open(path, "rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                echo.write(chunk.decode("utf-8", "replace"))
                echo.flush()
                continue
            if done.is_set():
                rest = f.read()
                if rest:
                    echo.write(rest.decode("utf-8", "replace"))
                    echo.flush()
                return
            time.sleep(0.05)


# --------------------------------------------------------------------------
# leftovers: what a lab must not leave behind
# --------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) of every mount in this mount namespace."""
    return [(m.target, m.fstype, m.source) for m in mountlib.mountinfo()]


def _loops() -> dict[str, str]:
    """/dev/loopN -> backing file."""
    out = {}
    base = Path("/sys/block")
    with contextlib.suppress(OSError):
        for dev in base.iterdir():
            backing = dev / "loop" / "backing_file"
            if dev.name.startswith("loop") and backing.exists():
                out[f"/dev/{dev.name}"] = _read(str(backing)).strip()
    return out


def _dm_devices() -> set[str]:
    out = set()
    with contextlib.suppress(OSError):
        for dev in Path("/sys/block").iterdir():
            name = dev / "dm" / "name"
            if dev.name.startswith("dm-") and name.exists():
                out.add(_read(str(name)).strip())
    return out


def _netns() -> set[str]:
    with contextlib.suppress(OSError):
        return set(os.listdir("/run/netns"))
    return set()


def _links() -> set[str]:
    with contextlib.suppress(OSError):
        return set(os.listdir("/sys/class/net"))
    return set()


def _nft_layerfs_rules() -> set[str]:
    """Rules a layerfs container added (they carry comment "layerfs:<id>")."""
    if shutil.which("nft") is None:
        return set()
    try:
        out = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line.strip() for line in out.splitlines() if 'comment "layerfs:' in line}


def _cgroups() -> set[str]:
    """Cgroup directories below a ``layerfs``-named parent (the runner's default parent)."""
    out: set[str] = set()
    root = Path("/sys/fs/cgroup")
    candidates = [root / "layerfs"]
    with contextlib.suppress(OSError):
        candidates += [d / "layerfs" for d in root.iterdir() if d.is_dir()]
    for parent in candidates:
        with contextlib.suppress(OSError):
            for d in parent.iterdir():
                if d.is_dir():
                    out.add(str(d))
    return out


@dataclass
class Snapshot:
    dm: set[str]
    netns: set[str]
    links: set[str]
    nft: set[str]
    cgroups: set[str]

    @classmethod
    def take(cls) -> Snapshot:
        return cls(_dm_devices(), _netns(), _links(), _nft_layerfs_rules(), _cgroups())


# Network namespaces and interfaces are global and other jobs on the machine make
# their own (test suites use unique prefixes such as lfst...): only names a lab
# makes count, i.e. "lab..." (the labs' convention) and layerfs's container
# veths "lfv<id>" (the runner's default naming).
LAB_NAME_PREFIXES = ("lab", "lfv")


def _under(path: str, lab_dir: Path) -> bool:
    d = str(lab_dir)
    return path == d or path.startswith(d + "/")


def find_leftovers(lab_dir: Path, before: Snapshot, sessions: Iterable[int]) -> list[str]:
    found = []
    for target, fstype, source in _mounts():
        if _under(target, lab_dir) or _under(source, lab_dir):
            found.append(f"mount {target} ({fstype})")
    for dev, backing in _loops().items():
        if _under(backing.removesuffix(" (deleted)"), lab_dir):
            found.append(f"loop device {dev} -> {backing}")
    now = Snapshot.take()
    found += [f"device-mapper device {n}" for n in sorted(now.dm - before.dm)]
    found += [f"network namespace {n}" for n in sorted(now.netns - before.netns)
              if n.startswith(LAB_NAME_PREFIXES)]
    found += [f"network interface {n}" for n in sorted(now.links - before.links)
              if n.startswith(LAB_NAME_PREFIXES)]
    found += [f"nft rule {r}" for r in sorted(now.nft - before.nft)]
    found += [f"cgroup {c}" for c in sorted(now.cgroups - before.cgroups)]
    sessions = set(sessions)
    for pid in _pids():
        try:
            if os.getsid(pid) in sessions:
                found.append(f"process {pid} ({_read(f'/proc/{pid}/comm').strip()})")
        except (ProcessLookupError, PermissionError):
            continue
    return found


def lab_container_ids(lab_dir: Path, max_depth: int = 4) -> set[str]:
    """Ids of the containers whose records are in a state directory below LAB_DIR
    (``.../containers/<id>/``): a container the runner failed to clean up keeps its
    record, so this names every container whose cgroup or nft rules a lab may leave."""
    ids: set[str] = set()
    top = str(lab_dir).rstrip("/")
    for dirpath, dirnames, _files in os.walk(top):
        if os.path.basename(dirpath) == "containers":
            ids.update(dirnames)
            dirnames[:] = []
        elif dirpath[len(top):].count("/") >= max_depth:
            dirnames[:] = []
    return ids


def _rule_container(rule: str) -> str:
    """The container id in a rule's ``comment "layerfs:<id>"``."""
    return rule.partition('comment "layerfs:')[2].partition('"')[0]


def remove_leftovers(lab_dir: Path, before: Snapshot, sessions: Iterable[int]) -> None:
    """Undo what a lab left: only what it made, by exact name: mounts and loop devices
    below LAB_DIR, dm devices, netns and veths new since it started (with a lab's
    names), and the nft rules and cgroups of the containers recorded below LAB_DIR
    (others' new ones are reported by :func:`find_leftovers`, never removed)."""
    for sid in sessions:
        _kill_session(sid)
    _unmount_and_detach_under(lab_dir)
    now = Snapshot.take()
    for name in sorted(now.dm - before.dm, reverse=True):
        subprocess.run(["dmsetup", "remove", "--force", name], capture_output=True)
    for ns in sorted(now.netns - before.netns):
        if ns.startswith(LAB_NAME_PREFIXES):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    for link in sorted(now.links - before.links):
        if link.startswith(LAB_NAME_PREFIXES):
            subprocess.run(["ip", "link", "delete", link], capture_output=True)
    ours = lab_container_ids(lab_dir)
    rules = {r for r in now.nft - before.nft if _rule_container(r) in ours}
    if rules:
        _delete_nft_rules(rules)
    for cg in sorted((c for c in now.cgroups - before.cgroups if Path(c).name in ours),
                     key=len, reverse=True):
        for sub in sorted(Path(cg).glob("**/"), key=lambda p: -len(str(p))):
            with contextlib.suppress(OSError):
                os.rmdir(sub)


def _unmount_and_detach_under(lab_dir: Path) -> None:
    """Mounts below LAB_DIR (or of a source there), then loop devices backed by a file
    there: what ``rm -rf --one-file-system`` cannot remove."""
    for target, _fstype, source in sorted(_mounts(), key=lambda m: -len(m[0])):
        if _under(target, lab_dir) or _under(source, lab_dir):
            subprocess.run(["umount", "-l", target], capture_output=True)
    for dev, backing in _loops().items():
        if _under(backing.removesuffix(" (deleted)"), lab_dir):
            subprocess.run(["losetup", "-d", dev], capture_output=True)


def _delete_nft_rules(rules: set[str]) -> None:
    try:
        out = subprocess.run(["nft", "-a", "list", "ruleset"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return
    family = table = chain = ""
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("table "):
            _, family, table, *_ = s.split()
        elif s.startswith("chain "):
            chain = s.split()[1]
        elif "# handle" in s:
            rule, _, handle = s.rpartition("# handle")
            if rule.strip() in rules:
                subprocess.run(["nft", "delete", "rule", family, table, chain, "handle",
                                handle.strip()], capture_output=True)


# --------------------------------------------------------------------------
# running a lab
# --------------------------------------------------------------------------


def _new_lab_dir(base: Path, lab: Lab) -> Path:
    if not base.exists():
        base.mkdir(parents=True)
        base.chmod(0o755)  # a container in a user namespace must be able to pass through
    return Path(tempfile.mkdtemp(prefix=f"{lab.path.stem[:24]}-", dir=base))


def run_lab(path: Path | str, *, base: Path | None = None, echo: TextIO | None = None,
            keep: bool = False, here: bool = False, daemon: bool = False) -> LabResult:
    """Run a whole lab and return what happened; never raises for a failing lab.

    A lab with ``runs-in: guest`` boots the qemu guest once and runs itself
    there (``here=True`` runs it on this machine whatever it says). With
    ``daemon``, every command goes through a ``layerfs daemon`` for its root,
    started on the root's first command; when the lab is done every daemon must
    stop cleanly and leave no process behind.
    """
    path = Path(path)
    try:
        lab = parse_lab(path)
    except (LabFormatError, OSError) as err:
        return LabResult(str(path), path.stem, [], 0.0, error=str(err))
    if lab.in_guest and not here and not host_can_run(lab):
        return _run_in_guest(lab, echo=echo)
    return _run_here(lab, base or DEFAULT_BASE, echo=echo, keep=keep, daemon=daemon)


def host_can_run(lab: Lab) -> bool:
    """Whether a ``runs-in: guest`` lab can run on this machine instead.

    Inside the guest, yes. Elsewhere only if the kernel has device-mapper (what
    the guest is for) and ``LAB_DISK`` names the spare disk the guest would
    otherwise provide, e.g. in the Vagrant VM; ``LAB_FORCE_GUEST=1`` boots the
    guest anyway.
    """
    if os.environ.get("LAYERFS_IN_GUEST") == "1":
        return True
    if os.environ.get("LAB_FORCE_GUEST") == "1" or not os.environ.get("LAB_DISK"):
        return False
    return any(line.split()[-1:] == ["device-mapper"]
               for line in _read("/proc/devices").splitlines())


def _say(echo: TextIO | None, text: str) -> None:
    if echo is not None:
        echo.write(text)
        echo.flush()


def _run_here(lab: Lab, base: Path, *, echo: TextIO | None, keep: bool,
              daemon: bool = False) -> LabResult:
    t0 = time.monotonic()
    lab_dir = _new_lab_dir(base, lab)
    work = Path(tempfile.mkdtemp(prefix="lab-run-"))  # state and output files, outside LAB_DIR
    state = work / "state.sh"
    env = lab_environment(lab_dir, state)
    before = Snapshot.take()
    sessions: list[int] = []
    results: list[BlockResult] = []
    leftovers: list[str] = []
    failed = False
    served = _LabDaemons(work, env) if daemon else None
    _say(echo, f"== {lab.title}  ({lab.path}; LAB_DIR={lab_dir})\n")
    try:
        for block in lab.blocks:
            if failed and not block.always:
                results.append(BlockResult(block.index, block.kind, block.line, block.heading,
                                           "skipped", reason="an earlier block failed"))
                continue
            _say(echo, f"\n-- block {block.index} ({block.kind}, line {block.line}) "
                       f"[{block.heading}]\n")
            if echo is not None:
                for line in block.code.rstrip("\n").splitlines():
                    echo.write(f"$ {line}\n")
            rc, seconds, output, sid = run_block(block, env, work / f"out-{block.index}.txt",
                                                 echo)
            sessions.append(sid)
            res = BlockResult(block.index, block.kind, block.line, block.heading, "passed",
                              rc, round(seconds, 3), output)
            if rc is None:
                res.status, res.reason = "timeout", f"still running after {block.timeout:.0f} s"
            elif rc != 0:
                res.status, res.reason = "failed", f"exit status {rc}"
            elif block.expect:
                why = check_expect(block.expect, output)
                if why:
                    res.status = "mismatch"
                    res.reason = f"{why} (expect block at line {block.expect_line})"
            if not res.ok:
                failed = True
            _say(echo, f"-- block {block.index}: {res.status} in {seconds:.2f} s"
                       f"{': ' + res.reason if res.reason else ''}\n")
            results.append(res)
        if served is not None:
            leftovers += served.stop()
        time.sleep(0.05)
        leftovers += find_leftovers(lab_dir, before, sessions)
        if leftovers:
            remove_leftovers(lab_dir, before, sessions)
    finally:
        if keep:
            _say(echo, f"kept LAB_DIR={lab_dir}\n")
        else:
            for sid in sessions:
                _kill_session(sid)
            # Also on Ctrl-C or a failure mid-lab, when remove_leftovers did not run.
            _unmount_and_detach_under(lab_dir)
            subprocess.run(["rm", "-rf", "--one-file-system", str(lab_dir)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    result = LabResult(str(lab.path), lab.title, results, round(time.monotonic() - t0, 2),
                       leftovers, "guest" if os.environ.get("LAYERFS_IN_GUEST") == "1" else "host",
                       daemon_commands=served.commands if served is not None else None)
    _say(echo, f"\n== {lab.path.name}: {'PASSED' if result.ok else 'FAILED'} in "
               f"{result.seconds:.1f} s\n")
    return result


def guest_command(lab: Lab, *, quiet: bool = True) -> tuple[list[str], float, str]:
    """What runs ``lab`` in the qemu guest: the command, its timeout and the disk size.
    The command writes the lab's result to ``lab.json`` in the guest's results folder."""
    from . import qemu

    timeout = float(lab.meta.get("guest-timeout", 0) or lab.budget + 60)
    python = REPO_ROOT / ".venv" / "bin" / "python"
    argv = [str(python), "-m", "tests.support.labs", "--here", "--json",
            f"{qemu.GUEST_RESULTS}/lab.json", str(lab.path.resolve())]
    if quiet:
        argv.insert(4, "--quiet")
    return argv, timeout, lab.meta.get("guest-disk", "4G")


GUEST_ENV = {"LAB_BASE": "/tmp/lfs-labs"}


def result_from_guest(lab: Lab, guest: qemu_types.GuestResult, results: Path,
                      seconds: float) -> LabResult:
    """The lab's result from a guest run of :func:`guest_command` (results in ``results``)."""
    out = results / "lab.json"
    if not out.exists():
        why = "timed out" if guest.timed_out else f"exit status {guest.returncode}"
        return LabResult(str(lab.path), lab.title, [], round(seconds, 2),
                         where="guest", boot_seconds=guest.boot_seconds,
                         error=f"the guest wrote no lab result ({why}):\n"
                               + guest.output[-6000:])
    result = LabResult.from_json(json.loads(out.read_text()))
    result.path = str(lab.path)
    result.where = "guest"
    result.boot_seconds = guest.boot_seconds
    result.seconds = round(seconds, 2)
    return result


def _run_in_guest(lab: Lab, *, echo: TextIO | None) -> LabResult:
    from . import qemu

    t0 = time.monotonic()
    argv, timeout, disk = guest_command(lab, quiet=echo is None)
    with tempfile.TemporaryDirectory(prefix="lab-guest-") as tmp:
        try:
            guest = qemu.run_in_guest(argv, timeout=timeout, disk_size=disk, results_dir=tmp,
                                      echo=echo is not None, stream=echo, env=GUEST_ENV)
        except qemu.GuestError as err:
            return LabResult(str(lab.path), lab.title, [], round(time.monotonic() - t0, 2),
                             where="guest", error=str(err))
        return result_from_guest(lab, guest, Path(tmp), time.monotonic() - t0)


def discover(directory: Path = LABS_DIR) -> list[Path]:
    """The labs, in curriculum order: ``docs/labs/NN-*.md``."""
    return sorted(p for p in directory.glob("[0-9]*.md") if p.is_file())


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _list(lab: Lab, write: Callable[[str], object]) -> None:
    where = "qemu guest" if lab.in_guest else "this machine"
    write(f"{lab.path}: {lab.title} — runs on {where}, {len(lab.blocks)} blocks, "
          f"budget {lab.budget:.0f} s\n")
    for b in lab.blocks:
        first = next((ln for ln in b.code.splitlines() if ln.strip()), "")
        write(f"  {b.index:2d} {b.kind:<11} line {b.line:<4} {b.heading[:34]:<34} "
              f"{len(b.expect)} patterns  {first[:50]}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.labs",
        description="Run teaching labs (docs/labs/*.md) as CI does: every `sh lab` block in "
                    "one shell state, output checked against the `text expect` blocks.")
    parser.add_argument("labs", nargs="*", type=Path,
                        help="lab files (default: every docs/labs/NN-*.md)")
    parser.add_argument("--list", action="store_true", help="show the blocks, run nothing")
    parser.add_argument("--keep", action="store_true",
                        help="keep LAB_DIR afterwards (and what is mounted in it)")
    parser.add_argument("--quiet", action="store_true", help="no live output, only a summary")
    parser.add_argument("--here", action="store_true",
                        help="run here even if the lab says runs-in: guest")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE,
                        help="where LAB_DIRs are made (default %(default)s)")
    parser.add_argument("--json", type=Path, help="write the result(s) as JSON")
    opts = parser.parse_args(argv)
    paths = opts.labs or discover()
    if opts.list:
        for p in paths:
            _list(parse_lab(p), sys.stdout.write)
        return 0
    results = []
    for p in paths:
        r = run_lab(p, base=opts.base, echo=None if opts.quiet else sys.stdout, keep=opts.keep,
                    here=opts.here)
        results.append(r)
        if not r.ok:
            print(r.report(), file=sys.stderr)
    if opts.json:
        data = results[0].to_json() if len(results) == 1 else [r.to_json() for r in results]
        tmp = opts.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, opts.json)
    print("\nsummary:")
    for r in results:
        bad = r.failed_block
        why = (r.error.splitlines()[0] if r.error else
               f"block {bad.index} (line {bad.line}) {bad.status}" if bad else
               "left things behind" if r.leftovers else "")
        boot = f", boot {r.boot_seconds:.1f} s" if r.boot_seconds else ""
        print(f"  {'PASS' if r.ok else 'FAIL'}  {r.seconds:6.1f} s{boot}  {r.path}  {why}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
