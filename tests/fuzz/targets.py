"""Fuzz cases run against one C extension in this process: the child of a campaign (tests/fuzz/campaign.py).

A case is (target, JPEG bytes, params): params are the call's other arguments, drawn as the callers draw
them (a crop inside the frame the header claims, a target size), with a few hostile ones (NaN or empty
regions, sizes past the limits) that must raise ValueError. The property, per case: the call returns
(decoded or failed, for decode_batch; bytes or None, for reencode) or raises ValueError; it writes nothing
outside its own part of the output; and no sanitizer report, hang or memory blow-up (the campaign watches
those). A case is a function of (seed, index), so any case can be made again.

    python -m tests.fuzz.targets --corpus tests/fuzz/build/corpus --target cropdecode \
        --so tests/fuzz/build/_cropdecode-asan.so --seed 1 --seconds 10
    python -m tests.fuzz.targets --corpus tests/fuzz/build/corpus --replay tests/fuzz/regressions  # the normal build

Imports only numpy, the header reader and the extension (not the package, whose torch and DALI would take
~550 MB), so that the campaign's memory bound measures the decoders.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import mmap
import random
import resource
import struct
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from stagewise.shards.jpeg import JpegHeaderError, read_frame_header
from tests.fuzz import mutate

REPO = Path(__file__).resolve().parents[2]
SOURCES = {"cropdecode": REPO / "loaders" / "_cropdecode.c", "jpegraw": REPO / "pipeline" / "_jpegraw.c"}

TARGETS = ("cropdecode", "jpegraw")
STATE_BYTES = 4 << 20  # the case in progress, for the campaign to keep if this process dies on it
HARNESS_ERROR = 4  # exit status: the harness itself failed (a campaign stops rather than keep a regression)
HEADER = struct.Struct("<qqII")  # cases begun by this process, case index (-1: replayed), params JSON bytes, data bytes


class PropertyFailure(Exception):
    """The call broke the property without crashing (a wrong exception, a write outside its part)."""


def installed(target: str) -> Path | None:
    """The normal build of the extension, built in place next to its source (`pip install -e .`)."""
    source = SOURCES[target]
    return next(iter(sorted(source.parent.glob(f"{source.stem}.*.so"))), None)


def load(target: str, so: str | Path | None):
    """The extension: the sanitizer build at `so`, or the installed one."""
    so = so or installed(target)
    if so is None:
        raise ImportError(f"{SOURCES[target]} is not built")
    spec = importlib.util.spec_from_file_location(f"_{target}", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _frame(data: bytes, rng: random.Random) -> tuple[int, int]:
    """(height, width) as the loader would see them: from the header, or made up when it does not parse."""
    try:
        frame = read_frame_header(data)
        return frame.height, frame.width
    except JpegHeaderError:
        return rng.randint(1, 80), rng.randint(1, 80)


def draw_params(rng: random.Random, target: str, data: bytes) -> dict:
    h, w = _frame(data, rng)
    hostile = rng.random() < 0.03
    params = {"avx2": rng.random() < 0.5, "max_pixels": rng.choice((0, 0, 0, 1000, 10**7)), "hostile": hostile}
    if target == "cropdecode":
        y0 = rng.uniform(0, h * 0.9)
        y1 = rng.uniform(y0 + min(1, h - y0), h) if rng.random() < 0.9 else rng.uniform(y0 + 0.5, h * 1.5 + 1)
        x0 = rng.uniform(0, w * 0.9)
        x1 = rng.uniform(x0 + min(1, w - x0), w) if rng.random() < 0.9 else rng.uniform(x0 + 0.5, w * 1.5 + 1)
        if rng.random() < 0.3:
            x0, x1 = x1, x0  # mirrored
        bounds = [0, 0, h, w] if rng.random() < 0.3 else [y0, min(x0, x1), y1, max(x0, x1)]
        region = [y0, x0, y1, x1, *bounds]
        if hostile:
            k = rng.randrange(8)
            region[k] = rng.choice((math.nan, math.inf, -math.inf, 1e300, -1e300, 2e6))
            if rng.random() < 0.3:
                region[2] = region[0]  # empty
        params.update(size=rng.choice((1, 2, 7, 16, 33)), region=region)
        if hostile and rng.random() < 0.3:
            params["size"] = rng.choice((0, 65501, 2**31))
    else:
        scale = rng.choice((1.0, 0.5, 0.3, 0.1))
        params.update(width=max(1, round(w * scale)) if w * scale < 200 else rng.randint(1, 64),
                      height=max(1, round(h * scale)) if h * scale < 200 else rng.randint(1, 64),
                      denom=rng.choice((1, 1, 2, 4, 8)), quality=rng.randint(1, 100))
        if hostile:  # a value outside the field's range
            field = rng.choice(("width", "height", "denom", "quality", "max_pixels"))
            params[field] = rng.choice({"width": (0, -1, 65501, 2**31 - 1), "height": (0, -1, 65501, 2**31 - 1),
                                        "denom": (0, 3, -1, 16), "quality": (0, 101, -1),
                                        "max_pixels": (-1, -2**40)}[field])
    return params


def make_case(target: str, seed: int, index: int, seeds: list[bytes]) -> tuple[bytes, dict]:
    rng = random.Random(seed * 1_000_003 + index)
    data = mutate.mutate(rng, rng.choice(seeds))
    return data, draw_params(rng, target, data)


def run_case(module, target: str, data: bytes, params: dict) -> str:
    """One call; 'decoded', 'failed' or 'refused' (ValueError), or PropertyFailure."""
    module.use_avx2(params["avx2"])
    try:
        if target == "cropdecode":
            size = params["size"]
            out = np.full((3, max(size, 1) if size < 65501 else 1, max(size, 1) if size < 65501 else 1, 3), 0xA5,
                          np.uint8)
            if size == 0 or size >= 65501:  # an output buffer of a size no caller may ask for: its shape is checked
                out = np.full((3, 0 if size == 0 else 65501, 1, 3), 0xA5, np.uint8)
            regions = np.zeros((3, 8), np.float64)
            regions[1] = params["region"]
            regions[0] = regions[2] = (0, 0, 1, 1, 0, 0, 1, 1)
            failed = module.decode_batch([b"", data, b""], regions, out, 1, 2, params["max_pixels"])
            if out.size and not (np.all(out[0] == 0xA5) and np.all(out[2] == 0xA5)):
                raise PropertyFailure("decode_batch wrote outside out[1:2]")
            if params["hostile"]:
                raise PropertyFailure(f"decode_batch took hostile arguments {params}")
            return "failed" if failed else "decoded"
        jpg = module.reencode(data, params["width"], params["height"], params["denom"], params["quality"],
                              params["max_pixels"])
        if params["hostile"]:
            raise PropertyFailure(f"reencode took hostile arguments {params}")
        if jpg is not None:
            frame = read_frame_header(jpg)
            if (frame.width, frame.height) != (params["width"], params["height"]):
                raise PropertyFailure(f"reencode made {frame.width}x{frame.height}, not the size asked for")
            return "decoded"
        return "failed"
    except ValueError as exc:
        if target == "cropdecode" and not params["hostile"] and "region" in str(exc):
            raise PropertyFailure(f"decode_batch refused a valid region: {exc}") from None
        return "refused"


def replay_cases(paths: list[Path]) -> list[tuple[str, str, bytes, dict]]:
    """(name, target, data, params) of every kept case under `paths` (a .jpg with its .json)."""
    cases = []
    for path in paths:
        for jpg in sorted(path.glob("*.jpg")) if path.is_dir() else [path]:
            meta = json.loads(jpg.with_suffix(".json").read_text())
            cases.append((jpg.name, meta["target"], jpg.read_bytes(), meta["params"]))
    return cases


def fixed_cases(target: str, corpus: Path) -> list[tuple[str, str, bytes, dict]]:
    """Every seed and hostile case (corpus/seeds, corpus/hostile: `corpus.write_corpus`), with plain arguments."""
    cases = []
    for path in sorted(corpus.glob("*/*.jpg")):
        name, data = path.name, path.read_bytes()
        rng = random.Random(name)
        params = draw_params(rng, target, data)
        params["hostile"] = False
        if target == "cropdecode":
            params["region"] = [0, 0, 1, 1, 0, 0, 1, 1]
        else:
            params.update(width=16, height=12, denom=1, quality=90)
        cases.append((name, target, data, params))
    return cases


class State:
    """The case in progress, in a file the campaign maps too."""

    def __init__(self, path: str) -> None:
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), STATE_BYTES)
        self.begun = 0

    def write(self, index: int, target: str, data: bytes, params: dict) -> None:
        meta = json.dumps({"target": target, "params": params}).encode()
        data = data[: STATE_BYTES - HEADER.size - len(meta)]
        self.map[HEADER.size : HEADER.size + len(meta)] = meta
        self.map[HEADER.size + len(meta) : HEADER.size + len(meta) + len(data)] = data
        self.begun += 1
        HEADER.pack_into(self.map, 0, self.begun, index, len(meta), len(data))


def read_state(path: str) -> tuple[int, int, dict, bytes]:
    """(cases begun, index, {"target", "params"}, data) of the last case a child began."""
    with open(path, "rb") as f:
        begun, index, meta_len, data_len = HEADER.unpack(f.read(HEADER.size))
        meta = json.loads(f.read(meta_len) or b"{}")
        return begun, index, meta, f.read(data_len)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True, help="seeds/ and hostile/ (`corpus.write_corpus`)")
    ap.add_argument("--target", choices=TARGETS)
    ap.add_argument("--so", help="the sanitizer build of the extension (default: the installed one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--seconds", type=float, default=0.0, help="mutated cases for this long (after the replay)")
    ap.add_argument("--state", help="file for the case in progress (the campaign's)")
    ap.add_argument("--replay", type=Path, nargs="*", default=[], help="kept cases (.jpg + .json) to run first")
    ap.add_argument("--fixed", action="store_true", help="run the seeds and hostile cases first")
    args = ap.parse_args(argv)
    targets = [args.target] if args.target else list(TARGETS)
    modules = {t: load(t, args.so) for t in targets}
    state = State(args.state) if args.state else None
    outcomes: dict[str, int] = {}

    def one(index: int, target: str, data: bytes, params: dict) -> None:
        if state:
            state.write(index, target, data, params)
        outcome = run_case(modules[target], target, data, params)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    try:
        kept = [c for c in replay_cases(args.replay) if c[1] in targets]
        kept += [c for t in targets for c in fixed_cases(t, args.corpus)] if args.fixed else []
        for _, target, data, params in kept:
            one(-1, target, data, params)
        index, seeds = args.start, [p.read_bytes() for p in sorted((args.corpus / "seeds").glob("*.jpg"))]
        mutate.SPLICE_FROM[:] = seeds
        deadline = time.monotonic() + args.seconds
        while args.target and time.monotonic() < deadline:
            for _ in range(32):
                try:
                    data, params = make_case(args.target, args.seed, index, seeds)
                except Exception:  # noqa: BLE001 - a bug of this harness, not of the extension: no regression
                    print(json.dumps({"harness": traceback.format_exc()}), flush=True)
                    return HARNESS_ERROR
                one(index, args.target, data, params)
                index += 1
    except PropertyFailure as exc:
        print(json.dumps({"property": str(exc)}), flush=True)
        return 3
    mutated = index - args.start
    print(json.dumps({"kept": len(kept), "mutated": mutated, "next": index, "outcomes": outcomes,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
