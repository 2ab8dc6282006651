"""`pipeline bench-progressive DEST`: time to accuracy of progressive learning against fixed-size training.

The paper's Tables 12 and 13 in one command, on any shard dataset with train
and val splits. Every setting trains the same model on the same data for the
same epochs with the same recipe, once per `--seeds` value:

- fixed:     the final size and the final regularization throughout (one stage);
- small:     the smallest size throughout (one stage), evaluated at the eval
             size: the cheap baseline progressive must beat, and the check that
             resolution matters on this data;
- vanilla:   sizes ramp, regularization at its final values (Table 13 "vanilla");
- adaptive:  Algorithm 1, sizes and regularization ramp together (the default);
- random-resize, automl (only when asked): Mix&Match with adaptive
  regularization (Table 13), and the official code's stage sizes;
- ffcv, composer (only when asked): the peer schedules a user picks today for
  a faster ImageNet run (issue 21), regularization constant at its final
  values: FFCV's late linear size ramp and Composer's progressive resizing
  (train/schedule.py gives their rules and sources). Both run between the
  same --min-size and --max-size: Composer's start scale is min/max.

Each run evaluates its EMA weights at the eval size at every stage end and at
`--eval-points` evenly spaced steps (the trainer's `run.eval_points`), and
records the training wall time (evaluation excluded) and the images seen at
each point. The table gives final top-1 (mean ± sd over seeds), training time,
and time to target: the training time at which a setting's mean curve first
reaches the fixed setting's final mean top-1, in seconds and as a ratio to
fixed's total; plus the measured training cost per image at the smallest and
largest size, so that a reader sees whether the sizes were compute-bound. When
ffcv or composer ran, one more line: adaptive's training time to the best peer
schedule's final mean top-1, as a ratio to that schedule's training time
(issue 21's goal: at most 0.8x, and a final top-1 no lower).

`--model torchvision:NAME` (a ResNet: the paper's Table 12) trains with SGD and
Nesterov momentum (the trainer's optimizer for ResNets, docs/training.md), LR
0.1 per 256 images (Goyal et al. 2017) and weight decay 5e-5 (FFCV's rn18
configs); torchvision models take no dropout or stochastic depth (the trainer
pushes them only to models with set_dropout), so the EfficientNet-only flags
are not passed and "adaptive" ramps RandAugment and mixup only, as the header
and the table say. `--time-budget 20m` gives every setting the same wall-clock
budget instead of the same epochs (the trainer's schedule.time_budget); each
run is then a `python -m stagewise.train` process of its own, so that each is
charged its own start-up (train_in_child).
`--json` keeps all of it and every curve; a PNG plots top-1 against training
time, one mean line and a min-max band over seeds per setting.

Defaults are the 2-core CPU configuration of docs/training.md (texture task
from `python -m stagewise.benchmarks.datasets textures`); `--device cuda`
switches to paper-like sizes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time

# Setting name -> (label, what it adds to the shared command line). {min} is the smallest train size.
SETTINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fixed": ("fixed size", ("--schedule.stages=1",)),
    "small": ("fixed small", ("--schedule.stages=1", "--schedule.min_size={min}", "--schedule.max_size={min}")),
    "vanilla": ("progressive, vanilla", ("--schedule.adaptive=false",)),
    "adaptive": ("progressive, adaptive", ()),
    "random-resize": ("random resize, adaptive", ("--schedule.kind=random-resize", "--schedule.chunk_epochs={chunk}")),
    "automl": ("progressive, official code", ("--schedule.kind=automl",)),
    "ffcv": ("FFCV late size ramp", ("--schedule.kind=ffcv",)),  # regularization constant: the final values
    "composer": ("Composer progressive resizing", ("--schedule.kind=composer",)),
}
PEERS = ("ffcv", "composer")  # the schedules adaptive is held against (issue 21)
PEER_GOAL = 0.8  # issue 21: adaptive reaches the best peer's final top-1 in <= 0.8x that peer's training time
TORCHVISION = "torchvision:"
# ResNets (torchvision): the trainer's SGD + Nesterov (docs/training.md), LR 0.1 per 256 images (Goyal et al.
# 2017: 1.6 per 4096), weight decay 5e-5 (FFCV's rn18 configs; rn50's: 1e-4).
RESNET_RECIPE = ("--optim.optimizer=momentum", "--optim.lr=1.6", "--optim.weight_decay=5e-5")

DEFAULT_SETTINGS = ("fixed", "small", "vanilla", "adaptive")

# Per device: model, sizes (px), epochs, batch, stages. CPU: 2 cores, one torch thread (docs/training.md).
# CUDA: efficientnetv2_s at Table 6's sizes. Test size and crop (None): the trainer's default for the final
# train size (train/data.py: the model's test-to-train ratio; S: 300 -> 384), the same for every setting.
DEVICE_DEFAULTS: dict[str, dict] = {
    "cpu": {"model": "efficientnetv2_b0", "min_size": 64, "max_size": 128, "eval_size": None, "eval_crop": None,
            "epochs": 12, "batch": 32, "stages": 4, "threads": 1},
    "cuda": {"model": "efficientnetv2_s", "min_size": 128, "max_size": 300, "eval_size": None, "eval_crop": None,
             "epochs": 16, "batch": 128, "stages": 4, "threads": 0},
}


class BenchError(ValueError):
    """A user's mistake, reported as one line before any training starts."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", metavar="DEST", help="shard dataset with train and val splits (pipeline build-shards)")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), metavar="NAME",
                   help=f"which settings to run: {', '.join(SETTINGS)} (default: {' '.join(DEFAULT_SETTINGS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and setting")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model and the loader run")
    p.add_argument("--model", help="model/ name or torchvision:NAME (cpu: efficientnetv2_b0, cuda: efficientnetv2_s)")
    p.add_argument("--min-size", type=int, help="smallest train size, px (cpu 64, cuda 128)")
    p.add_argument("--max-size", type=int, help="final train size, px (cpu 128, cuda 300)")
    p.add_argument("--eval-size", type=int, help="test size, px (default: the trainer's for the final size; "
                                                  "cpu 149, cuda 384)")
    p.add_argument("--eval-crop", type=float, help="test center-crop fraction (default: the model's)")
    p.add_argument("--epochs", type=int, help="epochs of every run (cpu 12, cuda 16)")
    p.add_argument("--time-budget", metavar="DURATION", default="",
                   help="every setting gets this wall-clock budget (e.g. 20m, 1h30m) instead of --epochs: the "
                        "trainer's schedule.time_budget")
    p.add_argument("--batch", type=int, help="global batch (cpu 32, cuda 128)")
    p.add_argument("--stages", type=int, help="progressive stages (4)")
    p.add_argument("--threads", type=int, help="torch CPU threads (cpu 1: DALI gets the other core; cuda 0 = all)")
    p.add_argument("--max-steps", type=int, default=0, help="> 0: stop every run after this many steps (smoke tests)")
    p.add_argument("--eval-points", type=int, default=8, help="evaluations at evenly spaced steps, besides stage ends")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any trainer config key for every run, e.g. --set optim.lr=0.1 (repeat)")
    p.add_argument("--run-dir", default="runs/bench-progressive", help="one subfolder per run, and the outputs")
    p.add_argument("--json", metavar="FILE", help="write everything, every curve included, to FILE")
    p.add_argument("--plot", metavar="FILE", help="PNG of top-1 against training time (default: beside --json, "
                                                   "else RUN_DIR/bench-progressive.png)")


def base_args(a: argparse.Namespace, d: dict) -> list[str]:
    """The trainer's command line shared by every setting (a short-run recipe; see docs/training.md)."""
    args = [
        "--data", a.dest, "--model", d["model"], f"--run.device={a.device}", f"--data.device={a.device}",
        f"--run.threads={d['threads']}", "--run.checkpoints=false", "--run.ckpt_every=0", "--run.progress=false",
        "--run.tensorboard=false", "--run.plots=false", "--run.eval=stages", f"--run.eval_points={a.eval_points}",
        f"--schedule.epochs={d['epochs']}", f"--schedule.stages={d['stages']}",
        f"--schedule.min_size={d['min_size']}", f"--schedule.max_size={d['max_size']}",
        f"--data.eval_size={d['eval_size']}", f"--data.eval_crop_pct={d['eval_crop']}",
        f"--optim.batch_size={d['batch']}",
        # A train record (it names the stage's image size) at least once per epoch, for the cost per size.
        f"--run.log_every={max(1, min(20, getattr(a, 'train_samples', 0) // d['batch']))}",
    ]
    resnet = d["model"].startswith(TORCHVISION)
    # One warm-up epoch; auto (a tenth of the run) when --max-steps may cut the run to an epoch or less.
    warmup = "--optim.warmup_epochs=-1" if a.max_steps else "--optim.warmup_epochs=1"
    if a.device == "cpu":
        args += [
            # Short runs (hundreds of steps), as the demo: see docs/training.md for the evidence behind each.
            "--optim.lr=0.064", warmup, "--optim.lr_decay=cosine",
            "--model.bn_momentum=0.1", "--model.zero_head=true", "--model.channels_last=false",
            "--data.crop_scale=0.35,1",
            # Table 6's EfficientNetV2-S regularization range (B0's own row has no RandAugment).
            "--schedule.min_randaug=5", "--schedule.max_randaug=15", "--schedule.min_mixup=0",
            "--schedule.max_mixup=0",
        ]
        if not resnet:  # a torchvision model takes neither (models.supports_dropout): not passed, not claimed
            args += ["--model.drop_path_rate=0.1", "--schedule.min_dropout=0.1", "--schedule.max_dropout=0.3"]
    else:
        args += [warmup, "--optim.lr_decay=cosine", "--model.zero_head=true",
                 "--data.crop_scale=0.35,1"]
    if resnet:
        args += RESNET_RECIPE  # after the CPU recipe's LR: the later flag wins
    if a.time_budget:
        args.append(f"--schedule.time_budget={a.time_budget}")
    if a.max_steps:
        args.append(f"--schedule.max_steps={a.max_steps}")
    for item in a.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise BenchError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.1")
        args.append(f"--{key.removeprefix('--')}={value}")
    return args


def resolved(a: argparse.Namespace) -> dict:
    d = dict(DEVICE_DEFAULTS[a.device])
    for key in ("model", "min_size", "max_size", "eval_size", "eval_crop", "epochs", "batch", "stages", "threads"):
        if getattr(a, key) is not None:
            d[key] = getattr(a, key)
    if d["eval_size"] is None or d["eval_crop"] is None:  # what the trainer would test the fixed setting at
        from stagewise.train import config, data, models
        from stagewise.train.schedule import preset_from_config

        cfg = config.parse(["--model", d["model"], f"--schedule.min_size={d['min_size']}",
                            f"--schedule.max_size={d['max_size']}"])
        variant = models.variant_of(d["model"])
        size, crop = data.eval_size_and_crop(cfg, variant, preset_from_config(cfg.schedule, d["model"], variant))
        d["eval_size"] = d["eval_size"] or size
        d["eval_crop"] = d["eval_crop"] or crop
    return d


def setting_args(name: str, d: dict) -> list[str]:
    chunk = max(1, d["epochs"] // 8)  # random-resize: about 8 sizes per run (paper: one per 8 of 350 epochs)
    return [x.format(min=d["min_size"], chunk=chunk) for x in SETTINGS[name][1]]


def check_inputs(a: argparse.Namespace) -> None:
    """Everything that can be wrong with the command, found before the first training starts."""
    unknown = [s for s in a.settings if s not in SETTINGS]
    if unknown:
        raise BenchError(f"unknown setting {', '.join(map(repr, unknown))}; choose from {', '.join(SETTINGS)}")
    if len(set(a.settings)) != len(a.settings):
        raise BenchError(f"--settings names a setting twice: {' '.join(a.settings)}")
    if not a.seeds:
        raise BenchError("--seeds needs at least one seed")
    if a.eval_points < 0:
        raise BenchError(f"--eval-points must be >= 0, got {a.eval_points}")
    if a.time_budget:
        from stagewise.train.budget import parse_duration
        from stagewise.train.config import ConfigError

        try:
            parse_duration(a.time_budget)
        except ConfigError as exc:
            raise BenchError(f"--time-budget: {exc}") from None
    from stagewise.shards import read_manifest

    try:
        manifest = read_manifest(a.dest)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise BenchError(f"{a.dest}: {exc}") from None
    missing = [s for s in ("train", "val") if s not in manifest.splits]
    if missing:
        raise BenchError(f"{a.dest} has no {' or '.join(repr(s) for s in missing)} split (it has "
                         f"{', '.join(sorted(manifest.splits)) or 'none'}); build it with "
                         f"`pipeline build-shards SRC {a.dest} --split {missing[0]}`")
    a.train_samples = manifest.splits["train"].num_samples


def configs(a: argparse.Namespace, d: dict) -> dict[tuple[str, int], object]:
    """Every run's trainer config, parsed up front so that a bad --set stops the benchmark before it starts."""
    from stagewise.train import config

    if "run.eval_points" not in config.LEAVES:
        raise BenchError("this trainer has no run.eval_points; bench-progressive needs it for its curves")
    out = {}
    for name in a.settings:
        for seed in a.seeds:
            try:
                out[(name, seed)] = config.parse(run_argv(a, d, name, seed))
            except config.ConfigError as exc:
                raise BenchError(str(exc)) from None
    return out


def run_argv(a: argparse.Namespace, d: dict, name: str, seed: int) -> list[str]:
    """The trainer's command line of one run."""
    return base_args(a, d) + setting_args(name, d) + ["--run-dir", os.path.join(a.run_dir, f"{name}-seed{seed}"),
                                                      f"--run.seed={seed}"]


def train_in_child(argv: list[str], run_dir: str) -> dict:
    """One run as `python -m stagewise.train ARGV`, its result read back from its log.jsonl as train() returns it.

    --time-budget runs each setting in a process of its own: the budget charges a process's start-up
    (interpreter, imports) to its first budgeted run, as a person's clock does (train/budget.py spent_since), so
    in one process the first setting would pay it and the others not; as processes each pays its own. (Before
    spent_since charged only the first run, a second train() in one process was charged the first run's time:
    100 s budgets gave 93 s and 17 s.)"""
    import subprocess

    from stagewise.train.config import ConfigError

    rc = subprocess.run([sys.executable, "-m", "stagewise.train", *argv], check=False).returncode
    if rc != 0:
        raise ConfigError(f"the trainer exited with status {rc} (its message is above)")
    evals, done = [], {}
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "eval":
                evals.append(r)
            elif r.get("kind") == "done":
                done = r
    return {"evals": evals, "steps": done.get("step", evals[-1]["step"] if evals else 0),
            "train_seconds": done.get("train_seconds", evals[-1]["train_seconds"] if evals else 0.0)}


def _stage_sizes(run_dir: str) -> dict[int, int]:
    """Stage number (1-based) -> train image size, from the run's log.jsonl train records."""
    sizes: dict[int, int] = {}
    try:
        with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") == "train" and "stage" in r and "image_size" in r:
                    sizes.setdefault(int(r["stage"]), int(r["image_size"]))
    except OSError:
        pass
    return sizes


def cost_by_size(runs: list[dict]) -> dict[int, dict]:
    """Training ms per image at each train size, from the time and images between consecutive evaluations.

    A stretch between two evaluations lies inside one stage (every stage end is
    evaluated), so it has one size.
    """
    acc: dict[int, list[float]] = {}
    for run in runs:
        sizes = run["stage_sizes"]
        prev_s, prev_n = 0.0, 0
        for e in run["evals"]:
            size = sizes.get(int(e["stage"]))
            ds, dn = e["train_seconds"] - prev_s, e["images_seen"] - prev_n
            prev_s, prev_n = e["train_seconds"], e["images_seen"]
            if size is None or dn <= 0:
                continue
            total = acc.setdefault(size, [0.0, 0])
            total[0] += ds
            total[1] += dn
    return {size: {"ms_per_img": 1000.0 * s / n, "images": n, "seconds": round(s, 2)}
            for size, (s, n) in sorted(acc.items())}


def mean_curve(runs: list[dict]) -> list[dict]:
    """Points at the steps every seed evaluated: mean top-1 (min, max, sd), mean training seconds and images."""
    common = set.intersection(*({e["step"] for e in r["evals"]} for r in runs)) if runs else set()
    curve = []
    for step in sorted(common):
        pts = [next(e for e in r["evals"] if e["step"] == step) for r in runs]
        tops = [p["top1"] for p in pts]
        curve.append({"step": step, "images_seen": pts[0]["images_seen"], "stage": pts[0]["stage"],
                      "train_seconds": statistics.mean(p["train_seconds"] for p in pts),
                      "top1": statistics.mean(tops), "top1_min": min(tops), "top1_max": max(tops),
                      "top1_sd": statistics.stdev(tops) if len(tops) > 1 else 0.0})
    return curve


def summarize(runs: dict[str, list[dict]], labels: dict[str, str]) -> dict:
    out: dict = {"settings": {}}
    for name, rs in runs.items():
        tops = [r["top1"] for r in rs]
        out["settings"][name] = {
            "label": labels[name], "seeds": [r["seed"] for r in rs],
            "final_top1_mean": statistics.mean(tops), "final_top1_sd": statistics.stdev(tops) if len(tops) > 1 else 0.0,
            "final_top1": tops, "train_seconds_mean": statistics.mean(r["train_seconds"] for r in rs),
            "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in rs),
            "curve": mean_curve(rs), "runs": rs,
        }
    fixed = out["settings"].get("fixed")
    target = fixed["final_top1_mean"] if fixed else None
    out["target_top1"] = target
    for s in out["settings"].values():
        s["time_to_target_s"] = s["time_to_target_ratio"] = None
        if target is None:
            continue
        hit = time_to(s["curve"], target)
        if hit is not None:
            s["time_to_target_s"] = hit
            s["time_to_target_ratio"] = hit / fixed["train_seconds_mean"]
    out["adaptive_vs_peer"] = against_best_peer(out["settings"])
    # Runs that did not learn (fixed ends no higher than its first evaluation, e.g. all at chance) reach any
    # target at once: their times to target and the peer verdict say nothing.
    out["learned"] = not (fixed and fixed["curve"]) or target > fixed["curve"][0]["top1"] + 1e-9
    costs = cost_by_size([r for rs in runs.values() for r in rs])
    out["cost_by_size"] = {str(k): v for k, v in costs.items()}
    if costs:
        lo, hi = min(costs), max(costs)
        out["cost_ms_per_img"] = {"smallest": {"size": lo, "ms": costs[lo]["ms_per_img"]},
                                  "largest": {"size": hi, "ms": costs[hi]["ms_per_img"]}}
    else:
        out["cost_ms_per_img"] = None
    return out


def time_to(curve: list[dict], top1: float) -> float | None:
    """Training seconds at which a mean curve first reaches `top1` (at an evaluation point); None if never."""
    hit = next((p for p in curve if p["top1"] >= top1 - 1e-9), None)
    return None if hit is None else hit["train_seconds"]


def against_best_peer(settings: dict) -> dict | None:
    """Issue 21's question: adaptive's time to the best peer schedule's final mean top-1, against that peer's
    training time; None unless adaptive and a peer ran."""
    peers = [n for n in PEERS if n in settings]
    if "adaptive" not in settings or not peers:
        return None
    best = max(peers, key=lambda n: settings[n]["final_top1_mean"])
    peer, ad = settings[best], settings["adaptive"]
    hit = time_to(ad["curve"], peer["final_top1_mean"])
    ratio = None if hit is None else hit / peer["train_seconds_mean"]
    return {"peer": best, "peer_top1": peer["final_top1_mean"], "peer_train_seconds": peer["train_seconds_mean"],
            "adaptive_top1": ad["final_top1_mean"], "time_s": hit, "ratio": ratio, "goal_ratio": PEER_GOAL,
            "goal_met": ratio is not None and ratio <= PEER_GOAL
            and ad["final_top1_mean"] >= peer["final_top1_mean"] - 1e-9}


def format_table(summary: dict) -> str:
    rows = [("setting", "final top-1 (%)", "per seed", "train s", "wall s", "to target", "ratio")]
    for name, s in summary["settings"].items():
        sd = f" ± {s['final_top1_sd']:.1f}" if len(s["final_top1"]) > 1 else ""
        reached = s["time_to_target_s"] is not None
        rows.append((name, f"{s['final_top1_mean']:.1f}{sd}", " / ".join(f"{t:.1f}" for t in s["final_top1"]),
                     f"{s['train_seconds_mean']:.0f}", f"{s['wall_seconds_mean']:.0f}",
                     f"{s['time_to_target_s']:.0f} s" if reached else "not reached",
                     f"{s['time_to_target_ratio']:.2f}x" if reached else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if summary["target_top1"] is not None:
        lines.append(f"target: fixed's final mean top-1 {summary['target_top1']:.1f}%; time to target = training "
                     f"time (evaluation excluded) at which the setting's mean curve first reaches it; ratio to "
                     f"fixed's total training time")
    v = summary.get("adaptive_vs_peer")
    if summary["target_top1"] is not None and not summary["learned"]:
        lines.append(f"warning: fixed ends at {summary['target_top1']:.1f}%, no higher than its first evaluation: "
                     f"these runs did not learn (too short?), so the times to target say nothing")
    if v:
        reached = (f"reaches it at {v['time_s']:.0f} s, {v['ratio']:.2f}x {v['peer']}'s {v['peer_train_seconds']:.0f} s"
                   if v["time_s"] is not None else "does not reach it")
        lines.append(f"adaptive vs the best peer schedule ({v['peer']}, final mean top-1 {v['peer_top1']:.1f}%): "
                     f"adaptive {reached} of training; final {v['adaptive_top1']:.1f}% "
                     f"({v['adaptive_top1'] - v['peer_top1']:+.1f}); goal <= {v['goal_ratio']:.2f}x and no lower: "
                     f"{('met' if v['goal_met'] else 'not met') if summary['learned'] else 'no verdict'}")
    if summary.get("regularization"):
        lines.append(summary["regularization"])
    c = summary["cost_ms_per_img"]
    if c:
        lines.append(f"training cost: {c['smallest']['ms']:.1f} ms/img at {c['smallest']['size']} px, "
                     f"{c['largest']['ms']:.1f} ms/img at {c['largest']['size']} px "
                     f"({c['largest']['ms'] / c['smallest']['ms']:.2f}x for "
                     f"{(c['largest']['size'] / c['smallest']['size']) ** 2:.2f}x the pixels)")
    return "\n".join(lines)


def regularization_note(cfg) -> str:
    """What adaptive ramps for this model, from the run's own preset; a torchvision model takes no dropout."""
    from stagewise.train import models
    from stagewise.train.schedule import preset_from_config

    name = cfg.model.name
    p = preset_from_config(cfg.schedule, name, models.variant_of(name))
    ramps = f"RandAugment {p.min_randaug:g} -> {p.max_randaug:g}, mixup {p.min_mixup:g} -> {p.max_mixup:g}"
    if name.startswith(TORCHVISION):
        return (f"regularization: {name} takes no dropout or stochastic depth (torchvision models have no "
                f"set_dropout), so adaptive ramps {ramps} only; the other settings hold the final values")
    return (f"regularization: adaptive ramps {ramps}, dropout {p.min_dropout:g} -> {p.max_dropout:g}; the other "
            f"settings hold the final values")


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, s in summary["settings"].items():
        c = s["curve"]
        if not c:
            continue
        t = [p["train_seconds"] for p in c]
        line, = ax.plot(t, [p["top1"] for p in c], "o-", ms=3, lw=1.5, label=f"{name} ({len(s['runs'])} seeds)")
        ax.fill_between(t, [p["top1_min"] for p in c], [p["top1_max"] for p in c], color=line.get_color(),
                        alpha=0.15, lw=0)
    if summary["target_top1"] is not None:
        ax.axhline(summary["target_top1"], color="gray", ls="--", lw=0.8, label="fixed's final mean")
    ax.set_xlabel("training time, evaluation excluded (s)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("top-1 vs training time: mean over seeds, band min-max", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def machine() -> dict:
    import torch

    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_before": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> int:
    try:
        check_inputs(args)
        d = resolved(args)
        if not args.time_budget and d["epochs"] < d["stages"]:  # a stage spans whole epochs
            raise BenchError(f"--epochs {d['epochs']} is below --stages {d['stages']}: the progressive settings "
                             f"would train fewer stages than asked; pass --epochs {d['stages']} or more")
        cfgs = configs(args, d)
    except BenchError as exc:
        print(f"error: bench-progressive: {exc}", file=sys.stderr)
        return 2
    from stagewise.train.config import ConfigError
    from stagewise.train.loop import train

    info = machine()
    shared = base_args(args, d)
    length = f"a time budget of {args.time_budget} each" if args.time_budget else f"{d['epochs']} epochs"
    note = regularization_note(next(iter(cfgs.values())))
    print(f"bench-progressive: {', '.join(args.settings)} x seeds {' '.join(map(str, args.seeds))}; {d['model']} "
          f"{d['min_size']}->{d['max_size']} px (eval {d['eval_size']}, crop {d['eval_crop']:.3f}), "
          f"{length}, batch {d['batch']}, "
          f"{d['stages']} stages, on {args.device}; load {info['load_before'][0]:.2f}\n{note}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in args.settings}
    for seed in args.seeds:  # seeds outermost: a partial benchmark still compares every setting
        for name in args.settings:
            cfg = cfgs[(name, seed)]
            start = time.perf_counter()
            try:
                if args.time_budget:  # a process per run: each run pays its own start-up (train_in_child)
                    result = train_in_child(run_argv(args, d, name, seed), cfg.run.dir)
                else:
                    result = train(cfg, print_config=False)
            except ConfigError as exc:  # preflight's problems, or a time budget too short for this setting
                hint = re.sub(r"--([a-z_]+\.[a-z_]+=)", r"--set \1", str(exc))  # the trainer's flags, as ours
                print(f"error: bench-progressive: {name}, seed {seed}: {hint}", file=sys.stderr)
                return 2
            wall = time.perf_counter() - start
            evals = [dict(e) for e in result.get("evals", [])]
            if not evals:
                print(f"error: bench-progressive: {name}, seed {seed}: the trainer reported no evaluations",
                      file=sys.stderr)
                return 1
            last = evals[-1]
            runs[name].append({"seed": seed, "top1": last["top1"], "top5": last.get("top5"),
                               "train_seconds": result.get("train_seconds", last["train_seconds"]),
                               "wall_seconds": wall, "images_seen": last["images_seen"], "steps": result["steps"],
                               "evals": evals, "stage_sizes": _stage_sizes(cfg.run.dir), "run_dir": cfg.run.dir,
                               "load_after": os.getloadavg()[0]})
            print(f"{name}, seed {seed}: top-1 {last['top1']:.1f}% after {runs[name][-1]['train_seconds']:.0f} s of "
                  f"training ({wall:.0f} s with evaluation), {result['steps']} steps; load {os.getloadavg()[0]:.2f}",
                  flush=True)
    summary = summarize(runs, {n: SETTINGS[n][0] for n in args.settings})
    summary["regularization"] = note
    info["load_after"] = os.getloadavg()
    summary.update({"machine": info, "config": {**d, "device": args.device, "dest": args.dest,
                                                  "settings": args.settings, "seeds": args.seeds,
                                                  "eval_points": args.eval_points, "set": args.set,
                                                  "max_steps": args.max_steps, "time_budget": args.time_budget},
                    "trainer_args": {n: shared + setting_args(n, d) for n in args.settings}})
    print()
    print(format_table(summary))
    png = args.plot or (os.path.splitext(args.json)[0] + ".png" if args.json
                        else os.path.join(args.run_dir, "bench-progressive.png"))
    plot(summary, png)
    print(f"plot: {png}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, default=lambda v: v if not isinstance(v, float) or math.isfinite(v)
                      else None)
        print(f"json: {args.json}")
    return 0
