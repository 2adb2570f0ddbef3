"""The rich consoles commands render with: ``out`` (stdout) and ``err`` (stderr).

A module of its own so that importing rich (tens of ms) is paid only by commands that
draw tables or progress, never by ``layerfs run``.
"""

from rich.console import Console

out = Console()
err = Console(stderr=True)
