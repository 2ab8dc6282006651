"""Building the DALI pipeline once: every run-time value enters through a named external_source.

Inputs fed per batch (see `loaders/runner.py`):

| name         | per sample            | meaning                                     |
|--------------|-----------------------|---------------------------------------------|
| jpg          | uint8 [bytes]         | the encoded image                           |
| window       | float32 [4]           | crop window (y, x, h, w), source pixels     |
| size         | float32 [2]           | output (H, W): the stage's image size       |
| flip         | int32 []              | 1 = mirror horizontally (train; hflip_prob) |
| ra{k}_*      | see randaugment.py    | RandAugment layer k (train only)            |
| mix_*        | see mixup.py          | mixup / CutMix of the batch (train only)    |

Defined with `@pipeline_def(enable_conditionals=True)` in this file: DALI's AutoGraph
needs the source of the graph function (it fails for code typed at a REPL or stdin).
"""
from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types

from stagewise.loaders import ops
from stagewise.loaders.randaugment import RandAugmentConfig, slot_inputs


@dataclass(frozen=True)
class GraphSpec:
    train: bool
    gpu: bool
    layers: int  # RandAugment layers built (a stage may use fewer; the rest run the identity)
    randaug: RandAugmentConfig
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last: bool


@pipeline_def(enable_conditionals=True)
def _graph(spec: GraphSpec):
    jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1)
    window = fn.external_source(name="window", dtype=types.FLOAT, ndim=1)
    size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
    img = ops.decode(jpg, window, spec.gpu)
    if not spec.train:
        return ops.normalize(ops.crop(img, size), spec.mean, spec.std, spec.channels_last)
    flips = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
    img = ops.crop(img, size, roi=ops.flip(flips))  # flip fused into the resize
    img = fn.cast(img, dtype=types.FLOAT)  # RandAugment's and mix's kernels run on float (see randaugment.py)
    if spec.layers > 0:
        img = ops.randaugment(img, [slot_inputs(k) for k in range(spec.layers)], spec.randaug)
    img = ops.mix(img, ops.mix_inputs())
    return ops.normalize(img, spec.mean, spec.std, spec.channels_last)


def build_pipeline(spec: GraphSpec, *, batch_size: int, num_threads: int, device_id: int | None, depth: int, seed: int):
    """A built pipeline fed with `feed_input` and driven by `schedule_run` / `outputs`.

    depth: batches one pipeline may hold in flight (its prefetch queue).
    device_id=None is DALI's CPU-only mode.
    """
    pipe = _graph(
        spec,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,  # no DALI random op is used; set anyway so nothing depends on the default
        prefetch_queue_depth=depth,
        exec_async=True,
        exec_pipelined=True,
    )
    pipe.build()
    return pipe
