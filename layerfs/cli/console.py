"""The rich consoles commands render with (``out`` for stdout, ``err`` for stderr), and
:func:`print_table`, the one way a command prints a table.

A module of its own so that importing rich (tens of ms) is paid only by commands that
draw tables or progress, never by ``layerfs run``. The consoles are made on first use
(``from .console import out`` inside a command, or ``console.out``), not at import: a
Console reads the terminal and the environment (width, colours, NO_COLOR) when it is
made, so it must be made by the process that prints. ``layerfs daemon`` imports this
module ahead of time; each worker makes its own consoles for its client's terminal.

Tables are drawn with rich on a terminal. Piped or redirected, they are plain rows
the way ``docker ps | cat`` prints them: a header line, then one line per row, the
columns padded with spaces, nothing cut, no title and no box, whatever ``COLUMNS``
says -- so that ``grep``, ``awk``, ``cut`` and ``sort`` work on them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

TYPE_CHECKING = False       # rich loads when something is printed
if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    out: Console
    err: Console


def __getattr__(name: str) -> Console:
    if name not in ("out", "err"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    console = Console(stderr=name == "err")
    globals()[name] = console
    return console


def _console(name: str) -> Console:
    made: Console | None = globals().get(name)
    return made if made is not None else __getattr__(name)

#: Spaces between plain columns (Docker's tabwriter uses at least 3).
PLAIN_GAP = 3

if TYPE_CHECKING:
    Cell = str | Text


def plain(cell: Cell) -> str:
    return cell if isinstance(cell, str) else cell.plain   # a str needs no rich


def plain_rows(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> list[str]:
    """Header and rows as aligned lines, full width, without trailing spaces."""
    table = [list(columns)] + [[plain(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = []
    for line in table:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])]
        lines.append((" " * PLAIN_GAP).join([*padded, line[-1]]).rstrip())
    return lines


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Cell]], *,
                title: str | None = None, caption: str | None = None,
                no_trunc: bool = False, titled_when_piped: bool = False,
                right: Sequence[str] = ()) -> None:
    """Print a table: rich on a terminal, plain rows otherwise (see the module docstring).

    ``no_trunc``: on a terminal, long cells wrap instead of ending in an ellipsis.
    ``titled_when_piped``: keep the title (and caption) as lines of their own when piped,
    for commands that print several tables (the bench). ``right``: right-justified columns.
    """
    out = _console("out")
    if not out.is_terminal:
        lines = plain_rows(columns, rows)
        if titled_when_piped and title:
            lines.insert(0, title)
        if titled_when_piped and caption:
            lines.append(caption)
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, col in enumerate(columns):
        last = i == len(columns) - 1
        table.add_column(col, justify="right" if col in right else "left",
                         overflow="fold" if no_trunc else "ellipsis",
                         no_wrap=not no_trunc and not last)
    for row in rows:   # a str is text, not rich markup (paths may hold brackets)
        table.add_row(*(c if isinstance(c, Text) else Text(c) for c in row))
    out.print(table)


__all__ = ["err", "out", "plain_rows", "print_table"]
