"""Bar chart of read throughput per tool from a bench JSON file.

    chart.py BENCH.json OUT.png

Run with the bench venv's Python (matplotlib lives there, not in snapfs's
venv). Left: large-file MB/s (cold, warm, cache). Right: small files/s
(cold and warm, 8 readers). Both on log scales, because native and the FUSE
peers are orders of magnitude apart.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TOOLS = ["native", "fuse-limit", "snapfs", "juicefs", "restic", "s3fs", "rclone-off", "rclone-full"]
LARGE = [("large_cold", "cold"), ("large_warm", "warm"), ("large_cache", "cache")]
SMALL = [("small_cold_8r", "cold, 8 readers"), ("small_warm_8r", "warm, 8 readers")]


def main() -> int:
    data = json.load(open(sys.argv[1]))
    values = {(r["tool"], r["metric"]): r["value"] for r in data["rows"]}
    tools = [t for t in TOOLS if any((t, m) in values for m, _ in LARGE + SMALL)]
    raw_get = values.get(("boto3", "large_get"))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, series, unit, log in ((axes[0], LARGE, "MB/s", True), (axes[1], SMALL, "files/s", True)):
        width = 0.8 / len(series)
        for i, (metric, label) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(tools))]
            ys = [values.get((t, metric), 0) for t in tools]
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(tools)), tools, rotation=30, ha="right")
        ax.set_ylabel(unit)
        if log:
            ax.set_yscale("log")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("large files")
    axes[1].set_title("small files")
    if raw_get:
        axes[0].axhline(raw_get, color="grey", linestyle="--", linewidth=1)
        axes[0].annotate(
            f"raw parallel GET {raw_get:,.0f} MB/s", (0, raw_get), textcoords="offset points", xytext=(0, 4)
        )
    size = data.get("meta", {}).get("size", "?")
    fig.suptitle(f"snapfs bench, read throughput (size {size})")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
