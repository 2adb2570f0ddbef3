"""PNG charts of a bench report (matplotlib, Agg backend: no display needed).

:func:`plot_all` writes, for whatever the report holds:

``copy_up.png``
    First 1-byte append to a lower file against the file size (log-log), one
    line per target with its min-max band; the second append dashed. chmod
    copy-up on the right, with overlay2 metacopy.
``stat_depth.png``
    stat() of the bottom-layer file at the deepest D against the number of
    layers L: right after mounting, cold (drop_caches) and warm; and the aufs
    FUSE filesystem's counted lookups against the seed's L x D.
``inodes_per_layer.png``
    Inodes and bytes each image layer adds, what one whiteout costs, and the
    bytes a 4 KiB write into a big lower file costs the container layer.
``mount_depth.png``
    Mounting a container layer against the number of image layers below it.

Redraw from a saved run: ``python -m layerfs_bench.plots out.json DIR``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from .harness import Report, Result, load_json

DPI = 110


def _size_label(n: float) -> str:
    n = int(n)
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g}{unit}"
    return str(n)


def _colors(report: Report) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(report.target_labels())}


def _ms(r: Result, value: float) -> float:
    return value / 1000 if r.unit == "us" else value * 1000 if r.unit == "s" else value


def _series(results: Sequence[Result], key: str) -> tuple[list[float], list[float], list[float],
                                                           list[float]]:
    rows = sorted(results, key=lambda r: r.params[key])
    return ([r.params[key] for r in rows], [r.median for r in rows], [r.min for r in rows],
            [r.max for r in rows])


def _log_axis(ax: Axes, xs: Sequence[float], labels: bool = False) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda v, _: _size_label(v) if labels else f"{v:g}"))


def _finish(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _subtitle(report: Report) -> str:
    return f"layerfs bench, {report.profile} profile - kernel {report.host['kernel']}, " \
           f"{report.host['cpu']} x{report.host['cpus']}"


# --- copy-up -------------------------------------------------------------------------------------

def plot_copy_up(report: Report, path: Path) -> Path | None:
    firsts = report.find("copy-up", "first_write")
    if not firsts:
        return None
    colors = _colors(report)
    chmods = report.find("copy-up", "first_chmod")
    fig, axes = plt.subplots(1, 2 if chmods else 1, figsize=(12 if chmods else 7.5, 5),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 2]} if chmods else {})
    ax = axes[0][0]
    allx: list[float] = []
    for label in report.target_labels():
        mine = [r for r in firsts if r.target == label]
        if not mine:
            continue
        xs, med, lo, hi = _series(mine, "size")
        allx += xs
        c = colors[label]
        ax.plot(xs, med, "o-", color=c, label=label, lw=2)
        ax.fill_between(xs, lo, hi, color=c, alpha=0.15, lw=0)
        second = report.find("copy-up", "second_write", label)
        if second:
            xs2, med2, _, _ = _series(second, "size")
            ax.plot(xs2, med2, "--", color=c, lw=1, alpha=0.8)
    ax.set_yscale("log")
    _log_axis(ax, allx, labels=True)
    ax.set_xlabel("size of the lower file")
    ax.set_ylabel("time of the 1-byte append (ms, log)")
    ax.set_title("first write to a lower file (solid) vs the second (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="target (band: min-max)", fontsize=9)
    if chmods:
        ax2 = axes[0][1]
        sizes = sorted({r.params["size"] for r in chmods})
        groups = []
        for label in report.target_labels():
            for meta in (False, True):
                rows = [r for r in chmods if r.target == label and r.params.get("metacopy") == meta]
                if rows:
                    groups.append((f"{label}{' metacopy' if meta else ''}", label, meta, rows))
        width = 0.8 / max(1, len(groups))
        for gi, (name, label, meta, rows) in enumerate(groups):
            by = {r.params["size"]: r for r in rows}
            xs = [i + gi * width for i, s in enumerate(sizes) if s in by]
            ys = [by[s].median for s in sizes if s in by]
            ax2.bar(xs, ys, width, color=colors[label], label=name,
                    hatch="//" if meta else None, edgecolor="white" if meta else None)
        ax2.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(sizes))])
        ax2.set_xticklabels([_size_label(s) for s in sizes])
        ax2.set_yscale("log")
        ax2.set_xlabel("size of the lower file")
        ax2.set_ylabel("first chmod (ms, log)")
        ax2.set_title("chmod of a lower file")
        ax2.grid(True, axis="y", which="both", alpha=0.3)
        ax2.legend(fontsize=8)
    fig.suptitle(_subtitle(report), fontsize=9, y=0.995, color="gray")
    return _finish(fig, path)


# --- stat vs depth -------------------------------------------------------------------------------

def plot_stat_depth(report: Report, path: Path) -> Path | None:
    stats = report.find("stat-lookup", "stat", position="bottom")
    if not stats:
        return None
    deepest = max(r.params["depth"] for r in stats)
    colors = _colors(report)
    counts = report.find("stat-lookup", "lookups", cache="first")
    panels = [("first", "right after mounting (backing fs cached)"),
              ("cold", "cold: after sync + drop_caches"), ("warm", "warm (dentry cache)")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    flat = [axes[0][0], axes[0][1], axes[1][0], axes[1][1]]
    for ax, (cache, title) in zip(flat, panels, strict=False):
        allx: list[float] = []
        for label in report.target_labels():
            mine = [r for r in stats if r.target == label and r.params["cache"] == cache
                    and r.params["depth"] == deepest]
            if not mine:
                continue
            xs, med, lo, hi = _series(mine, "layers")
            allx += xs
            ax.plot(xs, med, "o-", color=colors[label], label=label, lw=2)
            ax.fill_between(xs, lo, hi, color=colors[label], alpha=0.15, lw=0)
        if allx:
            _log_axis(ax, allx)
        if cache == "warm":  # flat on every driver: a linear axis from 0 shows it
            ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.3)
            ax.set_ylabel("one stat() (µs)")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("one stat() (µs, log)")
        ax.set_xlabel("layers in the stack (L)")
        ax.set_title(f"{title}, D={deepest}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = flat[3]
    if counts:
        depths = sorted({r.params["depth"] for r in counts})
        cmap = plt.get_cmap("viridis")
        allx = []
        for i, depth in enumerate(depths):
            for position, marker in (("bottom", "o"), ("top", "^")):
                mine = [r for r in counts if r.params["depth"] == depth
                        and r.params["position"] == position]
                if not mine:
                    continue
                xs, med, _, _ = _series(mine, "layers")
                allx += xs
                color = cmap(i / max(1, len(depths) - 1) * 0.85)
                ax.plot(xs, med, marker, color=color, ms=7 if position == "bottom" else 6,
                        label=f"D={depth} {position} file ({mine[0].target})")
                ax.plot(xs, [x * depth for x in xs], "-", color=color, lw=1, alpha=0.7)
        _log_axis(ax, allx)
        ax.set_yscale("log")
        ax.set_xlabel("layers in the stack (L)")
        ax.set_ylabel("backing lookups for one stat() (log)")
        ax.set_title("aufs FUSE: counted lookups (markers) vs the seed's L x D (lines)",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no lookup counters in this run\n(they come from the aufs driver's "
                "FUSE filesystem)", ha="center", va="center", color="gray")
    fig.suptitle(_subtitle(report), fontsize=9, color="gray")
    return _finish(fig, path)


# --- inodes and bytes per layer ------------------------------------------------------------------

def plot_inodes(report: Report, path: Path) -> Path | None:
    inodes = report.find("layers", "layer_inodes")
    if not inodes:
        return None
    colors = _colors(report)
    labels = [label for label in report.target_labels() if report.find("layers", "layer_inodes",
                                                                       label)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8))
    shape = inodes[0].params

    def bars(ax: Axes, metric: str, scenario: str, transform: Any = None) -> None:
        for i, label in enumerate(labels):
            rows = report.find(scenario, metric, label)
            if not rows:
                continue
            r = rows[0]
            value = transform(r) if transform else r.median
            ax.bar(i, value, color=colors[label])
            ax.text(i, value, _short(value), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right")
        ax.grid(True, axis="y", alpha=0.3)

    bars(axes[0], "layer_inodes", "layers")
    axes[0].set_ylabel("inodes (median over image layers)")
    axes[0].set_title(f"inodes per image layer\n(base: {shape.get('base_dirs')} dirs, "
                      f"{shape.get('base_files')} files; each layer changes 1 file, adds 1)",
                      fontsize=10)
    axes[0].set_ylim(0, axes[0].get_ylim()[1] * 1.3)
    axes[0].text(0.02, 0.97, "btrfs and vfs count every inode the layer's tree holds;\n"
                 "btrfs shares them with the parent (copy-on-write)", transform=axes[0].transAxes,
                 va="top", fontsize=7, color="dimgray")
    excl = {r.target: r for r in report.find("layers", "layer_exclusive_bytes")}
    bars(axes[1], "layer_bytes", "layers",
         lambda r: excl[r.target].median if r.target in excl else r.median)
    axes[1].set_yscale("symlog", linthresh=4096)
    top = max(1 << 20, axes[1].get_ylim()[1])
    ticks = [0] + [1 << k for k in range(12, 41, 4) if 1 << k <= top * 4]
    axes[1].yaxis.set_major_locator(FixedLocator(ticks))
    axes[1].yaxis.set_minor_locator(NullLocator())
    axes[1].yaxis.set_major_formatter(FuncFormatter(lambda v, _: _size_label(v) if v else "0"))
    axes[1].set_ylim(0, top * 6)
    axes[1].set_ylabel("bytes (symlog)")
    axes[1].set_title("bytes per image layer", fontsize=10)
    if excl:
        axes[1].text(0.02, 0.97, "btrfs: exclusive bytes (extents only this layer references;\n"
                     "small files live inline in metadata and count nowhere)",
                     transform=axes[1].transAxes, va="top", fontsize=7, color="dimgray")
    wh = report.find("whiteout", "whiteout_inodes")
    if wh:
        bars(axes[2], "whiteout_inodes", "whiteout")
        axes[2].axhline(0, color="black", lw=0.8)
        axes[2].set_ylabel("inodes per deleted lower file")
        axes[2].set_title("what one deletion costs the container layer\n(negative: the copy "
                          "is freed)", fontsize=10)
    else:
        axes[2].axis("off")
    fig.suptitle(_subtitle(report), fontsize=9, color="gray")
    return _finish(fig, path)


def _short(v: float) -> str:
    if abs(v) >= 1 << 20:
        return f"{v / (1 << 20):.3g}M"
    if abs(v) >= 10000:
        return f"{v / 1024:.0f}K"
    return f"{v:.3g}"


# --- mount time vs depth -------------------------------------------------------------------------

def plot_mount_depth(report: Report, path: Path) -> Path | None:
    mounts = report.find("layers", "mount")
    if not mounts:
        return None
    colors = _colors(report)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    allx: list[float] = []
    for label in report.target_labels():
        mine = [r for r in mounts if r.target == label]
        if not mine:
            continue
        xs, med, lo, hi = _series(mine, "image_layers")
        allx += xs
        ax.plot(xs, [_ms(mine[0], v) for v in med], "o-", color=colors[label], label=label)
        ax.fill_between(xs, [_ms(mine[0], v) for v in lo], [_ms(mine[0], v) for v in hi],
                        color=colors[label], alpha=0.15, lw=0)
    _log_axis(ax, allx)
    ax.set_yscale("log")
    ax.set_xlabel("image layers below the container layer")
    ax.set_ylabel("mount (ms, log)")
    ax.set_title("mounting a container layer vs stack depth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(_subtitle(report), fontsize=9, color="gray")
    return _finish(fig, path)


def plot_all(report: Report, out_dir: Path) -> list[Path]:
    """Every chart the report has data for; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fn, name in ((plot_copy_up, "copy_up.png"), (plot_stat_depth, "stat_depth.png"),
                     (plot_inodes, "inodes_per_layer.png"),
                     (plot_mount_depth, "mount_depth.png")):
        p = fn(report, out_dir / name)
        if p is not None:
            written.append(p)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Charts from a `layerfs bench --json` file.")
    parser.add_argument("report", help="results JSON")
    parser.add_argument("out_dir", help="directory for the PNG files")
    args = parser.parse_args(argv)
    for p in plot_all(load_json(args.report), Path(args.out_dir)):
        print(p)


if __name__ == "__main__":
    main()


__all__ = ["plot_all", "plot_copy_up", "plot_inodes", "plot_mount_depth", "plot_stat_depth"]
