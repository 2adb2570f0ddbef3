"""The lab runner itself (tests.support.labs): parsing, expectations, shell state, clean-up."""

from __future__ import annotations

import contextlib
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.support import labs


def write_lab(tmp_path: Path, body: str, name: str = "00-test.md") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def run(tmp_path: Path, body: str) -> labs.LabResult:
    base = tmp_path / "base"
    return labs.run_lab(write_lab(tmp_path, body), base=base)


def test_parse_blocks_expectations_and_front_matter(tmp_path: Path) -> None:
    path = write_lab(tmp_path, """\
        ---
        runs-in: guest
        guest-disk: 1G
        ---
        # Lab 0: a title

        ```sh
        echo not run
        ```

        ## Section

        ```sh lab timeout=7
        echo one
        ```

        Prose between a block and its expectations.

        ```text expect
        one
        ```

        ```text
        an ordinary text block
        ```

        ````sh lab-cleanup
        echo '```'
        ````
        """)
    lab = labs.parse_lab(path)
    assert lab.title == "Lab 0: a title"
    assert lab.in_guest and lab.meta["guest-disk"] == "1G"
    assert [(b.kind, b.timeout, b.expect, b.heading) for b in lab.blocks] == [
        ("lab", 7.0, ["one"], "Section"), ("lab-cleanup", labs.DEFAULT_TIMEOUT, [], "Section")]
    assert lab.blocks[1].code == "echo '```'\n"


@pytest.mark.parametrize("body", [
    "```text expect\nx\n```\n",                                    # no lab block before it
    "```sh lab\ntrue\n```\n```text expect\nre: (\n```\n",         # bad regex
    "```sh lab\ntrue\n",                                           # never closed
    "```sh lab\ntrue\n```\n```text expect\na\n```\n```text expect\nb\n```\n",
])
def test_format_errors(tmp_path: Path, body: str) -> None:
    with pytest.raises(labs.LabFormatError):
        labs.parse_lab(write_lab(tmp_path, body))


@pytest.mark.parametrize(("patterns", "output", "ok"), [
    (["first ... ms"], "first  append: 48 ms\n", True),            # ... and any whitespace
    (["a", "b"], "a\nb\n", True),
    (["b", "a"], "a\nb\n", False),                                 # order matters
    (["x 1", "re: ^x \\d$"], "x 1\n", True),                      # same line twice is fine
    (["re: ^\\d+ KiB$"], "65536 KiB\n", True),
    (["not: error"], "all good\n", True),
    (["not: error"], "an error\n", False),
    (["not re: ^E"], "E1\n", False),
    (["missing"], "", False),
])
def test_check_expect(patterns: list[str], output: str, ok: bool) -> None:
    assert (labs.check_expect(patterns, output) is None) == ok


def test_state_carries_and_cleanup_runs_after_a_failure(tmp_path: Path) -> None:
    result = run(tmp_path, """\
        ```sh lab
        x="two words"; declare -A m=([k]=v); f() { echo "f:$1"; }
        mkdir -p sub && cd sub
        test "$LAYERFS_ROOT" = "$LAB_DIR/root"
        ```

        ```sh lab
        echo "$x ${m[k]} $(f 1) $(basename "$PWD")"
        ```

        ```text expect
        two words v f:1 sub
        ```

        ```sh lab
        false
        echo never
        ```

        ```sh lab
        echo skipped
        ```

        ```sh lab-cleanup
        echo "cleanup sees $x"
        ```

        ```text expect
        cleanup sees two words
        ```
        """)
    assert [b.status for b in result.blocks] == ["passed", "passed", "failed", "skipped", "passed"]
    failed = result.failed_block
    assert failed is not None and failed.index == 3
    assert "exit status 1 from: false" in failed.output
    assert "never" not in failed.output
    assert not result.ok and "block 3" in result.report()


def test_expectation_mismatch_and_timeout(tmp_path: Path) -> None:
    result = run(tmp_path, """\
        ```sh lab
        echo actual
        ```

        ```text expect
        expected
        ```

        ```sh lab-cleanup timeout=1
        sleep 30
        ```
        """)
    assert [b.status for b in result.blocks] == ["mismatch", "timeout"]
    assert "'expected'" in result.blocks[0].reason


def test_bash_env_does_not_leak_into_scripts(tmp_path: Path) -> None:
    # ldd is a bash script with unset variables: set -u must not reach it
    result = run(tmp_path, """\
        ```sh lab
        ldd /bin/true > /dev/null
        bash -c 'echo "BASH_ENV=${BASH_ENV:-unset}"; case $- in *e*) echo errexit;; esac'
        ```

        ```text expect
        BASH_ENV=unset
        not: errexit
        ```
        """)
    assert result.ok, result.report()


def test_leftovers_are_reported_and_removed(tmp_path: Path) -> None:
    result = run(tmp_path, """\
        ```sh lab
        mkdir -p "$LAB_DIR/m" && mount -t tmpfs lab-leftover "$LAB_DIR/m"
        sleep 300 &
        ```
        """)
    assert result.blocks[0].status == "passed"
    assert any(x.startswith("mount ") and x.endswith("/m (tmpfs)") for x in result.leftovers)
    assert any(x.startswith("process ") and "(sleep)" in x for x in result.leftovers)
    assert not result.ok
    mounts = subprocess.run(["findmnt", "-rn", "-o", "SOURCE"], capture_output=True,
                            text=True).stdout.split()
    assert "lab-leftover" not in mounts
    assert not list((tmp_path / "base").iterdir()), "LAB_DIR was not removed"


def test_only_the_labs_own_containers_lose_their_cgroups(tmp_path: Path) -> None:
    """A cgroup that appeared under the runner's parent during the lab is removed only if
    it is a container recorded below LAB_DIR; another job's is reported, never removed."""
    parent = Path("/sys/fs/cgroup/pids/layerfs")
    ours, theirs = (f"lfstest{os.getpid()}{tag}" for tag in ("ours", "theirs"))
    created_parent = not parent.exists()
    try:
        result = run(tmp_path, f"""\
            ```sh lab
            mkdir -p "$LAB_DIR/root/containers/{ours}" {parent}/{ours} {parent}/{theirs}
            ```
            """)
        assert f"cgroup {parent}/{ours}" in result.leftovers, result.leftovers
        assert f"cgroup {parent}/{theirs}" in result.leftovers, result.leftovers
        assert not (parent / ours).exists()
        assert (parent / theirs).exists(), "another job's cgroup was removed"
    finally:
        for name in (ours, theirs):
            with contextlib.suppress(FileNotFoundError):
                (parent / name).rmdir()
        if created_parent:
            with contextlib.suppress(OSError):
                parent.rmdir()


def test_cli_list_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_lab(tmp_path, "# Lab 0: cli\n\n```sh lab\necho hi\n```\n\n```text expect\nhi\n```\n")
    assert labs.main(["--list", str(path)]) == 0
    assert "1 lab" in capsys.readouterr().out
    out = tmp_path / "r.json"
    assert labs.main(["--quiet", "--base", str(tmp_path / "b"), "--json", str(out), str(path)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert labs.LabResult.from_json(__import__("json").loads(out.read_text())).ok


def test_guest_labs_run_natively_only_with_device_mapper_and_a_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = labs.parse_lab(write_lab(tmp_path, "---\nruns-in: guest\n---\n# Lab 0: dm\n"))
    monkeypatch.delenv("LAYERFS_IN_GUEST", raising=False)
    monkeypatch.delenv("LAB_DISK", raising=False)
    assert not labs.host_can_run(lab)                  # no spare disk: the guest has one
    monkeypatch.setenv("LAB_DISK", "/dev/sdz")
    monkeypatch.setenv("LAB_FORCE_GUEST", "1")
    assert not labs.host_can_run(lab)
    monkeypatch.delenv("LAB_FORCE_GUEST")
    has_dm = "device-mapper" in Path("/proc/devices").read_text()
    assert labs.host_can_run(lab) == has_dm
    monkeypatch.setenv("LAYERFS_IN_GUEST", "1")
    assert labs.host_can_run(lab)
