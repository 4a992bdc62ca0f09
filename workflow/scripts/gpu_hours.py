"""Summarize Snakemake `benchmark:` files into GPU-hours per rule kind (<results>/benchmarks.csv).

    python gpu_hours.py RESULTS/benchmarks --out RESULTS/benchmarks.csv [--gpus pretrain=1,train=1,...]

Every GPU rule writes ``<results>/benchmarks/<rule>/.../<job>.tsv`` (Snakemake's columns: ``s`` wall seconds,
``max_rss`` MB, ``cpu_time`` seconds, ...). One CSV row per rule (the first directory level): number of jobs,
wall hours, GPU-hours (wall hours x GPUs per job, ``--gpus``; rules not listed count 0 GPUs), CPU hours and
the largest peak RSS, plus a ``total`` row. A benchmark with ``NA`` (job too short to sample) counts its
wall time only. This turns docs/WORKFLOW.md's GPU-hour estimate into a measurement after a run.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import sys
from pathlib import Path

DEFAULT_GPUS = "pretrain=1,train=1,evaluate=1,fig_sam=1"
FIELDS = ["rule", "jobs", "wall_hours", "gpu_hours", "cpu_hours", "max_rss_mb"]


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "", "NA", "-") else None
    except ValueError:
        return None


def parse_gpus(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        rule, sep, n = item.partition("=")
        if not sep or _float(n) is None:
            raise ValueError(f"--gpus: expected RULE=N, got {item!r}")
        out[rule] = float(n)
    return out


def summarize(root: Path, gpus: dict[str, float]) -> list[dict]:
    """One row per rule kind under ``root`` (sorted) and a ``total`` row; hours rounded to 4 decimals."""
    acc: dict[str, dict] = {}
    for f in sorted(root.rglob("*.tsv")):
        rule = f.relative_to(root).parts[0]
        with open(f, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if not rows:
            continue
        row = rows[-1]  # `repeat` benchmarks: the last run
        wall = _float(row.get("s"))
        if wall is None:
            raise ValueError(f"{f}: no wall time (column `s`)")
        a = acc.setdefault(rule, {"rule": rule, "jobs": 0, "wall": 0.0, "cpu": 0.0, "rss": 0.0})
        a["jobs"] += 1
        a["wall"] += wall
        a["cpu"] += _float(row.get("cpu_time")) or 0.0
        a["rss"] = max(a["rss"], _float(row.get("max_rss")) or 0.0)
    out = []
    for rule in sorted(acc):
        a = acc[rule]
        out.append({"rule": rule, "jobs": a["jobs"], "wall_hours": round(a["wall"] / 3600, 4),
                    "gpu_hours": round(a["wall"] * gpus.get(rule, 0.0) / 3600, 4),
                    "cpu_hours": round(a["cpu"] / 3600, 4), "max_rss_mb": round(a["rss"], 1)})
    out.append({"rule": "total", "jobs": sum(r["jobs"] for r in out),
                "wall_hours": round(sum(r["wall_hours"] for r in out), 4),
                "gpu_hours": round(sum(r["gpu_hours"] for r in out), 4),
                "cpu_hours": round(sum(r["cpu_hours"] for r in out), 4),
                "max_rss_mb": max((r["max_rss_mb"] for r in out), default=0.0)})
    return out


def render(rows: list[dict]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="the benchmarks directory (<results>/benchmarks)")
    p.add_argument("--out", required=True, type=Path, help="CSV to write (atomically)")
    p.add_argument("--gpus", default=DEFAULT_GPUS, help=f"GPUs per job of each rule (default {DEFAULT_GPUS})")
    args = p.parse_args(argv)
    try:
        rows = summarize(args.root, parse_gpus(args.gpus)) if args.root.is_dir() else summarize_empty()
    except (OSError, ValueError) as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2
    from greg import io

    io.atomic_write_text(args.out, render(rows))
    print(render(rows), end="")
    return 0


def summarize_empty() -> list[dict]:
    return [{"rule": "total", "jobs": 0, "wall_hours": 0.0, "gpu_hours": 0.0, "cpu_hours": 0.0, "max_rss_mb": 0.0}]


if __name__ == "__main__":
    sys.exit(main())
