"""The GPU check's Python parts: the real-vs-synthetic training comparison and the report.

    python -m stagewise.benchmarks.gpu_check train DATA --out train.json [--sizes 128,185,242,300] [--steps 20]
    python -m stagewise.benchmarks.gpu_check report OUT      # OUT/gpu-check.md from the step outputs

`train`: EfficientNetV2-S (bf16 autocast, channels_last, eager, SGD) trains on the loader's
batches (RandAugment + mixup at each stage's values, one Loader whose stage changes, as the
trainer does) and on one synthetic batch already on the GPU, at each stage size. It reports
images per second of both, their ratio (goal: real >= 0.97 x synthetic), the share of the
step spent waiting for data, and the GPU memory in use after each stage, including a return
to the first and the largest size (goal: < 2% growth). Run by benchmarks/gpu_check.sh
(docs/benchmarks.md, "GPU check").
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

MB = 2**20


def _stage(size: int, k: int, stages: int):
    """Stage k of `stages` with the paper's S ramp (Table 6: RandAugment 5 -> 15, mixup 0 -> 0), here with mixup 0 ->
    0.2 so that the mix stage is timed too."""
    from stagewise.loaders import StageParams

    f = k / max(stages - 1, 1)
    return StageParams(image_size=size, randaug_magnitude=5 + 10 * f, mixup_alpha=0.2 * f if f > 0 else 0.0)


def train_check(data: str, sizes: list[int], batch: int, steps: int, warmup: int, threads: int,
                device_name: str = "cuda", out: Path | None = None) -> dict:
    """device_name="cpu": the dry run of the same code (DALI's CPU mode, fp32, memory as host RSS).
    `out`: rewritten after every stage, so a run cut short by its time box still reports what it measured."""
    import torch
    from torch import nn

    from stagewise.loaders import AugmentSpec, Loader
    from stagewise.model import create_model

    device = torch.device(device_name)
    gpu = device.type == "cuda"
    stages = [_stage(s, k, len(sizes)) for k, s in enumerate(sizes)]
    revisit = [stages[0], stages[-1]]  # back to the first and the largest size: memory must not grow
    loader = Loader(data, split="train", batch_size=batch, stage=stages[0], device=device_name, num_threads=threads,
                    augment=AugmentSpec(channels_last=True))
    model = create_model("efficientnetv2_s", num_classes=loader.num_classes).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):  # bf16 on CPU is ~100x slower
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()

    def stream():
        while True:
            yield from loader

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def used_mib() -> int:
        if gpu:
            free, total = torch.cuda.mem_get_info()
            return round((total - free) / MB)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))

    batches = stream()
    rows, memory = [], []
    result = {"batch": batch, "steps": steps, "threads": threads, "stages": rows, "memory": memory,
              "memory_growth_pct_on_revisit": {},
              "device": torch.cuda.get_device_name() if gpu else "CPU (dry run: DALI CPU mode, fp32, host RSS)"}

    def save() -> None:
        if out is not None:
            first = {m["size"]: m["used_mib"] for m in memory[: len(stages)]}
            result["memory_growth_pct_on_revisit"] = {
                m["size"]: round((m["used_mib"] - first[m["size"]]) / first[m["size"]] * 100, 2)
                for m in memory[len(stages):]}
            out.write_text(json.dumps(result, indent=1))

    for stage in stages + revisit:
        loader.set_stage(stage)
        for _ in range(warmup):  # the stage's first batches, kernels and allocator at this size
            step(*next(batches))
        sync()
        waited, start = 0.0, time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            x, y = next(batches)
            waited += time.perf_counter() - t
            step(x, y)
        sync()
        real = time.perf_counter() - start
        memory.append({"size": stage.image_size, "used_mib": used_mib()})
        if stage in revisit and len(memory) > len(stages):
            save()
            continue  # revisits measure memory only
        x, y = next(batches)
        xs, ys = x.clone(), y.clone()  # one real batch, replayed: the same step without the loader
        for _ in range(warmup):
            step(xs, ys)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step(xs, ys)
        sync()
        synthetic = time.perf_counter() - start
        rows.append({"size": stage.image_size, "randaug": round(stage.randaug_magnitude, 1),
                     "mixup": round(stage.mixup_alpha, 2), "real_img_s": round(batch * steps / real, 1),
                     "synthetic_img_s": round(batch * steps / synthetic, 1),
                     "ratio": round(synthetic / real, 4), "data_wait_share": round(waited / real, 4)})
        print(json.dumps(rows[-1]), flush=True)
    loader.close()
    first = {m["size"]: m["used_mib"] for m in memory[: len(stages)]}
    growth = {m["size"]: round((m["used_mib"] - first[m["size"]]) / first[m["size"]] * 100, 2)
              for m in memory[len(stages):]}
    return {"batch": batch, "steps": steps, "threads": threads, "stages": rows, "memory": memory,
            "memory_growth_pct_on_revisit": growth,
            "device": torch.cuda.get_device_name() if gpu else "CPU (dry run: DALI CPU mode, host RSS)"}


def report(out: Path) -> str:
    """gpu-check.md: the step table and each result in docs/benchmarks.md's table format (a section whose
    output is missing or unreadable says so and the rest still comes)."""
    lines = ["# GPU check", ""]
    for section in (_environment, _steps, _tests, _loader, _engine, _model, _train):
        try:
            lines += section(out)
        except Exception as exc:  # noqa: BLE001 - one step's bad output must not hide the others
            lines += [f"({section.__name__[1:]}: unreadable output, {type(exc).__name__}: {exc})", ""]
    text = "\n".join(lines)
    (out / "gpu-check.md").write_text(text + "\n")
    return text


def _environment(out: Path) -> list[str]:
    lines = []
    env = out / "env.txt"
    if env.exists():
        lines += ["```", env.read_text().strip(), "```", ""]
    return lines


def _steps(out: Path) -> list[str]:
    lines = []
    steps = out / "steps.txt"
    if steps.exists():
        lines += ["| step | exit | seconds |", "|---|---|---|"]
        for line in steps.read_text().split("\n"):
            if line.strip():
                name, rc, secs = (line.split() + ["", ""])[:3]
                lines.append(f"| {name} | {rc} | {secs} |")
        lines.append("")
    return lines


def _tests(out: Path) -> list[str]:
    lines = []
    tests = out / "test.log"
    if tests.exists():
        summary = [line for line in tests.read_text().splitlines()
                   if any(word in line for word in (" passed", " failed", " skipped", " error"))]
        lines += ["## tests/test_gpu.py", "", summary[-1] if summary else "(no summary: see test.log)", ""]
    return lines


def _loader(out: Path) -> list[str]:
    lines = []
    loader = out / "bench-loader.json"
    if loader.exists():
        rows = json.loads(loader.read_text())
        r0 = rows[0]
        lines += [f"## bench-loader (device {r0['device']}, batch {r0['batch']}, RandAugment(2, {r0['magnitude']:g}), "
                  f"mixup {r0['mixup']}, {r0['threads']} threads = baseline workers, load average "
                  f"{r0['load_average'][0]} -> {r0['load_average'][1]})", "",
                  "| size | ours img/s | baseline img/s | ratio | consumer CPU ms | ready ms | ceiling img/s | wait ms "
                  "| ops |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['size']} | {r['ours_img_s']:,.0f} [{r['ours_range'][0]:,.0f}-{r['ours_range'][1]:,.0f}] | "
                         f"{r['baseline_img_s']:,.0f} | {r['ratio']:.2f}x | {r['consumer_ms']:.2f} | "
                         f"{r['ready_ms']:.2f} | {r['ceiling_img_s']:,.0f} | {r['wait_ms']:.1f} | "
                         f"{r['ops']} |")
        lines.append("")
    return lines


def _engine(out: Path) -> list[str]:
    files = sorted(out.glob("engine-*.json"))
    if not files:
        return []
    size = json.loads(files[0].read_text())[0]["size"]
    lines = [f"## Engine options, our side only ({size} px)", "",
             "| variant | img/s [range] | consumer CPU ms | wait ms | ops |", "|---|---|---|---|---|"]
    for path in files:
        r = json.loads(path.read_text())[0]
        lines.append(f"| {path.stem[len('engine-'):]} ({r.get('engine', {})}) | {r['ours_img_s']:,.0f} "
                     f"[{r['ours_range'][0]:,.0f}-{r['ours_range'][1]:,.0f}] | {r['consumer_ms']:.2f} | "
                     f"{r['wait_ms']:.1f} | {r['ops']} |")
    return lines + [""]


def _model(out: Path) -> list[str]:
    lines = []
    for mode in ("eager", "compiled"):
        path = out / f"model-{mode}.log"
        rows = _last_json_list(path) if path.exists() else None
        if path.exists():
            lines += [f"## bench-model, {mode} (channels_last)", ""]
            if rows is None:
                lines += ["(no result: see " + path.name + ")", ""]
                continue
            lines += ["| size | ours img/s | timm img/s | ratio |", "|---|---|---|---|"]
            lines += [f"| {r['size']} | {_n(r['ours_img_s'])} | {_n(r['timm_img_s'])} | {r['ratio']:.2f}x |"
                      for r in rows]
            lines.append("")
    return lines


def _last_json_list(path: Path) -> list | None:
    """bench-model --json prints its rows as the last JSON line; warnings may surround it."""
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("["):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _n(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _train(out: Path) -> list[str]:
    lines = []
    train = out / "train.json"
    if train.exists():
        t = json.loads(train.read_text())
        lines += [f"## EfficientNetV2-S training steps on {t['device']}, real data vs synthetic (batch {t['batch']}, "
                  f"channels_last, eager; goal: ratio >= 0.97)", "",
                  "| size | RandAugment | mixup | real img/s | synthetic img/s | real / synthetic | data wait |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['size']} | {r['randaug']} | {r['mixup']} | {_n(r['real_img_s'])} | "
                  f"{_n(r['synthetic_img_s'])} | {r['ratio']:.3f} | {r['data_wait_share'] * 100:.1f}% |"
                  for r in t["stages"]]
        lines += ["", "Memory in use after each stage (MiB; GPU, or host RSS in a dry run): "
                  + ", ".join(f"{m['size']} px {m['used_mib']:,}" for m in t["memory"])
                  + f"; growth on revisiting a size: {t['memory_growth_pct_on_revisit']} % (goal < 2%)", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagewise.benchmarks.gpu_check", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("data")
    t.add_argument("--out", required=True)
    t.add_argument("--sizes", default="128,185,242,300", help="stage sizes: EfficientNetV2-S's 4 stages, 128 -> 300")
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    t.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the same steps")
    r = sub.add_parser("report")
    r.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "train":
        train_check(args.data, [int(s) for s in args.sizes.split(",")], args.batch, args.steps, args.warmup,
                    args.threads, args.device, Path(args.out))
        return 0
    print(report(Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
