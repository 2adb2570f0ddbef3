"""A service for the daemon tests: records its pid and arguments, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path


def serve(root: Path, args: list[str]) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = Path(args[0])
    # A thread, as grpcio would start: fine in a service, never in the supervisor.
    threading.Thread(target=stop.wait, daemon=True).start()
    with open(out, "a") as f:
        f.write(f"started {os.getpid()} {os.getppid()} {root} {' '.join(args[1:])}\n")
    stop.wait()
    with open(out, "a") as f:
        f.write(f"stopped {os.getpid()}\n")
    return 0
