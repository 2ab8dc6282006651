"""`pipeline bench-build SRC`: build-shards against naive baselines, same input, same run.

Two cases:
- re-encode: every image is downscaled to `--max-side` and re-encoded. The
  baseline is the script people write first: one process, Pillow open +
  convert + LANCZOS resize + JPEG save, written with `webdataset.ShardWriter`.
- copy: inputs that already are baseline RGB JPEGs are copied byte for byte.
  The baseline is "disk speed": read each file and append it to a tar, with
  no image work at all.

Each case runs `--rounds` times, baseline and ours alternating; the table shows
medians. Two measures, because the machine may be busy with other work:
- wall: images per second, end to end (ours includes starting its workers;
  the baseline runs in a process of its own, timed after its imports);
  ratio/core divides our rate by our worker count.
- CPU: user + system seconds per image of every process involved (ours: the
  main process and its workers). Their ratio is the per-core speed-up when
  cores are free, and other load barely moves it.
Files are read once before timing so both sides start from a warm page cache.
`--make-input N` first writes a reproducible input of N photos into SRC.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from stagewise.benchmarks.datasets import make_input  # the reproducible input (--make-input)
from stagewise.pipeline.build_shards import build_shards
from stagewise.pipeline.imagefix import reencode_path
from stagewise.pipeline.sources import scan_class_tree


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


def _timed_baseline(files: list[tuple[str, int]], out_dir: str, max_side: int, quality: int) -> tuple[float, float]:
    """(wall s, CPU s) of the re-encode baseline, importing webdataset (and torch) before timing."""
    import webdataset  # noqa: F401

    t0, c0 = time.perf_counter(), time.process_time()
    _naive_reencode(files, out_dir, max_side, quality)
    return time.perf_counter() - t0, time.process_time() - c0


def _disk_copy(files: list[tuple[str, int]], out_dir: str) -> None:
    with tarfile.open(os.path.join(out_dir, "copy.tar"), "w") as tar:
        for i, (path, _) in enumerate(files):
            with open(path, "rb") as f:
                data = f.read()
            info = tarfile.TarInfo(f"{i:08d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _in_own_process(fn, *args):
    """fn(*args) in a fresh process.

    What it imports (numpy's BLAS threads, torch's) stays out of this process,
    whose builds would otherwise have to spawn their workers instead of forking.
    """
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _describe(scan) -> str:
    from PIL import Image

    sizes: Counter[str] = Counter()
    for x in scan.inputs:
        try:
            with Image.open(x.path) as im:
                sizes[f"{im.size[0]}x{im.size[1]}"] += 1
        except (OSError, ValueError, Image.DecompressionBombError):
            sizes["unreadable"] += 1
    mix = ", ".join(f"{k} x{v}" for k, v in sizes.most_common(4))
    return f"{len(scan.inputs)} images, {sum(x.size for x in scan.inputs) / 1e6:,.0f} MB ({mix})"


def bench(src: str, max_sides: list[int], workers: int, quality: int, rounds: int, scratch: str) -> dict:
    scan = scan_class_tree(src, src, None)
    files = [(x.path, x.label) for x in scan.inputs]
    n = len(files)
    per_shard = max(1, n // (8 * workers))  # enough shards to keep every worker busy
    mb = sum(x.size for x in scan.inputs) / 1e6
    for path, _ in files:  # warm the page cache for both sides
        with open(path, "rb") as f:
            f.read()

    def fresh(name: str) -> str:
        path = os.path.join(scratch, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    runs: dict[str, tuple[list, list]] = {}  # case -> (ours [(wall s, CPU s)], baseline [(wall s, CPU s)])
    notes: dict[str, str] = {}

    def ours(case: str, **kw) -> tuple[float, float]:
        reports = []
        took = _timed(lambda: reports.extend(build_shards(src, fresh("ours"), workers=workers, quality=quality,
                                                          samples_per_shard=per_shard, **kw)))
        notes[case] = (f"{reports[0].fixes.get('resized', 0)} resized, {reencode_path()}" if "max_side" in kw
                       else f"{reports[0].copied} copied byte for byte")
        return took

    load_before = os.getloadavg()[0]
    for _ in range(rounds):
        for max_side in max_sides:
            case = f"re-encode, --max-side {max_side}"
            runs.setdefault(case, ([], []))[1].append(_in_own_process(_timed_baseline, files, fresh("base"),
                                                                      max_side, quality))
            runs[case][0].append(ours(case, max_side=max_side))
        disk = _timed(lambda: _disk_copy(files, fresh("disk")))
        for fast in (False, True):
            case = "copy" + (", --fast-copy" if fast else ", decode-checked")
            runs.setdefault(case, ([], []))[1].append(disk)
            runs[case][0].append(ours(case, decode_copies=not fast))
    rows = []
    for case, (our, base) in runs.items():
        wall, cpu = statistics.median(w for w, _ in our), statistics.median(c for _, c in our)
        base_wall, base_cpu = statistics.median(w for w, _ in base), statistics.median(c for _, c in base)
        if case.startswith("copy"):
            notes[case] += f"; {mb / wall:,.0f} MB/s vs disk {mb / base_wall:,.0f} MB/s"
        rows.append({"case": case, "images": n, "workers": workers, "ours_img_s": n / wall,
                     "baseline_img_s": n / base_wall,
                     "ratio": base_wall / wall, "ratio_per_core": base_wall / wall / workers,
                     "ours_cpu_ms": cpu / n * 1e3, "baseline_cpu_ms": base_cpu / n * 1e3,
                     "ratio_per_core_cpu": base_cpu / cpu, "note": notes[case]})
    return {"input": _describe(scan), "rounds": rounds, "cores": os.cpu_count(),
            "load_before": load_before, "load_after": os.getloadavg()[0], "rows": rows}


def format_table(result: dict) -> str:
    head = (f"{'case':<29}{'ours img/s':>11}{'base img/s':>11}{'ratio':>7}{'/core':>7}"
            f"{'ours CPU ms':>12}{'base CPU ms':>12}{'/core':>7}  note")
    lines = [f"input: {result['input']}; {result['rows'][0]['workers']} workers", head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['case']:<29}{r['ours_img_s']:>11,.0f}{r['baseline_img_s']:>11,.0f}{r['ratio']:>6.2f}x"
                     f"{r['ratio_per_core']:>6.2f}x{r['ours_cpu_ms']:>12.3f}{r['baseline_cpu_ms']:>12.3f}"
                     f"{r['ratio_per_core_cpu']:>6.2f}x  {r['note']}")
    lines += [
        "baselines: re-encode = 1 process, Pillow + webdataset.ShardWriter; copy = 1 process reading files into a tar",
        "ratio = ours img/s / baseline img/s (wall); /core = that / workers; CPU ms = user+sys CPU per image of all "
        "processes; its /core = baseline CPU / ours CPU",
        f"medians of {result['rounds']} rounds; {result['cores']} cores, load average "
        f"{result['load_before']:.2f} before, {result['load_after']:.2f} after",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="class-per-folder tree of images")
    p.add_argument("--max-sides", default="320,160",
                   help="re-encode cases: downscale to these longer sides (comma-separated, px)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--rounds", type=int, default=3, help="runs of each case, baseline and ours alternating (medians)")
    p.add_argument("--make-input", type=int, default=None, metavar="N",
                   help="first write N photos into SRC, which must be empty or absent (see make_input)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.make_input:
        _in_own_process(make_input, args.src, args.make_input)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as scratch:
        result = bench(args.src, [int(x) for x in args.max_sides.split(",")], args.workers, args.quality,
                       max(1, args.rounds), scratch)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
