"""`pipeline bench-build SRC`: build-shards against naive baselines, same input, same run.

Two cases:
- re-encode: every image is downscaled to `--max-side` and re-encoded. The
  baseline is the script people write first: one process, Pillow open +
  convert + LANCZOS resize + JPEG save, written with `webdataset.ShardWriter`.
  The ratio is per core: (ours img/s / our workers) / baseline img/s.
- copy: inputs that already are baseline RGB JPEGs are copied byte for byte.
  The baseline is "disk speed": read each file and append it to a tar, with
  no image work at all; the ratio shows how close the copy path gets.
Files are read once before timing so both sides start from a warm page cache.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

from pipeline.build_shards import build_shards
from pipeline.sources import scan_class_tree


def _naive_reencode(files: list[tuple[str, int]], out_dir: str, max_side: int, quality: int) -> None:
    import webdataset as wds
    from PIL import Image

    with wds.ShardWriter(os.path.join(out_dir, "base-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, (path, label) in enumerate(files):
            try:
                im = Image.open(path).convert("RGB")
            except Exception:  # the baseline skips what it cannot read
                continue
            if max(im.size) > max_side:
                scale = max_side / max(im.size)
                im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
            sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "cls": str(label)})


def _disk_copy(files: list[tuple[str, int]], out_dir: str) -> None:
    with tarfile.open(os.path.join(out_dir, "copy.tar"), "w") as tar:
        for i, (path, _) in enumerate(files):
            with open(path, "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(f"{i:08d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(src: str, max_sides: list[int], workers: int, quality: int, scratch: str) -> list[dict]:
    scan = scan_class_tree(src, src, None)
    files = [(x.path, x.label) for x in scan.inputs]
    n = len(files)
    per_shard = max(1, n // (8 * workers))  # enough shards to keep every worker busy
    mb = sum(x.size for x in scan.inputs) / 1e6
    for path, _ in files:  # warm the page cache for both sides
        with open(path, "rb") as f:
            f.read()
    rows = []

    def fresh(name: str) -> str:
        path = os.path.join(scratch, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    reports: list = []
    for max_side in max_sides:
        base_s = _timed(lambda: _naive_reencode(files, fresh("base"), max_side, quality))
        reports.clear()
        ours_s = _timed(lambda: reports.extend(build_shards(src, fresh("ours"), workers=workers, max_side=max_side,
                                                             quality=quality, samples_per_shard=per_shard)))
        rows.append({"case": f"re-encode, --max-side {max_side}", "images": n, "ours_img_s": n / ours_s,
                     "baseline_img_s": n / base_s, "workers": workers,
                     "ratio_per_core": (n / ours_s / workers) / (n / base_s),
                     "note": f"{reports[0].fixes.get('resized', 0)} resized"})

    disk_s = _timed(lambda: _disk_copy(files, fresh("disk")))
    for fast in (False, True):
        reports.clear()
        copy_s = _timed(lambda: reports.extend(build_shards(src, fresh("copy"), workers=workers, decode_copies=not fast,
                                                             samples_per_shard=per_shard)))
        rows.append({"case": "copy" + (", --fast-copy" if fast else ", decode-checked"), "images": n,
                     "ours_img_s": n / copy_s, "baseline_img_s": n / disk_s, "workers": workers,
                     "ratio_per_core": (n / copy_s / workers) / (n / disk_s),
                     "note": f"{reports[0].copied} copied byte for byte, {mb / copy_s:,.0f} MB/s vs disk {mb / disk_s:,.0f} MB/s"})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'case':<30}{'images':>8}{'ours img/s':>12}{'baseline img/s':>16}{'workers':>9}{'ratio/core':>12}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<30}{r['images']:>8}{r['ours_img_s']:>12,.0f}{r['baseline_img_s']:>16,.0f}"
                     f"{r['workers']:>9}{r['ratio_per_core']:>11.2f}x  {r['note']}")
    lines.append("baselines: re-encode = 1 process, Pillow + webdataset.ShardWriter; copy = 1 process reading files into a tar")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="class-per-folder tree of images")
    p.add_argument("--max-sides", default="320,160",
                   help="re-encode cases: downscale to these longer sides (comma-separated, px)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-build-") as scratch:
        rows = bench(args.src, [int(x) for x in args.max_sides.split(",")], args.workers, args.quality, scratch)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
