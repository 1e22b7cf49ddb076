"""Targets (DESIGN.md §4, issues 2 and 6), the markdown tables, the JSON and the chart."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from .common import BENCH_VENV, Results

log = logging.getLogger(__name__)

READ_PEERS = ("juicefs", "restic", "s3fs", "rclone-off", "rclone-full")
TOOL_ORDER = [
    "native",
    "fuse-limit",
    "boto3",
    "b3sum",
    "snapfs",
    "juicefs",
    "restic",
    "s3fs",
    "rclone-off",
    "rclone-full",
    "snapdir",
    "dvc",
    "data",
    "snapfs-1m",
]

READ_COLUMNS = [
    ("large_cold", "large cold MB/s"),
    ("large_warm", "large warm MB/s"),
    ("large_folios", "large folios %"),
    ("large_cache", "large cache MB/s"),
    ("cache_files", "cache files MB/s"),
    ("small_cold_1r", "small cold 1r files/s"),
    ("small_cold_8r", "small cold 8r files/s"),
    ("small_warm_1r", "small warm 1r files/s"),
    ("small_warm_8r", "small warm 8r files/s"),
    ("small_cache_8r", "small cache 8r files/s"),
    ("find_s", "find s"),
    ("lslR_s", "ls -lR s"),
    ("mount_ls_s", "mount+ls s"),
    ("rss_mb", "RSS MB"),
    ("cpu_s", "CPU s"),
]
SNAP_COLUMNS = [
    ("id", "id MB/s"),
    ("push_s", "push s"),
    ("push_mb", "pushed MB"),
    ("repush_s", "re-push s"),
    ("repush_mb", "re-push MB"),
    ("pull_s", "pull s"),
    ("prewarm", "prewarm MB/s"),
    ("large_get", "GET large MB/s"),
    ("same_get", "GET chunks MB/s"),
    ("small_get", "GET small obj/s"),
    ("all_get", "GET all MB/s"),
    ("changed_mb", "changed MB"),
    ("cdc_changed_mb", "changed chunks MB"),
]
SCALE_COLUMNS = [
    ("scale_gen_s", "generate s"),
    ("push_s", "push s"),
    ("mount_s", "mount s"),
    ("first_ls_s", "first ls s"),
    ("find_s", "find s"),
    ("rss_mb", "RSS after find MB"),
    ("repush_s", "re-push s"),
    ("diff_s", "diff s"),
]


@dataclasses.dataclass
class Target:
    name: str
    target: str
    value: float | None = None
    reference: float | None = None
    reference_label: str = ""
    ratio: float | None = None
    required: float | None = None
    met: bool | None = None
    missing: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["status"] = (
            "met" if self.met else ("unmet" if self.met is False else f"not measured: {self.missing}")
        )
        return out


def _ratio_at_least(
    name: str, target: str, value: float | None, ref: float | None, label: str, need: float
) -> Target:
    t = Target(name, target, value, ref, label, required=need)
    if value is None or ref is None or ref <= 0:
        t.missing = (
            ", ".join(w for w, v in (("snapfs", value), (label or "reference", ref)) if v is None) or "zero"
        )
        return t
    t.ratio = value / ref
    t.met = t.ratio >= need
    return t


def _ratio_at_most(
    name: str, target: str, value: float | None, ref: float | None, label: str, need: float
) -> Target:
    t = _ratio_at_least(name, target, value, ref, label, need)
    if t.ratio is not None:
        t.met = t.ratio <= need
    return t


def _below(name: str, target: str, value: float | None, limit: float) -> Target:
    t = Target(name, target, value, limit, "limit", required=limit)
    if value is None:
        t.missing = "snapfs"
        return t
    t.ratio = value / limit
    t.met = value < limit
    return t


def _best_peer(results: Results, metric: str) -> tuple[float | None, str]:
    best: tuple[float | None, str] = (None, "best peer")
    for peer in READ_PEERS:
        value = results.get(peer, metric)
        if value is not None and (best[0] is None or value > best[0]):
            best = (value, f"best peer ({peer})")
    return best


def targets(results: Results) -> list[Target]:
    g = results.get
    snap = "snapfs"
    out = [
        _ratio_at_least(
            "warm large read",
            ">= 0.9x native",
            g(snap, "large_warm"),
            g(snap, "native_large_warm") or g("native", "large_warm"),
            "native, interleaved" if g(snap, "native_large_warm") else "native",
            0.9,
        ),
        _ratio_at_least(
            "warm small read (8 readers)",
            ">= 0.5x native",
            g(snap, "small_warm_8r"),
            g(snap, "native_small_warm_8r") or g("native", "small_warm_8r"),
            "native, interleaved" if g(snap, "native_small_warm_8r") else "native",
            0.5,
        ),
        _ratio_at_least(
            "cache-hit large read",
            ">= 0.9x the Python FUSE limit (cold)",
            g(snap, "large_cache"),
            g("fuse-limit", "large_cold"),
            "fuse-limit",
            0.9,
        ),
    ]
    peer_large, peer_large_label = _best_peer(results, "large_cold")
    out.append(
        _ratio_at_least(
            "cold large read vs peers",
            ">= 1.2x the best peer",
            g(snap, "large_cold"),
            peer_large,
            peer_large_label,
            1.2,
        )
    )
    limits = [
        (v, k)
        for k, v in (("boto3 GET", g("boto3", "large_get")), ("fuse-limit", g("fuse-limit", "large_cold")))
    ]
    known = [(v, k) for v, k in limits if v is not None]
    floor, floor_label = min(known) if len(known) == len(limits) else (None, "raw GET and fuse-limit")
    out.append(
        _ratio_at_least(
            "cold large read vs limits",
            ">= 0.8x min(raw parallel GET, Python FUSE limit)",
            g(snap, "large_cold"),
            floor,
            floor_label,
            0.8,
        )
    )
    out.append(
        _ratio_at_least(
            "cold large read vs GET of the same objects",
            ">= 0.8x boto3 GET of the snapshot's chunk objects (issue 3)",
            g(snap, "large_cold"),
            g("boto3", "same_get"),
            "boto3 GET chunks",
            0.8,
        )
    )
    peer_small, peer_small_label = _best_peer(results, "small_cold_8r")
    out.append(
        _ratio_at_least(
            "cold small read, 8 readers",
            ">= 1.2x the best peer",
            g(snap, "small_cold_8r"),
            peer_small,
            peer_small_label,
            1.2,
        )
    )
    out.append(
        _ratio_at_least(
            "prewarm",
            ">= 0.8x raw parallel GET (all objects)",
            g(snap, "prewarm"),
            g("boto3", "all_get"),
            "boto3",
            0.8,
        )
    )
    out.append(_ratio_at_least("id", ">= 0.8x b3sum", g(snap, "id"), g("b3sum", "id"), "b3sum", 0.8))
    out.append(
        _ratio_at_most(
            "re-push",
            "<= 1.2x the changed chunks' bytes",
            g(snap, "repush_mb"),
            g("data", "cdc_changed_mb"),
            "changed chunks",
            1.2,
        )
    )
    for metric, label in (("push_s", "push"), ("pull_s", "pull")):
        out.append(
            _ratio_at_most(
                f"{label} time vs snapdir",
                "<= 1.0x snapdir's time",
                g(snap, metric),
                g("snapdir", metric),
                "snapdir",
                1.0,
            )
        )
    out.append(_below("1M files: first ls /snap/<id>", "< 2 s", g("snapfs-1m", "first_ls_s"), 2.0))
    out.append(_below("1M files: daemon RSS after find", "< 300 MB", g("snapfs-1m", "rss_mb"), 300.0))
    out.append(_below("1M files: diff of 10 changes", "< 1 s", g("snapfs-1m", "diff_s"), 1.0))
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _table(results: Results, columns: list[tuple[str, str]], tools: list[str]) -> list[str]:
    present = [(m, h) for m, h in columns if any(results.get(t, m) is not None for t in tools)]
    rows = [t for t in tools if any(results.get(t, m) is not None for m, _ in present)]
    if not present or not rows:
        return []
    lines = ["| tool | " + " | ".join(h for _, h in present) + " |", "|---" * (len(present) + 1) + "|"]
    for tool in rows:
        lines.append(f"| {tool} | " + " | ".join(_fmt(results.get(tool, m)) for m, _ in present) + " |")
    return lines


def markdown(results: Results, goals: list[Target]) -> str:
    tools = [t for t in TOOL_ORDER if any(r.tool == t for r in results.rows)]
    tools += sorted({r.tool for r in results.rows} - set(tools))
    meta = results.meta
    out = [f"## snapfs bench — size {meta.get('size')}, {meta.get('data_desc', '')}", ""]
    reads = _table(results, READ_COLUMNS, [t for t in tools if t not in ("snapfs-1m", "data")])
    if reads:
        out += ["### Reads", "", *reads, ""]
    snaps = _table(results, SNAP_COLUMNS, [t for t in tools if t != "snapfs-1m"])
    if snaps:
        out += ["### Snapshots, hashing and raw S3", "", *snaps, ""]
    scale = _table(results, SCALE_COLUMNS, ["data", "snapfs-1m"])
    if scale:
        out += ["### 1,000,000 files (file store)", "", *scale, ""]
    out += [
        "### Targets",
        "",
        "| target | need | snapfs | reference | ratio | status |",
        "|---|---|---|---|---|---|",
    ]
    for t in goals:
        d = t.as_dict()
        ref = (
            f"{_fmt(t.reference)} ({t.reference_label})"
            if t.reference is not None
            else t.reference_label or "–"
        )
        ratio = f"{t.ratio:.2f}" if t.ratio is not None else "–"
        out.append(f"| {t.name} | {t.target} | {_fmt(t.value)} | {ref} | {ratio} | {d['status']} |")
    out.append("")
    if results.unavailable:
        out += ["### Not measured", ""]
        for u in results.unavailable:
            out.append(f"- **{u['tool']}** ({u['what']}): {u['reason']}")
        out.append("")
    out.append(f"Run time {meta.get('run_seconds', 0):.0f} s. Columns are explained in docs/BENCHMARKS.md.")
    return "\n".join(out)


def to_json(results: Results, goals: list[Target]) -> dict[str, Any]:
    return {
        "meta": results.meta,
        "rows": [dataclasses.asdict(r) for r in results.rows],
        "targets": [t.as_dict() for t in goals],
        "unavailable": results.unavailable,
    }


def write_png(json_path: Path, png_path: Path) -> str | None:
    """Draw the chart with the bench venv's matplotlib (kept out of snapfs's venv). Returns an error or None."""
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        return f"no bench venv at {BENCH_VENV} (run scripts/setup-bench)"
    chart = Path(__file__).with_name("chart.py")
    proc = subprocess.run([python, chart, json_path, png_path], capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["chart failed"])[-1]
    return None


def dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
