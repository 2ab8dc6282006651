"""A time budget (`schedule.time_budget`, issue #21): the run length that fits a wall-clock budget on this machine.

A person thinks "I have 2 hours", not "N epochs"; the stages cost differently by size (64 to 128 px: 7.9 to
18.4 ms per image on 2 CPU cores, bench-progressive), so the epochs that fit are a computation. The run's wall
time, from the process start to its exit, is predicted as

    spent (process start, or the call to train(), to the end of the probe: imports, preflight, the probe)
    + setup (model, EMA, optimizer)
    + per stage: stage_start (the first, slower step of a size) + steps x batch x seconds per image at its size
    + per evaluation: eval_start (loader and first batch) + val images x seconds per image at the eval size
    + per checkpoint: seconds per checkpoint (last.pt at every stage end, and run.ckpt_every / ckpt_every_s)
    + END_S (fingerprints, exit) + PLOTS_S (run.plots)

`probe` times each term on the real data and model (the real Loader, so decoding and augmentation count) in the
run's first seconds; `choose` is a pure function of those costs: the longest run whose prediction stays inside
budget x (1 - margin), the margin from the probe's own noise. The run's length is a whole number of epochs when
flooring to whole epochs loses at most EPOCH_SLACK of the budget, else epochs plus schedule.max_steps (on small
data one epoch can be a tenth of a short budget; the steps then end the last stage early, with its evaluation).

The plan (budget, costs, epochs, steps, predicted seconds per stage) is written to PLAN_NAME beside the
checkpoints; `--resume` takes it from there and does not probe again. One process only: under torchrun each
rank would time itself alone (preflight says so).
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from stagewise.shards.store import join_url, open_url, url_exists, write_atomic
from stagewise.train import checkpoint, data, models
from stagewise.train.config import Config, ConfigError, redact_text
from stagewise.train.distributed import Dist
from stagewise.train.ema import EMA
from stagewise.train.losses import loss_fn
from stagewise.train.optim import build_optimizer
from stagewise.train.schedule import StagePlan, count

PLAN_NAME = "budget.json"  # beside last.pt: what --resume keeps
KEY = "schedule.time_budget"
EXAMPLE = "e.g. 2h, 45m, 90s or 1h30m"
UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
# Timed steps per size, after one warm-up step: at least MIN, then more while the probe's steps take less than
# PROBE_SHARE of the budget, at most MAX. B0 on 64-px textures, 2 CPU cores: 4 x 5 steps ~ 8 s. At 3% of a
# 6-minute budget (5 steps a size) one size's steps once came out 45% slow on a loaded machine; hence 5% (~8).
MIN_PROBE_STEPS, MAX_PROBE_STEPS, PROBE_SHARE = 4, 20, 0.05
EVAL_PROBE_BATCHES = 3  # timed eval batches after the first
# Of the budget: the goal is to end within 0.9x-1.0x of it. The deadline guard keeps a run that the machine
# slows from passing 1.0x, so the margin needs no more than the probe's own noise; on 2 loaded CPU cores runs
# landed up to 9% faster than predicted, and margins of 3-8% had them end at 0.83-0.95x (docs/training.md).
MIN_MARGIN, MAX_MARGIN = 0.02, 0.06
EPOCH_SLACK = 0.01  # whole epochs when flooring to them loses at most this share of the budget
# s after the last checkpoint: replica fingerprints, loader and interpreter exit; the PNG plots (run.plots) on
# top. 3.2 s in all measured on the texture task, 2 CPU cores (docs/training.md, "A time budget").
END_S, PLOTS_S = 1.0, 2.5
MAX_EPOCHS = 1_000_000  # the search's bound


def parse_duration(text: str) -> float:
    """Seconds of "2h", "45m", "90s", "1h30m", "1.5h" (a unit after every number); ConfigError naming the key."""
    value = text.strip().lower()
    match = DURATION.fullmatch(value)
    if not value or match is None or not any(match.groups()):
        raise ConfigError(f"{KEY}={text!r} is not a duration: write hours, minutes and seconds, {EXAMPLE}")
    seconds = sum(float(n) * UNITS[u] for n, u in zip(match.groups(), "hms") if n)
    if seconds <= 0:
        raise ConfigError(f"{KEY}={text!r} is no time at all: give a positive duration, {EXAMPLE}")
    return seconds


def problems(cfg: Config, world: int) -> list[str]:
    """What preflight reports about the budget: a value that is no duration, a run of several processes."""
    found = []
    try:
        parse_duration(cfg.schedule.time_budget)
    except ConfigError as exc:
        found.append(str(exc))
    if world > 1:
        found.append(f"{KEY}: one process only for now (under torchrun each rank would time its steps alone): "
                     f"pass --schedule.epochs instead")
    return found


@dataclass(frozen=True)
class Costs:
    """What the probe measured, in seconds; `image_s` maps a train size (px) to seconds per training image."""

    image_s: dict[int, float]
    stage_start_s: float  # a stage's first step beyond a steady one (set_stage, new shapes)
    eval_image_s: float  # per val image at the eval size
    eval_start_s: float  # building the eval loader and its first batch beyond a steady one
    val_images: int
    ckpt_s: float  # one last.pt
    setup_s: float  # model, EMA, optimizer
    spent_s: float  # process start to the end of the probe
    noise: float  # relative standard error of the fitted step costs (fit_sizes)
    measured_s: dict[int, float] = field(default_factory=dict)  # each size's median seconds per image, as timed

    def train_s(self, size: int) -> float:
        """Seconds per image at `size` px: measured, else interpolated in area between measured sizes (the
        convolutions' work grows with the pixels), else scaled by area from the nearest measured size."""
        if size in self.image_s:
            return self.image_s[size]
        sizes = sorted(self.image_s)
        below, above = [s for s in sizes if s < size], [s for s in sizes if s > size]
        if below and above:
            lo, hi = below[-1], above[0]
            r = (size ** 2 - lo ** 2) / (hi ** 2 - lo ** 2)
            return self.image_s[lo] + r * (self.image_s[hi] - self.image_s[lo])
        near = below[-1] if below else above[0]
        return self.image_s[near] * (size / near) ** 2


@dataclass(frozen=True)
class Rules:
    """How often the run evaluates and checkpoints (from the config)."""

    eval: str  # run.eval: stages | end | none ("none" also when there is no val split)
    eval_points: int = 0
    checkpoints: bool = True
    ckpt_every: int = 0  # steps
    ckpt_every_s: float = 0.0
    plots: bool = False

    @classmethod
    def of(cls, cfg: Config) -> "Rules":
        r = cfg.run
        val = bool(cfg.data.val_split)
        return cls(eval=r.eval if val else "none", eval_points=r.eval_points if val else 0, checkpoints=r.checkpoints,
                   ckpt_every=r.ckpt_every, ckpt_every_s=r.ckpt_every_s, plots=r.plots)


def stage_steps(stages: list[StagePlan], max_steps: int) -> list[int]:
    """Steps each stage trains: all of them, or up to `max_steps` in all (the loop stops there)."""
    out, left = [], max_steps or sum(sp.steps for sp in stages)
    for sp in stages:
        out.append(min(sp.steps, left))
        left -= out[-1]
    return out


def predict(stages: list[StagePlan], max_steps: int, costs: Costs, rules: Rules) -> tuple[list[float], float]:
    """(seconds of each stage: its steps, start, evaluation and checkpoints; the whole run's wall seconds)."""
    steps = stage_steps(stages, max_steps)
    ran = [i for i, n in enumerate(steps) if n > 0]
    one_eval = costs.eval_start_s + costs.val_images * costs.eval_image_s
    per_stage = [0.0] * len(stages)  # 0: a stage max_steps leaves out
    for i in ran:
        sp = stages[i]
        seconds = costs.stage_start_s + steps[i] * sp.batch_size * costs.train_s(sp.values.image_size)
        if rules.eval == "stages" or (rules.eval == "end" and i == ran[-1]):
            seconds += one_eval
        if rules.checkpoints:  # last.pt and stage-N.pt at its end, plus the periodic ones
            periodic = steps[i] // rules.ckpt_every if rules.ckpt_every else 0
            periodic += int(seconds // rules.ckpt_every_s) if rules.ckpt_every_s else 0
            seconds += (2 + periodic) * costs.ckpt_s
        per_stage[i] = seconds
    extra = rules.eval_points * one_eval
    end = END_S + (PLOTS_S if rules.plots else 0.0)
    return per_stage, costs.spent_s + costs.setup_s + sum(per_stage) + extra + end


def margin(noise: float) -> float:
    """Share of the budget left unplanned: twice the relative standard error of the measured step costs (about
    a 95% one-sided bound on how far the real mean may lie above the probe's), within MIN..MAX_MARGIN."""
    return min(MAX_MARGIN, max(MIN_MARGIN, 2.0 * noise))


@dataclass(frozen=True)
class Choice:
    epochs: int
    max_steps: int  # 0: whole epochs
    stages: list[StagePlan]
    stage_s: list[float]
    total_s: float  # predicted wall seconds
    aim_s: float  # budget x (1 - margin)


def choose(budget_s: float, costs: Costs, rules: Rules, layout: Callable[[int], list[StagePlan]],
           steps_too: bool = True) -> Choice:
    """The longest run predicted to end within budget x (1 - margin): whole epochs when flooring to them loses at
    most EPOCH_SLACK of the budget, else (`steps_too`) the steps of one more epoch that still fit.
    ConfigError when not one step fits."""
    aim = budget_s * (1 - margin(costs.noise))

    def fits(epochs: int, max_steps: int = 0) -> Choice | None:
        stages = layout(epochs)
        stage_s, total = predict(stages, max_steps, costs, rules)
        return Choice(epochs, max_steps, stages, stage_s, total, aim) if total <= aim else None

    best = None
    epochs = 1
    while epochs <= MAX_EPOCHS and (found := fits(epochs)) is not None:  # the time grows with the epochs
        best, epochs = found, epochs + 1
    if best is not None and (best.total_s >= aim - EPOCH_SLACK * budget_s or not steps_too):
        return best
    per_epoch = layout(epochs)[0].steps_per_epoch  # preflight's epochs = ceil(max_steps / steps per epoch)
    lo, hi = (epochs - 1) * per_epoch, epochs * per_epoch  # fits(lo) holds (or lo is 0), fits(hi) does not
    while hi - lo > 1:  # the time grows with the steps: bisect for the last step that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(epochs, mid) is not None else (lo, mid)
    if lo == 0:
        _, one = predict(layout(1), 1, costs, rules)
        raise ConfigError(f"{KEY}={budget_s:.0f} s is too short: a run of one step would take {one:.0f} s here "
                          f"(start-up and the probe {costs.spent_s:.0f} s): give a longer budget")
    if best is not None and lo == best.epochs * per_epoch:
        return best
    found = fits(epochs, lo)
    assert found is not None
    return found


# --- the probe ---------------------------------------------------------------------------------------------


def spent_since(entered: float) -> float:
    """Seconds the budget has used: since `entered` (time.monotonic() when train() was called), plus, for the
    first budgeted run of a command-line process (`python -m stagewise.train`, `pipeline train`), the process's
    start-up before it (the interpreter, imports: part of the wall time a person measures). train(cfg) called
    by a Python program, and any later run in the same process, counts from its call."""
    global _START_UP_CHARGED
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", "") or ""
    on_command_line = spec_name.startswith("stagewise.") or os.path.basename(sys.argv[0]) == "pipeline"
    since = time.monotonic() - entered
    before = max(0.0, process_seconds() - since) if on_command_line and not _START_UP_CHARGED else 0.0
    _START_UP_CHARGED = True
    return before + since


_START_UP_CHARGED = False  # spent_since: the process's start-up is one run's


def process_seconds() -> float:
    """Seconds since this process started (Linux /proc; elsewhere since this module was imported)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the name
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


def probe(cfg: Config, stages: list[StagePlan], num_classes: int, val_images: int, eval_size: int,
          eval_crop: float, eval_batch: int, d: Dist, budget_s: float, entered: float) -> Costs:
    """Time the run's parts on a throw-away model (the run's own is built afterwards, from the seed, so the probe
    changes nothing it computes): MIN..MAX_PROBE_STEPS training steps at each stage size (at most four sizes)
    after a warm-up step, through the run's own train loader; a few eval batches; one checkpoint write."""
    sizes = list(dict.fromkeys(sp.values.image_size for sp in stages))
    if len(sizes) > 4:  # random-resize: the ends and two between; the others are interpolated (Costs.train_s)
        sizes = sorted(sizes)
        sizes = list(dict.fromkeys(sizes[round(i * (len(sizes) - 1) / 3)] for i in range(4)))
    by_size = {sp.values.image_size: sp for sp in stages}
    t0 = time.perf_counter()
    model = models.build_model(cfg.model.name, num_classes, drop_path_rate=cfg.model.drop_path_rate,
                               tf_same_padding=cfg.model.tf_same_padding)
    model.to(d.device, memory_format=torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
    o = cfg.optim
    ema = EMA(model, o.ema_decay, o.ema_warmup) if o.ema_decay > 0 else None
    opt = build_optimizer(model, o.optimizer, lr=1e-6, weight_decay=o.weight_decay, momentum=o.momentum,
                          rmsprop_decay=o.rmsprop_decay, eps=o.eps)
    net = torch.compile(model, dynamic=False) if cfg.model.compile else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.run.bf16 and d.device.type == "cuda"
                else nullcontext())  # as the trainer steps
    setup_s = time.perf_counter() - t0
    measured: dict[int, float] = {}
    samples: list[tuple[int, float]] = []  # (size, seconds per image) of every timed step
    starts = []
    loader = data.train_loader(cfg, by_size[sizes[0]], d)
    try:
        batches = _endless(loader)
        for size in sizes:
            sp = by_size[size]
            loader.set_stage(data.stage_params(sp, cfg))
            times: list[float] = []
            while len(times) < 1 + MIN_PROBE_STEPS or (len(times) < 1 + MAX_PROBE_STEPS
                                                        and sum(times) < PROBE_SHARE * budget_s / len(sizes)):
                t = time.perf_counter()
                images, targets = next(batches)
                with autocast:
                    loss = loss_fn(net(images.to(d.device)), targets.to(d.device), o.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    ema.update(model)
                loss.item()  # waits for the device
                times.append(time.perf_counter() - t)
            steady = statistics.median(times[1:])
            measured[size] = steady / sp.batch_size
            samples += [(size, t / sp.batch_size) for t in times[1:]]
            starts.append(max(0.0, times[0] - steady))
    finally:
        loader.close()
    image_s, noise = fit_sizes(samples)
    eval_image_s = eval_start_s = 0.0
    if val_images and cfg.data.val_split and cfg.run.eval != "none":
        eval_image_s, eval_start_s = _probe_eval(ema.module if ema else model, cfg, eval_size, eval_crop,
                                                 eval_batch, d, autocast)
    ckpt_s = _probe_checkpoint(model, ema, opt) if cfg.run.checkpoints else 0.0
    return Costs(image_s=image_s, stage_start_s=statistics.median(starts), eval_image_s=eval_image_s,
                 eval_start_s=eval_start_s, val_images=val_images, ckpt_s=ckpt_s, setup_s=setup_s,
                 spent_s=spent_since(entered), noise=noise, measured_s=measured)


def fit_sizes(samples: list[tuple[int, float]]) -> tuple[dict[int, float], float]:
    """Seconds per image at each size from the timed steps, a + b x size^2 fitted to each size's median (a
    convolution's work grows with the pixels; a per-image part, such as the loader's file reads, does not), and
    the fit's noise: the relative standard error of the mean cost (the steps' spread about the line / mean /
    sqrt(steps)).

    One line through the sizes, not each size's own median: on a loaded machine a size's four steps can come out
    faster than the size below (56 px: 12.2 ms/image, 64 px: 11.2 ms on 2 busy cores; the run then trained 64 px
    at 14.7 ms), and the line pools the sizes against such outliers."""
    by_size: dict[int, list[float]] = {}
    for size, y in samples:
        by_size.setdefault(size, []).append(y)
    medians = {size: statistics.median(ys) for size, ys in by_size.items()}  # a spike in one step does not count
    xs, ys = [float(s) ** 2 for s in medians], list(medians.values())
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    a = mean_y - b * mean_x
    if b < 0:  # the noise won: no growth with size is measurable, a flat cost
        a, b = mean_y, 0.0
    elif a < 0:  # a line through the origin instead: no per-image cost is measurable
        a, b = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    residuals = [y - (a + b * float(s) ** 2) for s, y in samples]
    spread = math.sqrt(sum(r * r for r in residuals) / max(1, len(samples) - 2))
    return {s: a + b * float(s) ** 2 for s in medians}, spread / mean_y / math.sqrt(len(samples))


def _endless(loader):  # noqa: ANN001, ANN202 - the Loader; batches across epoch ends
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def _probe_eval(model: torch.nn.Module, cfg: Config, size: int, crop: float, batch: int, d: Dist,
                autocast) -> tuple[float, float]:  # noqa: ANN001 - a context manager
    """(seconds per val image, seconds of a pass beyond its images: loader build and first batch)."""
    t = time.perf_counter()
    loader = data.eval_loader(cfg, size, crop, batch, d)
    model.eval()
    times = []
    try:
        loader.set_epoch(0)
        for images, _ in loader:
            with autocast:
                model(images.to(d.device)).float().sum().item()
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            if len(times) > EVAL_PROBE_BATCHES:
                break
    finally:
        loader.close()
        model.train()
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return steady / max(1, batch // d.world_size), max(0.0, times[0] - steady)


def _probe_checkpoint(model: torch.nn.Module, ema: EMA | None, opt: torch.optim.Optimizer) -> float:
    """Seconds to write a checkpoint of this model (weights, EMA, optimizer) to a temporary file."""
    payload = {"model": model.state_dict(), "ema": ema.state_dict() if ema else None, "optimizer": opt.state_dict()}
    t = time.perf_counter()
    with tempfile.TemporaryFile() as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


# --- the trainer's hooks -----------------------------------------------------------------------------------


@dataclass
class Deadline:
    """The budget's end as a guard against a machine that slows down after the probe (other work on it): the
    loop ends the run early, evaluated and saved, when one more step and what follows the last (an evaluation,
    checkpoints, the end) would pass it."""

    at: float  # time.monotonic() by which the process should have exited
    reserve_s: float  # after the last step: evaluation, 2 checkpoints, END_S (+ PLOTS_S), x RESERVE_FACTOR
    planned_steps: int
    last: float = field(default_factory=time.monotonic)
    recent: list[float] = field(default_factory=list)  # the last steps' seconds (with evaluations between them)

    def reached(self) -> bool:
        """Called after every step: whether the next one would end past the budget (a step's time: the median
        of the last 5, so that an evaluation between two steps does not count as a step)."""
        now = time.monotonic()
        self.recent, self.last = (self.recent + [now - self.last])[-5:], now
        return now + statistics.median(self.recent) + self.reserve_s > self.at

    def line(self, step: int) -> str:
        return (f"budget: ending at step {step} of {self.planned_steps}, evaluated and saved: this machine runs "
                f"slower than the probe measured, and one more step would pass the budget")


RESERVE_FACTOR = 1.5  # the reserve's own costs were measured once, in the probe; a slowed machine slows them too




@dataclass(frozen=True)
class Fitted:
    epochs: int
    max_steps: int  # 0: whole epochs
    deadline: Deadline | None  # None on resume: the budget was the first process's


def fit(checked, d: Dist, say: Callable[[str], None], layout: Callable,  # noqa: ANN001 - preflight's Plan
        entered: float) -> Fitted:
    """The run length for `checked` (preflight's Plan) under its time budget: the plan saved beside the
    checkpoints when resuming one, else probed and chosen here, printed (`say`) and saved. `layout(checked,
    epochs)` lays out the stages (preflight.layout); `entered` is time.monotonic() when train() was called."""
    cfg = checked.cfg
    plan_url = join_url(cfg.run.ckpt_dir or cfg.run.dir, PLAN_NAME)
    saved = _saved_plan(cfg, plan_url)
    if saved is not None:
        say(f"budget {saved['budget']}: the plan of {saved['planned_at']} kept ({PLAN_NAME}): "
                  f"{count(saved['epochs'], 'epoch')}"
                  + (f" ending at step {saved['max_steps']}" if saved["max_steps"] else "") + "; no probe")
        return Fitted(saved["epochs"], saved["max_steps"], None)
    budget_s, costs, choice = _measure_and_choose(checked, d, say, layout, entered)
    for line in plan_lines(cfg.schedule.time_budget, budget_s, choice, costs):
        say(line)
    if d.is_main:
        record = {"budget": cfg.schedule.time_budget, "budget_s": budget_s, "epochs": choice.epochs,
                  "max_steps": choice.max_steps, "predicted_s": round(choice.total_s, 1),
                  "aim_s": round(choice.aim_s, 1), "planned_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "stages": [{"stage": sp.stage + 1, "size": sp.values.image_size, "epochs": sp.epochs,
                              "steps": n, "seconds": round(s, 1)} for sp, n, s in
                             zip(choice.stages, stage_steps(choice.stages, choice.max_steps), choice.stage_s)],
                  "costs": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(costs).items()}}
        write_atomic(plan_url, (json.dumps(record, indent=1) + "\n").encode())
    rules = Rules.of(cfg)
    reserve = (costs.eval_start_s + costs.val_images * costs.eval_image_s if rules.eval != "none" else 0.0)
    reserve += 2 * costs.ckpt_s * rules.checkpoints + END_S + PLOTS_S * rules.plots
    steps = sum(stage_steps(choice.stages, choice.max_steps))
    deadline = Deadline(at=time.monotonic() + budget_s - costs.spent_s, reserve_s=RESERVE_FACTOR * reserve,
                        planned_steps=steps)
    return Fitted(choice.epochs, choice.max_steps, deadline)


def _measure_and_choose(checked, d: Dist, say: Callable[[str], None], layout: Callable,  # noqa: ANN001
                        entered: float) -> tuple[float, Costs, Choice]:
    """(budget seconds, the probe's costs, the run length chosen from them)."""
    cfg = checked.cfg
    budget_s = parse_duration(cfg.schedule.time_budget)
    eval_size, eval_crop = data.eval_size_and_crop(cfg, checked.variant, checked.preset)
    say(f"budget {cfg.schedule.time_budget}: timing {MIN_PROBE_STEPS}-{MAX_PROBE_STEPS} steps at each stage "
        f"size, and evaluation at {eval_size} px ...")
    costs = probe(cfg, checked.stages, checked.split.num_classes, _val_images(cfg), eval_size, eval_crop,
                  cfg.data.eval_batch_size or checked.batch, d, budget_s, entered)
    choice = choose(budget_s, costs, Rules.of(cfg), lambda epochs: layout(checked, epochs),
                    steps_too=not cfg.schedule.per_stage_batch)  # per-stage batches: steps per epoch vary
    return budget_s, costs, choice


def _saved_plan(cfg: Config, plan_url: str) -> dict | None:
    """The plan a resumed run was started with (None: not resuming, or nothing to resume); ConfigError when it
    was planned for another budget."""
    ckpt_dir = cfg.run.ckpt_dir or cfg.run.dir
    if not (cfg.run.resume and url_exists(join_url(ckpt_dir, checkpoint.LATEST)) and url_exists(plan_url)):
        return None
    with open_url(plan_url, "rb") as f:
        saved = json.loads(f.read())
    if saved["budget"] != cfg.schedule.time_budget:
        raise ConfigError(f"{KEY}: {redact_text(ckpt_dir)} holds a run planned for {saved['budget']!r}, not "
                          f"{cfg.schedule.time_budget!r}: resume with --{KEY}={saved['budget']}, or start a new "
                          f"run (a new --run.dir)")
    return saved


def _val_images(cfg: Config) -> int:
    """Images of the val split (0: none, or no evaluation)."""
    if not cfg.data.val_split or cfg.run.eval == "none":
        return 0
    from stagewise.shards.manifest import read_manifest

    split = read_manifest(cfg.data.url.rstrip("/")).splits.get(cfg.data.val_split)
    return split.num_samples if split else 0


def plan_lines(name: str, budget_s: float, choice: Choice, costs: Costs) -> list[str]:
    """The plan as printed: one line per stage (epochs, steps, size, predicted seconds) and the end time."""
    end = time.time() - costs.spent_s + choice.total_s  # the process started spent_s ago
    steps = stage_steps(choice.stages, choice.max_steps)
    length = count(choice.epochs, "epoch") + (f" ending at step {choice.max_steps}" if choice.max_steps else "")
    lines = [f"budget {name} ({budget_s:.0f} s): {length}; predicted {choice.total_s:.0f} s "
             f"({choice.total_s / budget_s:.2f}x; aim {choice.aim_s / budget_s:.2f}x, margin from the probe's "
             f"noise {costs.noise:.1%}), ends about {time.strftime('%H:%M:%S', time.localtime(end))}"]
    for sp, n, s in zip(choice.stages, steps, choice.stage_s):
        lines.append(f"  stage {sp.stage + 1}: {sp.values.image_size:>4} px, {count(sp.epochs, 'epoch')}, "
                     f"{count(n, 'step')}, {s:.0f} s ({1000 * costs.train_s(sp.values.image_size):.1f} ms/image)")
    lines.append(f"  fixed: {costs.spent_s:.0f} s start-up and probe, {costs.setup_s:.1f} s setup, "
                 f"{costs.ckpt_s:.2f} s a checkpoint, eval {costs.eval_start_s:.1f} s + "
                 f"{1000 * costs.eval_image_s:.1f} ms/image x {costs.val_images}, "
                 f"{costs.stage_start_s:.1f} s a stage start")
    return lines


def preview(cfg: Config) -> list[str]:
    """`pipeline schedule --time-budget`: the plan a run of `cfg` would make on this machine, probed here, without
    training or writing anything (the run folder is not looked at)."""
    from stagewise.train import distributed, preflight  # preflight imports this module

    entered = time.monotonic()
    cfg.run.overwrite = True  # a preview creates no run: whatever run.dir holds is no mistake here
    checked = preflight.check(cfg)
    d = distributed.setup(checked.cfg.run.device, checked.cfg.run.dist_timeout_s)
    threads = torch.get_num_threads()
    try:
        if n := distributed.torch_threads(checked.cfg.run.threads, d.device):
            torch.set_num_threads(n)
        budget_s, costs, choice = _measure_and_choose(checked, d, lambda line: None, preflight.layout, entered)
    finally:
        torch.set_num_threads(threads)
        distributed.teardown()
    return plan_lines(checked.cfg.schedule.time_budget, budget_s, choice, costs)

