"""The rich consoles commands render with: ``out`` (stdout) and ``err`` (stderr).

Made on first use (``from .console import out`` inside a command, or
``console.out``), not at import: importing rich costs tens of ms that ``layerfs
run``, ``--help`` and ``--version`` never need, and a Console reads the terminal
and the environment (width, colours, NO_COLOR) when it is made, so it must be
made by the process that prints. ``layerfs daemon`` imports the command modules
ahead of time; each worker makes its own consoles for its client's terminal.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from rich.console import Console

    out: Console
    err: Console


def __getattr__(name: str) -> Console:
    if name not in ("out", "err"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    console = Console(stderr=name == "err")
    globals()[name] = console
    return console
