"""The DALI graph: built once from an `AugmentSpec` and a `Layout`, every run-time value entering through a named input.

Inputs fed per batch (see `loaders/feed.py`), each an `fn.external_source` with no_copy:

| name                 | per sample            | meaning                                                    |
|----------------------|-----------------------|------------------------------------------------------------|
| jpg                  | uint8 [bytes]         | the encoded image                                          |
| window               | float32 [4]           | decoded region (y, x, h, w), source pixels (ROI decode)    |
| size                 | float32 [2]           | output (H, W): the stage's image size                      |
| crop_start, crop_end | float32 [2] each      | resize region (y, x): relative to the window (ROI decode), |
|                      |                       | else source pixels; x running backwards mirrors the sample |
| ra{k}_*              | see randaugment.py    | RandAugment layer k (train)                                |
| mix_*                | see mixup.py          | mixup / CutMix of the batch (train)                        |

Layouts (`layout_for`): the CPU graph decodes only the crop window and routes RandAugment
and mixing through DALI conditionals (a tree); the GPU graph decodes whole images
(nvImageCodec#55: ROI decoding crashes on H100 with nvImageCodec 0.9) and runs every
RandAugment kernel on the whole batch, then picks each sample's result (branchless,
`randaugment.apply_layer_branchless`), which keeps its operator count under 100
(`count_ops`). Conditionals need `@pipeline_def(enable_conditionals=True)` in this file:
DALI's AutoGraph reads the graph function's source (it fails for code typed at a REPL).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types

from stagewise.loaders import hostdecode, ops
from stagewise.loaders.inputs import CROP_END, CROP_START, IMG, JPG, SIZE, WINDOW, mix_names
from stagewise.loaders.randaugment import input_names as randaug_input_names
from stagewise.loaders.spec import AugmentSpec, EngineSpec

KNOWN_BAD_NVIMGCODEC = ((0, 9),)  # (major, minor) whose GPU ROI decode crashes or fails: NVIDIA/nvImageCodec#55


@dataclass(frozen=True)
class Layout:
    """How the graph is laid out for a device: derived from the device and the EngineSpec by `layout_for`."""

    train: bool
    gpu: bool
    branchless: bool  # RandAugment and mixing without conditionals (every kernel on the whole batch, then a pick)
    roi_decode: bool  # decode only the crop window (fn.decoders.image_slice); else the whole image
    compact: bool  # the compact formulas (randaugment.py); the GPU graph's, also buildable in CPU mode for tests
    host_decode: bool = False  # CPU: the graph starts from images cropped and resized on the host (hostdecode.py)

    @property
    def conditionals(self) -> bool:
        return self.train and not self.branchless


def nvimgcodec_version() -> tuple[int, int, int] | None:
    """(major, minor, patch) of the nvImageCodec DALI loaded, or None when it cannot tell."""
    try:
        from nvidia.dali import backend

        v = int(backend.GetNvimgcodecVersion())  # NVIMGCODEC_VER: major * 1000 + minor * 100 + patch
    except Exception:  # noqa: BLE001 - an older DALI without the call, or no library
        return None
    return (v // 1000, (v % 1000) // 100, v % 100) if v > 0 else None


def layout_for(*, train: bool, gpu: bool, engine: EngineSpec) -> Layout:
    """Per-device defaults (docs/loader.md, "Engine defaults"); a setting the device cannot run is refused."""
    branchless = gpu if engine.branchless is None else engine.branchless
    version = nvimgcodec_version()
    roi_unsafe = gpu and (version is None or version[:2] in KNOWN_BAD_NVIMGCODEC)
    if engine.roi_decode is None:
        roi_decode = not gpu  # GPU: whole images until a fixed nvImageCodec is released and measured
    elif engine.roi_decode and roi_unsafe:
        found = ".".join(map(str, version)) if version else "an unknown version"
        raise ValueError(f"EngineSpec.roi_decode=True: GPU ROI decoding crashes on H100 with nvImageCodec 0.9 "
                         f"(NVIDIA/nvImageCodec#55) and DALI loaded {found}; leave roi_decode=None")
    else:
        roi_decode = engine.roi_decode
    branchless = branchless and train
    if engine.host_decode and gpu:
        raise ValueError("EngineSpec.host_decode=True: the host decoder is for DALI's CPU mode; on the GPU "
                         "nvJPEG decodes (leave host_decode=None)")
    if engine.host_decode and not hostdecode.AVAILABLE:
        raise ValueError("EngineSpec.host_decode=True but stagewise.loaders._cropdecode was not built "
                         "(no C compiler or libjpeg headers at install); leave host_decode=None")
    host = not gpu and hostdecode.AVAILABLE if engine.host_decode is None else engine.host_decode
    return Layout(train=train, gpu=gpu, branchless=branchless, roi_decode=roi_decode and not host,
                  compact=gpu or branchless, host_decode=host)


def input_names(augment: AugmentSpec, layout: Layout) -> list[str]:
    """Every input the graph declares, in feeding order."""
    if layout.host_decode:
        names = [IMG] + ([SIZE] if layout.branchless else [])  # only branchless RandAugment reads the size
    else:
        names = [JPG, SIZE] + ([WINDOW] if layout.roi_decode else [])
    if _has_region(augment, layout):
        names += [CROP_START, CROP_END]
    if layout.train:
        names += randaug_input_names(augment.randaug_layers or 0, layout.branchless)
        names += mix_names(layout.branchless)
    return names


def _has_region(augment: AugmentSpec, layout: Layout) -> bool:
    """Whether the resize takes a region input: train (flip), whole-image decode, or torchvision's eval geometry."""
    if layout.host_decode:
        return False  # cropped and resized on the host
    return layout.train or not layout.roi_decode or augment.eval_geometry == "torchvision"


def _define(augment: AugmentSpec, layout: Layout, hints: dict):
    if layout.host_decode:
        return _define_from_host(augment, layout)
    norm = (augment.mean, augment.std, augment.channels_last)
    jpg = ops.source(JPG)
    size = ops.source(SIZE)
    window = ops.source(WINDOW) if layout.roi_decode else None
    img = ops.decode(jpg, window, layout.gpu, hints)
    start = end = None
    if _has_region(augment, layout):
        start, end = ops.source(CROP_START), ops.source(CROP_END)
    if not layout.train:  # eval regions are in pixels (of the decoded window, or of the whole image)
        return ops.normalize(ops.crop(img, size, start, end, relative=False), *norm)
    # uint8 out of the resize, as the reference's RandAugment sees it (Posterize and Solarize are defined on
    # integer levels), then float for RandAugment's and mix's kernels (see randaugment.py)
    img = fn.cast(ops.crop(img, size, start, end, relative=layout.roi_decode), dtype=types.FLOAT)
    return _augment(img, size, augment, layout)


def _define_from_host(augment: AugmentSpec, layout: Layout):
    """The graph after the host's crop-decode-resize: uint8 HWC images at the stage size come in."""
    img = ops.source(IMG)
    size = ops.source(SIZE) if layout.branchless else None
    if not layout.train:
        return ops.normalize(img, augment.mean, augment.std, augment.channels_last)
    return _augment(fn.cast(img, dtype=types.FLOAT), size, augment, layout)


def _augment(img, size, augment: AugmentSpec, layout: Layout):
    """Train: RandAugment, mixing and normalizing of float HWC images at the stage size."""
    layers = augment.randaug_layers or 0
    if layers:
        img = ops.randaugment(img, augment.randaug, layers, branchless=layout.branchless, compact=layout.compact,
                              size=size)
    if layout.branchless:
        img = ops.mix_branchless(img, ops.mix_inputs(branchless=True))
    else:
        img = ops.mix(img, ops.mix_inputs(), compact=layout.compact)
    return ops.normalize(img, augment.mean, augment.std, augment.channels_last)


@pipeline_def(enable_conditionals=True)
def _graph_conditional(augment: AugmentSpec, layout: Layout, hints: dict):
    return _define(augment, layout, hints)


@pipeline_def
def _graph_plain(augment: AugmentSpec, layout: Layout, hints: dict):
    return _define(augment, layout, hints)


def _pipeline_kwargs(engine: EngineSpec) -> dict:
    from nvidia.dali.pipeline import OperatorConcurrency, StreamPolicy

    out = {}
    if engine.stream_policy is not None:
        out["stream_policy"] = StreamPolicy[engine.stream_policy.upper()]
    if engine.concurrency is not None:
        out["concurrency"] = OperatorConcurrency[engine.concurrency.upper()]
    return out


def decoder_hints(engine: EngineSpec) -> dict:
    return {"hw_decoder_load": engine.hw_decoder_load, "preallocate_width_hint": engine.preallocate_width_hint,
            "preallocate_height_hint": engine.preallocate_height_hint}


def define_pipeline(augment: AugmentSpec, layout: Layout, engine: EngineSpec, *, batch_size: int, num_threads: int,
                    device_id: int | None, depth: int, seed: int):
    """The pipeline object, not yet built (device_id=None: DALI's CPU-only mode)."""
    graph = _graph_conditional if layout.conditionals else _graph_plain
    return graph(
        augment, layout, decoder_hints(engine),
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,  # no DALI random op is used; set anyway so nothing depends on the default
        prefetch_queue_depth=depth,
        exec_async=True,
        exec_pipelined=True,
        **_pipeline_kwargs(engine),
    )


def build_pipeline(augment: AugmentSpec, layout: Layout, engine: EngineSpec, *, batch_size: int, num_threads: int,
                   device_id: int | None, depth: int, seed: int):
    """A built pipeline fed with `feed_input` and driven by `schedule_run` / `outputs`.

    depth: batches one pipeline may hold in flight (its prefetch queue).
    """
    pipe = define_pipeline(augment, layout, engine, batch_size=batch_size, num_threads=num_threads,
                           device_id=device_id, depth=depth, seed=seed)
    pipe.build()
    return pipe


@pipeline_def
def _probe_graph(layout: Layout, hints: dict):
    jpg = ops.source(JPG)
    window = ops.source(WINDOW) if layout.roi_decode else None
    return ops.decode(jpg, window, layout.gpu, hints)


def build_probe(layout: Layout, engine: EngineSpec, *, batch_size: int, device_id: int | None):
    """A decode-only pipeline with the main graph's decoder, to find the samples a failed batch cannot decode."""
    pipe = _probe_graph(layout, decoder_hints(engine), batch_size=batch_size, num_threads=1, device_id=device_id,
                        seed=0, prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    pipe.build()
    return pipe


# ---------------------------------------------------------------- operator count
def count_ops(pipe) -> Counter:
    """Operators of a pipeline, by (schema name, device), read from DALI's own serialized definition.

    `Pipeline.serialize()` returns the PipelineDef protobuf (dali/pipeline/proto/dali.proto:
    field 5 is the repeated OpDef; an OpDef's field 1 is the schema name and its "device"
    argument, field 4, the backend). It needs no GPU: a GPU graph defined with device_id=None
    serializes here without being built.
    """
    counts: Counter = Counter()
    for field, value in _fields(pipe.serialize()):
        if field == 5:
            name, device = "", "cpu"
            for f, v in _fields(value):
                if f == 1:
                    name = v.decode()
                elif f == 4:
                    arg = dict((af, av) for af, av in _fields(v) if af in (1, 5))
                    if arg.get(1) == b"device" and 5 in arg:
                        device = arg[5].decode()
            counts[(name, device)] += 1
    return counts


def graph_op_count(augment: AugmentSpec, layout: Layout, engine: EngineSpec | None = None,
                   batch_size: int = 256) -> Counter:
    """`count_ops` of the graph a layout gives, without building it (so a GPU layout can be counted on a CPU)."""
    pipe = define_pipeline(augment, layout, engine or EngineSpec(), batch_size=batch_size, num_threads=1,
                           device_id=None, depth=1, seed=0)
    return count_ops(pipe)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, payload) of each top-level protobuf field; length-delimited payloads as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in DALI's serialized pipeline")
        yield key >> 3, value
