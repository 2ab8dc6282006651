"""One batch's graph inputs: drawn from the batch's own generators, handed to DALI without copies.

Everything random about a sample of global step t of epoch e (crop window, flip,
RandAugment ops and magnitudes) comes from generators seeded with (seed, e, t, stream):
each draws for all G slots of the global batch, in slot order, and a rank keeps the rows
of its own slots. So a sample's pixels are a pure function of (seed, e, t, its slot,
stage, its bytes), whatever the world size, whichever pipeline runs it and whenever
(every draw is row-wise: row i's values do not depend on any other row's sample). Mixup
and CutMix share one lambda, kind and box per global step; partners are drawn within the
rank's slots (from the generator of (seed, e, t, MIX_PARTNER_STREAM, first slot)).

Cost per batch of 256 on the consumer thread (2-core CPU machine, docs/benchmarks.md):
the JPEGs go in as a list of read-only views of the bytes the reader already holds
(external_source no_copy: ~1 ms instead of ~2.5 ms of copying), the RandAugment
parameters are gathered from per-magnitude tables (`randaugment.sample_slots`), and
every array is fresh, so DALI may read it in place until the batch is out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stagewise.loaders.crop import center_crop, center_region, random_resized_crop, with_margin
from stagewise.loaders.graph import Layout
from stagewise.loaders.inputs import CROP_END, CROP_START, JPG, LAYOUTS, SIZE, WINDOW
from stagewise.loaders.mixup import MIX_PARTNER_STREAM, MIX_STREAM, MixParams, draw_mix, mix_feeds
from stagewise.loaders.params import StageParams
from stagewise.loaders.randaugment import branchless_inputs, sample_slots, tree_inputs
from stagewise.loaders.shard_stream import Item
from stagewise.loaders.spec import AugmentSpec

CROP_STREAM, FLIP_STREAM, RANDAUG_STREAM = 1, 2, 3  # generator stream ids per step (MIX_STREAM = 4, MIX_PARTNER_STREAM = 5)


def batch_rng(seed: int, epoch: int, step: int, stream: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, step, stream, *more])


@dataclass(frozen=True)
class Slots:
    """Where a rank's batch sits: global step `step` of `epoch`, slots `rows` of a global batch of `total`."""

    seed: int
    epoch: int
    step: int
    rows: slice
    total: int

    def rng(self, stream: int) -> np.random.Generator:
        """The step's generator for `stream`: the same on every rank (draw `total` rows, keep `rows`)."""
        return batch_rng(self.seed, self.epoch, self.step, stream)


@dataclass
class Drawn:
    inputs: dict[str, object]  # input name -> array (jpg: a list of arrays), as fed
    mix: MixParams | None  # train: the batch's mix draw, for the targets
    regions: np.ndarray | None = None  # host decode: float64 [N, 8] per sample, see `_host_regions`


_SIZES: dict[tuple[int, int], np.ndarray] = {}


def _size_input(n: int, size: int) -> np.ndarray:
    """[n, 2] float32 of the stage size, shared between batches (read-only, so no_copy may read it any time)."""
    key = (n, size)
    if key not in _SIZES:
        if len(_SIZES) > 64:
            _SIZES.clear()
        array = np.full((n, 2), size, np.float32)
        array.flags.writeable = False
        _SIZES[key] = array
    return _SIZES[key]


def draw_batch(items: list[Item], *, augment: AugmentSpec, layout: Layout, stage: StageParams, seed: int,
               epoch: int, step: int, slots: slice | None = None, global_batch: int | None = None) -> Drawn:
    """The inputs of a rank's batch: slots `slots` (default: all) of global step `step`, global batch
    `global_batch` (default: len(items), a single rank)."""
    n, size = len(items), stage.image_size
    at = Slots(seed, epoch, step, slots or slice(0, n), global_batch or n)
    if len(range(at.total)[at.rows]) != n:
        raise ValueError(f"{n} samples for slots {at.rows} of a global batch of {at.total}")
    sizes = np.empty((n, 2), np.int64)
    sizes[:, 0] = [it.height for it in items]
    sizes[:, 1] = [it.width for it in items]
    inputs: dict[str, object] = {SIZE: _size_input(n, size)}
    regions = None
    if layout.host_decode:
        regions = _host_regions(sizes, augment, layout, size, at)
    else:
        jpgs = [it.view for it in items]  # DALI tensors the shard stream made in its threads (`dali_view`)
        if any(view is None for view in jpgs):
            jpgs = [np.frombuffer(it.jpg, np.uint8) for it in items]
        inputs[JPG] = jpgs
        _dali_regions(inputs, sizes, augment, layout, size, at)
    mix = None
    if layout.train:
        layers = augment.randaug_layers or 0
        if layers:
            slots = sample_slots(at.rng(RANDAUG_STREAM), at.total, layers, stage.randaug_ops,
                                 stage.randaug_magnitude, size, augment.randaug, keep=at.rows)
            if layout.branchless:
                inputs.update(branchless_inputs(slots, size))
            else:
                for k, params in enumerate(slots):
                    for field, array in tree_inputs(params, layout.compact).items():
                        inputs[f"ra{k}_{field}"] = array
        partners = batch_rng(seed, epoch, step, MIX_PARTNER_STREAM, at.rows.start)
        mix = draw_mix(at.rng(MIX_STREAM), partners, n, size, stage)
        inputs.update(mix_feeds(mix, n, size, layout.branchless))
    return Drawn(inputs, mix, regions)


def _draw_windows(sizes: np.ndarray, augment: AugmentSpec, at: Slots):
    """Train: the random-resized-crop windows (y, x, h, w) and the flip flags (0 or 1) of a batch."""
    windows = random_resized_crop(at.rng(CROP_STREAM), sizes, augment.scale, augment.ratio, keep=at.rows,
                                  total=at.total)
    # Uniform draws in [0, 1) from the step's own stream, one per slot: 0 never mirrors, 1 always does.
    flips = (at.rng(FLIP_STREAM).random(at.total)[at.rows] < augment.hflip_prob).astype(np.float32)
    return windows, flips


def _host_regions(sizes: np.ndarray, augment: AugmentSpec, layout: Layout, size: int, at: Slots) -> np.ndarray:
    """float64 [N, 8]: the region to resize, (y0, x0, y1, x1) in source pixels (x1 < x0 mirrors), then the part
    of the image its filter may read, (top, left, bottom, right). The same windows as the DALI path.

    A crop is resized from itself alone, as torchvision's RandomResizedCrop (crop, then resize) and the
    DALI path (which decodes only the window) do; torchvision's eval geometry resizes the whole image
    and then crops, so there the filter reads the whole image."""
    n = len(sizes)
    out = np.empty((n, 8), np.float64)
    if not layout.train and augment.eval_geometry == "torchvision":
        out[:, 0:4] = center_region(sizes, size, augment.crop_pct)
        out[:, 4:6], out[:, 6:8] = 0.0, sizes
        return out
    if layout.train:
        windows, flips = _draw_windows(sizes, augment, at)
    else:
        windows, flips = center_crop(sizes, size, augment.crop_pct), np.zeros(n, np.float32)
    out[:, 0:2], out[:, 2:4] = _region(windows, flips, relative=False)
    out[:, 4:6], out[:, 6:8] = windows[:, 0:2], windows[:, 0:2] + windows[:, 2:4]
    return out


def _dali_regions(inputs: dict, sizes: np.ndarray, augment: AugmentSpec, layout: Layout, size: int,
                  at: Slots) -> None:
    """The DALI decoder's window and the resize's region inputs."""
    n = len(sizes)
    if layout.train:
        windows, flips = _draw_windows(sizes, augment, at)
        if layout.roi_decode:
            inputs[WINDOW] = windows
        inputs[CROP_START], inputs[CROP_END] = _region(windows, flips, layout.roi_decode)
    elif augment.eval_geometry == "torchvision":  # the exact region, in pixels of the decoded window or image
        region = center_region(sizes, size, augment.crop_pct)
        offset = np.zeros((n, 2))
        if layout.roi_decode:
            inputs[WINDOW] = with_margin(region, sizes, size)
            offset = inputs[WINDOW][:, 0:2].astype(np.float64)
        inputs[CROP_START] = (region[:, 0:2] - offset).astype(np.float32)
        inputs[CROP_END] = (region[:, 2:4] - offset).astype(np.float32)
    else:
        windows = center_crop(sizes, size, augment.crop_pct)
        if layout.roi_decode:
            inputs[WINDOW] = windows
        else:
            inputs[CROP_START], inputs[CROP_END] = _region(windows, np.zeros(n, np.float32), False)


def _region(windows: np.ndarray, flips: np.ndarray, relative: bool) -> tuple[np.ndarray, np.ndarray]:
    """The resize region (y, x) -> (y, x) per sample; x runs backwards where flips is 1.

    relative: within the decoded window, (0, f) -> (1, 1 - f), the values the graph used to
    compute from the flip flags (so CPU batches stay byte-identical). Else in source pixels.
    """
    n = len(flips)
    start, end = np.empty((n, 2), np.float32), np.empty((n, 2), np.float32)
    if relative:
        start[:, 0], start[:, 1] = 0.0, flips
        end[:, 0], end[:, 1] = 1.0, 1.0 - flips
        return start, end
    y, x, h, w = windows[:, 0], windows[:, 1], windows[:, 2], windows[:, 3]
    start[:, 0], start[:, 1] = y, x + flips * w
    end[:, 0], end[:, 1] = y + h, x + w - flips * w
    return start, end


def dali_view(data: bytes):
    """A JPEG's bytes as a DALI CPU tensor sharing their memory (it keeps a reference to them); ~1 us."""
    from nvidia.dali import tensors

    return tensors.TensorCPU(np.frombuffer(data, np.uint8), "")


class Feeder:
    """`Pipeline.feed_input` for one built pipeline, less its per-call Python work.

    The public call searches the pipeline's operator list for the input's name and
    inspects every list element (measured: ~80 us per input, 21 inputs a batch, plus
    ~0.8 ms for the 256-JPEG list). This does what it ends in: wrap the arrays as DALI
    tensors (no copy) and hand them to the backend's external-source input. CPU inputs
    only; GPU-device inputs, and a DALI without these backend calls, take the public path.
    """

    def __init__(self, pipe, gpu_inputs: frozenset[str] = frozenset()) -> None:
        from nvidia.dali import tensors

        self.pipe, self.gpu_inputs = pipe, gpu_inputs
        backend = getattr(pipe, "_pipe", None)
        self._tl = getattr(backend, "SetExternalTLInput", None)
        self._list = getattr(backend, "SetExternalTensorInput", None)
        self._TensorListCPU, self._TensorCPU = tensors.TensorListCPU, tensors.TensorCPU
        self.direct = self._tl is not None and self._list is not None

    def __call__(self, names: list[str], inputs: dict[str, object]) -> None:
        for name in names:
            data = inputs[name]
            if not self.direct or name in self.gpu_inputs:
                self.pipe.feed_input(name, data)
            elif isinstance(data, list):
                tensor = self._TensorCPU
                if not isinstance(data[0], tensor):
                    data = [tensor(x, "") for x in data]
                self._list(name, data, None, False)
            else:
                self._tl(name, self._TensorListCPU(data, LAYOUTS.get(name, "")), None, False)


def feed(pipe, names: list[str], inputs: dict[str, object]) -> None:
    """The public path (tests compare it with `Feeder`)."""
    for name in names:
        pipe.feed_input(name, inputs[name])
