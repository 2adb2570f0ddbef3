"""Every ``--help`` page teaches: every option says what it does, and every command shows
examples (docs/runner.md promises examples on every page)."""

from __future__ import annotations

import argparse
import re
import shlex
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


def example_commands(page: argparse.ArgumentParser) -> Iterator[list[str]]:
    """The ``layerfs ...`` commands in a page's examples (indented lines), as words: a
    description after two or more spaces or a ``#`` is dropped; ``;``, ``&&`` and ``|``
    separate commands, and those in ``$(...)`` count too."""
    epilog = page.epilog or ""
    for line in epilog.split("examples:", 1)[-1].splitlines():
        if not line.startswith("  "):
            continue   # prose below the examples
        code = re.split(r"\s{2,}|\s#", line.strip(), maxsplit=1)[0]
        inner = re.findall(r"\$\(([^)]*)\)", code)   # base=$(layerfs layer apply ...)
        for part in [re.sub(r"\$\([^)]*\)", "WORD", code), *inner]:
            yield from _commands(part)


def _commands(code: str) -> Iterator[list[str]]:
    """The ``layerfs`` commands of one shell line without ``$(...)``; redirections
    (``> FILE``, ``2> FILE``) are dropped."""
    lexer = shlex.shlex(code, posix=True, punctuation_chars=";&|>")
    lexer.whitespace_split = True
    command: list[str] = []
    skip_next = False
    for word in [*lexer, ";"]:
        if skip_next:
            skip_next = False
        elif word.startswith(">"):
            skip_next = True
            if command and command[-1].isdigit():
                command.pop()   # the 2 of 2>
        elif word.strip(";&|"):
            command.append(word)
        else:
            if command[:1] == ["layerfs"]:
                yield command
            command = []


PARSER = build_parser()
EXAMPLES = sorted({shlex.join(cmd) for page in PAGES.values() for cmd in example_commands(page)})


def test_examples_are_found() -> None:
    assert len(EXAMPLES) > 80
    assert "layerfs --driver btrfs info" in EXAMPLES


@pytest.mark.parametrize("command", EXAMPLES)
def test_every_example_parses(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An example whose command or option was renamed fails here, not on a user."""
    try:
        _args, extra = PARSER.parse_known_args(shlex.split(command)[1:])
    except SystemExit:
        pytest.fail(f"`{command}`: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not extra, f"`{command}`: layerfs does not take {extra}"
