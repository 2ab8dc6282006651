"""`pipeline stats DEST`: samples, classes, bytes and the image-size distribution per split.

Sizes come from each sample's json member, read through the index files, so
stats on S3 fetches a few KB per sample rather than whole shards.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from stagewise.pipeline.errors import report
from stagewise.shards import iter_meta, open_split, read_manifest

_SIDE_BINS = (0, 64, 128, 256, 384, 512, 1024, 2048, 10**9)  # px, longer side


def split_stats(dest: str, split: str) -> dict:
    view = open_split(dest, split)
    widths, heights = [], []
    for shard, idx in zip(view.shard_urls, view.index_urls):
        for meta in iter_meta(shard, idx):
            widths.append(meta["width"])
            heights.append(meta["height"])
    w, h = np.asarray(widths), np.asarray(heights)
    longer = np.maximum(w, h) if len(w) else np.zeros(0)
    hist, _ = np.histogram(longer, bins=_SIDE_BINS)
    def pct(a: np.ndarray) -> list[int]:
        return [int(v) for v in np.percentile(a, [0, 5, 50, 95, 100])] if len(a) else []
    return {
        "split": split, "samples": view.num_samples, "classes": view.num_classes, "shards": len(view.info.shards),
        "bytes": sum(s.bytes for s in view.info.shards),
        "width_pct": pct(w), "height_pct": pct(h),
        "longer_side_hist": {f"{lo}-{hi if hi < 10**9 else ''}": int(n) for lo, hi, n in zip(_SIDE_BINS, _SIDE_BINS[1:], hist)},
        "class_counts_min_max": [min(view.info.class_counts), max(view.info.class_counts)] if view.info.class_counts else [],
    }


def format_table(rows: list[dict]) -> str:
    out = [f"{'split':<10}{'samples':>10}{'classes':>9}{'shards':>8}{'MB':>10}  {'per class':>11}  width p0/p5/p50/p95/p100   height p0/p5/p50/p95/p100"]
    for r in rows:
        per_class = "-".join(map(str, r["class_counts_min_max"]))
        out.append(f"{r['split']:<10}{r['samples']:>10,}{r['classes']:>9}{r['shards']:>8}{r['bytes'] / 1e6:>10,.1f}  "
                   f"{per_class:>11}  {'/'.join(map(str, r['width_pct'])):<26} {'/'.join(map(str, r['height_pct']))}")
    out.append("")
    out.append("longer side (px)   " + "  ".join(f"{k:>9}" for k in rows[0]["longer_side_hist"]) if rows else "")
    for r in rows:
        out.append(f"{r['split']:<19}" + "  ".join(f"{v:>9,}" for v in r["longer_side_hist"].values()))
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    dest = args.dest.rstrip("/")
    try:
        rows = [split_stats(dest, s) for s in sorted(read_manifest(dest).splits)]
    except (FileNotFoundError, ValueError) as exc:
        return report("stats", exc, (FileNotFoundError, ValueError))
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
