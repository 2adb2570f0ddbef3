"""Every ``--help`` page teaches: every option says what it does, and every command shows
examples (docs/runner.md promises examples on every page)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from layerfs.cli import build_parser


def pages(parser: argparse.ArgumentParser, name: str = "layerfs") -> Iterator[
        tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from pages(sub, f"{name} {sub_name}")


PAGES = dict(pages(build_parser()))


def test_every_command_is_found() -> None:
    assert {"layerfs layer apply", "layerfs info", "layerfs run", "layerfs system reset",
            "layerfs image prune"} <= set(PAGES)


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_option_has_help(name: str) -> None:
    missing = [", ".join(a.option_strings) for a in PAGES[name]._actions
               if a.option_strings and a.help is None]
    assert not missing, f"`{name} --help` says nothing about {missing}"


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_page_has_examples(name: str) -> None:
    epilog = PAGES[name].epilog or ""
    assert "examples:" in epilog and "layerfs" in epilog.split("examples:", 1)[1], \
        f"`{name} --help` has no examples"


def test_a_mistyped_option_prints_the_commands_own_usage() -> None:
    for argv, usage in ((["run", "--nosuch", "busybox"], "usage: layerfs run "),
                        (["layer", "apply", "--nope", "x.tar"], "usage: layerfs layer apply "),
                        (["system", "prune", "--yes"], "usage: layerfs system prune ")):
        proc = subprocess.run([sys.executable, "-m", "layerfs", *argv], capture_output=True,
                              text=True)
        assert proc.returncode == 2, proc
        assert proc.stderr.startswith(usage), proc.stderr
        assert "unrecognized arguments" in proc.stderr.splitlines()[-1]
