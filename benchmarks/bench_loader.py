"""`pipeline bench-loader`: this loader against webdataset + Pillow + torchvision.transforms.v2.

Both sides read the same shards in the same run, at the same sizes, with
RandomResizedCrop + flip + RandAugment(2, m) (+ mixup with --mixup-alpha) + normalize.
The baseline is a torch DataLoader with as many worker processes as the loader has
CPU threads. Rounds alternate (ours, baseline, ours, ...); the table gives each side's
median round with the range over rounds, and the median of the per-round ratios, so
load from other processes, which drifts, hits both sides of a ratio alike. Throughput
is images per second of batches handed to the caller.

Per batch, for our side (medians over rounds; the loader's own accounting, `Loader.stats`):
- assemble / draw / feed: CPU ms of the consuming thread taking the samples, drawing the
  random parameters, and feeding DALI (feed_input, schedule_run);
- hand-over: its CPU ms in `outputs()`, the DLPack hand-over and the targets;
- other: the rest of the consuming thread's CPU (the runner's bookkeeping, and handing each
  epoch over, which this benchmark's small datasets do every few batches);
- epochs, open: epochs begun per timed round, and CPU ms per epoch to open it (its plan and
  shard stream, mostly in a background thread). On a small split (105 images, batch 64: one
  batch an epoch) every batch turns an epoch over; the runner then keeps several epochs in
  flight, so the rate should stay near a large split's (see docs/loader.md, Epoch turnover);
- consumer: all of the consuming thread's CPU per batch, pulling as fast as it can;
- ready: the same when each batch is ready before it is pulled, as in a trainer whose step
  takes longer than the loader's batch: every round also pulls `--batches` batches, each
  after a pause of 1.5x the round's wall time per batch (a sleep, outside the timing). A
  thread that pulls from a loader still working spends CPU inside `outputs()` while it
  waits (measured: 1.5-2.3 ms per batch of 256 at 128 px on 2 cores, 0.7 ms when ready),
  so `consumer` is the starved case and `ready` the loader's own cost; the ceiling,
  batch / ready in img/s, is what this thread alone would allow;
- wait: wall ms inside `outputs()` (DALI still working) and waiting for the host decoder;
- host decode: CPU ms of the host decoder's threads (crop-decode-resize in C, loaders/hostdecode.py;
  the CPU default where it is built, `--host-decode off` for DALI's decoder);
- DALI CPU: CPU ms of every other thread of the process (DALI's workers), i.e. the
  process's CPU time less the consuming thread's, the shard readers' and the host decoder's;
- ops: operators in the loader's DALI graph (`graph.count_ops`), and in the GPU graph.

Caveat: `--magnitude m` is the reference (TF) scale for us and a bin out of 31 for
torchvision's RandAugment; the ops' cost hardly depends on the magnitude.

Extra sections: `--readers` times DALI's own `fn.readers.webdataset` (with .idx)
against our fsspec streamer with the same image ops (RandAugment off); `--mixup`
times mixing one batch in torch on the output tensor against the loader's DALI
mix stage (the measurement behind loaders/mixup.py's choice); `--parity` prints the
eval path's difference from torchvision's Resize + CenterCrop + Normalize
(benchmarks/parity.py) at each size.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import numpy as np
import torch

WORKER_START_S = 120  # the baseline's first batch includes spawning workers
COLUMNS = ("assemble", "draw", "feed", "handover", "other", "consumer", "ready", "ready_handover", "wait",
           "host_cpu", "dali_cpu")  # ms per batch, ours


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="shard dataset: a folder or s3://bucket/prefix holding manifest.json")
    parser.add_argument("--split", default="train")
    parser.add_argument("--sizes", default="128,224,300", help="comma-separated output sizes, px")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, default=20, help="timed batches per round and side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--magnitude", type=float, default=10.0, help="RandAugment magnitude (both sides)")
    parser.add_argument("--mixup-alpha", type=float, default=0.0,
                        help="mixup on both sides (ours in the stage, the baseline's v2.MixUp in its workers)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for us = baseline workers (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per side and size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches after each size change")
    parser.add_argument("--readers", action="store_true", help="also time DALI's webdataset reader vs our streamer")
    parser.add_argument("--mixup", action="store_true", help="also time mixup in torch vs in DALI")
    parser.add_argument("--parity", action="store_true", help="also print the eval path's difference from torchvision")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON list of rows: size, img/s, ratio, ranges and the per-batch columns')
    parser.add_argument("--json-out", default=None, help="also write those rows to this file (the table is printed)")
    parser.add_argument("--no-baseline", action="store_true", help="time our side only (engine option comparisons)")
    parser.add_argument("--concurrency", choices=["none", "backend", "full"], default=None,
                        help="DALI operator concurrency (EngineSpec.concurrency; default DALI's)")
    parser.add_argument("--stream-policy", choices=["single", "per_backend", "per_operator"], default=None,
                        help="DALI stream policy (EngineSpec.stream_policy; default DALI's)")
    parser.add_argument("--hw-decoder-load", type=float, default=None, help="GPU: EngineSpec.hw_decoder_load")
    parser.add_argument("--branchless", choices=["auto", "on", "off"], default="auto",
                        help="RandAugment without conditionals (EngineSpec.branchless; auto: on GPU only)")
    parser.add_argument("--host-decode", choices=["auto", "on", "off"], default="auto",
                        help="CPU: crop-decode-resize on the host before DALI (EngineSpec.host_decode; auto: on CPU "
                             "where loaders/_cropdecode.c is built), off: DALI's decoder and resize")


def run(args: argparse.Namespace) -> int:
    from stagewise.loaders import EngineSpec, Loader, StageParams
    from stagewise.loaders.graph import Layout, graph_op_count

    sizes = [int(s) for s in args.sizes.split(",") if s]
    threads = args.threads or len(os.sched_getaffinity(0))
    load_start = os.getloadavg()

    def stage_at(size: int) -> StageParams:
        return StageParams(image_size=size, randaug_magnitude=args.magnitude, mixup_alpha=args.mixup_alpha)

    engine = EngineSpec(concurrency=args.concurrency, stream_policy=args.stream_policy,
                        branchless={"auto": None, "on": True, "off": False}[args.branchless],
                        host_decode={"auto": None, "on": True, "off": False}[args.host_decode],
                        **({} if args.hw_decoder_load is None else {"hw_decoder_load": args.hw_decoder_load}))
    loader = Loader(args.url, split=args.split, batch_size=args.batch_size, stage=stage_at(sizes[0]),
                    device=args.device, num_threads=threads, engine=engine)
    ops = sum(graph_op_count(loader.augment, loader.layout).values())
    gpu_layout = Layout(train=True, gpu=True, branchless=True, roi_decode=False, compact=True)
    gpu_ops = sum(graph_op_count(loader.augment, gpu_layout).values())
    ours_stream = _cycle(loader)
    rows = []
    for size in sizes:
        loader.set_stage(stage_at(size))  # the same built pipeline serves every size
        baseline = None if args.no_baseline else _baseline_loader(
            loader.view.shard_urls, size, args.magnitude, args.batch_size, threads, args.warmup + args.batches,
            args.mixup_alpha, loader.num_classes)
        ours, base, parts = [], [], []
        for _ in range(args.rounds):
            rate, part = _our_round(loader, ours_stream, args)
            part.update(_ready_round(loader, ours_stream, args, pause_s=1.5 * args.batch_size / rate))
            ours.append(rate)
            parts.append(part)
            if baseline is None:
                base.append(float("nan"))
                continue
            # Fresh workers per round: persistent ones would keep refilling their prefetch
            # queue during our rounds. Their start-up falls in the untimed warm-up.
            base_stream = iter(baseline)
            base.append(_rate(base_stream, args.batches, args.warmup, args.batch_size, args.device))
            for _rest in base_stream:  # let the workers finish their share and exit
                pass
        ratios = [o / b for o, b in zip(ours, base)]
        row = {"size": size, "ours_img_s": round(float(np.median(ours)), 1),
               "baseline_img_s": round(float(np.median(base)), 1), "ratio": round(float(np.median(ratios)), 3),
               "ours_range": [round(min(ours), 1), round(max(ours), 1)],
               "baseline_range": [round(min(base), 1), round(max(base), 1)],
               "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}
        for column in COLUMNS:
            values = [p[column] for p in parts]
            row[f"{column}_ms"] = round(float(np.median(values)), 3)
            row[f"{column}_ms_range"] = [round(min(values), 3), round(max(values), 3)]
        row["ceiling_img_s"] = round(args.batch_size / row["ready_ms"] * 1e3, 1)
        for column, name in (("epochs", "epochs_per_round"), ("open_per_epoch", "open_ms_per_epoch")):
            values = [p[column] for p in parts]
            row[name], row[f"{name}_range"] = round(float(np.median(values)), 3), [min(values), max(values)]
        row["ops"], row["gpu_graph_ops"] = ops, gpu_ops
        row["engine"] = {k: v for k, v in vars(engine).items() if v is not None}
        rows.append(row)
    extra = []
    if args.readers and args.device == "cpu":
        extra.append(_reader_section(loader, sizes[0], args, threads))
    elif args.readers:
        extra.append("--readers compares CPU-mode pipelines: run it with --device cpu")
    if args.mixup:
        extra.append(_mixup_section(sizes, args.batch_size))
    loader.close()
    if args.parity:
        from stagewise.benchmarks.parity import compare, report

        extra.append("\n".join(report(compare(args.url, args.split, size, 0.875, 128, device=args.device,
                                                geometry=geometry))
                               for size in sizes for geometry in ("torchvision", "window")))
    load_end = os.getloadavg()
    for row in rows:
        row.update(load_average=[round(load_start[0], 2), round(load_end[0], 2)], device=args.device,
                   batch=args.batch_size, threads=threads, magnitude=args.magnitude, mixup=args.mixup_alpha)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"loader vs webdataset+Pillow+torchvision.v2 | {args.url} ({args.split}) | device={args.device} "
          f"threads={threads} batch={args.batch_size} magnitude={args.magnitude} mixup={args.mixup_alpha} "
          f"rounds={args.rounds}x{args.batches} batches (medians [ranges]; ratio = median of per-round ratios) | "
          f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    print(f"{'size':>5} {'ours img/s':>20} {'baseline img/s':>20} {'ratio':>18}")
    for r in rows:
        print(f"{r['size']:>5} {_ranged(r['ours_img_s'], r['ours_range'], 1):>20} "
              f"{_ranged(r['baseline_img_s'], r['baseline_range'], 1):>20} "
              f"{_ranged(r['ratio'], r['ratio_range'], 2, 'x'):>18}")
    print()
    print(f"our side, ms per batch of {args.batch_size} (medians over rounds): consuming thread's CPU pulling "
          f"as fast as it can, and with each batch ready (ready, ready hand-over; ceiling = batch / ready), "
          f"wall time waiting, CPU of the host decoder's and of DALI's threads; graph operators: "
          f"{ops} here, {gpu_ops} in the GPU graph; decoder: {'host' if loader.layout.host_decode else 'DALI'}")
    print(f"{'size':>5} {'assemble':>9} {'draw':>6} {'feed':>6} {'hand-over':>10} {'other':>6} {'consumer':>9} "
          f"{'ready':>6} {'ready hand-over':>16} {'ceiling img/s':>14} {'wait':>8} {'host decode':>12} {'DALI CPU':>9} "
          f"{'epochs/round':>13} {'open ms/epoch':>14}")
    for r in rows:
        print(f"{r['size']:>5} {r['assemble_ms']:>9.2f} {r['draw_ms']:>6.2f} {r['feed_ms']:>6.2f} "
              f"{r['handover_ms']:>10.2f} {r['other_ms']:>6.2f} {r['consumer_ms']:>9.2f} {r['ready_ms']:>6.2f} "
              f"{r['ready_handover_ms']:>16.2f} {r['ceiling_img_s']:>14.0f} {r['wait_ms']:>8.1f} "
              f"{r['host_cpu_ms']:>12.1f} {r['dali_cpu_ms']:>9.1f} {r['epochs_per_round']:>13.0f} "
              f"{r['open_ms_per_epoch']:>14.2f}")
    for section in extra:
        print()
        print(section)
    return 0


def _ranged(value: float, span: list[float], digits: int, unit: str = "") -> str:
    return f"{value:.{digits}f}{unit} [{span[0]:.{digits}f}-{span[1]:.{digits}f}]"


def _cycle(loader):
    while True:
        yield from loader  # each pass is the next epoch


def _our_round(loader, stream, args) -> tuple[float, dict]:
    """img/s of one timed round of ours, and its per-batch accounting (ms)."""
    for _ in range(args.warmup):
        next(stream)
    stats = loader.stats
    stats.reset()
    process, reader, host = time.process_time(), loader.reader_cpu, loader.host_decode_cpu
    start, thread = time.perf_counter(), time.thread_time()
    images = 0
    for _ in range(args.batches):
        x, _y = next(stream)
        images += x.shape[0]
    consumer = time.thread_time() - thread
    if args.device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n = args.batches
    parts = stats.assemble + stats.draw + stats.feed + stats.handover
    host = loader.host_decode_cpu - host
    dali = (time.process_time() - process) - consumer - (loader.reader_cpu - reader) - host
    part = {"assemble": stats.assemble, "draw": stats.draw, "feed": stats.feed, "handover": stats.handover,
            "other": max(consumer - parts, 0.0), "consumer": consumer, "wait": stats.wait, "host_cpu": host,
            "dali_cpu": max(dali, 0.0)}
    per_batch = {k: v / n * 1e3 for k, v in part.items()}
    per_batch["epochs"] = stats.epochs  # per round, not per batch
    per_batch["open_per_epoch"] = stats.open / max(stats.epochs, 1) * 1e3
    return images / elapsed, per_batch


def _ready_round(loader, stream, args, pause_s: float) -> dict:
    """The consuming thread's CPU per pull (ms) when each batch is ready: a pause before every pull, untimed."""
    if args.device != "cpu":
        torch.cuda.synchronize()
    stats = loader.stats
    stats.reset()
    cpu = 0.0
    for _ in range(args.batches):
        time.sleep(pause_s)  # a trainer's step: the loader finishes the batches in flight meanwhile
        start = time.thread_time()
        next(stream)
        cpu += time.thread_time() - start
    return {"ready": cpu / args.batches * 1e3, "ready_handover": stats.handover / args.batches * 1e3}


def _rate(stream, batches: int, warmup: int, batch_size: int, device: str = "cpu") -> float:
    """Images per second handed over on `device` (the baseline's CPU batches are moved there, as a trainer would)."""
    def pull():
        x, _y = next(stream)
        return x.to(device, non_blocking=True) if device != "cpu" else x

    for _ in range(warmup):
        pull()
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        images += pull().shape[0]
    if device != "cpu":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


# ---------------------------------------------------------------- the baseline
def _open_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    import fsspec

    return fsspec.open(url, mode).open()


class _BaselineShards(torch.utils.data.IterableDataset):
    """webdataset + Pillow decode + torchvision.transforms.v2, cycling over the shards, `per_worker` samples.

    A round's worth of samples, so that the workers finish and exit cleanly when the
    caller drains the iterator (killing busy workers made them abort).
    """

    def __init__(self, urls: list[str], size: int, magnitude: float, per_worker: int) -> None:
        self.urls, self.size, self.magnitude, self.per_worker = urls, size, magnitude, per_worker

    def __iter__(self):
        import webdataset as wds
        from torchvision.transforms import v2

        from stagewise.shards import IMAGE_EXT, LABEL_EXT

        # webdataset 1.0.2 has no s3:// handler (`wds.gopen` is the function; the table is in the module)
        importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _open_fsspec
        transform = v2.Compose([
            v2.RandomResizedCrop(self.size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(num_ops=2, magnitude=min(int(round(self.magnitude)), 30)),  # torchvision: bins 0..30
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * 3, [0.5] * 3),
        ])
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if len(self.urls) >= workers:  # webdataset's default: whole shards per worker
            data = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False)
        else:  # fewer shards than workers: every worker reads all shards and keeps every workers-th sample
            data = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False,
                                  workersplitter=None).slice(worker, None, workers)
        data = data.decode("pil").to_tuple(IMAGE_EXT, LABEL_EXT).map_tuple(transform, int)
        left = self.per_worker
        while left > 0:
            before = left
            for sample in data:
                yield sample
                left -= 1
                if left == 0:
                    return
            if left == before:
                raise RuntimeError(f"baseline worker {worker}/{workers} got no samples from {len(self.urls)} shard(s)")


class _MixupCollate:
    """The baseline's mixup: torchvision's v2.MixUp on each collated batch, in the worker (picklable for spawn)."""

    def __init__(self, alpha: float, num_classes: int) -> None:
        self.alpha, self.num_classes = alpha, num_classes

    def __call__(self, batch):
        from torchvision.transforms import v2

        images, labels = torch.utils.data.default_collate(batch)
        return v2.MixUp(alpha=self.alpha, num_classes=self.num_classes)(images, labels)


def _baseline_loader(urls: list[str], size: int, magnitude: float, batch_size: int, workers: int, batches: int,
                     mixup_alpha: float = 0.0, num_classes: int = 0):
    """Enough for `batches` batches (each worker fills whole batches of its own)."""
    per_worker = (batches // workers + 1) * batch_size
    collate = _MixupCollate(mixup_alpha, num_classes) if mixup_alpha > 0 else None
    # spawn, not fork: the parent already runs DALI threads, and forking a threaded process can deadlock
    return torch.utils.data.DataLoader(
        _BaselineShards(urls, size, magnitude, per_worker), batch_size=batch_size, num_workers=workers,
        multiprocessing_context="spawn", prefetch_factor=2, timeout=WORKER_START_S, collate_fn=collate,
    )


# ---------------------------------------------------------------- --readers
def _reader_section(loader, size: int, args: argparse.Namespace, threads: int) -> str:
    """Same image ops (ROI decode, resize, flip, normalize; no RandAugment) behind two readers."""
    from stagewise.loaders import StageParams

    loader.set_stage(StageParams(image_size=size, randaug_magnitude=0.0, mixup_alpha=0.0, randaug_ops=0))
    ours_stream = _cycle(loader)
    pipes = [_dali_reader_pipeline(loader.view, size, args.batch_size, k, threads) for k in range(threads)]
    dali_stream = _round_robin(pipes)
    ours, dali = [], []
    for _ in range(args.rounds):
        ours.append(_rate(ours_stream, args.batches, args.warmup, args.batch_size))
        dali.append(_rate(dali_stream, args.batches, args.warmup, args.batch_size))
    lines = [f"readers at {size}px, no RandAugment, {threads} pipeline(s) x 1 thread, {args.url}",
             f"{'reader':>32} {'img/s':>8}",
             f"{'fsspec streamer (ours)':>32} {float(np.median(ours)):>8.1f}",
             f"{'DALI fn.readers.webdataset+idx':>32} {float(np.median(dali)):>8.1f}"]
    return "\n".join(lines)


def _dali_reader_pipeline(view, size: int, batch_size: int, shard_id: int, num_shards: int):
    from nvidia.dali import fn, pipeline_def, types

    from stagewise.shards import IMAGE_EXT, LABEL_EXT

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=shard_id, prefetch_queue_depth=2)
    def graph():
        jpg, cls = fn.readers.webdataset(
            paths=view.shard_urls, index_paths=view.index_urls, ext=[IMAGE_EXT, LABEL_EXT],
            shard_id=shard_id, num_shards=num_shards, random_shuffle=True, initial_fill=1024, name="reader",
        )
        anchor, shape = fn.random_crop_generator(fn.peek_image_shape(jpg), random_area=[0.08, 1.0],
                                                 random_aspect_ratio=[3 / 4, 4 / 3])
        img = fn.decoders.image_slice(jpg, anchor, shape, axes=[0, 1], output_type=types.RGB)
        img = fn.resize(img, size=[size, size], antialias=True)
        img = fn.flip(img, horizontal=fn.random.coin_flip())
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                        std=[127.5] * 3), cls

    pipe = graph()
    pipe.build()
    return pipe


def _round_robin(pipes):
    from nvidia.dali.plugin.pytorch import feed_ndarray

    k = 0
    while True:
        images, _cls = pipes[k % len(pipes)].run()
        dense = images.as_tensor()
        out = torch.empty(tuple(dense.shape()), dtype=torch.float32)
        feed_ndarray(dense, out)
        yield out, None
        k += 1


# ---------------------------------------------------------------- --mixup
def _torch_mixup(images: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """What mixing after DALI would cost: an index copy and one in-place lerp on the output tensor."""
    return images.lerp_(images[perm], 1.0 - lam)


def _mixup_section(sizes: list[int], batch_size: int, repeats: int = 10) -> str:
    """ms to mix one batch: torch on the output tensor vs the extra DALI ops the loader runs (ops.mix)."""
    lines = [f"mixup of one batch of {batch_size}, ms per batch (torch: {torch.get_num_threads()} threads)",
             f"{'size':>6} {'torch':>8} {'DALI (marginal)':>16}"]
    perm = torch.from_numpy(np.random.default_rng(1).permutation(batch_size))
    for size in sizes:
        images = torch.randn(batch_size, 3, size, size)
        _torch_mixup(images, perm, 0.3)
        start = time.perf_counter()
        for _ in range(repeats):
            _torch_mixup(images, perm, 0.3)
        torch_ms = (time.perf_counter() - start) / repeats * 1e3
        plain, mixed = _dali_mix_time(size, batch_size, repeats, mix=False), _dali_mix_time(size, batch_size, repeats, mix=True)
        lines.append(f"{size:>6} {torch_ms:>8.2f} {max(mixed - plain, 0.0):>16.2f}")
    return "\n".join(lines)


def _dali_mix_time(size: int, batch_size: int, repeats: int, mix: bool) -> float:
    """ms per run of a float batch through normalize, with or without the loader's own mix stage."""
    from nvidia.dali import fn, pipeline_def, types

    from stagewise.loaders import ops
    from stagewise.loaders.mixup import MIXUP, MixParams, feed_mix

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1,
                  enable_conditionals=True)
    def graph():
        img = fn.external_source(name="img", dtype=types.FLOAT, ndim=3, layout="HWC")
        if mix:
            img = ops.mix(img, ops.mix_inputs())
        return ops.normalize(img, (0.5,) * 3, (0.5,) * 3, channels_last=False)

    pipe = graph()
    pipe.build()
    batch = np.random.default_rng(0).uniform(0, 255, (batch_size, size, size, 3)).astype(np.float32)
    params = MixParams(MIXUP, 0.3, np.random.default_rng(1).permutation(batch_size).astype(np.int32), (0, 0, 0, 0))
    times = []
    for _ in range(repeats + 1):
        pipe.feed_input("img", batch)
        if mix:
            feed_mix(pipe, params, batch_size, size)
        start = time.perf_counter()
        pipe.run()
        times.append(time.perf_counter() - start)
    return float(np.mean(times[1:])) * 1e3
