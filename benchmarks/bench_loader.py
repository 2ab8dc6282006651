"""`pipeline bench-loader`: this loader against webdataset + Pillow + torchvision.transforms.v2.

Both sides read the same shards in the same run, at the same sizes, with
RandomResizedCrop + flip + RandAugment(2, m) + normalize. The baseline is a torch
DataLoader with as many worker processes as the loader has CPU threads. Rounds
alternate (ours, baseline, ours, ...); the table gives each side's median round and
the median of the per-round ratios, so load from other processes, which drifts,
hits both sides of a ratio alike. Throughput is images per second of batches
handed to the caller.

Caveat: `--magnitude m` is the reference (TF) scale for us and a bin out of 31 for
torchvision's RandAugment; the ops' cost hardly depends on the magnitude.

Extra sections: `--readers` times DALI's own `fn.readers.webdataset` (with .idx)
against our fsspec streamer with the same image ops (RandAugment off); `--mixup`
times mixing one batch in torch on the output tensor against the loader's DALI
mix stage (the measurement behind loaders/mixup.py's choice).
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="shard dataset: a folder or s3://bucket/prefix holding manifest.json")
    parser.add_argument("--split", default="train")
    parser.add_argument("--sizes", default="128,224,300", help="comma-separated output sizes, px")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, default=20, help="timed batches per round and side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--magnitude", type=float, default=10.0, help="RandAugment magnitude (both sides)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for us = baseline workers (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per side and size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches after each size change")
    parser.add_argument("--readers", action="store_true", help="also time DALI's webdataset reader vs our streamer")
    parser.add_argument("--mixup", action="store_true", help="also time mixup in torch vs in DALI")
    parser.add_argument("--json", action="store_true", help='print [{"size", "ours_img_s", "baseline_img_s", "ratio"}]')


def run(args: argparse.Namespace) -> int:
    from stagewise.loaders import Loader, StageParams

    sizes = [int(s) for s in args.sizes.split(",") if s]
    threads = args.threads or len(os.sched_getaffinity(0))
    stage = StageParams(image_size=sizes[0], randaug_magnitude=args.magnitude, mixup_alpha=0.0)
    loader = Loader(args.url, split=args.split, batch_size=args.batch_size, stage=stage, device=args.device,
                    num_threads=threads)
    ours_stream = _cycle(loader)
    rows = []
    for size in sizes:
        stage = StageParams(image_size=size, randaug_magnitude=args.magnitude, mixup_alpha=0.0)
        loader.set_stage(stage)  # the same built pipeline serves every size
        baseline = _baseline_loader(loader.view.shard_urls, size, args.magnitude, args.batch_size, threads,
                                    args.warmup + args.batches)
        ours, base = [], []
        for _ in range(args.rounds):
            ours.append(_rate(ours_stream, args.batches, args.warmup, args.batch_size, args.device))
            # Fresh workers per round: persistent ones would keep refilling their prefetch
            # queue during our rounds. Their start-up falls in the untimed warm-up.
            base_stream = iter(baseline)
            base.append(_rate(base_stream, args.batches, args.warmup, args.batch_size, args.device))
            for _rest in base_stream:  # let the workers finish their share and exit
                pass
        ratio = float(np.median([o / b for o, b in zip(ours, base)]))
        rows.append({"size": size, "ours_img_s": round(float(np.median(ours)), 1),
                     "baseline_img_s": round(float(np.median(base)), 1), "ratio": round(ratio, 3)})
    extra = []
    if args.readers and args.device == "cpu":
        extra.append(_reader_section(loader, sizes[0], args, threads))
    elif args.readers:
        extra.append("--readers compares CPU-mode pipelines: run it with --device cpu")
    if args.mixup:
        extra.append(_mixup_section(sizes, args.batch_size))
    loader.close()
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"loader vs webdataset+Pillow+torchvision.v2 | {args.url} ({args.split}) | device={args.device} "
          f"threads={threads} batch={args.batch_size} magnitude={args.magnitude} "
          f"rounds={args.rounds}x{args.batches} batches (medians; ratio = median of per-round ratios)")
    print(f"{'size':>6} {'ours img/s':>12} {'baseline img/s':>15} {'ratio':>7}")
    for r in rows:
        print(f"{r['size']:>6} {r['ours_img_s']:>12.1f} {r['baseline_img_s']:>15.1f} {r['ratio']:>6.2f}x")
    for section in extra:
        print()
        print(section)
    return 0


def _cycle(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


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


def _baseline_loader(urls: list[str], size: int, magnitude: float, batch_size: int, workers: int, batches: int):
    """Enough for `batches` batches (each worker fills whole batches of its own)."""
    per_worker = (batches // workers + 1) * batch_size
    # spawn, not fork: the parent already runs DALI threads, and forking a threaded process can deadlock
    return torch.utils.data.DataLoader(
        _BaselineShards(urls, size, magnitude, per_worker), batch_size=batch_size, num_workers=workers,
        multiprocessing_context="spawn", prefetch_factor=2, timeout=WORKER_START_S,
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
