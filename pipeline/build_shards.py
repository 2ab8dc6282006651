"""`pipeline build-shards`: an image tree -> WebDataset shards, an index per shard, a manifest.

This module drives a build: it scans SRC (`sources`, `imagenet21k`), plans the
shards (`plan`), runs the shard tasks on local processes or Ray
(`ray_executor`), and writes the rejects report and, last, the manifest.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context

from stagewise.pipeline import errors, plan as planning
from stagewise.shards.jpeg import DEFAULT_MAX_PIXELS
from stagewise.pipeline.imagenet21k import DEFAULT_HOLDOUT, DEFAULT_MAX_SIDE, HOLDOUT_SPLIT, scan_imagenet21k
from stagewise.pipeline.plan import (DEFAULT_SHARD_BYTES, EncodeOptions, ShardResult, ShardTask, build_one,
                                     carve_holdout, finished_result, plan_shards, random_holdout)
from stagewise.pipeline.ray_executor import run_on_ray
from stagewise.pipeline.sources import Scan, read_class_list, scan_class_tree, scan_imagenet
from stagewise.shards import SplitInfo, parse_shard_name, rejects_name, shard_name
from stagewise.shards.layout import is_split_temp
from stagewise.shards.manifest import Manifest, read_manifest_or_none, write_manifest
from stagewise.shards.store import is_local, join_url, list_names, local_path, makedirs, remove_url, write_atomic

LAYOUTS = ("folder", "imagenet", "imagenet21k")
EXECUTORS = ("local", "ray")


@dataclass
class BuildReport:
    split: str
    inputs: int
    written: int
    copied: int
    fixed: int
    fixes: dict[str, int]
    rejected: int
    reject_reasons: dict[str, int]
    shards: int
    resumed_shards: int
    bytes_in: int
    bytes_out: int
    seconds: float
    duplicates: int = 0  # files merged into a multi-label sample with the same bytes (imagenet21k)

    @property
    def balanced(self) -> bool:
        return self.inputs == self.written + self.rejected

    def summary(self, dest: str) -> str:
        def kinds(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"

        rate = self.inputs / self.seconds if self.seconds else 0.0
        return "\n".join([
            f"build-shards: split {self.split!r} -> {dest}",
            f"  inputs    {self.inputs:>9,}",
            *([f"  merged    {self.duplicates:>9,}  duplicate files (same bytes) folded into multi-label samples"]
              if self.duplicates else []),
            f"  written   {self.written:>9,}  in {self.shards} shards ({self.bytes_out / 1e6:,.1f} MB out, "
            f"{self.bytes_in / 1e6:,.1f} MB in), {self.resumed_shards} shards resumed from an earlier run",
            f"  copied    {self.copied:>9,}  byte for byte",
            f"  fixed     {self.fixed:>9,}  {kinds(self.fixes)}",
            f"  rejected  {self.rejected:>9,}  {kinds(self.reject_reasons)}  (see {rejects_name(self.split)})",
            f"  check: inputs {self.inputs:,} = written {self.written:,} + rejected {self.rejected:,}: "
            + ("OK" if self.balanced else "MISMATCH"),
            f"  time {self.seconds:.1f} s, {rate:,.0f} img/s",
        ])


def _start_method() -> str:
    """How to start worker processes.

    fork when this process runs a single thread: a worker then starts in a few
    milliseconds, where spawn re-imports the build code in each (about 0.2 s,
    most of a small build). With more threads (s3fs's event loop, tqdm's
    monitor, torch's pools) a forked child could inherit a lock that a thread it
    does not have was holding, so spawn. /proc tells on Linux; elsewhere spawn.
    """
    try:
        single = len(os.listdir("/proc/self/task")) == 1
    except OSError:
        single = False
    return "fork" if single else "spawn"


def _run_tasks(tasks: list[ShardTask], total: int, workers: int, progress: bool, desc: str,
               executor: str, ray_address: str | None) -> list[ShardResult]:
    from tqdm import tqdm

    class Bar(tqdm):
        monitor_interval = 0  # refreshed by hand below; tqdm's monitor thread would make pools spawn

    results: dict[str, ShardResult] = {}
    todo = []
    for t in tasks:
        done = finished_result(t)
        if done is not None:
            results[t.name] = done
        else:
            todo.append(t)
    already = sum(len(t.inputs) for t in tasks if t.name in results)
    bar = Bar(total=total, initial=already, unit="img", desc=desc, disable=not progress, file=sys.stderr,
              dynamic_ncols=True, smoothing=0.1)
    if executor == "ray":
        for result in run_on_ray(todo, ray_address):
            results[result.name] = result
            bar.update(len(result.rejects) + (result.info.num_samples if result.info else 0))
    elif workers <= 1 or len(todo) <= 1:
        for t in todo:
            results[t.name] = build_one(t)
            bar.update(len(t.inputs))
    else:
        ctx = get_context(_start_method())
        counter = ctx.Value("q", 0)
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                                 initializer=planning.init_worker, initargs=(counter,)) as pool:
            futures = {pool.submit(build_one, t): t for t in todo}
            pending = set(futures)
            while pending:
                done_now, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for f in done_now:
                    results[futures[f].name] = f.result()  # re-raises a worker's error
                bar.n = already + counter.value
                bar.refresh()
    bar.close()
    return [results[t.name] for t in tasks]


def _remove_stale_temp_files(dest: str, split: str) -> None:
    """Temporary shards of a run that was killed (remote stores never see them)."""
    if is_local(dest):
        for name in list_names(dest):
            if is_split_temp(name, split):
                os.unlink(os.path.join(local_path(dest), name))


def _write_split(dest: str, split: str, layout: str, classes: tuple[str, ...], tasks: list[ShardTask],
                 scan_rejects: list[tuple[str, str]], workers: int, progress: bool, t0: float,
                 executor: str, ray_address: str | None) -> BuildReport:
    total = sum(len(t.inputs) for t in tasks)
    _remove_stale_temp_files(dest, split)
    results = _run_tasks(tasks, total, workers, progress, split, executor, ray_address)
    rejects = sorted(scan_rejects + [r for res in results for r in res.rejects])
    lines = "".join(json.dumps({"source": s, "reason": r}) + "\n" for s, r in rejects)
    write_atomic(join_url(dest, rejects_name(split)), lines.encode("utf-8"))
    infos = [r.info for r in results if r.info is not None]
    counts = Counter()
    fixes: Counter[str] = Counter()
    for r in results:
        counts.update(r.class_counts)
        fixes.update(r.fixes)
    _remove_stale_shards(dest, split, {i.name for i in infos})
    split_info = SplitInfo(num_samples=sum(i.num_samples for i in infos), classes=classes, shards=tuple(infos),
                           class_counts=tuple(counts.get(k, 0) for k in range(len(classes))),  # by first label
                           multi_label=any(x.labels for t in tasks for x in t.inputs))
    manifest = read_manifest_or_none(dest) or Manifest(layout=layout)
    write_manifest(dest, manifest.with_split(split, split_info, layout))  # last: after every shard and index
    return BuildReport(
        split=split, inputs=total + len(scan_rejects), written=split_info.num_samples,
        copied=sum(r.copied for r in results), fixed=sum(r.fixed for r in results), fixes=dict(fixes),
        rejected=len(rejects), reject_reasons=dict(Counter(r.split(":", 1)[0] for _, r in rejects)),
        shards=len(infos), resumed_shards=sum(r.resumed for r in results),
        bytes_in=sum(r.bytes_in for r in results), bytes_out=sum(i.bytes for i in infos), seconds=time.time() - t0)


def _remove_stale_shards(dest: str, split: str, keep: set[str]) -> None:
    """Shards of `split` left by an earlier build with another plan."""
    for name in list_names(dest):
        parsed = parse_shard_name(name)
        if parsed and parsed[0] == split and shard_name(split, parsed[1]) not in keep:
            remove_url(join_url(dest, name))


def scan_source(src: str, dest: str, layout: str, split: str, classes_file: str | None,
                val_labels: str | None, val_synsets: str | None, workers: int, executor: str,
                ray_address: str | None, keep_empty_classes: bool = False) -> Scan:
    classes = read_class_list(classes_file) if classes_file else None
    if layout == "imagenet21k":
        return scan_imagenet21k(src, classes, workers=workers, executor=executor, ray_address=ray_address)
    if layout == "imagenet":
        return scan_imagenet(src, split, val_labels, val_synsets, classes, keep_empty_classes)
    if layout == "folder":
        if classes is None:  # later splits reuse the label order of the splits already in DEST
            existing = read_manifest_or_none(dest)
            if existing and existing.splits:
                classes = next(iter(existing.splits.values())).classes
        return scan_class_tree(src, src, classes, keep_empty_classes)
    raise ValueError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")


def build_shards(src: str, dest: str, *, layout: str = "folder", split: str = "train", seed: int = 0,
                 samples_per_shard: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 workers: int = 1, max_side: int | None = None, quality: int = 90,
                 max_pixels: int = DEFAULT_MAX_PIXELS, decode_copies: bool = True, holdout: int | None = None, holdout_split: str | None = None,
                 classes_file: str | None = None, val_labels: str | None = None, val_synsets: str | None = None,
                 executor: str = "local", ray_address: str | None = None, progress: bool = False,
                 keep_empty_classes: bool = False) -> list[BuildReport]:
    """Build `split` (and `holdout_split` when `holdout` > 0) from SRC into DEST; one report per split."""
    t0 = time.time()
    if not os.path.isdir(src):
        raise FileNotFoundError(f"SRC {src}: not a folder")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality {quality}: must be within 1..100")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard {samples_per_shard}: must be >= 1")
    dest = dest.rstrip("/")
    if executor not in EXECUTORS:
        raise ValueError(f"--executor {executor!r}: choose from {', '.join(EXECUTORS)}")
    scan = scan_source(src, dest, layout, split, classes_file, val_labels, val_synsets, workers, executor, ray_address,
                       keep_empty_classes)
    makedirs(dest)  # after the scan: a tree that does not match --layout leaves no DEST behind
    if layout == "imagenet21k":  # a uniform random val split and a size cap by default (paper §5.2, issue 6)
        max_side = DEFAULT_MAX_SIDE if max_side is None else max_side
        holdout, holdout_split = DEFAULT_HOLDOUT if holdout is None else holdout, holdout_split or HOLDOUT_SPLIT
    holdout, holdout_split = holdout or 0, holdout_split or "minival"
    if max_side is not None and max_side < 0:
        raise ValueError(f"--max-side {max_side}: must be >= 0 (0 keeps every size)")
    options = EncodeOptions(max_side=max_side or None, quality=quality, max_pixels=max_pixels,
                            decode_copies=decode_copies)
    carve = random_holdout if layout == "imagenet21k" else carve_holdout
    inputs, held = carve(scan.inputs, holdout, seed)
    plans = [(split, inputs, scan.rejects)] + ([(holdout_split, held, [])] if held else [])
    reports = []
    for name, items, rejects in plans:
        tasks = plan_shards(dest, name, items, seed, samples_per_shard, shard_bytes, options)
        reports.append(_write_split(dest, name, layout, scan.classes, tasks, rejects, workers, progress, t0,
                                    executor, ray_address))
        t0 = time.time()  # the next split's rate counts its own time only
    reports[0].duplicates = scan.duplicates
    return reports


def parse_size(text: str) -> int:
    """'256MB' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB)")
    unit = m[2].upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".find(unit[:1]) + 1 if unit else 0
    return int(float(m[1]) * base**power)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="input tree (local folder)")
    p.add_argument("dest", metavar="DEST", help="output folder or fsspec URL (file://, s3://bucket/prefix)")
    p.add_argument("--layout", choices=LAYOUTS, default="folder")
    p.add_argument("--split", default="train", help="split name to write (train, val, ...)")
    p.add_argument("--seed", type=int, default=0, help="shuffle and holdout seed")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=None)
    size.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES, help="target shard size (default 256MB)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--max-side", type=int, default=None,
                   help="downscale so the longer side is <= PX (imagenet21k default 512; 0 = never)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="reject larger images as decompression bombs")
    p.add_argument("--fast-copy", action="store_true",
                   help="do not decode JPEGs that are copied byte for byte (structure checks only; near disk speed)")
    p.add_argument("--holdout", type=int, default=None,
                   help="carve N images out of the split: class-balanced; imagenet21k: uniform random, default 100000")
    p.add_argument("--holdout-split", default=None, help="name of the holdout split (default minival; imagenet21k: val)")
    p.add_argument("--classes", dest="classes_file", default=None, help="file pinning the label order, one class per line")
    p.add_argument("--val-labels", default=None, help="imagenet flat val: LOC_val_solution.csv or devkit ground truth")
    p.add_argument("--val-synsets", default=None, help="devkit synset order (line i = ILSVRC2012_ID i+1)")
    p.add_argument("--executor", choices=EXECUTORS, default="local", help="local processes, or Ray tasks on a cluster")
    p.add_argument("--ray-address", default=None, help="Ray cluster: auto or HOST:PORT (default: start a local Ray)")
    p.add_argument("--keep-empty-classes", action="store_true",
                   help="keep a class folder without files as a class with no samples (refused otherwise)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        reports = build_shards(
            args.src, args.dest, layout=args.layout, split=args.split, seed=args.seed,
            samples_per_shard=args.samples_per_shard, shard_bytes=args.shard_size, workers=args.workers,
            max_side=args.max_side, quality=args.quality, max_pixels=args.max_pixels, decode_copies=not args.fast_copy, holdout=args.holdout,
            holdout_split=args.holdout_split, classes_file=args.classes_file, val_labels=args.val_labels,
            val_synsets=args.val_synsets, executor=args.executor, ray_address=args.ray_address, progress=not args.no_progress and sys.stderr.isatty(),
            keep_empty_classes=args.keep_empty_classes)
    except (FileNotFoundError, ValueError) as exc:
        return errors.report("build-shards", exc, (FileNotFoundError, ValueError))
    for report in reports:
        print(report.summary(args.dest))
    return 0 if all(r.balanced for r in reports) else 1
