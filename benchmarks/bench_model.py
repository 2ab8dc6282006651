"""`pipeline bench-model`: training-step speed of our efficientnetv2_s against timm's tf_efficientnetv2_s.

Both models run forward + backward (cross-entropy on random labels, no
optimizer step) with the same batch, dtype, memory format, regularization and
input tensor, in the same process. Rounds alternate which model goes first
(ABBA), so drift in clock speed or cache state hits both equally. timm is a
dev extra; it builds its model from code, no weights are downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from stagewise.model import create_model

# Same regularization in both models: our table's final S dropout (paper
# Table 6) and the paper's stochastic depth 0.2 (survival 0.8).
_DROPOUT = 0.3
_DROP_PATH = 0.2
_NUM_CLASSES = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", default="128,192,256,300", help="comma-separated square image sizes, px")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 4 on cpu, 64 on cuda)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model per round (default: 2 on cpu, 20 on cuda)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per size, order alternating; img/s uses the fastest round (default: 5 on cpu, 3 on cuda)")
    parser.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast to bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice, one per core)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str, device: str) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with ctx:
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()

    return step


def _time_steps(step: Callable[[], None], steps: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _prepare(model: nn.Module, device: str, channels_last: bool, compile_: bool) -> nn.Module:
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model, dynamic=False) if compile_ else model  # static graph per size, as the trainer does


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must not try to reach the Hub
    try:
        import timm
    except ImportError:
        print("bench-model needs timm (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench-model: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    batch = args.batch or (64 if args.device == "cuda" else 4)
    steps = args.steps or (20 if args.device == "cuda" else 2)
    rounds = args.rounds or (3 if args.device == "cuda" else 5)

    torch.manual_seed(0)
    ours = _prepare(create_model("efficientnetv2_s", num_classes=_NUM_CLASSES, dropout=_DROPOUT, drop_path_rate=_DROP_PATH),
                    args.device, args.channels_last, args.compile)
    ref = _prepare(timm.create_model("tf_efficientnetv2_s", pretrained=False, num_classes=_NUM_CLASSES,
                                     drop_rate=_DROPOUT, drop_path_rate=_DROP_PATH),
                   args.device, args.channels_last, args.compile)

    rows = []
    for size in sizes:
        x = torch.randn(batch, 3, size, size, device=args.device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, _NUM_CLASSES, (batch,), device=args.device)
        fns = {"ours": _step_fn(ours, x, y, args.dtype, args.device), "timm": _step_fn(ref, x, y, args.dtype, args.device)}
        for fn in fns.values():  # warm-up: allocator, kernels, compilation at this size
            _time_steps(fn, 2 if args.compile else 1, args.device)
        times: dict[str, list[float]] = {"ours": [], "timm": []}
        for r in range(rounds):
            order = ["ours", "timm"] if r % 2 == 0 else ["timm", "ours"]
            for name in order:
                times[name].append(_time_steps(fns[name], steps, args.device))
        # Fastest round (as timeit does): load from other processes only ever adds
        # time, and alternating rounds give both models the same chances.
        ours_ips = batch * steps / min(times["ours"])
        timm_ips = batch * steps / min(times["timm"])
        rows.append({"size": size, "ours_img_s": round(ours_ips, 2), "timm_img_s": round(timm_ips, 2),
                     "ratio": round(ours_ips / timm_ips, 3)})
        if not args.json:
            print(f"size {size}: ours {ours_ips:.1f} img/s, timm {timm_ips:.1f} img/s, ratio {ours_ips / timm_ips:.3f}",
                  file=sys.stderr, flush=True)

    if args.json:
        print(json.dumps(rows))
    else:
        threads = torch.get_num_threads() if args.device == "cpu" else "-"
        print(f"efficientnetv2_s vs timm tf_efficientnetv2_s, forward+backward, device {args.device} "
              f"(threads {threads}), batch {batch}, {steps} steps x {rounds} rounds (best), dtype {args.dtype}, "
              f"{'channels_last' if args.channels_last else 'NCHW'}, {'compiled' if args.compile else 'eager'}")
        print(f"{'size':>6} {'ours img/s':>11} {'timm img/s':>11} {'ratio':>7}")
        for row in rows:
            print(f"{row['size']:>6} {row['ours_img_s']:>11.1f} {row['timm_img_s']:>11.1f} {row['ratio']:>6.3f}x")
    return 0
