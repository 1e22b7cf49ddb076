"""``scripts/bench``: argument parsing, the order of sections, and guaranteed cleanup."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import peers, report, s3raw, snapfs_sections
from .common import CLEANUP, MB, Results, Unavailable, section, which
from .context import Ctx
from .data import SIZES, generate
from .measure import ReadConfig

log = logging.getLogger("bench")

Section = Callable[[Ctx], None]

# In run order. The snapfs sections come before the peers so that a snapfs
# failure shows early; every section starts from a cold cache of its own.
SECTIONS: list[tuple[str, Section, bool]] = [  # (name, function, needs the S3 server)
    ("native", peers.native, False),
    ("fuse-limit", peers.fuse_limit, False),
    ("boto3", peers.boto3_raw, True),
    ("b3sum", peers.b3sum, False),
    ("snapfs-id", snapfs_sections.snapfs_id, False),
    ("snapfs-push", snapfs_sections.snapfs_push, True),
    ("snapfs-prewarm", snapfs_sections.snapfs_prewarm, True),
    ("snapfs-mount", snapfs_sections.snapfs_mount, True),
    ("juicefs", peers.juicefs, True),
    ("restic", peers.restic, True),
    ("s3fs", peers.s3fs, True),
    ("rclone-off", lambda ctx: peers.rclone(ctx, "off"), True),
    ("rclone-full", lambda ctx: peers.rclone(ctx, "full"), True),
    ("snapdir", peers.snapdir, True),
    ("dvc", peers.dvc, True),
    ("scale", snapfs_sections.scale, False),
]
GROUPS = {
    "baselines": ["native", "fuse-limit", "boto3", "b3sum"],
    "snapfs": ["snapfs-id", "snapfs-push", "snapfs-prewarm", "snapfs-mount"],
    "peers": ["juicefs", "restic", "s3fs", "rclone-off", "rclone-full", "snapdir", "dvc"],
    "rclone": ["rclone-off", "rclone-full"],
    "id": ["b3sum", "snapfs-id"],
    "reads": [
        "native",
        "fuse-limit",
        "snapfs-mount",
        "juicefs",
        "restic",
        "s3fs",
        "rclone-off",
        "rclone-full",
    ],
}
NAMES = [name for name, _, _ in SECTIONS]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark snapfs against native disk, the Python FUSE limit, raw boto3 and its peers "
        "(JuiceFS, restic, s3fs-fuse, rclone, snapdir, DVC, b3sum) on one generated dataset and one "
        "loopback SeaweedFS S3 server. Prints a markdown table on stdout; progress goes to stderr.",
        epilog=f"sections: {', '.join(NAMES)}; groups: "
        + "; ".join(f"{g} = {','.join(s)}" for g, s in GROUPS.items())
        + ". 'scale' (1,000,000 files) runs only at --size large or when named. Install peers with "
        "scripts/setup-bench. See docs/BENCHMARKS.md.",
    )
    parser.add_argument("--size", choices=list(SIZES), default="small", help="data size (default small)")
    parser.add_argument("--only", metavar="SECTION[,SECTION]", help="run only these sections or groups")
    parser.add_argument("--skip", metavar="SECTION[,SECTION]", help="leave these sections or groups out")
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="write every measurement and target as JSON"
    )
    parser.add_argument("--png", type=Path, metavar="FILE", help="draw read throughput per tool (matplotlib)")
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/snapfs-bench"), help="default /tmp/snapfs-bench"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data, stores, logs) at exit")
    parser.add_argument("--large-readers", type=int, default=4, help="reader processes for large files (4)")
    parser.add_argument("--small-readers", type=int, default=8, help="reader processes for small files (8)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def _expand(spec: str | None) -> list[str]:
    if not spec:
        return []
    out: list[str] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        if word in GROUPS:
            out += GROUPS[word]
        elif word in NAMES:
            out.append(word)
        else:
            raise SystemExit(
                f"bench: unknown section {word!r} (sections: {', '.join(NAMES)}; groups: {', '.join(GROUPS)})"
            )
    return out


def select(args: argparse.Namespace) -> list[str]:
    chosen = _expand(args.only) or [n for n in NAMES if n != "scale" or args.size == "large"]
    skipped = set(_expand(args.skip))
    return [n for n in NAMES if n in chosen and n not in skipped]


def _version(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired, Unavailable):
        return "not installed"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0][:80] if text else "?"


def versions() -> dict[str, str]:
    def tool(name: str, *flags: str) -> str:
        try:
            return _version([which(name), *flags])
        except Unavailable:
            return "not installed"

    snapdir = report.BENCH_VENV / "bin" / "python"
    return {
        "snapfs": _version([snapfs_sections.SNAPFS, "--version"]),
        "s3fs": tool("s3fs", "--version"),
        "rclone": tool("rclone", "version"),
        "restic": tool("restic", "version"),
        "juicefs": tool("juicefs", "--version"),
        "dvc": tool("dvc", "--version"),
        "b3sum": tool("b3sum", "--version"),
        "snapdir": _version([str(snapdir), "-c", "import snapdir; print(snapdir.version())"]),
        "weed": _version([str(Path(sys.executable).parent / "weed"), "version"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "support.seaweed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    names = select(args)
    if os.geteuid() != 0:
        log.warning("bench: not root: cold reads (drop_caches) and some FUSE peers will be unavailable")

    started = time.monotonic()
    results = Results()
    results.meta.update(size=args.size, sections=names, cpus=os.cpu_count(), started=time.strftime("%F %T"))
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    server = None

    def cleanup() -> None:
        CLEANUP.run_all()
        if server is not None:
            server.stop()
        if not args.keep:
            # --one-file-system: never descend into a mount that failed to detach.
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)

    CLEANUP.install()
    atexit.register(cleanup)
    try:
        results.meta["versions"] = versions()
        ds = generate(work, args.size)
        spec = SIZES[args.size]
        results.meta["data_desc"] = (
            f"{spec['shards']} x {spec['shard_bytes'] >> 20} MiB shards + {spec['files']:,} x "
            f"{spec['file_bytes'] >> 10} KiB files in {spec['dirs']} dirs ({ds.total_bytes / MB:,.0f} MB)"
        )
        cfg = ReadConfig(large_readers=args.large_readers, small_readers=args.small_readers)
        results.meta["readers"] = {"large": cfg.large_readers, "small": [1, cfg.small_readers]}

        s3 = None
        if any(needs for name, _, needs in SECTIONS if name in names):
            sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
            from support.seaweed import SeaweedServer  # tests/support: the project's one S3 test server

            server = SeaweedServer(work / "seaweed").start()
            s3 = s3raw.client(server.endpoint_url, server.access_key, server.secret_key, server.region)
            log.info("S3: SeaweedFS at %s", server.endpoint_url)
        ctx = Ctx(work=work, size=args.size, ds=ds, results=results, cfg=cfg, server=server, s3=s3)

        if {"snapfs-push", "snapdir", "dvc", "restic", "juicefs"} & set(names):
            with section(results, "data", "changed bytes"):
                snapfs_sections.record_change_size(ctx)
        timings: dict[str, float] = {}
        for name, fn, _ in SECTIONS:
            if name not in names:
                continue
            log.info("== %s", name)
            t0 = time.monotonic()
            tool = name if not name.startswith("snapfs") else "snapfs"
            with section(results, "snapfs-1m" if name == "scale" else tool, name):
                fn(ctx)
            CLEANUP.run_all()  # a section that failed half-way leaves nothing mounted behind
            timings[name] = round(time.monotonic() - t0, 1)
        results.meta["section_seconds"] = timings
    finally:
        results.meta["run_seconds"] = time.monotonic() - started
        goals = report.targets(results)
        print(report.markdown(results, goals))
        if args.json:
            report.dump(args.json, report.to_json(results, goals))
            log.info("wrote %s", args.json)
        if args.png:
            if args.json:
                json_path = args.json
            else:
                json_path = work.parent / f".snapfs-bench-{os.getpid()}.json"
                report.dump(json_path, report.to_json(results, goals))
            error = report.write_png(json_path, args.png)
            if not args.json:
                json_path.unlink(missing_ok=True)
            if error:
                log.warning("bench: no chart: %s", error)
            else:
                log.info("wrote %s", args.png)
        cleanup()
        atexit.unregister(cleanup)
    return 0
