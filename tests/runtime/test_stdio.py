"""The container's stdio: relayed pipes, never the caller's files (issue 20, item 4)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from layerfs.runtime import RuntimeConfig, start

from .helpers import STARTED, sh

# What a hostile container tries with its stdout: learn the host path, read what the
# file held before, overwrite it (reopening /proc/self/fd/1 gets round O_APPEND).
PROBE = ("readlink /proc/self/fd/1; timeout 1 cat /proc/self/fd/1 2>/dev/null | "
         "grep -c PRIOR-SECRET; echo clobbered > /proc/self/fd/1; echo done")


def test_the_callers_file_is_out_of_reach(rootfs: Path, state: Path,
                                          config: RuntimeConfig) -> None:
    target = state / "caller-output.log"
    target.write_text("PRIOR-SECRET\n")
    with open(target, "ab") as out, open(os.devnull, "rb") as null:
        c = start(sh(rootfs, PROBE), state, config, stdin=null, stdout=out, stderr=out)
    STARTED.append(c)
    assert c.wait(timeout=20).code == 0
    text = target.read_text()
    # (sh may report the timed-out cat as "Terminated" at any point)
    lines = [line for line in text.splitlines() if line != "Terminated"]
    assert lines[0] == "PRIOR-SECRET", text            # still there, untouched
    assert lines[1].startswith("pipe:["), text         # not the host path
    assert str(target) not in text
    assert lines[2] == "0" and lines[-2:] == ["clobbered", "done"], text   # read nothing


def test_passthrough_hands_the_descriptor_over(rootfs: Path, state: Path,
                                               config: RuntimeConfig) -> None:
    # What the flag documents: the old behaviour, the file itself.
    target = state / "passthrough.log"
    target.write_text("PRIOR-SECRET\n")
    with open(target, "ab") as out, open(os.devnull, "rb") as null:
        c = start(sh(rootfs, "readlink /proc/self/fd/1"), state, config, stdin=null,
                  stdout=out, stderr=out, passthrough=True)
    STARTED.append(c)
    assert c.wait(timeout=20).code == 0
    assert target.read_text() == f"PRIOR-SECRET\n{target}\n"


def test_stdin_and_output_flow_together(rootfs: Path, state: Path,
                                        config: RuntimeConfig) -> None:
    """8 MiB in, the same 8 MiB echoed out while it is still coming in: the relay never
    blocks on one direction while the container waits on the other."""
    data = os.urandom(8 << 20)
    in_r, in_w = os.pipe()
    out_path = state / "echo.out"
    with open(out_path, "wb") as out:
        c = start(sh(rootfs, "cat; echo end >&2"), state, config, stdin=in_r, stdout=out,
                  stderr=out)
    os.close(in_r)
    STARTED.append(c)

    def feed() -> None:
        with os.fdopen(in_w, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    assert c.wait(timeout=60).code == 0
    writer.join()
    got = out_path.read_bytes()
    assert got[:len(data)] == data and got[len(data):] == b"end\n"


def test_a_closed_reader_does_not_stall_the_container(rootfs: Path, state: Path,
                                                      config: RuntimeConfig) -> None:
    # Our stdout's reader goes away (`layerfs run ... | head -1`): the container still
    # finishes, and its output still reaches the log.
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
    assert reader.stdin is not None
    with open(os.devnull, "rb") as null:
        c = start(sh(rootfs, "seq 1 200000; echo finished"), state, config, stdin=null,
                  stdout=reader.stdin, stderr=reader.stdin, log=True)
    reader.stdin.close()
    STARTED.append(c)
    assert c.wait(timeout=60).code == 0
    reader.wait()
    assert c.log_path.read_text().endswith("200000\nfinished\n")


def test_stdout_and_stderr_to_one_file_keep_their_order(rootfs: Path, state: Path,
                                                         config: RuntimeConfig) -> None:
    # `layerfs run … 2>&1 | less`: two descriptors, one pipe. The container's lines
    # arrive in the order it wrote them, as they would without the relay (lab 7's
    # "can't fork" line came after the line printed after it).
    script = "i=0; while [ $i -lt 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    read_end, write_end = os.pipe()
    second = os.dup(write_end)              # another descriptor for the same pipe
    with open(os.devnull, "rb") as null:
        c = start(sh(rootfs, script), state, config, stdin=null, stdout=write_end,
                  stderr=second)
    os.close(write_end)
    os.close(second)
    STARTED.append(c)
    with os.fdopen(read_end, "rb") as pipe:
        got = pipe.read().decode().split()
    assert c.wait(timeout=30).code == 0
    want = [f"{kind}{i}" for i in range(300) for kind in ("out", "err")]
    assert got == want
