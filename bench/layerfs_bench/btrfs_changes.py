"""btrfs: changes from btrfs's own trees (a tree search) vs the naive tree walk.

A 10 000-file layer, a child snapshot with 10 files changed; both ways of
computing the child's changes are timed (interleaved, medians) and must agree.
Also times snapshot creation. Run as root::

    .venv/bin/python -m layerfs_bench.btrfs_changes [--files 10000] [--changed 10] [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from layerfs import pool
from layerfs.changes import naive_changes
from layerfs.layers import LayerStore


def run(files: int = 10_000, changed: int = 10, runs: int = 7) -> dict[str, float]:
    scratch = Path(tempfile.mkdtemp(prefix="lfs-bench-btrfs-"))
    handle = pool.create_btrfs(scratch / "pool.img", scratch / "mnt", size=2 << 30)
    try:
        with LayerStore.open(handle.mountpoint / "layerfs", "btrfs") as store:
            base = store.create().id
            with store.mounted(base) as path:
                for i in range(files):
                    d = path / f"d{i % 100}"
                    d.mkdir(exist_ok=True)
                    (d / f"f{i}").write_bytes(b"x" * (i % 4096))
            image = store.create(base, readonly=True).id
            snap_times = []
            for _ in range(runs):
                t = time.perf_counter()
                box = store.create(image).id
                snap_times.append(time.perf_counter() - t)
                store.remove(box)
            box = store.create(image).id
            with store.mounted(box) as path:
                for i in range(changed):
                    (path / f"d{i * 7 % 100}" / f"f{i * 7}").write_bytes(b"changed")
            home = store.driver.home / "subvolumes"
            naive_t, native_t = [], []
            for _ in range(runs):
                t = time.perf_counter()
                expected = naive_changes(home / image, home / box)
                naive_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                got = store.changes(box)
                native_t.append(time.perf_counter() - t)
                assert got == expected, "tree-search changes differ from the naive walk"
            store.wipe()
        result = {"files": files, "changed": changed,
                  "naive_ms": statistics.median(naive_t) * 1000,
                  "native_ms": statistics.median(native_t) * 1000,
                  "snapshot_ms": statistics.median(snap_times) * 1000}
        result["speedup"] = result["naive_ms"] / result["native_ms"]
        return result
    finally:
        pool.destroy_btrfs(handle.mountpoint)
        os.rmdir(scratch / "mnt")
        os.rmdir(scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    r = run(args.files, args.changed, args.runs)
    print(f"{r['files']} files, {r['changed']} changed: naive walk {r['naive_ms']:.1f} ms, "
          f"tree search {r['native_ms']:.1f} ms, speed-up {r['speedup']:.1f}x; "
          f"snapshot create {r['snapshot_ms']:.2f} ms")


if __name__ == "__main__":
    main()
