"""Helper the containerd testsuite program (gosuite/) starts for each of its tests.

    python -m tests.engines.suite_helper serve ROOT SOCKET   # serve, print "ready"
    python -m tests.engines.suite_helper wipe ROOT           # remove every layer, check mounts

The driver comes from ``LAYERFS_SUITE_DRIVER`` (devicemapper gets the small
test pool of tests/dm_fixtures.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from layerfs import mount as mountlib
from layerfs.engines import serve
from layerfs.layers import LayerStore

from ..dm_fixtures import options_for


def main(argv: list[str]) -> int:
    # The suite runs with umask 0 (it checks modes it creates); layerfs's own
    # directories should not inherit that.
    os.umask(0o022)
    driver = os.environ["LAYERFS_SUITE_DRIVER"]
    if argv[0] == "serve":
        serve(argv[1], driver, options_for(driver, None), snapshotter_socket=argv[2],
              on_ready=lambda: print("ready", flush=True))
        return 0
    if argv[0] == "wipe":
        root = Path(argv[1])
        store = LayerStore.open(root, driver)
        store.wipe()
        store.close()
        leaked = [m.target for m in mountlib.mounts_under(root)]
        for target in leaked:
            mountlib.unmount(target, lazy=True)
        if leaked:
            print(f"suite_helper: mounts left under {root}: {leaked}", file=sys.stderr)
            return 1
        return 0
    print(f"suite_helper: unknown command {argv[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
