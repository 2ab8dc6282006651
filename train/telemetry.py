"""What a person sees while training: a progress bar with img/s and data-wait %, a JSONL log, TensorBoard, PNG plots.

On a terminal the progress is a tqdm bar. When the output is not a terminal
(CI, `nohup`, a cluster job's log file), a bar's carriage-return frames would
pile up in the log, so a plain line is printed instead, at most every
`PLAIN_EVERY_S` seconds and at the end of each stage:
`stage 2/4: step 140/460 (30%), 41 img/s, data wait 2%, loss 1.234`.

Data wait is the wall time the training loop spends blocked on the loader for
its next batch, as a share of all wall time in the loop. Near 0 % the model
is the bottleneck; a large share means the loader cannot keep up. It is shown
live, logged every `run.log_every` steps, and summed per stage. Only rank 0
writes (the other ranks construct a disabled Telemetry).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

PLAIN_EVERY_S = 30.0  # seconds between plain progress lines when the output is not a terminal


def is_terminal(stream) -> bool:  # noqa: ANN001 - any file-like object
    """Whether `stream` is an interactive terminal (a redirected or captured stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


@dataclass
class Meter:
    """Seconds waiting for data vs computing, and images, over a window and over the stage."""

    wait_s: float = 0.0
    busy_s: float = 0.0
    images: int = 0
    stage_wait_s: float = 0.0
    stage_busy_s: float = 0.0
    stage_images: int = 0
    _t: float = field(default_factory=time.perf_counter)

    def mark(self) -> None:
        """Start timing from now (after anything that is neither waiting nor training, e.g. eval)."""
        self._t = time.perf_counter()

    def got_batch(self) -> None:
        now = time.perf_counter()
        self.wait_s += now - self._t
        self.stage_wait_s += now - self._t
        self._t = now

    def did_step(self, images: int) -> None:
        now = time.perf_counter()
        self.busy_s += now - self._t
        self.stage_busy_s += now - self._t
        self.images += images
        self.stage_images += images
        self._t = now

    @staticmethod
    def _rates(wait: float, busy: float, images: int) -> tuple[float, float]:
        total = wait + busy
        return (images / total if total > 0 else 0.0), (100.0 * wait / total if total > 0 else 0.0)

    def window(self) -> tuple[float, float]:
        """(img/s, data-wait %) since the last call; starts a new window."""
        out = self._rates(self.wait_s, self.busy_s, self.images)
        self.wait_s = self.busy_s = 0.0
        self.images = 0
        return out

    def stage(self) -> tuple[float, float, float]:
        """(seconds, img/s, data-wait %) of the stage so far."""
        img_s, wait = self._rates(self.stage_wait_s, self.stage_busy_s, self.stage_images)
        return self.stage_wait_s + self.stage_busy_s, img_s, wait

    def new_stage(self) -> None:
        self.stage_wait_s = self.stage_busy_s = 0.0
        self.stage_images = 0
        self.window()
        self.mark()


class Telemetry:
    """JSONL records, TensorBoard scalars, progress bars and end-of-run plots in `run_dir`."""

    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool, progress: bool) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.records: list[dict] = []
        self.progress = progress and enabled
        self.bar = None
        self._plain: dict | None = None  # the progress of a stage when printed as plain lines
        self.plain_every_s = PLAIN_EVERY_S
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "log.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log(self, kind: str, step: int, values: dict) -> None:
        """One JSONL line {"kind", "step", "time", ...values}; numeric values also go to TensorBoard as kind/name."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.records.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def open_bar(self, desc: str, total: int, initial: int) -> None:
        """Progress of a stage: a tqdm bar on a terminal, periodic plain lines otherwise (see the module doc)."""
        self.close_bar()
        if not self.progress:
            return
        if is_terminal(sys.stderr):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                            dynamic_ncols=True, leave=True)
        else:
            self._plain = {"desc": desc, "total": total, "n": initial, "last": None, "printed_at": time.monotonic(),
                           "printed_n": initial}

    def update_bar(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        elif self._plain is not None:
            self._plain["n"] += n

    def bar_postfix(self, img_s: float, wait_pct: float, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({"img/s": f"{img_s:.0f}", "data-wait": f"{wait_pct:.0f}%", "loss": f"{loss:.3f}"},
                                 refresh=False)
        elif self._plain is not None:
            self._plain["last"] = (img_s, wait_pct, loss)
            if time.monotonic() - self._plain["printed_at"] >= self.plain_every_s:
                self._plain_line()

    def _plain_line(self) -> None:
        p = self._plain
        total = max(int(p["total"]), 1)
        line = f"{p['desc']}: step {p['n']}/{p['total']} ({100.0 * p['n'] / total:.0f}%)"
        if p["last"] is not None:
            img_s, wait_pct, loss = p["last"]
            line += f", {img_s:.0f} img/s, data wait {wait_pct:.0f}%, loss {loss:.3f}"
        print(line, flush=True)
        p["printed_at"], p["printed_n"] = time.monotonic(), p["n"]

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._plain is not None:
            if self._plain["n"] != self._plain["printed_n"]:  # the stage's last line, unless just printed
                self._plain_line()
            self._plain = None

    def close(self) -> None:
        self.close_bar()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def plots(self) -> list[str]:
        """`schedule.png` (size, regularization, LR over steps) and `curves.png` (loss, accuracy); returns paths."""
        if not self.enabled or not self.records:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.records if r["kind"] == "train"]
        evals = [r for r in self.records if r["kind"] == "eval"]
        paths = []
        keys = [("image_size", "image size (px)"), ("randaug", "RandAugment magnitude"), ("mixup", "mixup alpha"),
                ("dropout", "dropout"), ("lr", "learning rate")]
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2 * len(keys)), sharex=True)
        for ax, (key, label) in zip(axes, keys):
            ax.step([r["step"] for r in train], [r[key] for r in train], where="post")
            ax.set_ylabel(label, fontsize=8)
        axes[-1].set_xlabel("step")
        fig.suptitle("progressive schedule")
        fig.tight_layout()
        paths.append(os.path.join(self.run_dir, "schedule.png"))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

        fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        if evals:
            ax_acc.plot([r["step"] for r in evals], [r["top1"] for r in evals], "o-", label="val top-1 (EMA)")
            ax_acc.plot([r["step"] for r in evals], [r["top5"] for r in evals], "s--", label="val top-5 (EMA)")
            ax_acc.legend()
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_xlabel("step")
        fig.tight_layout()
        paths.append(os.path.join(self.run_dir, "curves.png"))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
        return paths
