"""A service for the daemon tests: records its pid and arguments, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from layerfs.engines.server import setter_for_signals


def serve(root: Path, args: list[str]) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, setter_for_signals(stop))
    out = Path(args[0])
    # A thread, as grpcio would start: fine in a service, never in the supervisor.
    threading.Thread(target=stop.wait, daemon=True).start()
    with open(out, "a") as f:
        f.write(f"started {os.getpid()} {os.getppid()} {root} {' '.join(args[1:])}\n")
    stop.wait()
    with open(out, "a") as f:
        f.write(f"stopped {os.getpid()}\n")
    return 0


def mount_cycles(root: Path, args: list[str]) -> int:
    """``COUNT OUT``: mount and unmount the root's first layer COUNT times through the
    layer store, as a worker would (forked from the daemon, with what it installed),
    then write ``done`` to OUT and exit 0 (a service that is done is not restarted)."""
    from layerfs.layers import LayerStore

    count, out = int(args[0]), Path(args[1])
    with LayerStore.open(root) as store:
        layer = store.layers()[0].id
        for _ in range(count):
            store.mount(layer)
            store.unmount(layer)
    out.write_text("done\n")
    return 0
