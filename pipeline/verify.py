"""`pipeline verify-shards DEST`: re-read everything and name each bad shard.

Per shard: sha256 and size against the manifest, tar structure and sample
members (shards.check), the index file, and that every jpg decodes to the
width and height its json states as a baseline RGB JPEG. Per split: sample
counts and counts per class against the manifest. Exit status 1 if anything
is wrong.
"""
from __future__ import annotations

import argparse
import io
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from PIL import Image

from stagewise.pipeline.errors import count, report
from stagewise.shards import ShardInfo, index_name, join_url, read_index, read_manifest, url_exists
from stagewise.shards.check import class_histogram, scan_shard
from stagewise.shards.jpeg import SOF_BASELINE, frame_marker


def _decode_problem(jpg: bytes, width: int, height: int) -> str | None:
    if frame_marker(jpg) != SOF_BASELINE:
        return "not a baseline JPEG"
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            im.load()
            if im.format != "JPEG" or im.mode != "RGB":
                return f"{im.format} {im.mode}, not an RGB JPEG"
            if im.size != (width, height):
                return f"decodes to {im.size[0]}x{im.size[1]}, json says {width}x{height}"
    except Exception as exc:  # any decoder failure is a finding, not a crash
        return f"does not decode: {exc}"
    return None


def verify_shard(dest: str, info: ShardInfo, decode: bool) -> tuple[str, list[str], Counter[int]]:
    """(shard name, problems, samples per label)."""
    url = join_url(dest, info.name)
    if not url_exists(url):
        return info.name, ["missing"], Counter()
    scan = scan_shard(url)
    problems = list(scan.problems)
    if scan.sha256 != info.sha256:
        problems.append(f"sha256 {scan.sha256[:12]}… does not match the manifest's {info.sha256[:12]}…")
    if scan.bytes != info.bytes:
        problems.append(f"{scan.bytes} bytes, manifest says {info.bytes}")
    if len(scan.samples) != info.num_samples and not scan.problems:
        problems.append(f"{len(scan.samples)} samples, manifest says {info.num_samples}")
    idx_url = join_url(dest, index_name(info.name))
    if not url_exists(idx_url):
        problems.append(f"index {index_name(info.name)} missing")
    elif read_index(idx_url) != scan.index:
        problems.append(f"index {index_name(info.name)} does not match the shard")
    if decode:
        for s in scan.samples:
            why = _decode_problem(s.jpg, s.width, s.height)
            if why:
                problems.append(f"sample {s.key} ({s.source}): {why}")
    return info.name, problems, class_histogram(scan.samples)


def verify(dest: str, workers: int = 1, decode: bool = True) -> dict[str, list[str]]:
    """Problems by shard (or by split, for split-level findings); empty if all is well."""
    manifest = read_manifest(dest)
    bad: dict[str, list[str]] = {}
    for split_name, split in sorted(manifest.splits.items()):
        jobs = [(dest, info, decode) for info in split.shards]
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                results = list(pool.map(verify_shard, *zip(*jobs)))
        else:
            results = [verify_shard(*job) for job in jobs]
        counts: Counter[int] = Counter()
        for name, problems, hist in results:
            counts.update(hist)
            if problems:
                bad[name] = problems
        split_problems = []
        total = sum(counts.values())
        if not bad and total != split.num_samples:
            split_problems.append(f"{total} samples, manifest says {split.num_samples}")
        if not bad and split.class_counts and tuple(counts.get(k, 0) for k in range(len(split.classes))) != split.class_counts:
            split_problems.append("samples per class differ from the manifest's class_counts")
        if any(k < 0 or k >= len(split.classes) for k in counts):
            split_problems.append(f"labels outside 0..{len(split.classes) - 1}")
        if split_problems:
            bad[f"split {split_name}"] = split_problems
        print(f"verify-shards: {split_name}: {count(len(split.shards), 'shard')}, {count(total, 'sample')}, "
              f"{count(len(split.classes), 'class')}" + ("" if not split_problems else " - PROBLEMS"), flush=True)
    return bad


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST", help="dataset folder or URL (s3://bucket/prefix)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-decode", action="store_true", help="skip decoding every jpg (faster)")


def run(args: argparse.Namespace) -> int:
    try:
        bad = verify(args.dest.rstrip("/"), workers=args.workers, decode=not args.no_decode)
    except (FileNotFoundError, ValueError) as exc:
        return report("verify-shards", exc, (FileNotFoundError, ValueError))
    for name, problems in sorted(bad.items()):
        print(f"BAD {name}:")
        for p in problems[:20]:
            print(f"  - {p}")
        if len(problems) > 20:
            print(f"  ... and {len(problems) - 20} more")
    print(f"verify-shards: {'OK' if not bad else f'{len(bad)} bad'}")
    return 1 if bad else 0
